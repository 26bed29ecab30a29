"""Global-mean pass: a traced loss's "mean" over the whole global batch, not per microbatch.

Why
    torch's ``reduction="mean"`` of ``cross_entropy`` / ``nll_loss`` over class indices
    divides the summed loss by the batch's normaliser: the number of targets that are not
    ``ignore_index``, or the sum of their class weights
    (:func:`partc.runtime.collectives.kept_target_normaliser`). A step split into
    microbatches and data-parallel replicas cannot average their means (each microbatch's
    divided by the microbatch count, the replicas' gradients averaged by DDP or FSDP2):
    that is the mean only when every piece keeps the same number of targets, and padded
    labels (HF's -100) rarely do.

What
    :func:`global_mean_loss` looks at the planned graph. When it returns such a loss (the
    ``loss_fn`` that compile's ``example_targets`` traced, or a model whose forward returns
    its loss; ``F.cross_entropy`` / ``F.nll_loss`` or torch.export's aten overloads, under
    casts and ``*`` or ``/`` by a number) and the global batch is split into more than one
    piece, it returns a :class:`GlobalMean`: the counter, a small graph copied from the
    nodes that compute the loss's target, weight and ignore_index (with those that write
    into them in place), then ``kept_target_normaliser``, so targets that the graph slices
    or masks (``labels[:, 1:]``) are counted as the loss sees them. Its
    :meth:`~GlobalMean.rewrite` changes the module that computes the loss in place (the
    last pipeline stage; in a replica, ``loss_fn``'s own graph when the mean is
    ``loss_fn``'s and the user's model runs, :func:`partc.passes.capture.traced_loss`,
    else the replica's program): the loss sums and is divided by the buffer
    ``global_loss_normaliser`` (``divide_by_global_normaliser``), and returns the step-time
    :class:`partc.runtime.loss_normaliser.GlobalLossNormaliser` that sets it from the global batch before each step (no communication; no gradient, as in torch). The
    pieces of every microbatch and replica now add up to torch's mean, so the runners treat
    them as a summed loss (``loss_reduction="sum"``).

    Under tensor parallelism the generated code is rewritten the same way: a batch-parallel
    ``divide_by_kept_targets`` (the microbatch's normaliser, all-reduced over "tp") divides
    by the global normaliser instead, and a vocabulary-parallel cross entropy sums; a
    ``reduce_from_tp`` after the loss is a sum over "tp" and stays. (The plan's
    ``collectives_per_step()`` still counts the removed all-reduce.)

Not here
    These keep each piece's mean, averaged as DDP averages replicas, with a warning naming
    the node and the exact alternatives: a loss partc does not trace (``loss_fn`` applied
    to the outputs; a model computing its loss compiled without ``example_targets``), a
    class-index "mean" that is not the graph's result (``ce + aux``), and targets or
    weights drawn at random in forward (BERT-style masking: counting them ahead of the
    step would draw other ones and move the random generator). Targets or class weights
    computed from trainable parameters are refused: the normaliser could not be computed
    before the step (and torch differentiates a trainable weight's normaliser under label
    smoothing).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from partc.errors import PartcError, PlanMismatchError
from partc.passes.capture import LOSS_FN_KEY
from partc.passes.ir import META_KEY, canonical_name, error_context, graph_info, node_info, op_kind
from partc.passes.layouts import class_index_mean, class_loss_arguments, sum_class_loss
from partc.runtime import collectives as C
from partc.runtime.loss_normaliser import NORMALISER_BUFFER, PASS_NAME, GlobalLossNormaliser

# The exact ways to torch's mean when partc keeps the per-piece one (warnings name them).
ALTERNATIVES = (
    "for torch's mean over the whole batch, mask the labels in the data pipeline (not in forward) and pass example_targets,"
    " or return the loss with reduction='sum' and divide it by your own count of the whole batch's kept targets, with loss_reduction='sum'"
)
# Scalar wrappers that commute with dividing the loss: a cast, or * or / by a Python number.
_CASTS = frozenset(("float", "double", "half", "bfloat16", "to", "_to_copy", "type_as"))
_MULTIPLY = frozenset((operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar))
_DIVIDE = frozenset((operator.truediv, torch.div, torch.true_divide, torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar))


@dataclass
class GlobalMean:
    """The graph's class-index loss, to be taken over the whole global batch (module doc)."""

    counter: fx.GraphModule  # one piece's graph inputs -> its normaliser (float64)
    pieces: int  # microbatches times replicas the global batch is split into
    in_loss_fn: bool  # the mean is computed by compile's loss_fn, not by the model (capture.traced_loss rewrites)

    def rewrite(self, gm: fx.GraphModule, state: nn.Module | None = None) -> GlobalLossNormaliser:
        """Make ``gm``'s loss (its result, under ``reduce_from_tp`` and scalar wrappers) a
        sum divided by the buffer :data:`NORMALISER_BUFFER`; the returned object sets it.
        state: the module holding the tensors the counter reads, when ``gm`` does not (``gm``
        is loss_fn alone, the counter reads the model's buffers)."""
        graph = gm.graph
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        loss = _peel(output.args[0], C.reduce_from_tp)  # a sum over "tp": dividing before or after it is the same
        if isinstance(loss, fx.Node) and loss.target is C.divide_by_kept_targets:  # batch-parallel under tp
            summed = loss.args[0]
        elif isinstance(loss, fx.Node) and loss.target is C.vocab_parallel_cross_entropy:
            loss.update_kwarg("reduction", "sum")
            summed = loss
        elif class_loss_arguments(loss) is not None:
            sum_class_loss(loss)
            summed = loss
        else:
            raise PlanMismatchError(
                f"the plan takes the mean of a cross_entropy / nll_loss over the global batch, but {type(gm).__name__} returns {output.args[0]!r}",
                error_context(output, PASS_NAME, fix="rewrite the module the plan's graph was cut into"),
            )
        gm.register_buffer(NORMALISER_BUFFER, torch.zeros((), dtype=torch.float64), persistent=False)
        with graph.inserting_after(summed):
            normaliser = graph.get_attr(NORMALISER_BUFFER)
        with graph.inserting_after(normaliser):
            mean = graph.create_node("call_function", C.divide_by_global_normaliser, (summed, normaliser), name=f"{summed.name}_global_mean")
        for new in (normaliser, mean):
            _bookkeeping(new, like=loss)
        loss.replace_all_uses_with(mean, delete_user_cb=lambda user: user is not mean)
        if loss is not summed:
            graph.erase_node(loss)  # divide_by_kept_targets and its all-reduce of the normaliser
        graph.lint()
        gm.recompile()
        return GlobalLossNormaliser(self.counter, self.pieces, gm, state=state)


