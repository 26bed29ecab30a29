"""Tensor-parallel codegen: one GraphModule per tensor-parallel rank, from a sharding plan.

Input: the annotated graph the sharding pass planned (``gm``, with ``node.meta["val"]``)
and its :class:`~partc.passes.sharding.ShardingPlan`. Output, for tensor-parallel rank
``rank`` of ``tp``: a :class:`TensorParallelModule` holding a NEW ``fx.GraphModule`` (the
input graph is not changed) that computes on this rank's shards and says every
communication out loud, as Megatron's code does.

What changes, node by node
    * Parameters and buffers: this rank's slice (``ParameterSharding.local``), registered
      under the original qualified name, so ``state_dict()`` keys are the model's (a tied
      weight appears once, under the name the graph reads it by). The slice rules are
      :attr:`TensorParallelModule.parameters`.
    * One conversion per ``plan.reshards`` record, right after the producer; every
      consumer the record lists reads the converted value. The record's (forward,
      backward) pair picks the function of :mod:`partc.runtime.collectives`::

          (None, all_reduce)           copy_to_tp            Megatron's f
          (all_reduce, None)           reduce_from_tp        Megatron's g
          (all_reduce, all_reduce)     reduce_from_tp, then copy_to_tp
          (all_gather, slice | None)   gather_from_tp
          (all_gather, reduce_scatter) gather_from_sp        sequence parallel
          (slice, all_gather | None)   scatter_to_tp
          (reduce_scatter, all_gather) reduce_scatter_to_tp
          (all_to_all, all_to_all)     all_to_all_tp
          (broadcast, None)            broadcast_from_tp     O(r) -> R (a table-wise lookup)
          (broadcast, all_reduce)      broadcast_from_tp, then copy_to_tp
          (partial, None)              to_partial            R -> P (a row-parallel bias)
          (pad, slice | None)          pad_to_partial        S -> P

      A record with ``regather`` also puts ``keep_shard_for_backward`` after each
      consumer: the consumer's saved copy of the gathered input is dropped and gathered
      again in backward (Megatron's sequence parallelism). A value laid out in blocks (GPT's fused qkv) passes ``blocks=``.
    * ``vocab_parallel`` embedding becomes ``vocab_parallel_embedding`` (masked lookup,
      giving P; ``vocab_parallel_embedding_bag`` for fixed-size bags); ``table_wise``
      lookups become ``table_wise_embedding[_bag]`` (the owner looks up, the others give
      zeros; their copy of the table is an empty [0, D] slice under the same name);
      ``vocab_parallel`` cross entropy becomes ``vocab_parallel_cross_entropy``
      (Megatron's two all-reduces, local backward). A ``batch_parallel`` cross_entropy /
      nll_loss "mean" over class indices becomes the same loss with ``reduction="sum"``
      divided by ``divide_by_kept_targets`` (the all-reduced count or class-weight sum of
      the batch's kept targets: torch's normaliser, not this rank's). A strategy's
      ``local_scale`` multiplies the node's result (a mean over a sharded dim).
    * ``plan.view_rewrites`` change hard-coded sizes (12 heads -> 12/tp) or divide a traced
      size; ``plan.size_rewrites`` turn a shard's ``size()`` into the whole tensor's
      (times tp) so traced sizes mean what the single-device program meant. A traced size
      that only feeds rewritten views is left local and the division dropped (the two cancel).

The process group is not baked into the graph: the module holds a
:class:`~partc.runtime.collectives.TensorParallelGroup` as ``self.tp_group`` (rank, size,
the DeviceMesh dimension name, a counter of collectives), bound at construction or later
with ``module.tp_group.bind(group)``. The generated code of a GPT block at tp=2 reads::

    tp_group = self.tp_group
    ...
    layer_norm_copy = copy_to_tp(layer_norm, tp_group)
    linear = torch._C._nn.linear(layer_norm_copy, blocks_0_attn_qkv_weight, None)
    chunk = linear.chunk(3, dim = -1)
    ...
    view = getitem.view(size_1, size_2, 2, 16)          # 4 heads -> 2 per rank
    ...
    linear_1 = torch._C._nn.linear(reshape, blocks_0_attn_proj_weight, None)
    linear_1_reduced = reduce_from_tp(linear_1, tp_group)

Every tensor-parallel rank receives the whole input batch; the graph's outputs are
replicated (the sharding pass requires it), so the module returns the whole output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from partc.errors import ErrorContext, PartcError, PlanMismatchError, UnsupportedOpError
from partc.passes.capture import copy_output_type
from partc.passes.ir import OpKind, canonical_name, error_context, op_kind
from partc.passes.layouts import Shard, bind_loss_arguments, holds_class_indices, tensor_inputs
from partc.passes.sharding import ParameterSharding, Reshard, ShardingPlan
from partc.runtime import collectives as C
from partc.runtime.collectives import TensorParallelGroup

__all__ = ["TensorParallelModule", "TensorParallelInfo", "emit_tensor_parallel", "generated_source"]

PASS_NAME = "tp_codegen"
META_KEY = "partc_tp"
# What an inserted node inherits from the node it serves: the NodeInfo (module, layer; its
# shapes are whole-tensor ones, like every copied node's) and where it came from.
_LOCATION_META = ("partc", "nn_module_stack", "stack_trace", "source_fn_stack")


def _register_readable_names() -> None:
    """Let fx print the collectives by their short names (``copy_to_tp(x, tp_group)``, not
    ``partc_runtime_collectives_copy_to_tp``), with the import that ``to_folder`` writes.
    Private fx API; without it the code still runs, with longer names."""
    register = getattr(torch.fx.graph, "_register_custom_builtin", None)
    custom = getattr(torch.fx.graph, "_custom_builtins", {})
    for name, fn in C.GENERATED_CODE_FUNCTIONS.items():
        if register is not None and name not in custom:
            register(name, f"from partc.runtime.collectives import {name}", fn)
    side_effect = getattr(torch.fx.node, "has_side_effect", None)
    if side_effect is not None:
        side_effect(C.keep_shard_for_backward)  # returns nothing; dead-code elimination must keep it


_register_readable_names()


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorParallelInfo:
    """What a generated module is (``module.meta["partc_tp"]``), for its readable source."""

    rank: int
    tp: int
    group_name: str
    parameters: Mapping[str, ParameterSharding]  # by original name: layout and slice rule
    layouts: tuple[tuple[str, str, str], ...]  # (node, owning module, strategy) of the sharded compute nodes
    collectives: Mapping[str, Mapping[str, int]]  # the plan's collectives per step


@dataclass(frozen=True)
class TensorParallelModule:
    """One tensor-parallel rank's module and how its tensors relate to the model's."""

    module: fx.GraphModule  # run it; state_dict() keys are the original names
    rank: int
    tp: int
    parameters: Mapping[str, ParameterSharding]  # slice rule of every parameter/buffer the module holds
    plan: ShardingPlan

    @property
    def group(self) -> TensorParallelGroup:
        return self.module.tp_group

    @property
    def counter(self) -> C.CollectiveCounter:
        return self.module.tp_group.counter

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole tensor ``full`` of parameter ``name`` (a gradient,
        a checkpoint entry)."""
        return self.parameters[name].local(full, self.rank)

    def source(self) -> str:
        return generated_source(self.module)


