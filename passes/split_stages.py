"""Split-stages pass: cut the annotated graph into one GraphModule per pipeline stage.

Input: the captured graph and, for every layer, the stage it belongs to (the stage
partition's answer). Output: a list of :class:`StageModule`, one per stage, each a new
``fx.GraphModule`` (the input graph is not changed).

What crosses a cut
    Stage ``s`` receives, as positional arguments, every tensor that was produced before
    it (by an earlier stage, or a user input) and is used by stage ``s`` or later, in
    graph order; it returns, as a tuple, every tensor produced by it or before it that a
    later stage uses. So a skip connection spanning stages, or an input that only the
    last stage reads, is relayed through the stages between. Stage 0 receives the user's
    inputs; the last stage returns the model's output. Python values that cross a cut
    (``B, T = x.size()`` computed in one stage, used in the next) cannot travel through
    ``torch.distributed.pipelining``; they are computed here for the microbatch shapes and
    written into the consuming stage as constants. A stage that writes one of its inputs
    in place (``x.mul_(0.5)``) writes a copy: torch's pipeline stages receive their inputs
    as leaf tensors that require grad, which autograd does not let an in-place op write.

Parameters
    A stage holds the parameters its nodes read, under their original qualified names,
    so ``stage.state_dict()`` keys are the single-device model's keys, and the union over
    stages is the whole state dict. A parameter read by several stages (an embedding tied
    to the LM head) is held by each of them; :attr:`StageModule.shared` names it, and the
    runtime sums its gradients across the stages that hold it.

For a GPT cut after block 5, stage 1's generated code reads like::

    def forward(self, dropout_relay, add_11):       # tensors from stage 0
        blocks_6_ln_1_weight = self.blocks.6.ln_1.weight
        layer_norm_12 = torch.nn.functional.layer_norm(add_11, (768,), ...)
        ...
        return linear_48                             # the logits
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from partc.errors import PartcError
from partc.passes.capture import copy_output_type
from partc.passes.ir import TensorSpec, canonical_name, error_context, node_info
from partc.passes.propagate import fake_values


@dataclass(frozen=True)
class StageModule:
    """One pipeline stage's code and what it shares with other stages."""

    index: int
    module: fx.GraphModule
    layers: tuple[str, ...]  # names of the layers it runs
    inputs: tuple[str, ...]  # graph values it receives, in argument order
    outputs: tuple[str, ...]  # graph values it returns, in order (the model output for the last stage)
    shared: tuple[str, ...]  # parameter names other stages hold too
    input_specs: tuple[TensorSpec, ...]  # shape and dtype of each input, for one microbatch
    output_specs: tuple[TensorSpec, ...]  # ... of each output
    input_grads: tuple[bool, ...]  # which inputs carry a gradient back to the previous stage
    output_grads: tuple[bool, ...]  # which outputs receive a gradient from the next stage


def split_stages(
    gm: fx.GraphModule,
    stage_of_layer: Sequence[int],
    microbatch_inputs: Sequence[Any],
    *,
    persistent_names: set[str] | None = None,
) -> list[StageModule]:
    """Cut ``gm`` into stages; ``stage_of_layer[j]`` is the stage of layer ``j``.

    microbatch_inputs: tensors (meta is fine) shaped like one microbatch, used to fix the
        Python values that cross a cut.
    persistent_names: the model's state-dict keys; other buffers are registered as
        non-persistent, as they were in the model.
    """
    num_stages = max(stage_of_layer) + 1
    if list(stage_of_layer) != sorted(stage_of_layer) or set(stage_of_layer) != set(range(num_stages)):
        raise PartcError(f"stage_of_layer must be non-decreasing and use every stage 0..{num_stages - 1}, got {list(stage_of_layer)}")
    nodes = list(gm.graph.nodes)
    stage_of = _stage_of_nodes(nodes, stage_of_layer, num_stages)
    values = fake_values(gm, microbatch_inputs)

    local = recomputable_nodes(gm)
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg not in local:
                last_use[arg] = max(last_use.get(arg, -1), stage_of[n])
    carried = [
        [n for n in nodes if n.op != "get_attr" and stage_of[n] < s <= last_use.get(n, -1) and isinstance(values[n], torch.Tensor)]
        for s in range(num_stages + 1)
    ]
    carried[0] = [n for n in nodes if n.op == "placeholder"]
    param_stages: dict[str, set[int]] = {}
    for n in nodes:
        if n.op == "get_attr":
            for user in n.users:
                param_stages.setdefault(n.target, set()).add(stage_of[user])
    shared = {name for name, stages in param_stages.items() if len(stages) > 1}
    layer_names = [layer.name for layer in gm.meta["partc"].layers]

    stages = []
    for s in range(num_stages):
        produced = carried[s + 1] if s < num_stages - 1 else _output_node(nodes).all_input_nodes
        module = _build_stage(gm, nodes, stage_of, s, carried[s], carried[s + 1], values, num_stages, persistent_names, local)
        stages.append(
            StageModule(
                index=s,
                module=module,
                layers=tuple(name for name, st in zip(layer_names, stage_of_layer) if st == s),
                inputs=tuple(n.name for n in carried[s]),
                outputs=tuple(n.name for n in carried[s + 1]) if s < num_stages - 1 else ("output",),
                shared=tuple(sorted(name for name in shared if s in param_stages[name])),
                input_specs=_specs([values[n] for n in carried[s]]),
                output_specs=_specs([values[n] for n in produced]),
                input_grads=tuple(node_info(n).requires_grad for n in carried[s]),
                output_grads=tuple(node_info(n).requires_grad for n in produced),
            )
        )
    return stages


