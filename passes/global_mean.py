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
    its loss) and the global batch is split into more than one piece, it returns a
    :class:`GlobalMeanLoss`. Its :meth:`~GlobalMeanLoss.rewrite` changes the module that
    computes the loss (the last pipeline stage, or each replica's program) in place: the
    loss sums (``reduction="sum"``) and is divided by the buffer ``global_loss_normaliser``
    (``divide_by_global_normaliser``). Before each step the runner calls
    :meth:`~GlobalMeanLoss.set_batch` with the global batch (every rank receives it whole)
    and the buffer becomes the whole batch's normaliser: the sum, over the microbatches, of
    a small graph copied from the loss's target and weight arguments, so targets that the
    graph slices or reshapes (``labels[:, 1:]``) are counted as the loss sees them. No
    communication; the normaliser carries no gradient, as in torch. The pieces of every
    microbatch and replica now add up to torch's mean, so the runners treat them as a
    summed loss (``loss_reduction="sum"``: no division by the microbatch count, the
    replicas' gradient average undone by their count).

    Under tensor parallelism the generated code is rewritten the same way: a batch-parallel
    ``divide_by_kept_targets`` (the microbatch's normaliser, all-reduced over "tp") divides
    by the global normaliser instead, and a vocabulary-parallel cross entropy sums; a
    ``reduce_from_tp`` after the loss is a sum over "tp" and stays.

Not here
    A loss partc does not trace (``loss_fn`` applied to the outputs) is the caller's: its
    microbatch means are averaged, as DDP averages replicas (compile's docstring gives the
    exact alternatives). A class-index "mean" that is not the graph's result (``ce + aux``)
    is left as it is, with a warning. Targets or class weights computed from trainable
    parameters are refused: the normaliser could not be computed before the step (and
    torch differentiates a trainable weight's normaliser under label smoothing).
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from partc.errors import PartcError, PlanMismatchError
from partc.passes.ir import META_KEY, canonical_name, error_context, node_info
from partc.passes.layouts import bind_loss_arguments
from partc.runtime import collectives as C
from partc.runtime.pipeline import split_microbatches

PASS_NAME = "global_mean"
NORMALISER_BUFFER = "global_loss_normaliser"  # a non-persistent buffer of the rewritten module
_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)


@dataclass
class GlobalMeanLoss:
    """The graph's class-index loss, taken over the whole global batch (see the module doc)."""

    counter: fx.GraphModule  # one microbatch's graph inputs -> its normaliser (float64)
    pieces: int  # microbatches times replicas the global batch is split into
    holder: nn.Module | None = field(default=None, repr=False)  # the module rewrite() changed

    def rewrite(self, gm: fx.GraphModule) -> None:
        """Make ``gm``'s loss (its result, or the value a ``reduce_from_tp`` sums into its
        result) a sum divided by the buffer :data:`NORMALISER_BUFFER`."""
        graph = gm.graph
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        loss = output.args[0]
        while isinstance(loss, fx.Node) and loss.target is C.reduce_from_tp:
            loss = loss.args[0]  # a sum over "tp": dividing before or after it is the same
        if not isinstance(loss, fx.Node) or loss.op != "call_function":
            raise PlanMismatchError(
                f"the plan takes the loss's mean over the global batch, but {gm.__class__.__name__} returns {output.args[0]!r}",
                error_context(output, PASS_NAME, fix="rewrite the module the plan's graph was cut into"),
            )
        if loss.target is C.divide_by_kept_targets:  # batch-parallel under tensor parallelism
            summed = loss.args[0]
        elif loss.target is C.vocab_parallel_cross_entropy:
            loss.update_kwarg("reduction", "sum")
            summed = loss
        elif loss.target in _CLASS_LOSSES:
            bound = bind_loss_arguments(canonical_name(loss), loss.args, loss.kwargs)
            loss.args = (bound.pop("input"), bound.pop("target"))
            loss.kwargs = {**bound, "reduction": "sum"}
            summed = loss
        else:
            raise PlanMismatchError(
                f"the plan takes the mean of a cross_entropy / nll_loss over the global batch, but the module computes its loss with {loss.format_node()}",
                error_context(loss, PASS_NAME, fix="rewrite the module the plan's graph was cut into"),
            )
        gm.register_buffer(NORMALISER_BUFFER, torch.zeros((), dtype=torch.float64), persistent=False)
        with graph.inserting_after(summed):
            normaliser = graph.get_attr(NORMALISER_BUFFER)
        with graph.inserting_after(normaliser):
            mean = graph.create_node("call_function", C.divide_by_global_normaliser, (summed, normaliser), name=f"{summed.name}_global_mean")
        for new in (normaliser, mean):
            new.meta = {k: v for k, v in loss.meta.items() if k != "val"}  # its layer, for recomputation
        loss.replace_all_uses_with(mean, delete_user_cb=lambda user: user is not mean)
        if loss is not summed:
            graph.erase_node(loss)  # divide_by_kept_targets and its all-reduce of the normaliser
        graph.lint()
        gm.recompile()
        self.holder = gm

    def set_batch(self, graph_inputs: Sequence[Any]) -> None:
        """Set the normaliser to the whole global batch's, from its inputs (and targets) in
        the graph's order."""
        if self.holder is None:
            raise PartcError("GlobalMeanLoss.set_batch before rewrite(): no module divides by the normaliser")
        chunks = [split_microbatches(x, self.pieces, what="the global batch") for x in graph_inputs]
        total = sum(self.counter(*(chunk[k] for chunk in chunks)) for k in range(self.pieces))
        self.holder.get_buffer(NORMALISER_BUFFER).copy_(total)


def global_mean_loss(gm: fx.GraphModule, pieces: int) -> GlobalMeanLoss | None:
    """A :class:`GlobalMeanLoss` for the planned graph ``gm`` (with the loss in it) run in
    ``pieces`` microbatches over all replicas; None when the graph's result needs none
    (one piece, a sum, a loss over probabilities or of another kind)."""
    if pieces == 1:
        return None
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    loss = output.args[0]
    if not _is_class_index_mean(loss):
        inner = [n for n in gm.graph.nodes if _is_class_index_mean(n)]
        if inner:
            context = error_context(inner[0], PASS_NAME)
            warnings.warn(
                f"{inner[0].name} ({context.source or context.module}) takes a 'mean' over class indices inside a larger loss: partc averages it per microbatch and replica,"
                " which is torch's mean only when every piece of the batch keeps as many targets (ignore_index) or class weight",
                stacklevel=2,
            )
        return None
    bound = bind_loss_arguments(canonical_name(loss), loss.args, loss.kwargs)
    bound.pop("input")
    return GlobalMeanLoss(_counter(gm, loss, bound), pieces)


def _is_class_index_mean(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _CLASS_LOSSES:
        return False
    bound = bind_loss_arguments(canonical_name(node), node.args, node.kwargs)
    target = bound.get("target")
    floating = isinstance(target, fx.Node) and META_KEY in target.meta and node_info(target).dtype is not None and node_info(target).dtype.is_floating_point
    return bound["reduction"] == "mean" and not floating


def _counter(gm: fx.GraphModule, loss: fx.Node, bound: dict[str, Any]) -> fx.GraphModule:
    """A GraphModule taking the graph's inputs (one microbatch of them) and returning the
    loss's normaliser: the nodes its target, weight and ignore_index are computed from,
    copied, then ``kept_target_normaliser``."""
    cone: set[fx.Node] = set()
    todo = [a for a in (bound.get("target"), bound.get("weight"), bound.get("ignore_index")) if isinstance(a, fx.Node)]
    while todo:
        n = todo.pop()
        if n not in cone:
            cone.add(n)
            todo.extend(n.all_input_nodes)
    for n in cone:
        attribute = operator.attrgetter(n.target)(gm) if n.op == "get_attr" else None
        trainable = isinstance(attribute, torch.Tensor) and attribute.requires_grad
        if trainable or (META_KEY in n.meta and node_info(n).requires_grad):
            raise PartcError(
                f"the targets or class weights of {loss.name} depend on a trainable parameter ({n.name}): partc cannot count the global batch's kept targets before the step",
                error_context(loss, PASS_NAME, fix="compute targets and class weights from the inputs and buffers only, or trace no loss and divide a summed loss yourself (loss_reduction='sum')"),
            )
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in cone:
            env[n] = graph.node_copy(n, env.__getitem__)
    arguments = {key: fx.node.map_arg(bound[key], env.__getitem__) for key in ("weight", "ignore_index") if bound.get(key) is not None}
    graph.output(graph.call_function(C.kept_target_normaliser, (env[bound["target"]],), arguments))
    return fx.GraphModule(gm, graph, class_name="KeptTargets")