# -- the pass -------------------------------------------------------------------------------
def emit_tensor_parallel(
    gm: fx.GraphModule,
    plan: ShardingPlan,
    *,
    rank: int,
    tp: int,
    group_name: str = "tp",
    group: Any = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> TensorParallelModule:
    """The module tensor-parallel rank ``rank`` of ``tp`` runs (see the module docstring).

    group: the process group to bind now (a ``ProcessGroup``, a ``DeviceMesh`` with a
        dimension ``group_name``, or a ``ThreadedGroup``); None binds later
        (``module.tp_group.bind(...)``) or, when the world is the group, on first use.
    state_dict: the model's ``state_dict(keep_vars=True)``. With it the module's
        state-dict keys are exactly the model's: buffers the model keeps out of its state
        dict (rope tables) stay out, and a tied tensor (an embedding shared with the LM
        head) appears under each of its names, one local tensor behind them. Without it,
        every tensor the graph reads is a state-dict entry under the name the graph uses.
    """
    _check(gm, plan, rank, tp)
    emitter = _Emitter(gm, plan, rank, tp)
    graph = emitter.build()
    copy_output_type(gm.graph, graph)  # an HF ModelOutput stays one
    root, parameters = _tensors(gm, plan, rank)
    holder = TensorParallelGroup(rank, tp, name=group_name, group=group)
    root[emitter.holder_attr] = holder
    module = fx.GraphModule(root, graph, class_name=f"TensorParallelRank{rank}")
    if "partc" in gm.meta:
        # the layers name the original nodes; inserted nodes carry their producer's NodeInfo,
        # so split_stages can cut this module into pipeline stages
        module.meta["partc"] = gm.meta["partc"]
    if state_dict is not None:
        _match_state_dict(module, gm, root, parameters, state_dict)
    if emitter.holder_attr != "tp_group":
        module.tp_group = holder  # the documented handle, whatever the graph calls it
    module.meta[META_KEY] = TensorParallelInfo(
        rank=rank,
        tp=tp,
        group_name=group_name,
        parameters=dict(parameters),  # plain dicts: module.meta is deep-copied with the module
        layouts=_layout_choices(gm, plan),
        collectives=plan.collectives_per_step(),
    )
    return TensorParallelModule(module=module, rank=rank, tp=tp, parameters=MappingProxyType(parameters), plan=plan)


def _check(gm: fx.GraphModule, plan: ShardingPlan, rank: int, tp: int) -> None:
    if plan.tp != tp:
        raise PlanMismatchError(f"the sharding plan is for tp={plan.tp}, not tp={tp}", ErrorContext(pass_name=PASS_NAME))
    if not isinstance(rank, int) or not 0 <= rank < tp:
        raise PartcError(f"rank must be in 0..{tp - 1}, got {rank!r}", ErrorContext(pass_name=PASS_NAME))
    names = {n.name for n in gm.graph.nodes}
    missing = [name for name in plan.strategies if name not in names]
    if missing:
        raise PlanMismatchError(
            f"the sharding plan names nodes this graph does not have ({', '.join(missing[:5])})",
            ErrorContext(pass_name=PASS_NAME, fix="emit from the graph the plan was made for"),
        )


class _Emitter:
    """Copies ``gm``'s nodes into a new graph, inserting and rewriting as the plan says."""

    def __init__(self, gm: fx.GraphModule, plan: ShardingPlan, rank: int, tp: int):
        self.gm, self.plan, self.rank, self.tp = gm, plan, rank, tp
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.holder_attr = _free_attribute(gm, "tp_group")
        self.tp_node: fx.Node | None = None

        self.reshards_of: dict[str, list[Reshard]] = {}
        self.reshard_for: dict[tuple[str, int], Reshard] = {}  # (consumer, input index) -> record
        for r in plan.reshards:
            self.reshards_of.setdefault(r.producer, []).append(r)
            for use in r.consumers:
                self.reshard_for[(use.node, use.input_index)] = r
        self.converted: dict[int, fx.Node] = {}  # id(record) -> the converted value
        self.view_rewrites: dict[str, list] = {}
        for v in plan.view_rewrites:
            self.view_rewrites.setdefault(v.node, []).append(v)
        self.size_rewrites = {s.node: s for s in plan.size_rewrites}
        self.blocked_dims = self._blocked_dims()
        self.local_sizes, self.undivided = self._cancelled_size_rewrites()

    # -- analysis ----------------------------------------------------------------------------
    def _blocked_dims(self) -> dict[tuple[str, int], int]:
        """(value, output index) -> the dim laid out in blocks, for fused projections."""
        dims: dict[tuple[str, int], int] = {}
        for name, s in self.plan.strategies.items():
            if s.blocks > 1 and isinstance(s.inputs[0], Shard):
                ref = tensor_inputs(self.nodes[name])[0]
                dims[(ref.node.name, ref.output_index)] = s.inputs[0].dim
        for p in self.plan.parameters.values():
            if p.blocks > 1 and isinstance(p.layout, Shard):
                dims[(p.node, 0)] = p.layout.dim
        return dims

    def _cancelled_size_rewrites(self) -> tuple[set[str], set[tuple[str, tuple]]]:
        """Size reads (times tp) whose every use is a view argument divided by tp: keep both local."""
        divided = {(v.node, v.path): v.divisor for vs in self.view_rewrites.values() for v in vs if v.old is None}
        local_sizes: set[str] = set()
        undivided: set[tuple[str, tuple]] = set()
        for name, s in self.size_rewrites.items():
            node = self.nodes[name]
            if canonical_name(node) not in ("size", "sym_size") or _size_dim(node) is None:
                continue  # a whole torch.Size or a numel: scale it
            uses = [(user.name, path) for user in node.users for path in _paths_of((user.args, user.kwargs), node)]
            if uses and all(divided.get(use) == s.multiplier for use in uses):
                local_sizes.add(name)
                undivided.update(uses)
        return local_sizes, undivided

    # -- building -------------------------------------------------------------------------
    def build(self) -> fx.Graph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node in placeholders:
            self.env[node] = self._copy(node, node.args, node.kwargs)
        self.tp_node = self.graph.get_attr(self.holder_attr)
        first = next((n for n in self.gm.graph.nodes if n.op != "placeholder"), None)
        if first is not None:  # read by every layer; it sits in the first (split_stages reads every node's layer)
            self.tp_node.meta = {k: v for k, v in first.meta.items() if k in _LOCATION_META}
        for node in placeholders:
            self._emit_conversions(node)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                args, kwargs = self._inputs(node)
                self.graph.output(args[0])
                continue
            if node.op == "get_attr":
                self.env[node] = self._copy(node, (), {})
            else:
                self._emit_compute(node)
            self._emit_conversions(node)
        self.graph.lint()
        return self.graph

    def _copy(self, node: fx.Node, args, kwargs, target=None) -> fx.Node:
        new = self.graph.create_node(node.op, node.target if target is None else target, tuple(args), dict(kwargs), name=node.name)
        new.meta = {k: v for k, v in node.meta.items() if k != "val"}  # "val" holds whole-tensor shapes
        return new

    def _inputs(self, node: fx.Node) -> tuple[tuple, dict]:
        """The node's (args, kwargs) in the new graph, converted inputs in place."""
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        refs = tensor_inputs(node)
        by_path: dict[tuple, list] = {}
        for i, ref in enumerate(refs):
            r = self.reshard_for.get((node.name, i))
            if r is not None:
                by_path.setdefault(ref.path, []).append((ref, self.converted[id(r)]))
        for path, found in by_path.items():
            ref = found[0][0]
            if len(found) == 1 and not isinstance(ref.node.meta.get("val"), (tuple, list)):
                args, kwargs = _set_path(args, kwargs, path, found[0][1])
                continue
            # a tuple-valued node read whole: rebuild the tuple with its converted elements
            tuple_node = self.env[ref.node]
            elements = [self._named(operator.getitem, (tuple_node, k), f"{ref.node.name}_{k}", like=ref.node) for k in range(len(ref.node.meta["val"]))]
            for r_ref, value in found:
                elements[r_ref.output_index] = value
            args, kwargs = _set_path(args, kwargs, path, tuple(elements))
        return args, kwargs

    def _emit_compute(self, node: fx.Node) -> None:
        strategy = self.plan.strategies.get(node.name)
        refs = tensor_inputs(node)
        # getitem of one element of a tuple whose element was converted: the conversion is the value
        if node.target is operator.getitem and len(refs) == 1 and refs[0].path == (0,) and isinstance(refs[0].node.meta.get("val"), (tuple, list)):
            r = self.reshard_for.get((node.name, 0))
            if r is not None:
                self.env[node] = self.converted[id(r)]
                return
        args, kwargs = self._inputs(node)
        args, kwargs = self._rewrite_views(node, args, kwargs)
        new = self._lower(node, strategy, args, kwargs) if strategy is not None else None
        if new is None:
            new = self._copy(node, args, kwargs)
        if strategy is not None and strategy.local_scale != 1.0:
            new = self._named(operator.mul, (new, strategy.local_scale), f"{node.name}_scaled", like=node)
        if node.name in self.size_rewrites and node.name not in self.local_sizes:
            new = self._global_size(node, new)
        self.env[node] = new
        self._keep_shards(node, new, args, kwargs)

    def _named(self, target, args, name: str, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
        """A new call_function node; it belongs where ``like`` does (module, layer, source line)."""
        new = self.graph.create_node("call_function", target, tuple(args), kwargs or {}, name=name)
        if like is not None:
            new.meta = {k: v for k, v in like.meta.items() if k in _LOCATION_META}
        return new

    def _rewrite_views(self, node: fx.Node, args, kwargs):
        for v in self.view_rewrites.get(node.name, ()):
            current = _get_path(args, kwargs, v.path)
            if v.old is not None:
                if current != v.old:
                    raise PlanMismatchError(
                        f"the plan rewrites {v.old} -> {v.new} at args{list(v.path)}, but the node has {current!r} there",
                        error_context(node, PASS_NAME, fix="emit from the graph the plan was made for"),
                    )
                args, kwargs = _set_path(args, kwargs, v.path, v.new)
            elif (node.name, v.path) not in self.undivided:
                if not isinstance(current, fx.Node):
                    raise PlanMismatchError(f"the plan divides a traced size at args{list(v.path)}, but the node has {current!r} there", error_context(node, PASS_NAME))
                local = self._named(operator.floordiv, (current, v.divisor), f"{current.name}_local", like=node)
                args, kwargs = _set_path(args, kwargs, v.path, local)
        return args, kwargs

    def _global_size(self, node: fx.Node, new: fx.Node) -> fx.Node:
        s = self.size_rewrites[node.name]
        name = canonical_name(node)
        if (name in ("size", "sym_size") and _size_dim(node) is not None) or name == "numel":
            return self._named(operator.mul, (new, s.multiplier), f"{node.name}_global", like=node)
        return self._named(C.global_size, (new, s.dim, s.multiplier), f"{node.name}_global", like=node)

    def _lower(self, node: fx.Node, strategy, args, kwargs) -> fx.Node | None:
        """Strategies whose local code is not the same operator on the shards."""
        kind = op_kind(node)
        if kind == OpKind.EMBEDDING and canonical_name(node) == "embedding_bag" and strategy.name in ("vocab_parallel", "table_wise"):
            return self._embedding_bag(node, strategy, args, kwargs)
        if kind == OpKind.EMBEDDING and strategy.name == "table_wise":
            bound = dict(zip(("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args))
            bound.update(kwargs)
            indices, weight = bound.pop("input"), bound.pop("weight")
            return self._copy(node, (indices, weight, self.tp_node, strategy.outputs[0].rank), bound, target=C.table_wise_embedding)
        if kind == OpKind.EMBEDDING and strategy.name == "vocab_parallel":
            return self._vocab_parallel_embedding(node, args, kwargs)
        if kind == OpKind.LOSS and strategy.name == "vocab_parallel":
            return self._vocab_parallel_cross_entropy(node, args, kwargs)
        if kind == OpKind.LOSS and strategy.name == "batch_parallel" and strategy.comm:
            return self._mean_over_kept_targets(node, args, kwargs)
        if strategy.comm:
            raise UnsupportedOpError(
                f"no code generation for strategy {strategy} (it communicates inside the operator)",
                error_context(node, PASS_NAME, fix="report this: the sharding rule and the codegen disagree"),
            )
        return None

    def _vocab_parallel_embedding(self, node, args, kwargs) -> fx.Node:
        aten = isinstance(node.target, torch._ops.OpOverload)
        names = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse") if aten else (
            "input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        defaults = {"padding_idx": -1 if aten else None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}
        extra = {k: v for k, v in bound.items() if k not in ("input", "weight") and defaults.get(k, object()) != v}
        if "padding_idx" in extra or "max_norm" in extra:
            raise UnsupportedOpError("a vocabulary-parallel embedding takes no padding_idx or max_norm", error_context(node, PASS_NAME))
        new = self._copy(node, (bound["input"], bound["weight"], self.tp_node), extra, target=C.vocab_parallel_embedding)
        return new

    def _embedding_bag(self, node, strategy, args, kwargs) -> fx.Node:
        """F.embedding_bag(input, weight, ...) as a row-wise (vocab_parallel) or table-wise lookup."""
        names = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse",
                 "per_sample_weights", "include_last_offset", "padding_idx")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        indices, weight = bound.pop("input"), bound.pop("weight")
        if strategy.name == "table_wise":
            return self._copy(node, (indices, weight, self.tp_node, strategy.outputs[0].rank), bound, target=C.table_wise_embedding_bag)
        return self._copy(node, (indices, weight, self.tp_node), {"mode": bound.get("mode", "mean")}, target=C.vocab_parallel_embedding_bag)

    def _vocab_parallel_cross_entropy(self, node, args, kwargs) -> fx.Node:
        bound = bind_loss_arguments("cross_entropy", args, kwargs)
        target = bound["target"]
        if not holds_class_indices(node.args[1] if len(node.args) > 1 else node.kwargs.get("target")):
            raise UnsupportedOpError(
                "vocabulary-parallel cross entropy takes class indices, not class probabilities",
                error_context(node, PASS_NAME, fix="pass integer targets, or plan the loss replicated"),
            )
        if bound.get("weight") is not None or bound.get("label_smoothing", 0.0):
            raise UnsupportedOpError("vocabulary-parallel cross entropy takes no class weights or label smoothing", error_context(node, PASS_NAME))
        extra = {}
        if bound.get("ignore_index", -100) != -100:
            extra["ignore_index"] = bound["ignore_index"]
        if bound["reduction"] != "mean":
            extra["reduction"] = bound["reduction"]
        return self._copy(node, (bound["input"], target, self.tp_node), extra, target=C.vocab_parallel_cross_entropy)

    def _mean_over_kept_targets(self, node, args, kwargs) -> fx.Node:
        """A batch-parallel cross_entropy / nll_loss "mean" over class indices: this rank's
        ``reduction="sum"`` loss divided by the all-reduced normaliser (layouts._batch_parallel_class_loss)."""
        name = canonical_name(node)
        bound = bind_loss_arguments(name, args, kwargs)
        if bound["reduction"] != "mean":
            raise PlanMismatchError(
                f"the plan divides {name} by the kept targets of the batch, but its reduction is {bound['reduction']!r}",
                error_context(node, PASS_NAME, fix="emit from the graph the plan was made for"),
            )
        logits, target = bound.pop("input"), bound.pop("target")
        summed = self._copy(node, (logits, target), {**bound, "reduction": "sum"})
        keywords = {}
        if bound.get("weight") is not None:
            keywords["weight"] = bound["weight"]
        if bound.get("ignore_index", -100) != -100:
            keywords["ignore_index"] = bound["ignore_index"]
        return self._named(C.divide_by_kept_targets, (summed, target, self.tp_node), f"{node.name}_mean", keywords, like=node)

    def _keep_shards(self, node: fx.Node, new: fx.Node, args, kwargs) -> None:
        """After a consumer of gathered values marked ``regather``: keep only their shards."""
        gathered = []
        for i, ref in enumerate(tensor_inputs(node)):
            r = self.reshard_for.get((node.name, i))
            if r is None or not r.regather:
                continue
            spec = (self.converted[id(r)], self._value(self.nodes[r.producer], r.output_index), r.src.dim)
            blocks = self._blocks(r, r.src.dim)
            gathered.append(spec + ((blocks,) if blocks > 1 else ()))
        if gathered:
            inputs = {"inputs": tuple(_flat_nodes((args, kwargs)))}
            self._named(C.keep_shard_for_backward, (new, self.tp_node, *gathered), f"{node.name}_keeps_shard", inputs, like=node)

    # -- conversions ----------------------------------------------------------------------------
    def _value(self, producer: fx.Node, k: int) -> fx.Node:
        value = self.env[producer]
        if isinstance(producer.meta.get("val"), (tuple, list)):
            return self._named(operator.getitem, (value, k), f"{producer.name}_{k}", like=producer)
        return value

    def _blocks(self, r: Reshard, dim: int) -> int:
        return r.blocks if r.blocks > 1 and self.blocked_dims.get((r.producer, r.output_index)) == dim else 1

    def _emit_conversions(self, node: fx.Node) -> None:
        for r in self.reshards_of.get(node.name, ()):
            self.converted[id(r)] = self._conversion(r, self._value(node, r.output_index), node)

    def _conversion(self, r: Reshard, value: fx.Node, producer: fx.Node) -> fx.Node:
        tp = self.tp_node
        base = value.name
        fwd, bwd = r.forward, r.backward

        def call(fn, args, suffix, **kw):
            return self._named(fn, args, f"{base}_{suffix}", {k: v for k, v in kw.items() if v != 1}, like=producer)

        if fwd is None and bwd == "all_reduce":
            return call(C.copy_to_tp, (value, tp), "copy")
        if fwd == "all_reduce" and bwd in (None, "all_reduce"):
            reduced = call(C.reduce_from_tp, (value, tp), "reduced")
            return reduced if bwd is None else self._named(C.copy_to_tp, (reduced, tp), f"{base}_copy", like=producer)
        if fwd == "all_gather" and bwd in (None, "slice", "reduce_scatter"):
            fn = C.gather_from_sp if bwd == "reduce_scatter" else C.gather_from_tp
            return call(fn, (value, r.src.dim, tp), "gathered", blocks=self._blocks(r, r.src.dim))
        if fwd == "slice" and bwd in (None, "all_gather"):
            return call(C.scatter_to_tp, (value, r.dst.dim, tp), "scattered", blocks=self._blocks(r, r.dst.dim))
        if fwd == "reduce_scatter" and bwd in (None, "all_gather"):
            return call(C.reduce_scatter_to_tp, (value, r.dst.dim, tp), "reduce_scattered", blocks=self._blocks(r, r.dst.dim))
        if fwd == "all_to_all" and bwd in (None, "all_to_all"):
            return call(
                C.all_to_all_tp, (value, r.src.dim, r.dst.dim, tp), "resharded",
                src_blocks=self._blocks(r, r.src.dim), dst_blocks=self._blocks(r, r.dst.dim),
            )
        if fwd == "broadcast" and bwd in (None, "all_reduce"):
            sent = call(C.broadcast_from_tp, (value, r.src.rank, tp), "broadcast")
            return sent if bwd is None else self._named(C.copy_to_tp, (sent, tp), f"{base}_copy", like=producer)
        if fwd == "partial" and bwd is None:
            return call(C.to_partial, (value, tp), "partial")
        if fwd == "pad" and bwd in (None, "slice"):
            return call(C.pad_to_partial, (value, r.src.dim, tp), "padded", blocks=self._blocks(r, r.src.dim))
        raise UnsupportedOpError(
            f"no collective converts {r.src} -> {r.dst} with forward {fwd} and backward {bwd} ({r})",
            error_context(self.nodes[r.producer], PASS_NAME, fix="report this: the sharding plan and the codegen disagree"),
        )


# -- tensors ---------------------------------------------------------------------------------
def _tensors(gm: fx.GraphModule, plan: ShardingPlan, rank: int) -> tuple[dict[str, Any], dict[str, ParameterSharding]]:
    """This rank's slice of every tensor the graph reads, under its original name."""
    root: dict[str, Any] = {}
    parameters: dict[str, ParameterSharding] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target in root:
            continue
        full = operator.attrgetter(n.target)(gm)
        sharding = plan.parameters.get(n.target)
        if not isinstance(full, torch.Tensor) or sharding is None:
            root[n.target] = full
            continue
        with torch.no_grad():
            local = sharding.local(full.detach(), rank).clone(memory_format=torch.contiguous_format)
        root[n.target] = nn.Parameter(local, requires_grad=full.requires_grad) if isinstance(full, nn.Parameter) else local
        parameters[n.target] = sharding
    return root, parameters


def _match_state_dict(module: fx.GraphModule, gm: fx.GraphModule, root: dict[str, Any], parameters: dict, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Make ``module.state_dict()`` keys the model's: non-persistent buffers, tied aliases."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in state_dict.items():
        names_of.setdefault(id(tensor), []).append(name)
    for name, value in list(root.items()):
        if not isinstance(value, torch.Tensor):
            continue
        original = operator.attrgetter(name)(gm)
        aliases = [a for a in names_of.get(id(original), []) if a != name]
        if name not in state_dict and not isinstance(value, nn.Parameter):
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._non_persistent_buffers_set.add(leaf)
        for alias in aliases:
            owner_name, _, leaf = alias.rpartition(".")
            owner = module
            for part in owner_name.split(".") if owner_name else ():
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if isinstance(value, nn.Parameter):
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value)
            if name in parameters:
                parameters[alias] = parameters[name]


def _free_attribute(gm: fx.GraphModule, wanted: str) -> str:
    taken = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    name, k = wanted, 0
    while name in taken or hasattr(gm, name):
        k += 1
        name = f"{wanted}_{k}"
    return name


# -- argument paths ------------------------------------------------------------------------------
def _get_path(args: tuple, kwargs: dict, path: tuple) -> Any:
    value: Any = args if isinstance(path[0], int) else kwargs
    for p in path:
        value = value[p]
    return value


def _set_path(args: tuple, kwargs: dict, path: tuple, new: Any) -> tuple[tuple, dict]:
    def put(container: Any, rest: tuple) -> Any:
        if not rest:
            return new
        head, tail = rest[0], rest[1:]
        if isinstance(container, dict):
            return {**container, head: put(container[head], tail)}
        items = list(container)
        items[head] = put(items[head], tail)
        return type(container)(items) if isinstance(container, (tuple, list)) and not hasattr(container, "_fields") else tuple(items)

    if isinstance(path[0], int):
        return tuple(put(tuple(args), path)), kwargs
    return args, put(dict(kwargs), path)


def _paths_of(args_kwargs: tuple, target: fx.Node) -> list[tuple]:
    """Every path in (args, kwargs) at which ``target`` appears."""
    found: list[tuple] = []

    def visit(value: Any, path: tuple) -> None:
        if value is target:
            found.append(path)
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(v, path + (i,))
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, path + (k,))

    args, kwargs = args_kwargs
    for i, a in enumerate(args):
        visit(a, (i,))
    for k, a in kwargs.items():
        visit(a, (k,))
    return found


def _flat_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _size_dim(node: fx.Node) -> int | None:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


# -- readable source ---------------------------------------------------------------------------
_REPORTED_KINDS = (OpKind.LINEAR, OpKind.MATMUL, OpKind.EMBEDDING, OpKind.ATTENTION, OpKind.LAYER_NORM, OpKind.RMS_NORM, OpKind.LOSS, OpKind.CONV)


def _layout_choices(gm: fx.GraphModule, plan: ShardingPlan) -> tuple[tuple[str, str, str], ...]:
    choices = []
    for n in gm.graph.nodes:
        s = plan.strategies.get(n.name)
        if s is None or op_kind(n) not in _REPORTED_KINDS:
            continue
        info = n.meta.get("partc")
        choices.append((n.name, getattr(info, "module", "") or "", str(s)))
    return tuple(choices)


def generated_source(module: fx.GraphModule | TensorParallelModule) -> str:
    """The module's Python source, headed by a comment naming the rank and the layouts."""
    if isinstance(module, TensorParallelModule):
        module = module.module
    info: TensorParallelInfo | None = module.meta.get(META_KEY)
    if info is None:
        return module.code
    lines = [
        f"# partc tensor-parallel code: rank {info.rank} of {info.tp} (mesh dimension {info.group_name!r})",
        "# every rank reads the whole input batch; outputs are whole (replicated)",
        f"# collectives per training step: forward {dict(info.collectives['forward'])}, backward {dict(info.collectives['backward'])}",
        "#",
        "# parameters (original names; this rank's slice):",
    ]
    width = max((len(name) for name in info.parameters), default=0)
    for name, p in info.parameters.items():
        layout = str(p.layout) + (f" in {p.blocks} blocks" if p.blocks > 1 else "")
        shape = f"{list(p.global_shape)} -> {list(p.local_shape)}" if p.local_shape != p.global_shape else f"{list(p.global_shape)}"
        lines.append(f"#   {name:<{width}}  {layout:<17} {shape}")
    lines.append("#")
    lines.append("# layouts of the compute nodes (strategy(inputs -> outputs)):")
    width = max((len(f"{n} ({m})") for n, m, _ in info.layouts), default=0)
    for node, owner, strategy in info.layouts:
        lines.append(f"#   {f'{node} ({owner})':<{width}}  {strategy}")
    return "\n".join(lines) + "\n" + module.code
