"""Sharding pass: one tensor-parallel layout per node, chosen by an integer linear program.

Reads an annotated graph (``node.meta["partc"]``), asks :mod:`partc.passes.layouts` for
the strategies of every node, prices them with the :class:`~partc.cost_model.CostModel`
on the ``tp`` ranks of one tensor-parallel group, and returns a frozen
:class:`ShardingPlan`: the strategy of every node, the layout and slice of every
parameter, the resharding collectives to insert, the constants to rewrite. The graph is
not changed; the codegen reads the plan.

The model (``_ShardingILP``)
----------------------------
Sets: nodes ``v`` with strategies ``s in S_v``; edges ``E = (u, k) -> (v, i)`` (output
``k`` of ``u`` feeds tensor input ``i`` of ``v``); for each value ``(u, k)`` its
consumers grouped by *transition* ``t = (L, g, regather)``: the layout ``L`` a consumer
strategy needs, the layout ``g`` of the gradient it sends back, and whether it saves the
input for backward after a gather.

Variables::

    x[v,s] in {0,1}     node v runs strategy s
    e[E,a,b] in [0,1]   producer strategy a and consumer strategy b on edge E (the product
                        x[u,a]·x[v,b], linearised through its marginals)
    y[u,a,t] in [0,1]   value u, produced by strategy a, is converted by transition t
                        (one conversion feeds every consumer that needs it)

Constraints (every one is named after its family and its node/edge)::

    choice     sum_s x[v,s] = 1                              for all v     _add_choice
    marginals  sum_b e[E,a,b] = x[u,a],  sum_a e[E,a,b] = x[v,b]   for all E  _add_edges
    reshard    y[u,a,t] >= sum_{b : t(E,a,b) = t} e[E,a,b]    for all E out of u, a, t
                                                                            _add_reshards
    memory     sum_v sum_s mem[v,s]·x[v,s] <= M                             _add_memory
               (one row per rank r, with mem_r, when a strategy places a tensor on one
               rank only: a table-wise embedding O(r) loads rank r alone)
    ownership  x[u,a] + x[v,b] <= 1   for an edge whose pair (a, b) would move an owned
               tensor to another owner, or an owned parameter anywhere       _add_edges

Objective (seconds per training step on one device of the group)::

    min  sum_v sum_s (compute[v,s] + internal[v,s])·x[v,s]
       + sum_u sum_a sum_t (fwd(out_a -> L) + bwd(g -> adjoint(out_a)) + regather
                            + calls(t)·COLLECTIVE_CALL_PENALTY)·y[u,a,t]

* ``compute[v,s]``: roofline of the node's forward and backward FLOPs and bytes times
  the strategy's compute factor (1/tp when the work is split), on the slowest device of
  the group, plus the optimizer update of the parameter share a device keeps.
* ``internal[v,s]``: collectives a strategy runs itself (vocab-parallel cross entropy's
  two all-reduces of N and 2N fp32 values).
* ``fwd``: :func:`~partc.passes.layouts.reshard_cost` of the value's layout into the
  consumer's (all-gather, all-reduce, reduce-scatter, all-to-all; slices are free).
* ``bwd``: the adjoint. A value of layout L must get its gradient in ``adjoint(L)`` (S
  for S; R for R and P); a consumer sends a gradient in ``grad_layout``: S(d) for an
  S(d) input, R for a P input, and for an R input R when it computes redundantly or P
  when it computes a sharded part. So a row-parallel all-reduce (P -> R forward) costs
  nothing in backward (R -> R), the replicated input of a column-parallel linear costs
  nothing forward and an all-reduce backward (P -> R), an all-gather before a
  column-parallel linear (sequence parallelism) a reduce-scatter backward (P -> S).
  Gradients are reduced where the value is produced (eager), as Megatron does.
* ``regather``: a consumer that saves a gathered input for backward keeps only the
  producer's sharded copy (that is what the memory term counts) and gathers it again in
  backward, as Megatron's sequence parallelism does: one more forward-sized collective.
* ``calls(t)·COLLECTIVE_CALL_PENALTY``: 1 µs per collective call, the launch cost the
  alpha-beta model leaves out; it breaks ties (an all-reduce against a reduce-scatter +
  all-gather pair of equal price) and is not part of the reported times.
* ``mem[v,s]``: a parameter's weights, gradient and optimizer state
  (:func:`~partc.cost_model.training_memory`) times 1/tp when sharded; a node's saved
  activations times 1/tp when its output is sharded. ``M`` is ``memory_limit``
  (default: the smallest device memory of the group; ``math.inf`` for none). A strategy
  whose output is O(r) keeps its bytes on rank r and none elsewhere (``mem_r``); its
  compute is charged whole, as the owner's time that the broadcast after it waits for
  (tables owned by different ranks in fact look up side by side: a conservative price).

Graph inputs are replicated, the graph's outputs must be replicated (the output node has
one strategy needing R). Communication is not overlapped with compute here: the TP
collectives sit on the critical path between dependent matmuls.

Repeated blocks
---------------
With ``reuse_repeated_blocks`` (default), layers with equal ``LayerInfo.signature`` (the
96 blocks of a GPT-3) are one class: every node of a class takes the strategy of its
representative. The ILP has variables for representatives only and counts each with
its multiplicity; an edge between two blocks (block i's output feeding block i+1) becomes
an edge between the representative's output and its own input, so the boundary layout is
chosen once and is consistent across the repeats. The objective is exact for block-uniform
plans, which is a restriction of the full problem: compare with
``reuse_repeated_blocks=False``.

Reading the plan (for the codegen)
----------------------------------
* ``plan.strategies[node].inputs[i]`` is the layout input ``i`` arrives in, ``i`` indexing
  :func:`~partc.passes.layouts.tensor_inputs` (the path of each input in args/kwargs);
  ``outputs[k]`` the layout of output element ``k``. The node computes on local shards.
* ``plan.parameters[name]``: slice each parameter with ``ParameterSharding.local(full,
  rank)`` (contiguous 1/tp of dim d; fused QKV in ``blocks``); state-dict keys stay ``name``.
* ``plan.reshards``: insert one autograd-aware conversion after the producer for each
  record; every listed consumer reads it. Forward ``forward``, backward ``backward`` on the
  summed gradient, plus an all-gather of the saved input first when ``regather``.
  Local ops: "slice" (R -> S, take this rank's piece), "partial" (R -> P: tp-rank 0 keeps
  the value, the others zeros; the gradient passes through unchanged), "pad" (S -> P: the
  local piece placed in zeros of the whole shape).
* Strategies with work of their own: ``row`` linear adds its bias as a P input (so the
  bias counts once in the sum); ``vocab_parallel`` embedding looks up the rank's rows
  (indices outside them give zero rows); ``vocab_parallel`` cross entropy is Megatron's
  (max all-reduce, then sum-exp and target-logit all-reduce); ``local_scale`` multiplies
  the local result (a mean over a sharded dim); ``split_sharded`` splits local blocks.
* ``plan.view_rewrites`` change hard-coded sizes; ``plan.size_rewrites`` mark ``size()``
  reads of sharded dims, whose local value times ``tp`` is the global size the traced
  program (and the view rewrites) assume.

Status
------
``optimal``; ``feasible`` when CBC stopped at ``time_limit`` with a solution (PuLP's
``status`` says "Optimal" then; ``sol_status`` says "integer feasible"); an infeasible
budget raises :class:`~partc.InfeasiblePlanError` with the least memory any layout needs
(exact: memory is separable per node); a missing or failing CBC raises
:class:`~partc.SolverError`.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pulp
import torch
import torch.fx as fx

from partc.cost_model import CostModel, MemoryBreakdown, optimizer_step_bytes, training_memory
from partc.passes.estimate import kernel_efficiency
from partc.errors import ErrorContext, InfeasiblePlanError, PartcError, SolverError
from partc.passes import layouts as _layouts
from partc.passes.ilp import solver_status
from partc.passes.ir import META_KEY, OpKind, canonical_name, gc_paused, graph_info, node_info
from partc.passes.layouts import (
    COLLECTIVES,
    PASS_NAME,
    InputRef,
    Layout,
    OpRule,
    Owned,
    R,
    Shard,
    Strategy,
    adjoint,
    grad_layout,
    local_shape,
    local_shard,
    op_rule,
    reshard_cost,
    saves_input,
    tensor_inputs,
    transition,
)
from partc.passes.plain_data import PlainDataError, from_plain, record_types, to_plain

__all__ = [
    "plan_sharding",
    "ShardingPlan",
    "ParameterSharding",
    "Reshard",
    "Use",
    "ViewRewrite",
    "SizeRewrite",
    "solver_status",
]

# Each collective call also costs a kernel launch and NCCL's setup, which the alpha-beta
# model leaves out; without it a reduce-scatter + all-gather pair prices exactly like the
# all-reduce it replaces, and the solver would gather a LayerNorm weight every step to save
# a tenth of a microsecond of optimizer time. The objective (not the reported times)
# charges each call this much.
COLLECTIVE_CALL_PENALTY = 1e-6  # seconds
# CBC's absolute tolerances (its cutoff increment is about 1e-5) would swallow differences
# of microseconds between plans of a small model if the objective were in seconds: CBC sees
# it in microseconds, and the plan reports seconds.
_OBJECTIVE_UNIT = 1e6
_MEMORY_FIELDS = tuple(f.name for f in fields(MemoryBreakdown))  # in constructor order
# Building the problem and the plan handles each repeated layer's nodes, uses and
# conversions once per class of layers (False: every node and use on its own, the reference
# tests/test_search_speed.py and tests/test_sharding.py check it against).
PRICE_REPEATS_ONCE = True
_GiB = 2**30


# -- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    """One consumer of a resharded value."""

    node: str  # the consumer node
    input_index: int  # index into layouts.tensor_inputs(consumer) and Strategy.inputs
    path: tuple  # where the value sits in the consumer's (args, kwargs)


@dataclass(frozen=True)
class Reshard:
    """A conversion of one value to insert after its producer; every listed consumer reads
    the converted value. Forward runs ``forward`` (src -> dst); backward turns the summed
    gradient of the consumers (``grad_layout``) into ``adjoint(src)`` with ``backward``.

    The Megatron functions are: ``copy_to_tp`` = (None, "all_reduce"); ``reduce_from_tp`` =
    ("all_reduce", None); ``gather_from_sp`` = ("all_gather", "reduce_scatter");
    ``reduce_scatter_to_sp`` = ("reduce_scatter", "all_gather"); ``scatter_to_tp`` =
    ("slice", "all_gather")."""

    producer: str
    output_index: int  # element of the producer's output (0 for a plain tensor)
    src: Layout
    dst: Layout
    consumers: tuple[Use, ...]
    forward: str | None  # "all_gather", "all_reduce", "reduce_scatter", "all_to_all", "slice", "partial", "pad" or None
    grad_layout: Layout | None  # layout of the consumers' summed gradient; None: no gradient flows
    backward: str | None  # transition(grad_layout, adjoint(src)); None: nothing to do
    regather: bool  # backward gathers src again (the consumer saved only the sharded copy)
    nbytes: int  # bytes of the whole tensor, in the compute dtype
    forward_time: float
    backward_time: float
    blocks: int = 1  # > 1: the value is a fused projection laid out in blocks (see ParameterSharding)

    def collectives(self, phase: str) -> list[str]:
        """Collective names this conversion runs in ``phase`` ("forward" or "backward")."""
        if phase == "forward":
            return [self.forward] if self.forward in COLLECTIVES else []
        found = ["all_gather"] if self.regather else []
        return found + ([self.backward] if self.backward in COLLECTIVES else [])

    def __str__(self) -> str:
        users = ", ".join(u.node for u in self.consumers)
        back = f"{self.grad_layout}->{adjoint(self.src)} {self.backward}" if self.backward else "none"
        return f"{self.producer}[{self.output_index}] {self.src}->{self.dst} fwd {self.forward} / bwd {back} -> {users}"


@dataclass(frozen=True)
class ParameterSharding:
    """How one parameter or buffer is split over the tensor-parallel ranks.

    Rank r keeps ``layouts.local_shard(full, layout, r, tp, blocks)``: for S(d), the r-th of
    tp contiguous slices of dim d; with ``blocks > 1`` (a fused QKV weight) dim d is first cut
    into ``blocks`` equal blocks and the rank keeps its slice of each, concatenated. The
    state-dict key is the original ``name``."""

    name: str  # qualified name (the get_attr target), as in the model's state dict
    node: str  # the get_attr node
    layout: Layout  # Shard(d) or Replicate
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    tp: int
    blocks: int = 1
    trainable: bool = True

    def local(self, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's piece of the whole parameter ``tensor``."""
        return local_shard(tensor, self.layout, rank, self.tp, self.blocks)