def global_mean_loss(gm: fx.GraphModule, pieces: int, *, targets_traced: bool = True) -> GlobalMean | None:
    """A :class:`GlobalMean` for the planned graph ``gm`` run in ``pieces`` microbatches
    over all replicas; None when the graph's result needs none (one piece, a sum, a loss
    over probabilities or of another kind) or when partc cannot count the normaliser
    ahead of the step (a warning then says so, with the alternatives).

    targets_traced: compile's ``example_targets`` traced ``loss_fn`` into ``gm``. Without
    them the runners apply ``loss_fn`` to each piece's output: a class-index mean that the
    model computes itself is then averaged per piece, with a warning."""
    if pieces == 1:
        return None
    means = [n for n in gm.graph.nodes if class_index_mean(n) is not None]
    if not means:
        return None
    if not targets_traced:
        _warn_per_piece_mean(means[0], "in a graph compiled without example_targets (the runner applies loss_fn to each piece's output)")
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    loss = _peel(output.args[0])
    bound = class_index_mean(loss)
    if bound is None:
        _warn_per_piece_mean(means[0], "inside a larger loss")
        return None
    cone = _target_cone(loss, bound)
    for n in cone:
        attribute = operator.attrgetter(n.target)(gm) if n.op == "get_attr" else None
        trainable = isinstance(attribute, torch.Tensor) and attribute.requires_grad
        if trainable or (META_KEY in n.meta and node_info(n).requires_grad):
            raise PartcError(
                f"the targets or class weights of {loss.name} depend on a trainable parameter ({n.name}): partc cannot count the global batch's kept targets before the step",
                error_context(loss, PASS_NAME, fix="compute targets and class weights from the inputs and buffers only, or trace no loss and divide a summed loss yourself (loss_reduction='sum')"),
            )
    random = next((n for n in gm.graph.nodes if n in cone and _is_random(n)), None)
    if random is not None:
        source = error_context(random, PASS_NAME)
        _warn_per_piece_mean(
            loss,
            f"with targets or class weights drawn at random ({random.name}, {source.source or source.module or 'no source line'}):"
            " counting them ahead of the step would draw other ones",
        )
        return None
    return GlobalMean(_counter(gm, cone, bound), pieces, in_loss_fn=bool(loss.meta.get(LOSS_FN_KEY)))