def _output_node(nodes: list[fx.Node]) -> fx.Node:
    return next(n for n in reversed(nodes) if n.op == "output")


def _specs(values: list[Any]) -> tuple[TensorSpec, ...]:
    flat = [v for value in values for v in (value if isinstance(value, (tuple, list)) else (value,))]
    return tuple(TensorSpec(tuple(v.shape), v.dtype) for v in flat if isinstance(v, torch.Tensor))


def recomputable_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from parameters, buffers and constants alone (rotary tables sliced to
    the sequence length, masks): a stage that needs one recomputes it instead of receiving
    it, so such values never cross a cut. Sizes read from inputs are constants per
    microbatch shape, so they do not make a node input-dependent."""
    local: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            local.add(n)
        elif n.op in ("call_function", "call_method"):
            inputs = n.all_input_nodes  # a new list at each read
            if not local.isdisjoint(inputs) and all(a in local or _is_python_value(a) for a in inputs):
                local.add(n)
    return local


def _is_python_value(node: fx.Node) -> bool:
    """A node whose value is a Python number or size (not a tensor), e.g. ``x.size(1)``."""
    value = node.meta.get("val")
    return value is not None and not isinstance(value, (torch.Tensor, tuple, list))


def _stage_of_nodes(nodes: list[fx.Node], stage_of_layer: Sequence[int], num_stages: int) -> dict[fx.Node, int]:
    stage_of: dict[fx.Node, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            stage_of[n] = 0
        elif n.op == "output":
            stage_of[n] = num_stages - 1
        else:
            stage_of[n] = stage_of_layer[node_info(n).layer]
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg.op != "get_attr" and stage_of[arg] > stage_of[n]:
                raise PartcError(
                    f"node {n.name} in stage {stage_of[n]} reads {arg.name} from the later stage {stage_of[arg]}",
                    error_context(n, "split_stages", fix="stages must follow the graph order; this is a partitioning bug"),
                )
    return stage_of


_IN_PLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "setitem"})


def _written_in_place(value: fx.Node, stage_of: dict[fx.Node, int], s: int) -> bool:
    """Whether a node of stage ``s`` writes ``value`` in place (``x.mul_(2)``, ``x += y``)."""
    for user in value.users:
        name = canonical_name(user)
        in_place = name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
        if stage_of.get(user) == s and in_place and user.args and user.args[0] is value:
            return True
    return False


def _not_a_view(graph: fx.Graph, node: fx.Node, value: Any) -> fx.Node:
    """``node`` as a stage output: a copy when its value is a view of another tensor (the
    ``[:, -n:]`` slice that ends an HF model's body), because torch's zero-bubble schedules
    detach a stage's outputs in place after the input backward, which autograd refuses for
    a view. The next stage receives its own tensor either way."""
    if not (isinstance(value, torch.Tensor) and value._is_view()):
        return node
    copy = graph.call_method("clone", (node,))
    copy.meta = dict(node.meta)
    return copy


def _build_stage(gm, nodes, stage_of, s, inputs, outputs, values, num_stages, persistent_names, local) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
        env[n].meta = dict(n.meta)
        if s > 0 and _written_in_place(n, stage_of, s):
            # torch.distributed.pipelining hands a stage its inputs as leaf tensors that
            # require grad, which an in-place op may not write: the stage writes a copy.
            env[n] = graph.call_method("clone", (env[n],))
            env[n].meta = dict(n.meta)

    def lookup(arg: fx.Node) -> Any:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)
            env[arg].meta = dict(arg.meta)
            return env[arg]
        if arg in local and stage_of[arg] != s:
            env[arg] = graph.node_copy(arg, lookup)  # recomputed here rather than received
            return env[arg]
        if stage_of[arg] < s and not isinstance(values[arg], torch.Tensor):
            return values[arg]  # a Python value from an earlier stage: a constant here
        raise PartcError(f"stage {s} needs {arg.name}, which no earlier stage passes on", error_context(arg, "split_stages"))

    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output") or stage_of[n] != s:
            continue
        env[n] = graph.node_copy(n, lookup)
    if s == num_stages - 1:
        output = _output_node(nodes)
        graph.output(fx.node.map_arg(output.args[0], lookup))
        copy_output_type(gm.graph, graph)  # an HF ModelOutput stays one
    else:
        graph.output(tuple(_not_a_view(graph, lookup(n), values[n]) for n in outputs))
    graph.lint()

    tensors = {n.target: operator.attrgetter(n.target)(gm) for n in graph.nodes if n.op == "get_attr"}
    module = fx.GraphModule(tensors, graph, class_name=f"Stage{s}")
    if persistent_names is not None:
        for name in tensors:
            if name not in persistent_names and not isinstance(tensors[name], torch.nn.Parameter):
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._non_persistent_buffers_set.add(leaf)
    return module