@dataclass(frozen=True)
class ViewRewrite:
    """A hard-coded size the codegen changes: ``args[path]`` of ``node`` from ``old`` to
    ``new``; an argument computed at run time (``old is None``) is divided by ``divisor``."""

    node: str
    path: tuple
    old: int | None
    new: int | None
    divisor: int


@dataclass(frozen=True)
class SizeRewrite:
    """A ``size()`` / ``shape`` / ``numel()`` read of a tensor sharded on ``dim``: the local
    value (of that dim, or the numel) times ``multiplier`` is the global value the traced
    program expects; view rewrites are relative to global sizes."""

    node: str  # the size / sym_size / getattr(shape) / numel node
    tensor: str  # the node whose size is read
    dim: int  # the sharded dim of that tensor
    multiplier: int


@dataclass(frozen=True)
class ShardingPlan:
    """The tensor-parallel plan of one graph; the single source of truth for the codegen."""

    tp: int
    ranks: tuple[int, ...]  # the tensor-parallel group the plan was priced on
    strategies: Mapping[str, Strategy]  # node name -> chosen strategy (inputs follow layouts.tensor_inputs)
    parameters: Mapping[str, ParameterSharding]  # parameter/buffer name -> layout and slice rule
    reshards: tuple[Reshard, ...]  # conversions to insert, in graph order of the producer
    view_rewrites: tuple[ViewRewrite, ...]
    size_rewrites: tuple[SizeRewrite, ...]
    compute_time: float  # seconds per step: forward + backward + optimizer update, one device
    communication_time: float  # seconds per step of the collectives (forward + backward)
    forward_communication_time: float
    objective: float  # the ILP's objective value (= compute + communication for exact reuse)
    memory: MemoryBreakdown  # bytes per device
    memory_limit: float  # the budget the ILP was given (math.inf: none)
    status: str  # "optimal" or "feasible" (time limit reached with a solution)
    solve_seconds: float  # CBC wall time
    plan_seconds: float  # whole pass wall time
    unsupported: tuple[str, ...]  # nodes with no sharding rule (replicated)
    refused_views: Mapping[str, tuple[str, ...]]  # view node -> shard layouts it refused and why
    reused_layers: int  # layers solved through a representative (0 without reuse)
    ilp_variables: int
    ilp_constraints: int

    @property
    def step_time(self) -> float:
        return self.compute_time + self.communication_time

    # -- plain JSON (plans are saved as JSON, never pickle) ---------------------------------------
    TIMING_FIELDS = ("solve_seconds", "plan_seconds")  # wall times: saved, but they decide nothing

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON data, generically over the dataclass fields of the records
        it holds (:mod:`partc.passes.plain_data`): new layout or strategy kinds need no code here."""
        return to_plain(self, "ShardingPlan")

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "ShardingPlan":
        """The plan :meth:`to_dict` wrote. Only the records of this module and
        :mod:`partc.passes.layouts` are rebuilt; anything else raises ``ValueError`` naming it."""
        plan = from_plain(dict(data), _plan_record_types(), "ShardingPlan")
        if not isinstance(plan, ShardingPlan):
            raise PlainDataError(f"not a ShardingPlan: {type(plan).__name__}")
        return plan

    def layout(self, node: str, output_index: int = 0) -> Layout:
        """The layout of a node's output value."""
        return self.strategies[node].outputs[output_index]

    def collectives_per_step(self, nodes: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        """Counts of each collective per training step, ``{"forward": {...}, "backward": {...}}``;
        restricted to conversions whose producer is in ``nodes`` (and strategies of those
        nodes) when given."""
        keep = None if nodes is None else set(nodes)
        counts = {"forward": Counter(), "backward": Counter()}
        for r in self.reshards:
            if keep is None or r.producer in keep:
                for phase in counts:
                    counts[phase].update(r.collectives(phase))
        for name, s in self.strategies.items():
            if keep is None or name in keep:
                for c in s.comm:
                    counts[c.phase][c.collective] += 1
        return {phase: dict(sorted(c.items())) for phase, c in counts.items()}

    def summary(self) -> str:
        lines = [
            f"tensor parallel over {self.tp} ranks {list(self.ranks)}: {self.status}, solved in {self.solve_seconds:.2f} s "
            f"({self.ilp_variables} variables, {self.ilp_constraints} constraints, {self.reused_layers} layers reused)",
            f"  predicted step: compute {self.compute_time * 1e3:.3f} ms + communication {self.communication_time * 1e3:.3f} ms "
            f"(forward {self.forward_communication_time * 1e3:.3f} ms)",
            f"  memory per device: {self.memory.total / _GiB:.2f} GiB (parameters {self.memory.parameters / _GiB:.2f}, "
            f"gradients {self.memory.gradients / _GiB:.2f}, optimizer {self.memory.optimizer_state / _GiB:.2f}, "
            f"activations {self.memory.activations / _GiB:.2f})"
            + ("" if math.isinf(self.memory_limit) else f" of {self.memory_limit / _GiB:.2f} GiB"),
            f"  collectives per step: {self.collectives_per_step()}",
        ]
        if self.unsupported:
            lines.append(f"  {len(self.unsupported)} operator(s) without a sharding rule, replicated: {', '.join(self.unsupported[:10])}")
        return "\n".join(lines)


def _plan_record_types() -> dict[str, type]:
    """The classes a saved ShardingPlan may name: this module's records and every layout,
    strategy and cost record of :mod:`partc.passes.layouts` (read now, so kinds added there count)."""
    return record_types(_layouts, sys.modules[__name__])


# -- the pass -------------------------------------------------------------------------------
@gc_paused()
def plan_sharding(
    gm: fx.GraphModule,
    cost_model: CostModel,
    *,
    tp: int,
    ranks: Sequence[int] | None = None,
    memory_limit: float | None = None,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    reuse_repeated_blocks: bool = True,
    time_limit: float = 30.0,
    training: bool = True,
) -> ShardingPlan:
    """Choose a tensor-parallel layout for every node of the annotated ``gm``.

    tp: ranks in the tensor-parallel group; ranks: their global ranks (default 0..tp-1),
        which price the collectives (a group spanning nodes pays the inter-node link).
    memory_limit: bytes per device (default: the smallest device memory among ``ranks``;
        ``math.inf`` for no limit). compute_dtype: the mixed-precision compute dtype (bf16):
        matmul rate, activation and communication bytes, fp32 master weights.
    reuse_repeated_blocks: solve layers with equal signatures once (see the module docstring).
    time_limit: CBC seconds; a plan found at the limit is reported as "feasible".
    """
    started = time.perf_counter()
    if META_KEY not in gm.meta or any(META_KEY not in n.meta for n in gm.graph.nodes):
        raise PartcError("the sharding pass needs an annotated graph", ErrorContext(pass_name=PASS_NAME, fix="run passes.annotate.annotate(gm) first"))
    if not isinstance(tp, int) or tp < 1:
        raise PartcError(f"tp must be an integer >= 1, got {tp!r}", ErrorContext(pass_name=PASS_NAME))
    ranks = tuple(range(tp) if ranks is None else ranks)
    if len(ranks) != tp or len(set(ranks)) != tp:
        raise PartcError(f"ranks must list {tp} distinct ranks, got {list(ranks)}", ErrorContext(pass_name=PASS_NAME))
    device = cost_model.cluster.slowest_device(ranks)  # also validates the ranks
    if memory_limit is None:
        memory_limit = min(cost_model.cluster.device(r).memory for r in ranks)
    problem = _ShardingProblem(gm, cost_model, tp, ranks, device, compute_dtype, optimizer, training, reuse_repeated_blocks)
    ilp = _ShardingILP(problem, memory_limit)
    choice, status, solve_seconds, objective = ilp.solve(time_limit)
    return problem.build_plan(choice, status, solve_seconds, objective, memory_limit, started, ilp)


@dataclass
class _Edge:
    """A canonical edge: output ``k`` of ``u`` into input ``i`` of ``v`` (representatives)."""

    u: fx.Node
    k: int
    v: fx.Node
    i: int
    ref: InputRef
    # (a, b) -> (transition key, cost); only pairs with a nonzero cost
    costs: dict[tuple[int, int], tuple[tuple, float]] = field(default_factory=dict)
    # (a, b) pairs no conversion serves (an owned tensor to another layout): never chosen together
    forbidden: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _LayerClass:
    """Layers of one signature whose nodes take the strategies of the first layer's.

    Equal signatures (``passes.annotate``) mean equal operators, argument structure and
    positions of the values read inside the layer, so a use inside a repeated layer is its
    representative layer's use with the nodes moved: such uses are handled once per class
    (``internal``), and only the uses that read from outside the layer one by one."""

    first: list[fx.Node]  # the representative layer's nodes (placeholders left out)
    members: list[list[fx.Node]]  # the repeated layers, aligned with ``first``
    # (t, i, p, k): input i of first[t] reads output k of first[p]
    internal: list[tuple[int, int, int, int]] = field(default_factory=list)
    # (t, i, path): input i of first[t] reads a value from outside the layer, at ``path`` of its arguments
    external: list[tuple[int, int, tuple]] = field(default_factory=list)
    # per member: whether its nodes need gradients as the representative layer's do (then its
    # conversions are the representative layer's: what a use converts depends on it)
    same_gradients: list[bool] = field(default_factory=list)


class _ShardingProblem:
    """Strategies and prices of every representative node and edge."""

    def __init__(self, gm, cost_model, tp, ranks, device, compute_dtype, optimizer, training, reuse):
        self.gm, self.cost_model, self.tp, self.ranks, self.device = gm, cost_model, tp, ranks, device
        self.compute_dtype, self.optimizer, self.training = compute_dtype, optimizer, training
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.order = {n: j for j, n in enumerate(self.nodes)}
        self._transition_prices: dict[tuple, tuple[float, float]] = {}
        self.canon, self.reused_layers, self.classes = self._classes() if reuse else ({}, 0, [])
        self.multiplicity = Counter(map(self.canon.get, self.nodes, self.nodes))  # rep(n) for every n
        self.weight_dtype = self._weight_dtype()
        self.rules: dict[fx.Node, OpRule] = {}  # representatives, in graph order
        self.unsupported: list[str] = []
        for n in self.nodes:
            if n not in self.canon:
                rule = op_rule(n, tp)
                if rule is not None:
                    self.rules[n] = rule
        self._warn_unsupported()
        self._describe_classes()
        self.reps = list(self.rules)
        self.node_cost = {n: [self._node_time(n, s) for s in self.rules[n].strategies] for n in self.reps}
        self.node_memory = {n: [self._node_memory(n, s) for s in self.rules[n].strategies] for n in self.reps}
        # Per-rank memory, needed only when some strategy places a tensor on one rank.
        self.owned = any(_owner(s) is not None for n in self.reps for s in self.rules[n].strategies)
        self.node_memory_on = (
            {n: [[self._node_memory_breakdown(n, s, r).total for r in range(tp)] for s in self.rules[n].strategies] for n in self.reps}
            if self.owned
            else {}
        )
        self.uses = self._uses_one_by_one()
        self.edges, self.groups = self._edges()

    def rep(self, node: fx.Node) -> fx.Node:
        """The representative whose strategy ``node`` takes (itself unless reused)."""
        return self.canon.get(node, node)

    def source(self, node: fx.Node, i: int) -> fx.Node:
        """The producer of tensor input ``i`` of ``node`` (``layouts.tensor_inputs(node)[i].node``)."""
        ref = self.rules[self.rep(node)].inputs[i]
        return ref.node if node not in self.canon else _argument_at(node, ref.path)

    # -- classes of repeated layers ------------------------------------------------------------
    def _classes(self) -> tuple[dict[fx.Node, fx.Node], int, list[_LayerClass]]:
        """(node -> representative, number of layers reused, the classes of layers)."""
        layers = graph_info(self.gm).layers
        by_signature: dict[str, list] = defaultdict(list)
        for layer in layers:
            by_signature[layer.signature].append(layer)
        canon: dict[fx.Node, fx.Node] = {}
        classes = []
        reused = 0
        for group in by_signature.values():
            if len(group) < 2:
                continue
            members = [[self.by_name[x] for x in layer.nodes if self.by_name[x].op != "placeholder"] for layer in group]
            first = members[0]
            mapped = []
            for other in members[1:]:
                # same target: same canonical name
                if len(other) != len(first) or any(a.op != b.op or (a.target is not b.target and canonical_name(a) != canonical_name(b)) for a, b in zip(first, other)):
                    continue  # equal hashes, different structure: solve it on its own
                canon.update(zip(other, first))
                mapped.append(other)
                reused += 1
            if mapped:
                classes.append(_LayerClass(first, mapped))
        return canon, reused, classes

    def _describe_classes(self) -> None:
        """Each class's uses inside and from outside its layers, and which members need
        gradients as the first layer does. Without ``PRICE_REPEATS_ONCE`` no class is
        described: every use is handled one by one (the reference)."""
        if not PRICE_REPEATS_ONCE:
            self.classes = []
            return
        for c in self.classes:
            position = {n: p for p, n in enumerate(c.first)}
            for t, r in enumerate(c.first):
                for i, ref in enumerate(self.rules[r].inputs if r in self.rules else ()):
                    p = position.get(ref.node)
                    if p is None:
                        c.external.append((t, i, ref.path))
                    else:
                        c.internal.append((t, i, p, ref.output_index))
            gradients = [node_info(n).requires_grad for n in c.first]
            c.same_gradients = [[node_info(n).requires_grad for n in layer] == gradients for layer in c.members]

    def _uses_one_by_one(self) -> list[tuple[fx.Node, int, fx.Node]]:
        """(v, i, u): input i of v reads u, for every use but those inside the layers of a
        class (which repeat the first layer's), in graph order."""
        external: dict[fx.Node, list[tuple[int, tuple]]] = defaultdict(list)
        for c in self.classes:
            for layer in c.members:
                for t, i, path in c.external:
                    external[layer[t]].append((i, path))
        uses = []
        for v in self.nodes:
            rv = self.canon.get(v, v)
            rule = self.rules.get(rv)
            if rule is None:
                continue
            if v is rv:
                uses += [(v, i, ref.node) for i, ref in enumerate(rule.inputs)]
            elif not PRICE_REPEATS_ONCE:  # the reference: every node's own arguments
                uses += [(v, i, ref.node) for i, ref in enumerate(tensor_inputs(v))]
            elif v in external:
                uses += [(v, i, _argument_at(v, path)) for i, path in external[v]]
        return uses

    def _warn_unsupported(self) -> None:
        if all(rule.supported for rule in self.rules.values()):
            return
        members: dict[fx.Node, list[str]] = defaultdict(list)
        for m in self.nodes:
            members[self.rep(m)].append(m.name)
        for n, rule in self.rules.items():
            if rule.supported:
                continue
            copies = members[n]
            self.unsupported.extend(copies)
            info = node_info(n)
            where = f" in {info.module}" if info.module else ""
            more = f" (and {len(copies) - 1} repeats)" if len(copies) > 1 else ""
            where += f" ({info.source})" if info.source else ""
            warnings.warn(
                f"partc sharding: no sharding rule for {canonical_name(n)} at node {n.name}{where}{more}; it is replicated "
                f"on every tensor-parallel rank ({n.format_node()})",
                stacklevel=3,
            )

    # -- prices --------------------------------------------------------------------------
    def _weight_dtype(self) -> torch.dtype:
        sizes: Counter = Counter()
        for n in self.nodes:
            if n.op != "get_attr":  # op_kind: the only OpKind.PARAMETER nodes
                continue
            info = node_info(n)
            if info.op == OpKind.PARAMETER and info.param_numel:
                sizes[info.dtype] += info.param_numel
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    def value_bytes(self, node: fx.Node, k: int) -> int:
        val = node.meta.get("val")
        val = val[k] if isinstance(val, (tuple, list)) else val
        if not isinstance(val, torch.Tensor):
            return 0
        itemsize = self.compute_dtype.itemsize if self.compute_dtype is not None and val.dtype.is_floating_point else val.dtype.itemsize
        return val.numel() * itemsize

    def _scale(self, info) -> float:
        if self.compute_dtype is None or info.dtype is None or not info.dtype.is_floating_point:
            return 1.0
        return self.compute_dtype.itemsize / info.dtype.itemsize

    def _node_time(self, node: fx.Node, s: Strategy) -> float:
        info = node_info(node)
        seconds = sum(self._comm(c) for c in s.comm)
        if info.op == OpKind.PARAMETER:
            if self.training and info.param_numel and self.optimizer != "sgd":
                seconds += info.param_numel * optimizer_step_bytes(self.optimizer, self.compute_dtype or self.weight_dtype, self.compute_dtype is not None) * s.memory_factor / self.device.memory_bandwidth
            return seconds
        floating = info.dtype is not None and info.dtype.is_floating_point
        dtype = self.compute_dtype if (self.compute_dtype is not None and floating) else (info.dtype or torch.float32)
        moved = info.bytes_moved * self._scale(info) * s.compute_factor
        if info.fwd_flops or moved:
            seconds += self.cost_model.compute_time(info.fwd_flops * s.compute_factor, moved, dtype, self.device, kernel_efficiency(info, self.device, dtype))
        if self.training and info.bwd_flops:
            seconds += self.cost_model.compute_time(info.bwd_flops * s.compute_factor, 2 * moved, dtype, self.device, kernel_efficiency(info, self.device, dtype))
        return seconds

    def _comm(self, c) -> float:
        price = {
            "all_reduce": self.cost_model.all_reduce,
            "all_gather": self.cost_model.all_gather,
            "reduce_scatter": self.cost_model.reduce_scatter,
        }.get(c.collective)
        if price is None:
            return self.cost_model.all_to_all(c.nbytes / self.tp, self.ranks)
        return price(c.nbytes, self.ranks)

    def parameter_memory(self, info) -> MemoryBreakdown:
        param_dtype = self.compute_dtype or self.weight_dtype
        weights = training_memory(
            info.param_numel, param_dtype, 0.0, optimizer=self.optimizer, mixed_precision=self.compute_dtype is not None, training=self.training
        )
        buffers = max(info.param_bytes - info.param_numel * (info.dtype.itemsize if info.dtype else 4), 0)
        return weights + MemoryBreakdown(parameters=buffers, gradients=0.0, optimizer_state=0.0, activations=0.0)

    def _node_memory_breakdown(self, node: fx.Node, s: Strategy, rank: int | None = None) -> MemoryBreakdown:
        """Bytes ``node`` keeps on tensor-parallel rank ``rank`` under ``s``; rank None: the
        mean over the ranks (the same on every rank unless ``s`` owns its output)."""
        info = node_info(node)
        owner = _owner(s)
        share = 1.0 if owner is None else (1.0 / self.tp if rank is None else float(rank == owner))
        if info.op == OpKind.PARAMETER:
            m = self.parameter_memory(info)
            f = s.memory_factor * share
            return MemoryBreakdown(m.parameters * f, m.gradients * f, m.optimizer_state * f, 0.0)
        activations = info.activation_bytes * self._scale(info) * s.memory_factor * share if self.training else 0.0
        return MemoryBreakdown(0.0, 0.0, 0.0, activations)

    def _node_memory(self, node: fx.Node, s: Strategy) -> float:
        return self._node_memory_breakdown(node, s).total

    # -- edges and transitions ------------------------------------------------------------
    def _edges(self):
        """Canonical edges with their priced transitions, and the producer groups:
        (representative producer, output, set of canonical edges) -> number of copies.

        A value of a repeated layer read only inside it has its representative's group; the
        values read from outside their layer are grouped one by one. Groups are listed in
        the order of their first use, as a scan of every use in graph order lists them."""
        edges: dict[tuple, _Edge] = {}
        consumers: dict[tuple[fx.Node, int], set] = {}  # value -> canonical edges, of the uses handled one by one
        first_use: dict[tuple[fx.Node, int], tuple[int, int]] = {}  # value -> (graph position of the consumer, input)
        canon, rules, order = self.canon, self.rules, self.order
        # per representative: the inputs some strategy reads
        reads = {rv: {i for i in range(len(rule.inputs)) if any(s.inputs[i] is not None for s in rule.strategies)} for rv, rule in rules.items()}
        for v, i, u in self.uses:
            rv, ru = canon.get(v, v), canon.get(u, u)
            if i not in reads[rv] or ru not in rules:
                continue
            k = rules[rv].inputs[i].output_index
            key = (ru, k, rv, i)
            if key not in edges:
                edges[key] = self._price_edge(ru, k, rv, i, rules[rv].inputs[i])
            if (u, k) not in consumers:
                consumers[(u, k)] = set()
                first_use[(u, k)] = (order[v], i)
            consumers[(u, k)].add(key)
        # (first use, group, copies); the ILP numbers the groups in the order of first use
        found: list[tuple[tuple[int, int], tuple, int]] = []
        for c in self.classes:
            inside: dict[tuple[int, int], tuple[set, tuple[int, int]]] = {}  # (p, k) -> (edges, first (t, i))
            for t, i, p, k in c.internal:
                rv, ru = c.first[t], c.first[p]
                if i in reads[rv] and ru in rules:
                    inside.setdefault((p, k), (set(), (t, i)))[0].add((ru, k, rv, i))  # priced with the first layer
            for (p, k), (keys, (t, i)) in inside.items():
                alone, first = 0, None
                for layer in c.members:
                    more = consumers.pop((layer[p], k), None)  # also read from outside the layer
                    if more is None:
                        alone += 1
                        first = first or (order[layer[t]], i)
                    else:
                        found.append((min((order[layer[t]], i), first_use[(layer[p], k)]), (c.first[p], k, frozenset(keys | more)), 1))
                if alone:
                    found.append((first, (c.first[p], k, frozenset(keys)), alone))
        found += [(first_use[(u, k)], (canon.get(u, u), k, frozenset(keys)), 1) for (u, k), keys in consumers.items()]
        groups: Counter = Counter()
        for _, group, copies in sorted(found, key=lambda f: f[0]):
            groups[group] += copies
        return edges, groups

    def transition_key(self, u: fx.Node, k: int, a: Strategy, v: fx.Node, ref: InputRef, i: int, b: Strategy) -> tuple | None:
        dst = b.inputs[i]
        if dst is None:
            return None
        src = a.outputs[k]
        needs_grad = self.training and node_info(u).requires_grad
        g = grad_layout(dst, b) if needs_grad else None
        regather = self.training and node_info(v).requires_grad and transition(src, dst) == "all_gather" and saves_input(v, ref)
        return (dst, g, regather)

    def _use_conversion(self, v: fx.Node, i: int, u: fx.Node, chosen: Mapping[fx.Node, Strategy], converts: dict) -> tuple | None:
        """:meth:`_conversion` of input ``i`` of ``v`` reading ``u`` under the ``chosen``
        strategies (None also when ``u`` has none). It depends on the edge between the two
        representatives and on which of the two nodes needs a gradient, so ``converts``
        remembers it by those."""
        a = chosen.get(u)
        if a is None:
            return None
        rv = self.canon.get(v, v)
        ref = self.rules[rv].inputs[i]
        use = (self.canon.get(u, u), ref.output_index, rv, i, node_info(u).requires_grad, node_info(v).requires_grad)
        if use not in converts or not PRICE_REPEATS_ONCE:
            converts[use] = self._conversion(u, ref.output_index, a, v, ref, i, chosen[v])
        return converts[use]

    def _conversion(self, u: fx.Node, k: int, a: Strategy, v: fx.Node, ref: InputRef, i: int, b: Strategy) -> tuple | None:
        """The transition key of a use whose conversion does something (a forward or backward
        operation, or a regather), else None."""
        key = self.transition_key(u, k, a, v, ref, i, b)
        if key is None:
            return None
        src = a.outputs[k]
        dst, g, regather = key
        if transition(src, dst) is None and (g is None or transition(g, adjoint(src)) is None) and not regather:
            return None
        return key

    def transition_cost(self, src: Layout, key: tuple, nbytes: int) -> tuple[float, float]:
        """(forward seconds, backward seconds) of converting ``src`` by transition ``key``;
        priced once per (src, key, nbytes): every repeated layer converts the same values."""
        found = self._transition_prices.get((src, key, nbytes)) if PRICE_REPEATS_ONCE else None
        if found is None:
            dst, g, regather = key
            fwd = reshard_cost(src, dst, nbytes, self.cost_model, self.ranks)[0]
            bwd = reshard_cost(g, adjoint(src), nbytes, self.cost_model, self.ranks)[0] if g is not None else 0.0
            if regather:
                bwd += fwd
            found = self._transition_prices[(src, key, nbytes)] = (fwd, bwd)
        return found

    @staticmethod
    def collective_calls(src: Layout, key: tuple) -> int:
        dst, g, regather = key
        calls = (transition(src, dst) in COLLECTIVES) + int(regather)
        return calls + (g is not None and transition(g, adjoint(src)) in COLLECTIVES)

    def _price_edge(self, u, k, v, i, ref) -> _Edge:
        edge = _Edge(u, k, v, i, ref)
        nbytes = self.value_bytes(u, k)
        cache: dict[tuple, float] = {}
        for ia, a in enumerate(self.rules[u].strategies):
            for ib, b in enumerate(self.rules[v].strategies):
                key = self.transition_key(u, k, a, v, ref, i, b)
                if key is None:
                    continue
                src = a.outputs[k]
                if _moves_owned(src, key[0], node_info(u).op == OpKind.PARAMETER):
                    edge.forbidden.append((ia, ib))
                    continue
                if (src, key) not in cache:
                    calls = self.collective_calls(src, key)
                    cache[(src, key)] = sum(self.transition_cost(src, key, nbytes)) + calls * COLLECTIVE_CALL_PENALTY
                cost = cache[(src, key)]
                if cost > 0:
                    edge.costs[(ia, ib)] = (key, cost)
        return edge

    # -- the plan ----------------------------------------------------------------------------
    def build_plan(self, choice, status, solve_seconds, objective, memory_limit, started, ilp) -> ShardingPlan:
        canon = self.canon
        picked = {r: rule.strategies[choice[r]] for r, rule in self.rules.items()}
        chosen = {}  # every node with a rule -> its representative's strategy, in graph order
        for n in self.nodes:
            s = picked.get(canon.get(n, n))
            if s is not None:
                chosen[n] = s
        compute, memory, internal_fwd, internal_bwd = self._node_totals(chosen, choice)

        # conversions, one per (value, transition), in graph order
        converts: dict[tuple, tuple | None] = {}
        order = self.order
        found: list[tuple[tuple[int, int], fx.Node, int, tuple, Use]] = []  # (use's position, u, k, key, use)

        def add(v: fx.Node, i: int, u: fx.Node) -> None:
            ref = self.rules[self.rep(v)].inputs[i]
            key = self._use_conversion(v, i, u, chosen, converts)
            if key is not None:
                found.append(((order[v], i), u, ref.output_index, key, Use(v.name, i, ref.path)))

        for v, i, u in self.uses:
            add(v, i, u)
        for c in self.classes:
            # the first layer's conversions inside it, repeated in every layer needing gradients alike
            inside = []
            for t, i, p, k in c.internal:
                key = self._use_conversion(c.first[t], i, c.first[p], chosen, converts)
                if key is not None:
                    inside.append((t, i, p, k, key, self.rules[c.first[t]].inputs[i].path))
            for layer, same in zip(c.members, c.same_gradients):
                if same:
                    found += [((order[layer[t]], i), layer[p], k, key, Use(layer[t].name, i, path)) for t, i, p, k, key, path in inside]
                else:
                    for t, i, p, _ in c.internal:
                        add(layer[t], i, layer[p])
        grouped: dict[tuple, list[Use]] = defaultdict(list)
        for _, u, k, key, use in sorted(found, key=lambda f: f[0]):
            grouped[(u, k, key)].append(use)
        reshards = []
        described: dict[tuple, tuple] = {}  # (representative, k, key) -> the conversion's fields: the repeats' are its
        for (u, k, key), uses in sorted(grouped.items(), key=lambda item: (order[item[0][0]], item[0][1])):
            what = (self.rep(u), k, key)
            if what not in described or not PRICE_REPEATS_ONCE:
                src = chosen[u].outputs[k]
                dst, g, regather = key
                nbytes = self.value_bytes(u, k)
                backward = transition(g, adjoint(src)) if g is not None else None
                fwd, bwd = self.transition_cost(src, key, nbytes)
                described[what] = (src, dst, transition(src, dst), g, backward, regather, nbytes, fwd, bwd)
            src, dst, forward, g, backward, regather, nbytes, fwd, bwd = described[what]
            reshards.append(Reshard(u.name, k, src, dst, tuple(uses), forward, g, backward, regather, nbytes, fwd, bwd))

        parameters, reshards = self._parameters(chosen, reshards)
        view_rewrites = tuple(
            ViewRewrite(n.name, r.path, r.old, r.new, r.divisor) for n, s in chosen.items() for r in s.rewrites
        )
        comm_fwd = sum(r.forward_time for r in reshards) + internal_fwd
        comm = comm_fwd + sum(r.backward_time for r in reshards) + internal_bwd
        refused = {}
        if any(rule.refused for rule in self.rules.values()):
            refused = {n.name: self.rules[self.rep(n)].refused for n in chosen if self.rules[self.rep(n)].refused}
        return ShardingPlan(
            tp=self.tp,
            ranks=self.ranks,
            strategies=MappingProxyType({n.name: s for n, s in chosen.items()}),
            parameters=MappingProxyType(parameters),
            reshards=tuple(reshards),
            view_rewrites=view_rewrites,
            size_rewrites=self._size_rewrites(chosen),
            compute_time=compute,
            communication_time=comm,
            forward_communication_time=comm_fwd,
            objective=objective,
            memory=memory,
            memory_limit=memory_limit,
            status=status,
            solve_seconds=solve_seconds,
            plan_seconds=time.perf_counter() - started,
            unsupported=tuple(self.unsupported),
            refused_views=MappingProxyType(refused),
            reused_layers=self.reused_layers,
            ilp_variables=ilp.num_variables,
            ilp_constraints=ilp.num_constraints,
        )

    def _node_totals(self, chosen, choice) -> tuple[float, MemoryBreakdown, float, float]:
        """(compute seconds, the busiest rank's memory, forward and backward seconds of the
        strategies' own collectives) of the chosen strategies, summed in graph order.

        A repeated layer's node costs what its representative costs, so each representative
        is priced once; the sums then run over plain floats in the same order as adding
        every node's MemoryBreakdown would (identical results, without building thousands
        of dataclasses)."""
        if not PRICE_REPEATS_ONCE:
            return self._node_totals_per_node(chosen, choice)
        ranks = self.tp if self.owned else 1
        own: dict[fx.Node, float] = {}
        comm: dict[fx.Node, list[tuple[bool, float]]] = {}
        memory = [[{} for _ in _MEMORY_FIELDS] for _ in range(ranks)]  # [rank][field][rep] -> bytes
        for rep in self.reps:
            s = self.rules[rep].strategies[choice[rep]]
            comm[rep] = [(c.phase == "forward", self._comm(c)) for c in s.comm]
            own[rep] = self.node_cost[rep][choice[rep]] - sum(t for _, t in comm[rep])
            for r in range(ranks):
                breakdown = self._node_memory_breakdown(rep, s, r if self.owned else None)
                for j, name in enumerate(_MEMORY_FIELDS):
                    memory[r][j][rep] = getattr(breakdown, name)
        in_order = list(map(self.canon.get, chosen, chosen))  # each node's representative, in graph order
        position = {rep: j for j, rep in enumerate(self.reps)}
        picks = np.fromiter(map(position.__getitem__, in_order), dtype=np.int64, count=len(in_order))

        def add_in_order(per_rep: dict[fx.Node, float]) -> float:
            return _add_in_order(np.array([per_rep[rep] for rep in self.reps], dtype=np.float64)[picks])

        compute = add_in_order(own)
        internal_fwd = internal_bwd = 0.0
        if any(comm.values()):
            internal_fwd = _add_in_order(t for rep in in_order for forward, t in comm[rep] if forward)
            internal_bwd = _add_in_order(t for rep in in_order for forward, t in comm[rep] if not forward)
        per_rank = [MemoryBreakdown(*(add_in_order(field) if any(field.values()) else 0.0 for field in fields_of_rank)) for fields_of_rank in memory]
        return compute, max(per_rank, key=lambda m: m.total), internal_fwd, internal_bwd  # the busiest rank's memory

    def _node_totals_per_node(self, chosen, choice) -> tuple[float, MemoryBreakdown, float, float]:
        """:meth:`_node_totals` pricing every node and adding MemoryBreakdowns (the reference
        that tests/test_search_speed.py compares it with)."""
        compute = internal_fwd = internal_bwd = 0.0
        per_rank = [MemoryBreakdown(0.0, 0.0, 0.0, 0.0) for _ in range(self.tp if self.owned else 1)]
        for n, s in chosen.items():
            rep = self.rep(n)
            compute += self.node_cost[rep][choice[rep]] - sum(self._comm(c) for c in s.comm)
            for r in range(len(per_rank)):
                per_rank[r] = per_rank[r] + self._node_memory_breakdown(rep, s, r if self.owned else None)
            for c in s.comm:
                if c.phase == "forward":
                    internal_fwd += self._comm(c)
                else:
                    internal_bwd += self._comm(c)
        return compute, max(per_rank, key=lambda m: m.total), internal_fwd, internal_bwd

    def _parameters(self, chosen, reshards):
        """Parameter layouts, and the block layout of fused projections split along their
        sharded dim (GPT's qkv -> chunk(3)): the linear's weight and bias rows are cut into
        ``blocks`` blocks, and any conversion of that value gathers/slices per block."""
        blocked_params: dict[str, int] = {}
        blocked_values: dict[tuple[str, int], int] = {}
        for n, s in chosen.items():
            if s.blocks <= 1:
                continue
            producer = self.source(n, 0)
            blocked_values[(producer.name, self.rules[self.rep(n)].inputs[0].output_index)] = s.blocks
            ps = chosen.get(producer)
            if ps is not None and ps.name == "column":
                for source, layout in zip((self.source(producer, j) for j in range(len(ps.inputs))), ps.inputs):
                    if source.op == "get_attr" and isinstance(layout, Shard):
                        blocked_params[source.name] = s.blocks
        for name, blocks in blocked_params.items():
            blocked_values[(name, 0)] = blocks
        if blocked_values:
            reshards = [
                r if (r.producer, r.output_index) not in blocked_values else _replace_blocks(r, blocked_values[(r.producer, r.output_index)])
                for r in reshards
            ]
        parameters = {}
        shapes: dict[tuple, tuple[int, ...]] = {}  # (global shape, layout) -> local shape
        for n, s in chosen.items():
            if n.op != "get_attr":
                continue
            info = node_info(n)
            shape = tuple(info.shape or ())
            layout = s.output
            local = shapes.get((shape, layout))
            if local is None:
                local = shapes[(shape, layout)] = local_shape(shape, layout, self.tp)
            blocks = blocked_params.get(n.name, 1) if isinstance(layout, Shard) else 1
            name = str(n.target)
            parameters[name] = ParameterSharding(name, n.name, layout, shape, local, self.tp, blocks, bool(info.param_numel))
        return parameters, reshards

    def _size_rewrites(self, chosen) -> tuple[SizeRewrite, ...]:
        """size(d) / shape / numel() reads of a tensor sharded on the dim they read."""
        found = []
        names: dict[tuple, str] = {}  # canonical_name reads only a node's op and target
        for n in self.nodes:
            if n.op not in ("call_function", "call_method"):
                continue  # canonical_name is the op itself: no size read
            name = names.get((n.op, n.target))
            if name is None:
                name = names[(n.op, n.target)] = canonical_name(n)
            if name not in ("size", "sym_size", "numel", "getattr") or not n.args or not isinstance(n.args[0], fx.Node):
                continue
            if name == "getattr" and (len(n.args) < 2 or n.args[1] != "shape"):
                continue
            source = n.args[0]
            s = chosen.get(source)
            layout = s.outputs[0] if s is not None and s.outputs else R
            if not isinstance(layout, Shard):
                continue
            dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")) if name in ("size", "sym_size") else None
            ndim = len(node_info(source).shape or ())
            if dim is None or (isinstance(dim, int) and ndim and dim % ndim == layout.dim):
                found.append(SizeRewrite(n.name, source.name, layout.dim, self.tp))
        return tuple(found)


def _cbc(time_limit: float):
    """PuLP's bundled CBC, else a cbc on PATH; None when neither runs. PuLP 3.3 warns that
    PULP_CBC_CMD moves out of PuLP in 4.0; it is still the bundled solver."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        candidates = [getattr(pulp, "PULP_CBC_CMD", None), pulp.COIN_CMD]
        for make in candidates:
            if make is None:
                continue
            solver = make(msg=False, timeLimit=time_limit)
            if solver.available():
                return solver
    return None


def _owner(s: Strategy) -> int | None:
    """The rank a strategy places its output on alone (an O(r) layout), else None."""
    return s.outputs[0].rank if s.outputs and isinstance(s.outputs[0], Owned) else None


def _moves_owned(src: Layout, dst: Layout, parameter: bool) -> bool:
    """True when no conversion serves ``src -> dst``: into an owned layout from any other,
    or an owned parameter (absent from the other ranks) out of its layout."""
    return src != dst and (isinstance(dst, Owned) or (parameter and isinstance(src, Owned)))


def _replace_blocks(r: Reshard, blocks: int) -> Reshard:
    return replace(r, blocks=blocks)


def _add_in_order(values: Iterable[float] | np.ndarray) -> float:
    """0.0 + v0 + v1 + ..., left to right: what a running ``total += v`` gives, to the last
    bit (``sum`` of floats may compensate rounding, as Python 3.12's does, and numpy's sum
    adds pairwise; its accumulate adds in order)."""
    if isinstance(values, np.ndarray):
        return float(np.add.accumulate(np.concatenate(([0.0], values)))[-1])
    return functools.reduce(operator.add, values, 0.0)


def _argument_at(node: fx.Node, path: tuple) -> fx.Node:
    """The argument of ``node`` at ``path`` into (args, kwargs), as ``InputRef.path`` gives it."""
    arg = node.args[path[0]] if isinstance(path[0], int) else node.kwargs[path[0]]
    for step in path[1:]:
        arg = arg[step]
    if not isinstance(arg, fx.Node):
        raise TypeError(f"{node.name}: no node at argument path {path} (layers of one signature differ)")
    return arg


# -- the ILP --------------------------------------------------------------------------------
class _ShardingILP:
    """The integer program of the module docstring, over representative nodes."""

    def __init__(self, problem: _ShardingProblem, memory_limit: float):
        self.p = problem
        self.memory_limit = memory_limit
        self.model = pulp.LpProblem("partc_sharding", pulp.LpMinimize)
        self.x: dict[fx.Node, list[Any]] = {}
        self.e: dict[tuple, dict[tuple[int, int], Any]] = {}
        self.objective_terms: dict[Any, float] = defaultdict(float)  # variable -> seconds (summed: a variable can be charged twice)
        self.constant = 0.0
        self._add_choice()
        self._add_edges()
        self._add_reshards()
        self._add_memory()
        terms = [(var, seconds * _OBJECTIVE_UNIT) for var, seconds in self.objective_terms.items()]
        self.model += pulp.LpAffineExpression(terms) + self.constant * _OBJECTIVE_UNIT
        self.num_variables = len(self.model.variables())
        self.num_constraints = self.model.numConstraints()

    def _variable(self, name: str, cat: str = pulp.LpContinuous):
        """A variable in [0, 1] attached to the model (PuLP >= 3.3 API, older PuLP too)."""
        if hasattr(self.model, "add_variable"):
            return self.model.add_variable(name, lowBound=0, upBound=1, cat=cat)
        return pulp.LpVariable(name, lowBound=0, upBound=1, cat=cat)

    # 1 if node v runs strategy s, as a variable or the constant 1
    def _x(self, v: fx.Node, s: int):
        return self.x[v][s]

    def _add_choice(self) -> None:
        """choice: sum_s x[v,s] = 1; compute and internal communication in the objective."""
        p = self.p
        for j, v in enumerate(p.reps):
            strategies = p.rules[v].strategies
            mult = p.multiplicity[v]
            if len(strategies) == 1:
                self.x[v] = [1]
                self.constant += mult * p.node_cost[v][0]
                continue
            xs = [self._variable(f"x_{j}_{s}", cat=pulp.LpBinary) for s in range(len(strategies))]
            self.x[v] = xs
            self.model += pulp.lpSum(xs) == 1, f"choice_{v.name}"
            for s, var in enumerate(xs):
                if p.node_cost[v][s]:
                    self.objective_terms[var] += mult * p.node_cost[v][s]

    def _add_edges(self) -> None:
        """marginals: sum_b e[E,a,b] = x[u,a] and sum_a e[E,a,b] = x[v,b]."""
        p = self.p
        for j, (key, edge) in enumerate(p.edges.items()):
            for a, b in edge.forbidden:
                pair = [self._x(edge.u, a), self._x(edge.v, b)]
                self.model += pulp.lpSum(pair) <= 1, f"ownership_{edge.u.name}_{edge.k}_to_{edge.v.name}_{edge.i}_{a}_{b}"
            if not edge.costs:
                continue
            na, nb = len(self.x[edge.u]), len(self.x[edge.v])
            if na == 1 or nb == 1:
                # the product is the other node's x (or the constant 1)
                self.e[key] = {(a, b): (self._x(edge.v, b) if na == 1 else self._x(edge.u, a)) for a in range(na) for b in range(nb)}
                continue
            ev = {(a, b): self._variable(f"e_{j}_{a}_{b}") for a in range(na) for b in range(nb)}
            self.e[key] = ev
            label = f"{edge.u.name}_{edge.k}_to_{edge.v.name}_{edge.i}"
            for a in range(na):
                self.model += pulp.lpSum(ev[a, b] for b in range(nb)) == self._x(edge.u, a), f"marginal_src_{label}_{a}"
            for b in range(nb):
                self.model += pulp.lpSum(ev[a, b] for a in range(na)) == self._x(edge.v, b), f"marginal_dst_{label}_{b}"

    def _add_reshards(self) -> None:
        """reshard: y[u,a,t] >= sum_{b : t(E,a,b) = t} e[E,a,b] for every edge E of the value;
        the conversion's forward + backward seconds are charged once per copy of the value."""
        p = self.p
        for g, ((u, k, keys), copies) in enumerate(p.groups.items()):
            by_transition: dict[tuple[int, tuple], list[tuple]] = defaultdict(list)
            cost_of: dict[tuple[int, tuple], float] = {}
            for key in sorted(keys, key=str):
                edge = p.edges[key]
                per_edge: dict[tuple[int, tuple], list] = defaultdict(list)
                for (a, b), (t, cost) in edge.costs.items():
                    per_edge[(a, t)].append(self.e[key][a, b])
                    cost_of[(a, t)] = cost
                for at, terms in per_edge.items():
                    by_transition[at].append(terms)
            for n, (at, sums) in enumerate(by_transition.items()):
                cost = copies * cost_of[at]
                if len(sums) == 1:
                    for term in sums[0]:
                        self._charge(term, cost)
                    continue
                y = self._variable(f"y_{g}_{n}")
                for m, terms in enumerate(sums):
                    self.model += y >= pulp.lpSum(terms), f"reshard_{g}_{u.name}_{k}_{at[0]}_{n}_{m}"
                self.objective_terms[y] += cost

    def _charge(self, term, cost: float) -> None:
        if isinstance(term, (int, float)):
            self.constant += term * cost
        else:
            self.objective_terms[term] += cost

    def _add_memory(self) -> None:
        """memory: sum_v sum_s mem[v,s]·x[v,s] <= M (bytes per device)."""
        p = self.p
        if math.isinf(self.memory_limit):
            return
        for rank in range(p.tp) if p.owned else (None,):
            terms: dict[Any, float] = defaultdict(float)
            constant = 0.0
            for v in p.reps:
                mult = p.multiplicity[v]
                for s, mem in enumerate(p.node_memory[v] if rank is None else [m[rank] for m in p.node_memory_on[v]]):
                    if isinstance(self.x[v][s], int):
                        constant += mult * mem
                    elif mem:
                        terms[self.x[v][s]] += mult * mem
            name = "memory_budget" if rank is None else f"memory_budget_rank{rank}"
            self.model += pulp.LpAffineExpression(list(terms.items())) + constant <= self.memory_limit, name

    def minimum_memory(self) -> float:
        """The least memory any layout needs: memory is separable, so per node its cheapest.
        With owned layouts it is the least mean over the ranks: a lower bound on the busiest."""
        p = self.p
        return sum(p.multiplicity[v] * min(p.node_memory[v]) for v in p.reps)

    # -- solving ---------------------------------------------------------------------------
    def solve(self, time_limit: float) -> tuple[dict[fx.Node, int], str, float, float]:
        least = self.minimum_memory()
        if least > self.memory_limit:
            self._infeasible(least)
        solver = _cbc(time_limit)
        if solver is None:
            raise SolverError(
                "the CBC solver bundled with PuLP is not available (nor a cbc on PATH)",
                ErrorContext(pass_name=PASS_NAME, fix="reinstall pulp (pip install --force-reinstall pulp) so its bundled cbc runs"),
            )
        started = time.perf_counter()
        try:
            self.model.solve(solver)
        except pulp.PulpSolverError as e:
            raise SolverError(f"CBC failed on the sharding ILP: {e}", ErrorContext(pass_name=PASS_NAME)) from e
        seconds = time.perf_counter() - started
        status = solver_status(self.model.status, self.model.sol_status)
        if status == "infeasible":
            self._infeasible(least)
        if status not in ("optimal", "feasible"):
            raise SolverError(
                f"CBC returned no usable sharding plan (status {status!r}, PuLP {pulp.LpStatus[self.model.status]!r}) after {seconds:.1f} s",
                ErrorContext(pass_name=PASS_NAME, fix=f"raise time_limit (was {time_limit} s) or plan fewer layers at a time"),
            )
        choice = {}
        for v, xs in self.x.items():
            values = [1.0 if isinstance(x, int) else (x.value() or 0.0) for x in xs]
            choice[v] = max(range(len(values)), key=values.__getitem__)
        return choice, status, seconds, float(pulp.value(self.model.objective) or 0.0) / _OBJECTIVE_UNIT

    def _infeasible(self, least: float) -> None:
        p = self.p
        params = sum(p.multiplicity[v] * min(p.node_memory[v]) for v in p.reps if node_info(v).op == OpKind.PARAMETER)
        error = InfeasiblePlanError(
            f"no tensor-parallel layout over tp={p.tp} fits the memory budget of {self.memory_limit / _GiB:.2f} GiB per device: "
            f"the least memory any layout needs is {least / _GiB:.2f} GiB "
            f"({params / _GiB:.2f} GiB of parameters, gradients and optimizer state, "
            f"{(least - params) / _GiB:.2f} GiB of activations, everything sharded that can be)",
            ErrorContext(
                pass_name=PASS_NAME,
                fix=f"give at least {least / _GiB:.2f} GiB per device, a larger tensor-parallel degree, pipeline stages, "
                "or a smaller batch",
            ),
        )
        # What would fit, for callers that search (the budget binding is the one memory row).
        error.budget_bytes = self.memory_limit
        error.required_bytes = least
        raise error
