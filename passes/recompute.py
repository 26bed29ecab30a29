"""Recompute pass: run every layer of a module under activation checkpointing.

Input: an ``fx.GraphModule`` whose nodes carry partc's NodeInfo with a layer index (a
pipeline stage from :mod:`partc.passes.split_stages`, cut from the captured graph or from
a generated tensor-parallel module). Output: the same module, rewritten in place, in
which each layer's nodes are one call to a parameter-free submodule
``recompute_layer_<j>`` that runs them through ``torch.utils.checkpoint`` (non-reentrant).
Backward then keeps only each layer's inputs and runs the layer's forward again: the full
per-layer recomputation the search prices with ``recompute=True``. Random operators
(dropout) draw the same numbers the second time (checkpoint restores the RNG state), and
a tensor-parallel layer's collectives run again in the recomputation, as in Megatron.

Parameters stay where they were: the outer graph reads them (``get_attr``), computes the
values made of parameters alone (rotary tables sliced to the sequence length), and passes
them to the layer as arguments, so the state-dict keys, FSDP2's parameter swap and the
optimizer all see the module's own tensors. A GPT block reads::

    blocks_0_attn_qkv_weight = self.blocks.0.attn.qkv.weight
    ...
    recompute_layer_1 = self.recompute_layer_1(add_2, blocks_0_ln_1_weight, ...)
    add_4 = recompute_layer_1[0]
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from partc.errors import PartcError
from partc.passes.capture import copy_output_type
from partc.passes.ir import error_context, node_info
from partc.passes.split_stages import recomputable_nodes

PASS_NAME = "recompute"
_COMPUTE = ("call_function", "call_method", "call_module")


class CheckpointedLayer(nn.Module):
    """One layer's code (a GraphModule without tensors of its own), run under checkpoint."""

    def __init__(self, body: fx.GraphModule):
        super().__init__()
        self.body = body

    def forward(self, *args):
        return checkpoint(self.body, *args, use_reentrant=False)


def checkpoint_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that each layer runs under activation checkpointing."""
    nodes = list(gm.graph.nodes)
    # Values of parameters alone (a rotary table sliced to the sequence length) are cheap
    # and were copied next to their readers by split_stages: they stay outside the layers.
    hoisted = recomputable_nodes(gm)
    runs: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n.op in _COMPUTE and n not in hoisted:
            runs.setdefault(node_info(n).layer, []).append(n)
    _check_contiguous(nodes, runs)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    done: set[int] = set()
    for n in nodes:
        if n.op not in _COMPUTE or n in hoisted:
            _copy_before(graph, env, n)  # unless a layer call before needed it already
            continue
        layer = node_info(n).layer
        if layer in done:
            continue
        done.add(layer)
        _emit_layer(gm, graph, env, layer, runs[layer])
    graph.lint()
    copy_output_type(gm.graph, graph)  # an HF ModelOutput stays one
    gm.graph = graph
    gm.recompile()
    return gm


def _emit_layer(gm: fx.GraphModule, graph: fx.Graph, env: dict[fx.Node, fx.Node], layer: int, run: list[fx.Node]) -> None:
    """One call node for ``run`` (the layer's nodes, in order), and a getitem per value used outside it."""
    inside = set(run)
    inputs: list[fx.Node] = []
    for n in run:
        for arg in n.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in run if any(user not in inside for user in n.users)]
    for arg in inputs:  # parameters and hoisted values sit just before their first reader: before the call
        _copy_before(graph, env, arg)

    body = fx.Graph()
    local: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        local[arg] = body.placeholder(arg.name)
        local[arg].meta = dict(arg.meta)
    for n in run:
        local[n] = body.node_copy(n, lambda a: local[a])
    body.output(tuple(local[n] for n in outputs))
    body.lint()

    name = f"recompute_layer_{layer}"
    gm.add_submodule(name, CheckpointedLayer(fx.GraphModule(nn.Module(), body, class_name=f"Layer{layer}")))
    call = graph.call_module(name, tuple(env[a] for a in inputs))
    call.meta = {k: v for k, v in run[0].meta.items() if k != "val"}
    for k, n in enumerate(outputs):
        env[n] = graph.create_node("call_function", operator.getitem, (call, k), name=n.name)  # the value keeps its name
        env[n].meta = dict(n.meta)


def _copy_before(graph: fx.Graph, env: dict[fx.Node, fx.Node], node: fx.Node) -> None:
    """Copy ``node`` (a placeholder, parameter or hoisted value) and what it reads, once."""
    if node in env:
        return
    for arg in node.all_input_nodes:
        _copy_before(graph, env, arg)
    env[node] = graph.node_copy(node, lambda a: env[a])


def _check_contiguous(nodes: list[fx.Node], runs: dict[int, list[fx.Node]]) -> None:
    """Each layer's compute nodes must follow one another in graph order (captured graphs
    are emitted layer by layer; a rewrite that interleaved two layers would break this)."""
    in_runs = [n for run in runs.values() for n in run]
    order = [n for n in nodes if n in set(in_runs)]
    position = {n: i for i, n in enumerate(order)}
    for layer, run in runs.items():
        first, last = position[run[0]], position[run[-1]]
        if last - first + 1 != len(run):
            stray = next(n for n in order[first:last] if node_info(n).layer != layer)
            raise PartcError(
                f"layer {layer} is not contiguous in the graph: {stray.name} (layer {node_info(stray).layer}) sits inside it",
                error_context(stray, PASS_NAME, fix="recompute needs each layer's operators in one run; this is a partc bug, please report it"),
            )


__all__ = ["CheckpointedLayer", "checkpoint_layers"]