def runs_graph_for_global_mean(gm: fx.GraphModule) -> bool:
    """Whether partc.compile runs the captured graph (one FSDP2 unit, which the search
    prices), not the user's module, to divide ``gm``'s loss by the global batch's
    normaliser once the batch is split: when the model computes that loss itself. A mean
    that loss_fn computes is rewritten in loss_fn alone (``capture.traced_loss``), the
    model sharded block by block. Quiet: the warnings are compile's to give."""
    if not graph_info(gm).loss_in_graph:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mean = global_mean_loss(gm, 2)
        except PartcError:
            return False  # compile refuses this loss with the reason
    return mean is not None and not mean.in_loss_fn


def _warn_per_piece_mean(node: fx.Node, why: str) -> None:
    context = error_context(node, PASS_NAME)
    warnings.warn(
        f"{node.name} ({context.source or context.module or 'no source line'}) takes a 'mean' over class indices {why}: partc averages it per"
        f" microbatch and replica, which is torch's mean only when every piece of the batch keeps as many targets (ignore_index) or class weight; {ALTERNATIVES}",
        stacklevel=3,
    )


def _peel(value: Any, *also: Any) -> Any:
    """The node under the scalar wrappers (and the targets ``also``) that ``value`` applies
    to a loss: casts, and multiplication or division by a Python number."""
    while isinstance(value, fx.Node) and value.op in ("call_function", "call_method"):
        args = value.args
        if value.target in also or canonical_name(value) in _CASTS:
            value = args[0]
        elif value.target in _MULTIPLY and len(args) == 2 and not value.kwargs and isinstance(args[1], (int, float)):
            value = args[0]
        elif value.target in _MULTIPLY and len(args) == 2 and not value.kwargs and isinstance(args[0], (int, float)):
            value = args[1]
        elif value.target in _DIVIDE and len(args) == 2 and not value.kwargs and isinstance(args[1], (int, float)):
            value = args[0]
        else:
            break
    return value


def _is_random(node: fx.Node) -> bool:
    """True for an operator that draws from the random generator (torch.rand, bernoulli,
    dropout, multinomial, ...): aten's ``nondeterministic_seeded`` tag, of the overload or
    of the aten operator the function or method is named after."""
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in node.target.tags
    packet = getattr(torch.ops.aten, canonical_name(node), None)
    overloads = packet.overloads() if isinstance(packet, torch._ops.OpOverloadPacket) else ()
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, o).tags for o in overloads)


def _writes_first_argument(node: fx.Node) -> bool:
    """``labels[mask] = -100``, ``labels.masked_fill_(...)``: the node changes its first argument."""
    if node.target is operator.setitem:
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if isinstance(node.target, torch._ops.OpOverload):
        arguments = node.target._schema.arguments
        return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
    return False


def _target_cone(loss: fx.Node, bound: dict[str, Any]) -> set[fx.Node]:
    """The nodes the loss's target, weight and ignore_index are computed from, with the
    nodes that write into any of them in place before the loss reads them."""
    position = {n: i for i, n in enumerate(loss.graph.nodes)}
    cone: set[fx.Node] = set()
    todo = [a for a in (bound.get("target"), bound.get("weight"), bound.get("ignore_index")) if isinstance(a, fx.Node)]
    while todo:
        n = todo.pop()
        if n in cone:
            continue
        cone.add(n)
        todo.extend(n.all_input_nodes)
        todo.extend(user for user in n.users if position[user] < position[loss] and _writes_first_argument(user) and user.args[0] is n)
    return cone


def _counter(gm: fx.GraphModule, cone: set[fx.Node], bound: dict[str, Any]) -> fx.GraphModule:
    """A GraphModule taking the graph's inputs (one piece of them) and returning the loss's
    normaliser: the cone's nodes, copied in graph order, then ``kept_target_normaliser``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in cone:
            env[n] = graph.node_copy(n, env.__getitem__)
    arguments = {key: fx.node.map_arg(bound[key], env.__getitem__) for key in ("weight", "ignore_index") if bound.get(key) is not None}
    graph.output(graph.call_function(C.kept_target_normaliser, (env[bound["target"]],), arguments))
    return fx.GraphModule(gm, graph, class_name="KeptTargets")


def _bookkeeping(new: fx.Node, like: fx.Node) -> None:
    """``new``'s annotation: ``like``'s layer and module (recomputation and the stage cut
    read them), none of its costs."""
    if META_KEY in like.meta:
        info = node_info(like)
        new.meta[META_KEY] = replace(
            info, op=op_kind(new), name=canonical_name(new), fwd_flops=0, bwd_flops=0, bytes_moved=0, param_bytes=0, param_numel=0, activation_bytes=0, requires_grad=new.op != "get_attr" and info.requires_grad
        )
