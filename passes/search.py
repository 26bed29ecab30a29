"""Search pass: the fastest DP x TP x PP layout that fits, chosen by the cost model.

A candidate is ``(pp, dp, tp, m, schedule, v, recompute, zero)``: pipeline, data- and
tensor-parallel degrees with ``pp * dp * tp`` = the world size, ``m`` microbatches per
replica and step, the pipeline schedule and its ``v`` stages per pipeline rank, full
activation recomputation on or off, and the ZeRO stage over the data-parallel group.
:func:`search` prices every candidate, drops those that cannot run or cannot fit, and
returns the fastest by predicted step time with the best alternatives and, for every
other candidate, why it lost (:class:`Rejection`).

Ranks (Megatron's order: tensor-parallel fastest, then data, then pipeline)::

    rank = pp_i * (dp * tp) + dp_i * tp + tp_i                  (:func:`mesh_rank`)

so a tensor-parallel group is ``tp`` consecutive ranks and stays inside a node (``tp``
must divide every node's device count), a data-parallel group strides by ``tp`` (and
spans nodes once ``dp * tp`` exceeds a node), and pipeline neighbours sit ``dp * tp``
ranks apart. The global batch of ``B`` samples splits over ``dp`` replicas and ``m``
microbatches: ``B % (dp * m) == 0``.

Layer costs under tensor parallelism
------------------------------------
Costs are read from a graph at one sample: a graph traced at a larger batch is
propagated and annotated again at batch 1 for the duration of the search, in place, its
traced metadata put back on return (:func:`_at_one_sample`; about 0.2 s for a 96-layer
GPT-3 whose repeated blocks are rebuilt, not propagated; nothing when the planner traces
at one sample), because the sharding ILP picks layouts for the shapes it
sees, and at the global batch it may shard the batch dimension across the
tensor-parallel group (data parallelism inside it, weights gathered), which a microbatch
of fewer samples than ``tp`` cannot run and which duplicates the dp dimension.
:func:`~partc.passes.sharding.plan_sharding` runs on it once per ``tp`` with no memory
budget (memory is checked here, per pipeline rank, with ZeRO and the schedule's in-flight
microbatches that the sharding ILP does not see); every candidate with that ``tp`` reuses
its layouts. ``tp = 1`` needs no plan. The sharding plan reports
step totals, so the per-layer figures are recomputed from its layouts with the formulas
the sharding pass prices with (no new cost rules). With ``f`` = samples per microbatch,
``c`` / ``k`` the compute / memory factor of the node's chosen strategy, ``F`` its FLOPs,
``M`` its bytes moved and ``W`` the weight bytes among them (both in the compute dtype)::

    forward  = max(c F_fwd f / rate, c (W + (M - W) f) / bandwidth, overhead)
    backward = max(c F_bwd f / rate, 2 c (W + (M - W) f) / bandwidth, overhead)     (nodes with a backward)

(``rate`` is the matmul rate x the node's :func:`~partc.passes.estimate.kernel_efficiency`,
``overhead`` the device's kernel overhead: :func:`~partc.cost_model.roofline`.)

A microbatch reads the whole weight again, so ``W`` does not shrink with it (unlike the
data-parallel and pipeline-only estimates, which scale every byte by ``f``); at ``f = 1``
the sum is the plan's ``compute_time`` less its optimizer update. Nodes that do not depend
on the batch (position tables) keep ``f = 1``. A layer's tensor-parallel communication is
the plan's conversions whose producer it owns, re-priced at microbatch size with
:func:`~partc.passes.layouts.reshard_cost` (forward; backward to the adjoint layout; the
re-gather of a saved sharded input), plus the collectives strategies run themselves
(vocab-parallel cross entropy). As in the sharding ILP it is not overlapped with compute.
Activations kept for backward: the annotated bytes x compute-dtype scale x ``k`` x ``f``;
parameters: numel x ``k`` of the parameter's layout.

Recomputation (``recompute=True``, full per layer): a layer keeps only its inputs (the
values it reads from earlier layers, at their layouts) and runs its forward again in
backward: time += forward compute + forward communication; the largest layer's activations
of one microbatch are live while it is recomputed (transient).

Pipelines (``pp > 1``)
----------------------
Each layer becomes a :class:`~partc.passes.stages.LayerCost` at microbatch size: ``time`` =
forward + backward (+ recompute) compute + TP communication; ``param_bytes`` = local numel
x :func:`~partc.cost_model.training_memory` per parameter (ZeRO ``z`` over ``dp``) +
buffers, a weight read by several layers (tied embedding and LM head) charged to each
reader as the stage pass does; ``activation_bytes`` per microbatch in flight;
``boundary_bytes`` = the values live across a cut after the layer / ``tp``: each
tensor-parallel rank sends its slice over its own link (Megatron's scatter-gather).
Pipeline neighbours use ``cluster.link`` of their ranks, a stage's speed is that of the
slowest device its ranks hold, the memory budget is the limit minus the transient buffers.
The cut minimises the stage pass's objective (``m·max + (sum - max)/d`` over ranks):

* one stage per rank (GPipe, 1F1B): :func:`~partc.passes.stages.exact_chain_partition`,
  the stage pass's exact DP of its ILP (same objective and memory rows; 2-3x quicker than
  starting CBC here), or :func:`~partc.passes.stages.solve_stages_without_cuts` when cuts
  are forbidden (:func:`~partc.passes.stages.gradient_free_cuts`, on torch < 2.13);
* several stages per rank (interleaved, zero-bubble, ``v`` in ``virtual_stage_options``):
  CBC does not close that ILP in seconds (96 layers, 4 ranks x 2: "feasible" at a 30 s
  limit), so :func:`_interleaved_cut` cuts it: the smallest cap on a stage's time that a
  greedy fill meets (bisection), a few looser caps, each (once per distinct cut) improved by
  moving one cut at a time to its best place (:func:`_polish`: a numpy screen prices every
  position of every cut at once, only cuts that may move are priced exactly); zero-bubble
  never cuts where no gradient crosses. On GPT-3
  chains it is within 0.03% of CBC's 30 s answer and equal to the ILP optimum on small
  transformer-shaped chains (tests); on random uneven chains up to ~5% above it.

1F1B needs ``m >= pp`` (torch); GPipe may take fewer (its stages then run one after
another, which the formula prices exactly); interleaved and zero-bubble need ``m >= pp``
too (with fewer microbatches than ranks the pipe never fills and the bubble formula does
not hold) and ``m`` a multiple of torch's rounds ``max(1, m // pp)``.

Reuse: without a memory budget the best cut depends neither on ZeRO (bytes only) nor on
GPipe vs 1F1B (same objective), so it is found once per ``(tp, pp, dp, m, recompute,
schedule family, v)`` and re-priced with ``evaluate_partition`` for each; only when it
does not fit is the problem cut again with the budget, and only after a cut that fits has
been found (the exact least peak memory for one stage per rank, the lightest greedy cut
otherwise): CBC proving a budget infeasible takes seconds. When the mean rank's bytes
exceed the budget no cut fits, and none is looked for (most pipelines the search prices
are rejected so: 218 of the 240 of a 96-layer GPT-3 on 64 GPUs). The same chain's per-stage sums are shared by the ZeRO
stages that share its cut, and the tp-independent per-node costs by every tp degree.

Data-parallel synchronisation (per pipeline rank ``r``, over its dp group)
--------------------------------------------------------------------------
``G_r`` gradient bytes, ``P_r`` weight bytes (compute dtype), ``f_r`` / ``b_r`` the rank's
forward / backward of one microbatch, ``w_r`` the backward that can hide the gradient sync:
the rank's last backward plus the backward of the pipeline ranks before it, which drain
after it (``b`` of the chunk-0 stages ``0..r``; the whole backward when ``pp = 1``).
AR / RS / AG are :class:`~partc.cost_model.CostModel`'s all-reduce / reduce-scatter /
all-gather on the group's ranks (hierarchical across nodes); ``bucket`` = DDP's 25 MiB::

    ZeRO-0  max(AR(G) - w, AR(bucket))                                    DDP, overlapped
    ZeRO-1  max(RS(G) - w, RS(bucket)) + max(AG(P) - f, AG(bucket))       updated weights
                                        gathered during the next step's first forward
    ZeRO-2  ZeRO-1                                                        FSDP2 sums the
                                        microbatches' gradients unsharded and reduce-scatters
                                        once, after the last (its memory is priced so)
    ZeRO-3  ZeRO-2 without the post-step gather + m (max(0, AG(P) - f) + max(0, AG(P) - b))
                                        (FSDP: weights gathered before each forward and
                                        backward, prefetched behind the previous layer)
    one FSDP unit  RS(G) + AG(P) (ZeRO-1/2) or + 2m AG(P) (ZeRO-3), nothing hidden: the
                                        runtime shards a generated module (pipeline stage,
                                        tensor-parallel module, recomputed or exported graph)
                                        as one unit, so only the user's own model overlaps
    exposed = max over pipeline ranks

Optimizer: ``max_r`` local parameters (``/ dp`` with ZeRO >= 1) x ``optimizer_step_bytes`` /
memory bandwidth (0 for SGD).

Step and memory
---------------
``step = pipeline step (pp > 1; m x one microbatch when pp = 1) + dp exposed + optimizer``,
reported as :class:`StepBreakdown` (compute, recompute, TP communication, pipeline
transfers and bubble of the slowest pipeline rank, exposed dp sync, optimizer).
Memory per device (the fullest rank): ``training_memory(numel, zero, dp)`` + buffers +
activations in flight (``StageProblem.inflight``: 1F1B stage i holds ``min(p - i, m)``
microbatches, GPipe ``m``, one when ``pp = 1``) + transient: the largest single output of a
microbatch at its layout (the logits), two layers of gathered weights under ZeRO-3, the
largest layer's activations under recomputation. A candidate fits when that is
``<= memory_limit``.

Search
------
Every candidate gets a cheap lower bound on its step time (``(m - 1/d) S / R + S / d`` for
a pipeline of total per-microbatch time ``S`` on ``R`` ranks, the mean rank's dp sync
and optimizer step; exact without a pipeline) and on its memory (the mean rank's);
candidates are priced in increasing bound order, a pipeline whose memory bound exceeds
the limit is rejected unpriced, and once ``top_k`` feasible candidates are known any whose
bound exceeds the ``top_k``-th best is rejected as slower unpriced (branch and bound: the
best and the top ``k`` are exact). Ties break on memory, then a fixed order of the options
(never on hashes): the result is the same in every run and under every
``PYTHONHASHSEED``.

Not modelled: contention between collectives that share a link (TP and ZeRO traffic on
NVLink, dp and pipeline traffic on InfiniBand), kernel launch latency, per-stage
recomputation (recompute is one switch for every layer).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from partc.passes.annotate import annotate
from partc.passes.estimate import DDP_BUCKET_BYTES, _parameter_dtype, kernel_efficiency
from partc.passes.global_mean import runs_graph_for_global_mean
from partc.passes.ir import FX_FRONTEND, META_KEY, OpKind, gc_paused, graph_info, node_info
from partc.passes.layouts import Shard, adjoint, reshard_cost
from partc.passes.propagate import propagate
from partc.passes.sharding import ShardingPlan, plan_sharding
from partc.passes.split_stages import recomputable_nodes
from partc.passes.stages import (
    PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS,
    LayerCost,
    StagePartition,
    StageProblem,
    evaluate_partition,
    exact_chain_partition,
    gradient_free_cuts,
    least_peak_stage_memory,
    solve_stages_without_cuts,
)

from partc.cluster import Cluster, GiB
from partc.cost_model import (
    CostModel,
    MemoryBreakdown,
    optimizer_step_bytes,
    roofline,
    training_memory,
)
from partc.errors import ErrorContext, InfeasiblePlanError, PartcError, SolverError

__all__ = [
    "search",
    "SearchResult",
    "Candidate",
    "Rejection",
    "StepBreakdown",
    "explain",
    "model_flops_utilization",
    "mesh_rank",
]

_PASS = "search"
SCHEDULES = ("1f1b", "interleaved", "zero_bubble", "gpipe")  # default order; ties go to the earlier
_MESH_DIMS = ("pp", "dp", "tp")
# Zero-bubble's weight-gradient pass fills about two thirds of the bubble (as passes/stages.py).
_ZERO_BUBBLE_FACTOR = 3
_STAGE_TIME_LIMIT = 20.0  # CBC seconds per stage ILP (only with forbidden cuts)
_REL = 1e-9  # relative slack when comparing times against a bound


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepBreakdown:
    """Where one predicted step goes, in seconds; the parts add up to the step."""

    compute: float  # forward + backward matmuls and pointwise work (slowest pipeline rank, all microbatches)
    recompute: float  # forward passes run again in backward (recompute=True)
    tp_communication: float  # tensor-parallel collectives, on the critical path
    pipeline_transfer: float  # activations and their gradients between pipeline stages
    pipeline_bubble: float  # fill and drain, and waiting on slower stages
    dp_sync_exposed: float  # data-parallel gradient / ZeRO traffic not hidden behind compute
    optimizer: float  # the optimizer step (memory-bound)

    @property
    def total(self) -> float:
        return (
            self.compute + self.recompute + self.tp_communication + self.pipeline_transfer
            + self.pipeline_bubble + self.dp_sync_exposed + self.optimizer
        )


@dataclass(frozen=True)
class Candidate:
    """One feasible layout and what it is predicted to cost."""

    mesh: dict[str, int]  # {"pp": .., "dp": .., "tp": ..}; ranks as mesh_rank() numbers them
    microbatches: int  # per data-parallel replica and step (gradient accumulation when pp = 1)
    schedule: str  # "none" without a pipeline; else "gpipe", "1f1b", "interleaved", "zero_bubble"
    virtual_stages: int  # pipeline stages per pipeline rank (1 unless interleaved / zero_bubble)
    recompute: bool  # full activation recomputation of every layer
    zero_stage: int  # ZeRO over the data-parallel group: 0 (DDP), 1, 2, 3 (FSDP)
    predicted_step_time: float  # seconds
    breakdown: StepBreakdown
    memory: MemoryBreakdown  # bytes on the fullest device
    memory_limit: float  # bytes per device the candidate was checked against
    partition: StagePartition | None  # the stage cut (None when pp = 1)
    sharding: ShardingPlan | None = field(repr=False, compare=False)  # the tensor-parallel layouts (None when tp = 1)
    solver_status: str = "exact"  # the cut's: "optimal" (DP/ILP), "feasible" (ILP time limit), "heuristic" (interleaved local search); "exact" without a pipeline

    @property
    def label(self) -> str:
        return _label(self.mesh, self.microbatches, self.schedule, self.virtual_stages, self.recompute, self.zero_stage)


@dataclass(frozen=True)
class Rejection:
    """A candidate (or a whole mesh, when the options are None) that lost, and why."""

    mesh: dict[str, int]
    microbatches: int | None
    schedule: str | None
    virtual_stages: int | None
    recompute: bool | None
    zero_stage: int | None
    kind: str  # "topology" | "indivisible" | "schedule" | "sharding" | "memory" | "slower"
    reason: str  # e.g. "over memory by 3.20 GiB", "slower: +12.0%"
    predicted_step_time: float | None = None  # seconds; a lower bound when the reason says "at least"
    memory: float | None = None  # bytes per device; a lower bound when the reason says "at least"

    @property
    def label(self) -> str:
        return _label(self.mesh, self.microbatches, self.schedule, self.virtual_stages, self.recompute, self.zero_stage)


@dataclass(frozen=True)
class SearchResult:
    """The fastest feasible candidate, the runners-up, and why everything else lost."""

    best: Candidate
    candidates: tuple[Candidate, ...]  # the top_k feasible candidates, fastest first (best included)
    rejected: tuple[Rejection, ...]  # every other configuration considered
    searched: int  # configurations considered: len(candidates) + len(rejected)
    seconds: float  # wall time of the search (sharding plans included)
    sharding_seconds: float  # of which plan_sharding, all degrees
    one_sample_seconds: float  # of which propagating the graph again at one sample (0 when traced at one)
    stage_solves: int  # exact stage cuts (DP, or ILP with forbidden cuts; one stage per rank)
    heuristic_cuts: int  # interleaved / zero-bubble cuts found by local search
    memory_limit: float  # bytes per device
    batch_size: int


def _label(mesh, m, schedule, v, recompute, zero) -> str:
    parts = [f"pp={mesh['pp']} dp={mesh['dp']} tp={mesh['tp']}"]
    if m is not None:
        parts.append(f"m={m}")
    if schedule is not None and schedule != "none":
        parts.append(schedule if not v or v == 1 else f"{schedule} v={v}")
    if recompute is not None:
        parts.append("recompute" if recompute else "no-recompute")
    if zero is not None:
        parts.append(f"zero-{zero}")
    return ", ".join(parts)


def mesh_rank(mesh: Mapping[str, int], pp_index: int, dp_index: int, tp_index: int) -> int:
    """The global rank of mesh coordinate (pp_i, dp_i, tp_i): tp fastest, then dp, then pp."""
    return pp_index * (mesh["dp"] * mesh["tp"]) + dp_index * mesh["tp"] + tp_index


# -- one configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    pp: int
    dp: int
    tp: int
    microbatches: int
    schedule: str  # "none" when pp == 1
    virtual_stages: int
    recompute: bool
    zero_stage: int

    @property
    def mesh(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}

    @property
    def stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def fill_drain_divisor(self) -> float:
        if self.schedule in ("none", "gpipe", "1f1b"):
            return 1.0
        return float(self.virtual_stages * (_ZERO_BUBBLE_FACTOR if self.schedule == "zero_bubble" else 1))

    def order(self, schedules: Sequence[str]) -> tuple:
        """A total order used to break ties: simpler layouts first."""
        rank = schedules.index(self.schedule) if self.schedule in schedules else -1
        return (self.pp, self.tp, self.zero_stage, self.recompute, rank, self.virtual_stages, self.microbatches)


# -- per tensor-parallel degree: per-node prices, summed per layer for any microbatch -------------------
class _NodeCosts:
    """What :class:`_LayerPrices` reads from every node that does not depend on the
    tensor-parallel plan (the node's strategy only scales it), gathered once per search:
    arrays in graph order, so that sums per layer accumulate in the same order as a loop."""

    def __init__(self, ctx: _Context):
        L, infos, compute_dtype = ctx.num_layers, ctx.infos, ctx.compute_dtype
        params, computes, kept = [], [], []
        self.activation_nodes: list[tuple[str, int, float, bool]] = []  # (name, layer, bytes in the compute dtype, batch-dependent)
        self.output_nodes: list[tuple[str, tuple[float, ...], bool, bool]] = []  # (name, bytes per output, batch-dependent, an input)
        diff_dep, diff_fixed = [0.0] * (L + 1), [0.0] * (L + 1)  # live-range differences of cut bytes
        rates: dict[tuple, float] = {}  # what a node's rate depends on -> the rate (repeated blocks repeat it)
        batch_dependent, recomputed = ctx.batch_dependent, ctx.recomputed
        for n in ctx.nodes:
            info = infos[n]
            op, outputs = info.op, info.outputs
            node_dtype = info.dtype
            if op == OpKind.PARAMETER:
                itemsize = node_dtype.itemsize if node_dtype is not None else 4
                readers = tuple(sorted({infos[u].layer for u in n.users} - {info.layer}))
                params.append((n.name, info.layer, info.param_numel, max(info.param_bytes - info.param_numel * itemsize, 0), readers))
                continue
            if op == OpKind.OUTPUT:
                continue
            scale = ctx.dtype_scale(node_dtype)
            is_dep = n in batch_dependent
            if op != OpKind.INPUT and (info.fwd_flops or info.bytes_moved):
                weights = sum(infos[a].outputs[0].nbytes for a in n.all_input_nodes if a.op == "get_attr" and infos[a].outputs) * scale
                dtype = compute_dtype if (compute_dtype is not None and node_dtype is not None and node_dtype.is_floating_point) else (node_dtype or torch.float32)
                key = (op, outputs[:1], info.fwd_flops, dtype)
                rate = rates.get(key)
                if rate is None:
                    rate = rates[key] = ctx.device.flops(dtype) * kernel_efficiency(info, ctx.device, dtype)
                computes.append((n.name, info.layer, rate, info.fwd_flops, info.bwd_flops, info.bytes_moved * scale, weights, is_dep, bool(info.bwd_flops)))
            self.activation_nodes.append((n.name, info.layer, info.activation_bytes * scale, is_dep))
            if not outputs or not n.users:
                continue
            is_input = op == OpKind.INPUT
            nbytes = tuple(spec.nbytes * scale for spec in outputs)
            self.output_nodes.append((n.name, nbytes, is_dep, is_input))
            if n in recomputed:
                continue  # rebuilt by each stage that reads it: never sent, never kept
            made = 0 if is_input else info.layer
            readers = sorted({infos[u].layer for u in n.users})
            whole = sum(nbytes)
            last = readers[-1]
            if last > made:
                diff = diff_dep if is_dep else diff_fixed
                diff[made] += whole
                diff[last] -= whole
            kept += [(len(self.output_nodes) - 1, reader, is_dep) for reader in readers if reader > made or is_input]
        # bytes live across a cut right after layer j (0 after the last), whole tensors
        self.boundary_dep = np.cumsum(diff_dep)[:L]
        self.boundary_fixed = np.cumsum(diff_fixed)[:L]
        self.boundary_dep[L - 1] = self.boundary_fixed[L - 1] = 0.0
        self.params = params  # (name, layer, numel, buffer bytes, the other layers that read it)
        self.param_layer = np.array([q[1] for q in params], dtype=np.int64)
        self.param_numel = np.array([q[2] for q in params], dtype=np.float64)
        self.param_buffers = np.array([q[3] for q in params], dtype=np.float64)
        self.reader_param = np.array([k for k, q in enumerate(params) for _ in q[4]], dtype=np.int64)  # (parameter, reader) pairs
        self.reader_layer = np.array([r for q in params for r in q[4]], dtype=np.int64)
        self.compute_names = [q[0] for q in computes]
        self.compute_layer = np.array([q[1] for q in computes], dtype=np.int64)
        self.rate = np.array([q[2] for q in computes], dtype=np.float64)
        self.fwd_flops = np.array([q[3] for q in computes], dtype=np.float64)
        self.bwd_flops = np.array([q[4] for q in computes], dtype=np.float64)
        self.moved = np.array([q[5] for q in computes], dtype=np.float64)  # bytes in the compute dtype
        self.weights = np.array([q[6] for q in computes], dtype=np.float64)  # of which weights
        self.compute_dep = np.array([q[7] for q in computes], dtype=bool)
        self.backward = np.array([q[8] for q in computes], dtype=bool)
        self.activation_layer = np.array([q[1] for q in self.activation_nodes], dtype=np.int64)
        self.activation_bytes = np.array([q[2] for q in self.activation_nodes], dtype=np.float64)
        self.activation_dep = np.array([q[3] for q in self.activation_nodes], dtype=bool)
        self.whole_output = np.array([float(sum(q[1])) for q in self.output_nodes], dtype=np.float64)
        self.output_dep = np.array([q[2] for q in self.output_nodes], dtype=bool)
        self.output_input = np.array([q[3] for q in self.output_nodes], dtype=bool)
        self.kept_output = np.array([q[0] for q in kept], dtype=np.int64)  # (output node, reader layer) pairs
        self.kept_layer = np.array([q[1] for q in kept], dtype=np.int64)
        self.kept_dep = np.array([q[2] for q in kept], dtype=bool)


def _factors(strategies: Mapping, names: Sequence[str], attribute: str) -> np.ndarray:
    """Per name: its strategy's compute or memory factor (1 without a strategy)."""
    found = [strategies.get(name) for name in names]
    return np.array([getattr(s, attribute) if s is not None else 1.0 for s in found], dtype=np.float64)


class _LayerPrices:
    """The costs of every layer under one tensor-parallel plan, as functions of the
    microbatch fraction ``f`` (module doc: "Layer costs under tensor parallelism")."""

    def __init__(self, ctx: "_Context", tp: int, plan: ShardingPlan | None):
        self.ctx, self.tp, self.plan = ctx, tp, plan
        L = ctx.num_layers
        strategies = plan.strategies if plan is not None else {}
        nodes = ctx.node_costs

        def bins(index: np.ndarray, weights: np.ndarray) -> np.ndarray:
            return np.bincount(index, weights, minlength=L)  # sums in array order, as a loop would


        mf = _factors(strategies, [q[0] for q in nodes.params], "memory_factor")
        numel, buffers = nodes.param_numel * mf, nodes.param_buffers * mf
        self.owned_numel = bins(nodes.param_layer, numel)  # local trainable elements, each parameter once (its first user's layer)
        self.buffers = bins(nodes.param_layer, buffers)  # local non-trainable bytes
        self.shared_numel = bins(nodes.reader_layer, numel[nodes.reader_param])  # parameters a layer reads that another layer owns (the stage pass's convention)
        self.shared_buffers = bins(nodes.reader_layer, buffers[nodes.reader_param])
        numel_list, buffers_list = numel.tolist(), buffers.tolist()
        self.shared_params: list[tuple[float, float, int, tuple[int, ...]]] = [  # (numel, buffer bytes, owner, readers)
            (numel_list[k], buffers_list[k], q[1], q[4]) for k, q in enumerate(nodes.params) if q[4]
        ]

        cf = _factors(strategies, nodes.compute_names, "compute_factor")
        moved, weights = nodes.moved * cf, nodes.weights * cf
        weights = np.minimum(weights, moved)
        self._layer, self._rate = nodes.compute_layer, nodes.rate
        self._f_fwd, self._f_bwd = nodes.fwd_flops * cf, nodes.bwd_flops * cf
        self._m_batch, self._m_fixed = moved - weights, weights
        self._dep, self._backward = nodes.compute_dep, nodes.backward

        activations = nodes.activation_bytes * _factors(strategies, [q[0] for q in nodes.activation_nodes], "memory_factor")
        dep = nodes.activation_dep
        self.act_dep, self.act_fixed = bins(nodes.activation_layer[dep], activations[dep]), bins(nodes.activation_layer[~dep], activations[~dep])

        # each output's bytes at its layout: 1/tp of the sharded ones
        local = nodes.whole_output.copy()
        for k, (name, nbytes, _, _) in enumerate(nodes.output_nodes):
            strategy = strategies.get(name)
            if strategy is None:
                continue
            sharded = [isinstance(layout, Shard) for layout in strategy.outputs[: len(nbytes)]]
            if True in sharded:
                local[k] = sum(b / (tp if j < len(sharded) and sharded[j] else 1) for j, b in enumerate(nbytes))
        produced = ~nodes.output_input
        out_dep = float(local[produced & nodes.output_dep].max(initial=0.0))
        out_fixed = float(local[produced & ~nodes.output_dep].max(initial=0.0))
        kept, dep = local[nodes.kept_output], nodes.kept_dep
        self.kept_dep, self.kept_fixed = bins(nodes.kept_layer[dep], kept[dep]), bins(nodes.kept_layer[~dep], kept[~dep])  # a layer's inputs, for recomputation

        self.boundary_dep, self.boundary_fixed = nodes.boundary_dep, nodes.boundary_fixed
        self.largest_output = (out_dep, out_fixed)
        self.largest_layer_param = float((self.owned_numel + self.shared_numel).max()) if L else 0.0
        self.total_owned_numel = float(self.owned_numel.sum())
        self.total_buffers = float(self.buffers.sum())
        self._comm_items = self._communication(strategies)
        self._comm_keys: tuple[list[tuple], np.ndarray, np.ndarray] | None = None
        self._tables: dict[int, _LayerTable] = {}

    def _communication(self, strategies) -> list[tuple[int, str, tuple, bool]]:
        """(layer, phase, pricing key, batch-dependent) for every TP collective of a step."""
        if self.plan is None:
            return []
        ctx = self.ctx
        items = []
        for r in self.plan.reshards:
            producer = ctx.by_name[r.producer]
            layer = ctx.infos[producer].layer
            items.append((layer, "reshard", (r.src, r.dst, r.grad_layout, r.regather, r.nbytes), producer in ctx.batch_dependent))
        for name, s in strategies.items():
            if not s.comm:
                continue
            node = ctx.by_name[name]
            for c in s.comm:
                items.append((ctx.infos[node].layer, "internal", (c.collective, c.nbytes, c.phase), node in ctx.batch_dependent))
        return items

    def held(self, layers: np.ndarray) -> tuple[float, float]:
        """(local numel, buffer bytes) a device holding the layers in the boolean mask
        ``layers`` keeps: each parameter once, shared ones when any of their layers is held."""
        numel = float(self.owned_numel[layers].sum())
        buffers = float(self.buffers[layers].sum())
        for n, b, owner, readers in self.shared_params:
            if not layers[owner] and any(layers[r] for r in readers):
                numel += n
                buffers += b
        return numel, buffers

    def table(self, samples: int, recompute: bool) -> "_LayerTable":
        """Per-layer costs of one microbatch of ``samples`` samples."""
        key = samples * 2 + int(recompute)
        found = self._tables.get(key)
        if found is None:
            base = self._tables.get(samples * 2) if recompute else None
            found = _LayerTable.build(self, samples, recompute, base)
            self._tables[key] = found
        return found

    # prices at fraction f ------------------------------------------------------------------------
    def compute_times(self, f: float) -> tuple[np.ndarray, np.ndarray]:
        L, bw = self.ctx.num_layers, self.ctx.device.memory_bandwidth
        scale = np.where(self._dep, f, 1.0)
        moved = self._m_fixed + self._m_batch * scale
        overhead = self.ctx.device.kernel_overhead
        fwd = roofline(self._f_fwd * scale, moved, self._rate, bw, overhead)
        bwd = np.where(self._backward, roofline(self._f_bwd * scale, 2 * moved, self._rate, bw, overhead), 0.0)
        return np.bincount(self._layer, fwd, minlength=L), np.bincount(self._layer, bwd, minlength=L)

    def communication_times(self, f: float) -> tuple[np.ndarray, np.ndarray]:
        L = self.ctx.num_layers
        if self._comm_keys is None:  # each distinct collective priced once per f, summed per layer in item order
            keys: dict[tuple, int] = {}
            index = [keys.setdefault((kind, key, is_dep), len(keys)) for _, kind, key, is_dep in self._comm_items]
            self._comm_keys = (list(keys), np.array(index, dtype=np.int64), np.array([item[0] for item in self._comm_items], dtype=np.int64))
        keys, index, layers = self._comm_keys
        prices = np.array([self._price(kind, key, f if is_dep else 1.0) for kind, key, is_dep in keys], dtype=np.float64).reshape(-1, 2)
        return np.bincount(layers, prices[index, 0], minlength=L), np.bincount(layers, prices[index, 1], minlength=L)

    def _price(self, kind: str, key: tuple, f: float) -> tuple[float, float]:
        cm, ranks = self.ctx.cost_model, self.plan.ranks
        if kind == "reshard":
            src, dst, grad, regather, nbytes = key
            nbytes = nbytes * f
            forward = reshard_cost(src, dst, nbytes, cm, ranks)[0]
            backward = reshard_cost(grad, adjoint(src), nbytes, cm, ranks)[0] if grad is not None else 0.0
            return forward, backward + (forward if regather else 0.0)
        collective, nbytes, phase = key
        nbytes = nbytes * f
        if collective == "all_to_all":
            seconds = cm.all_to_all(nbytes / self.tp, ranks)
        else:
            seconds = getattr(cm, collective)(nbytes, ranks)
        return (seconds, 0.0) if phase == "forward" else (0.0, seconds)


@dataclass(frozen=True)
class _LayerTable:
    """Per-layer costs of one microbatch under one tp (and recompute choice); seconds, bytes."""

    forward_compute: np.ndarray
    backward_compute: np.ndarray
    forward_comm: np.ndarray
    backward_comm: np.ndarray
    recompute: np.ndarray  # forward compute + communication again (0 without recomputation)
    time: np.ndarray  # the sum of the five above: forward + backward of one microbatch
    forward: np.ndarray  # forward compute + communication
    backward: np.ndarray  # backward compute + communication + recompute
    activations: np.ndarray  # bytes kept per microbatch in flight
    boundary: np.ndarray  # bytes per device sent across a cut right after the layer
    transient: float  # bytes: largest output of a microbatch (+ a recomputed layer's activations)
    total_time: float
    max_time: float
    total_forward: float
    total_backward: float
    total_activations: float

    @staticmethod
    def build(prices: _LayerPrices, samples: int, recompute: bool, base: "_LayerTable | None") -> "_LayerTable":
        f = samples / prices.ctx.traced_batch
        if base is not None:
            fc, bc, fm, bm = base.forward_compute, base.backward_compute, base.forward_comm, base.backward_comm
        else:
            fc, bc = prices.compute_times(f)
            fm, bm = prices.communication_times(f)
        full_activations = prices.act_dep * f + prices.act_fixed
        redo = fc + fm if recompute else np.zeros_like(fc)
        activations = prices.kept_dep * f + prices.kept_fixed if recompute else full_activations
        out_dep, out_fixed = prices.largest_output
        transient = max(out_dep * f, out_fixed) + (float(full_activations.max()) if recompute else 0.0)
        time_ = fc + bc + fm + bm + redo
        forward = fc + fm
        backward = bc + bm + redo
        return _LayerTable(
            forward_compute=fc,
            backward_compute=bc,
            forward_comm=fm,
            backward_comm=bm,
            recompute=redo,
            time=time_,
            forward=forward,
            backward=backward,
            activations=activations,
            boundary=(prices.boundary_dep * f + prices.boundary_fixed) / prices.tp,
            transient=transient,
            total_time=float(time_.sum()),
            max_time=float(time_.max()),
            total_forward=float(forward.sum()),
            total_backward=float(backward.sum()),
            total_activations=float(activations.sum()),
        )


# -- what every candidate shares --------------------------------------------------------------------
class _Context:
    def __init__(self, gm, cluster, cost_model, compute_dtype, optimizer, batch_size):
        self.gm, self.cluster, self.cost_model = gm, cluster, cost_model
        self.compute_dtype, self.optimizer = compute_dtype, optimizer
        self.nodes = list(gm.graph.nodes)
        self.infos = {n: node_info(n) for n in self.nodes}
        self.by_name = {n.name: n for n in self.nodes}
        info = graph_info(gm)
        self.layers = info.layers
        self.num_layers = len(info.layers)
        if not info.input_specs or not info.input_specs[0].shape:
            raise PartcError("cannot find the traced batch: the first input has no leading batch dimension", ErrorContext(pass_name=_PASS, fix="pass the batch as the first of example_inputs"))
        self.traced_batch = info.input_specs[0].shape[0]
        self.batch_size = batch_size
        self.mixed = compute_dtype is not None
        self.weight_dtype = _parameter_dtype(list(self.infos.values()))
        self.param_dtype = compute_dtype or self.weight_dtype
        self.device = cluster.slowest_device()  # the reference device: every price is on it
        self.dtype_name = str(self.param_dtype).removeprefix("torch.")
        self.batch_dependent = _batch_dependent(self.nodes, self.infos)
        self.recomputed = recomputable_nodes(gm)
        self.runs_graph_for_global_mean = runs_graph_for_global_mean(gm)
        self.per_param: dict[tuple[int, int, bool, bool], float] = {}  # (zero, dp, accumulates, gathered) -> bytes per local parameter
        self._node_costs: _NodeCosts | None = None

    @property
    def node_costs(self) -> _NodeCosts:
        """The per-node costs every tensor-parallel degree scales (built on first use)."""
        if self._node_costs is None:
            self._node_costs = _NodeCosts(self)
        return self._node_costs

    def dtype_scale(self, dtype: torch.dtype | None) -> float:
        """Bytes in the compute dtype over bytes of ``dtype`` as traced (mixed precision halves fp32)."""
        if self.compute_dtype is None or dtype is None or not dtype.is_floating_point:
            return 1.0
        return self.compute_dtype.itemsize / dtype.itemsize

    def bytes_per_param(self, zero: int, dp: int, accumulates: bool = False, gathered: bool = False) -> float:
        key = (zero, dp, accumulates, gathered)
        if key not in self.per_param:
            self.per_param[key] = training_memory(
                1, self.param_dtype, 0.0, optimizer=self.optimizer, mixed_precision=self.mixed, zero_stage=zero, dp=dp, accumulates=accumulates, gathered=gathered
            ).total
        return self.per_param[key]


_ABSENT = object()  # a metadata key a node did not have


@contextlib.contextmanager
def _at_one_sample(gm: fx.GraphModule) -> Iterator[None]:
    """Inside the block, the annotated ``gm`` is propagated and annotated again at batch 1
    (inputs whose leading dimension is the traced batch get 1): every node's ``val`` and
    NodeInfo and the graph's GraphInfo are those at one sample. On exit, also when
    propagation or the block raises, the traced batch's are put back (the same objects).

    The sharding ILP picks layouts for the shapes it sees: on a graph traced at the global
    batch it may shard the batch dimension across the tensor-parallel group (data
    parallelism inside it, with weights gathered), a layout that a microbatch of fewer
    samples than ``tp`` cannot take and that duplicates the dp dimension. At batch 1 it
    chooses among the model-parallel layouts (Megatron's column/row, sequence parallelism,
    vocab-parallel loss), which every microbatch size can run; costs are then scaled per
    sample from these annotations.

    In place, not on a copy of the graph: the search reads the graph only while it runs,
    and a copy would make every fx node again (~0.05 s of a 96-layer GPT-3's 0.25 s). The
    operators, modules, layers and source lines are read from the traced annotations, and
    the parameters' fakes are reused (``reuse_from``)."""
    traced_info = graph_info(gm)
    batch = traced_info.input_specs[0].shape[0]
    traced = [(n, n.meta.get("val", _ABSENT), n.meta.get(META_KEY, _ABSENT)) for n in gm.graph.nodes]
    try:
        inputs = []
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            value = n.meta.get("val")
            if isinstance(value, torch.Tensor):
                shape = tuple(value.shape)
                if shape and shape[0] == batch:
                    shape = (1,) + shape[1:]
                value = torch.empty(shape, dtype=value.dtype, device="meta")
            inputs.append(value)
        annotate(propagate(gm, inputs, reuse_from=gm), reuse_from=gm)
        if [l.name for l in graph_info(gm).layers] != [l.name for l in traced_info.layers]:
            raise PartcError("the layers of the batch-1 graph differ from the traced graph's", ErrorContext(pass_name=_PASS))
        yield
    finally:
        for node, value, info in traced:
            for key, old in (("val", value), (META_KEY, info)):
                if old is _ABSENT:
                    node.meta.pop(key, None)
                else:
                    node.meta[key] = old
        gm.meta[META_KEY] = traced_info


def _batch_dependent(nodes: Sequence[fx.Node], infos) -> set[fx.Node]:
    """Nodes whose value depends on a user input; sizes read from inputs do not count
    (they are Python values), so position tables built from ``x.size(1)`` stay fixed."""
    found: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder":
            found.add(n)
        elif infos[n].op not in (OpKind.SHAPE, OpKind.PARAMETER) and infos[n].outputs and not found.isdisjoint(n.all_input_nodes):
            found.add(n)
    return found


# -- the search -----------------------------------------------------------------------------------
@gc_paused()
def search(
    gm: fx.GraphModule,
    cluster: Cluster,
    cost_model: CostModel,
    *,
    batch_size: int,
    pinned: dict[str, int] | None = None,
    schedules: Sequence[str] = SCHEDULES,
    microbatch_options: Sequence[int] | None = None,
    virtual_stage_options: Sequence[int] = (2, 4),
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    recompute_options: Sequence[bool] = (False, True),
    zero_options: Sequence[int] = (0, 1, 2, 3),
    top_k: int = 8,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """The fastest feasible (dp, tp, pp, microbatches, schedule, recompute, ZeRO) for the
    annotated ``gm`` on ``cluster`` (see the module doc for every formula).

    batch_size: the global batch per step, in samples (the graph may be traced at another
        batch; costs scale per sample). pinned: fixed degrees, e.g. ``{"tp": 2}``.
    schedules: pipeline schedules to try (ties go to the earlier). microbatch_options:
        microbatch counts per replica (default: every count that divides the batch).
    virtual_stage_options: stages per rank for interleaved and zero-bubble schedules.
    compute_dtype: mixed-precision compute dtype (bf16; fp32 master weights), or None.
    memory_limit: bytes per device (default: the smallest device's memory).
    top_k: how many feasible candidates to return (the best first); the others are
        rejected as slower. progress: called with one line per phase.

    A graph traced at more than one sample is priced at one (module doc): while the
    search runs, ``gm``'s nodes carry their annotations at batch 1 (:func:`_at_one_sample`);
    the traced ones are back when it returns or raises.

    Raises :class:`~partc.InfeasiblePlanError` when no candidate runs and fits; its
    message names the closest and what would fit, ``error.rejected`` lists them all.
    """
    started = time.perf_counter()
    say = progress or (lambda line: None)
    _check_arguments(batch_size, schedules, zero_options, recompute_options, top_k, optimizer, virtual_stage_options)
    with contextlib.ExitStack() as one_sample:
        one_sample_seconds = 0.0
        if graph_info(gm).input_specs and graph_info(gm).input_specs[0].shape and graph_info(gm).input_specs[0].shape[0] > 1:
            start = time.perf_counter()
            try:
                one_sample.enter_context(_at_one_sample(gm))
                say(f"batch-1    {time.perf_counter() - start:7.3f} s  graph propagated and annotated again at one sample")
            except Exception as e:  # noqa: BLE001 - a graph with the batch baked in: price the traced one
                say(f"batch-1    {time.perf_counter() - start:7.3f} s  not possible ({str(e).splitlines()[0]}); pricing the traced graph")
            one_sample_seconds = time.perf_counter() - start
        if cost_model.cluster is not cluster and cost_model.cluster != cluster:
            raise PartcError("cost_model prices another cluster than the one searched", ErrorContext(pass_name=_PASS, fix="pass CostModel(cluster)"))
        ctx = _Context(gm, cluster, cost_model, compute_dtype, optimizer, batch_size)
        limit = float(memory_limit) if memory_limit is not None else min(cluster.device(r).memory for r in range(cluster.world_size))
        runner = _Search(ctx, limit, list(schedules), microbatch_options, tuple(virtual_stage_options), tuple(recompute_options), tuple(zero_options), top_k, say)
        runner.enumerate(_check_pinned(pinned, cluster.world_size))
        runner.run()
        feasible = sorted(runner.feasible, key=lambda c: runner.sort_key(c))
        if not feasible:
            raise runner.infeasible_error()
        feasible = _simplest_first_among_ties(feasible)
        kept = tuple(runner.finish(c) for c in feasible[:top_k])
        best = kept[0]
        rejected = list(runner.rejected)
        for c in feasible[top_k:]:
            rejected.append(_rejection(c, "slower", f"slower: {_percent(c.predicted_step_time, best.predicted_step_time)} ({_ms(c.predicted_step_time)} vs {_ms(best.predicted_step_time)})", c.predicted_step_time, c.memory.total))
        seconds = time.perf_counter() - started
        say(f"search     {seconds:7.3f} s  {len(kept) + len(rejected)} configurations, {runner.solves} exact stage cuts, {runner.heuristic_cuts} interleaved, best {best.label} {_ms(best.predicted_step_time)}")
        return SearchResult(
            best=best,
            candidates=kept,
            rejected=tuple(sorted(rejected, key=_rejection_key)),
            searched=len(kept) + len(rejected),
            seconds=seconds,
            sharding_seconds=runner.sharding_seconds,
            one_sample_seconds=one_sample_seconds,
            stage_solves=runner.solves,
            heuristic_cuts=runner.heuristic_cuts,
            memory_limit=limit,
            batch_size=batch_size,
        )


class _Search:
    """The state of one search: per-tp prices, cached stage solutions, results so far."""

    def __init__(self, ctx, limit, schedules, microbatch_options, virtual_options, recompute_options, zero_options, top_k, say):
        self.ctx, self.limit, self.schedules = ctx, limit, schedules
        self.microbatch_options = microbatch_options
        self.virtual_options, self.recompute_options, self.zero_options = virtual_options, recompute_options, zero_options
        self.top_k, self.say = top_k, say
        self.prices: dict[int, _LayerPrices] = {}
        self.specs: list[_Spec] = []
        self.rejected: list[Rejection] = []
        self.feasible: list[Candidate] = []
        self.solves = 0  # exact stage cuts (DP or ILP)
        self.heuristic_cuts = 0  # interleaved cuts by local search
        self.sharding_seconds = 0.0
        self.unconstrained: dict[tuple, StagePartition | PartcError] = {}
        self.collective_cache: dict[tuple, tuple[float, float]] = {}
        self.layer_costs: dict[tuple, tuple[LayerCost, ...]] = {}  # (tp, dp, m, recompute, zero) -> the chain
        self.links: dict[tuple, tuple] = {}  # (pp, dp, tp, v) -> stage speeds, link latencies and bandwidths
        self.inflight: dict[tuple, tuple[float, ...]] = {}  # (stages, v, m, schedule) -> microbatches in flight per stage
        self.param_bytes: dict[tuple, np.ndarray] = {}  # (tp, dp, zero) -> parameter bytes per layer
        self.stage_sums: dict[tuple, list[float]] = {}  # (table, cut, column) -> per-stage sums (_stage_sums)
        self.bound_parts: dict[tuple, tuple] = {}  # (tp, pp, dp, m, schedule, v, recompute) -> what lower_bound shares across ZeRO stages
        self.prefixes: dict[int, tuple[np.ndarray, list[float]]] = {}  # id(array) -> (the array, its prefix sums) (_prefix)
        self.cut_hints: dict[tuple, list[int]] = {}  # (tp, pp, dp, recompute, schedule, v) -> last interleaved cut
        forbidden = gradient_free_cuts(ctx.gm, every_value=True, recomputed=ctx.recomputed) if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else frozenset()
        self.forbidden = {s: forbidden | (gradient_free_cuts(ctx.gm, recomputed=ctx.recomputed) if s == "zero_bubble" else frozenset()) for s in SCHEDULES}

    def sort_key(self, c: Candidate) -> tuple:
        spec = _Spec(c.mesh["pp"], c.mesh["dp"], c.mesh["tp"], c.microbatches, c.schedule, c.virtual_stages, c.recompute, c.zero_stage)
        return (c.predicted_step_time, c.memory.total, spec.order(self.schedules))

    # enumeration -------------------------------------------------------------------------------
    def enumerate(self, pinned: dict[str, int]) -> None:
        ctx = self.ctx
        cluster, world, B = ctx.cluster, ctx.cluster.world_size, ctx.batch_size
        node_sizes = sorted({n.devices for n in cluster.nodes})
        for tp in _divisors(world):
            for pp in _divisors(world // tp):
                dp = world // (tp * pp)
                mesh = {"pp": pp, "dp": dp, "tp": tp}
                if any(mesh[k] != v for k, v in pinned.items()):
                    continue
                problem = self._mesh_problem(tp, pp, dp, node_sizes)
                if problem is not None:
                    self.rejected.append(Rejection(mesh, None, None, None, None, None, *problem))
                    continue
                if self.microbatch_options is None and B % dp:
                    self.rejected.append(Rejection(mesh, 1, None, None, None, None, "indivisible", f"batch {B} does not split over dp={dp} x 1 microbatch"))
                    continue
                counts = self.microbatch_options if self.microbatch_options is not None else [m for m in _divisors(B // dp)]
                for m in counts:
                    if B % (dp * m):
                        self.rejected.append(Rejection(mesh, m, None, None, None, None, "indivisible", f"batch {B} does not split over dp={dp} x {m} microbatch{'es' if m > 1 else ''}"))
                        continue
                    for schedule, v in self._schedules(pp):
                        why = self._schedule_problem(pp, m, schedule, v)
                        if why is not None:
                            self.rejected.append(Rejection(mesh, m, schedule, v, None, None, *why))
                            continue
                        # with dp = 1 there is nothing to shard over: every ZeRO stage is ZeRO-0
                        zeros = self.zero_options if dp > 1 else (0,)
                        for recompute in self.recompute_options:
                            for zero in zeros:
                                self.specs.append(_Spec(pp, dp, tp, m, schedule, v, recompute, zero))

    def _mesh_problem(self, tp: int, pp: int, dp: int, node_sizes: list[int]) -> tuple[str, str] | None:
        smallest = node_sizes[0]
        if tp > smallest:
            return "topology", f"tp={tp} exceeds the node ({smallest} devices per node): tensor parallelism stays inside a node"
        if any(size % tp for size in node_sizes):
            return "topology", f"tp={tp} does not divide the {'/'.join(map(str, node_sizes))} devices of a node: a tensor-parallel group would cross nodes"
        L = self.ctx.num_layers
        if pp > L:
            return "topology", f"pp={pp} exceeds the model's {L} layers"
        return None

    def _schedules(self, pp: int) -> list[tuple[str, int]]:
        if pp == 1:
            return [("none", 1)]
        found = []
        for s in self.schedules:
            if s in ("interleaved", "zero_bubble"):
                found += [(s, v) for v in self.virtual_options]
            else:
                found.append((s, 1))
        return found

    def _schedule_problem(self, pp: int, m: int, schedule: str, v: int) -> tuple[str, str] | None:
        if schedule == "none":
            return None
        layers = self.ctx.num_layers - len(self.forbidden[schedule])
        if pp * v > layers:
            return "topology", f"pp={pp} x {v} stage(s) per rank needs {pp * v} stages; the model has {layers} layers that can be cut"
        if schedule == "1f1b" and m < pp:
            return "schedule", f"1f1b needs at least {pp} microbatches (one per stage), got {m}"
        if schedule in ("interleaved", "zero_bubble"):
            if m < pp:
                # torch runs it, but with fewer microbatches than pipeline ranks the pipe never
                # fills: the step is the serial sum, not what the bubble formula prices
                return "schedule", f"{schedule} needs at least {pp} microbatches (one per pipeline rank) to fill the pipe, got {m}"
            rounds = max(1, m // pp)
            if m % rounds:
                return "schedule", f"{schedule} needs the microbatch count a multiple of its {rounds} rounds (torch), got {m}"
        return None

    # pricing -------------------------------------------------------------------------------------
    def _prices(self, tp: int) -> _LayerPrices | PartcError:
        if tp not in self.prices:
            plan = None
            if tp > 1:
                start = time.perf_counter()
                try:
                    plan = plan_sharding(self.ctx.gm, self.ctx.cost_model, tp=tp, ranks=list(range(tp)), memory_limit=math.inf, compute_dtype=self.ctx.compute_dtype, optimizer=self.ctx.optimizer, reuse_repeated_blocks=True)
                except SolverError:
                    raise  # CBC missing or failing is the installation's problem, not this tp's: say so
                except PartcError as e:
                    self.prices[tp] = e
                    return e
                finally:
                    self.sharding_seconds += time.perf_counter() - start
                self.say(f"sharding   {time.perf_counter() - start:7.3f} s  tp={tp} ({plan.status})")
            self.prices[tp] = _LayerPrices(self.ctx, tp, plan)
        return self.prices[tp]

    def _table(self, spec: _Spec) -> _LayerTable:
        return self.prices[spec.tp].table(self.ctx.batch_size // (spec.dp * spec.microbatches), spec.recompute)

    def lower_bound(self, spec: _Spec) -> tuple[float, float]:
        """(seconds, bytes) no pricing of ``spec`` can beat (module doc, "Search")."""
        ctx = self.ctx
        # the parts every ZeRO stage shares, computed once for them
        key = (spec.tp, spec.pp, spec.dp, spec.microbatches, spec.schedule, spec.virtual_stages, spec.recompute)
        shared = self.bound_parts.get(key)
        if shared is None:
            table, prices = self._table(spec), self.prices[spec.tp]
            R, m, d = spec.pp, spec.microbatches, spec.fill_drain_divisor
            S = table.total_time
            if R == 1:
                pipeline = m * S
            else:
                per_rank = max(S / R, table.max_time if spec.virtual_stages == 1 else 0.0)
                pipeline = (m - 1.0 / d) * per_rank + S / d
            numel = prices.total_owned_numel / R  # the mean rank holds at least this
            buffers = prices.total_buffers / R
            acts = table.total_activations / R * (1 if R == 1 else self._least_inflight(spec))
            shared = self.bound_parts[key] = (table, pipeline, numel, buffers, acts)
        table, pipeline, numel, buffers, acts = shared
        exposed = self._dp_exposed(spec, 0, numel * ctx.param_dtype.itemsize, table.total_forward, table.total_backward, table.total_backward)
        optimizer = self._optimizer_time(numel, spec)
        static = numel * ctx.bytes_per_param(spec.zero_stage, spec.dp, *self._fsdp_holds_whole(spec)) + buffers
        return pipeline + exposed + optimizer, static + acts + self._transient(spec, table)

    @staticmethod
    def _least_inflight(spec: _Spec) -> float:
        if spec.schedule == "gpipe":
            return float(spec.microbatches)
        return 1.0 if spec.schedule == "1f1b" else 1.0 / spec.virtual_stages

    def _transient(self, spec: _Spec, table: _LayerTable) -> float:
        extra = 0.0
        if spec.zero_stage == 3 and spec.dp > 1 and not self._fsdp_holds_whole(spec)[1]:  # (else gathered whole: priced as parameters)
            extra = 2 * self.prices[spec.tp].largest_layer_param * self.ctx.param_dtype.itemsize  # the layer in use and the prefetched one
        return table.transient + extra

    def _optimizer_time(self, numel: float, spec: _Spec) -> float:
        if self.ctx.optimizer == "sgd":
            return 0.0
        local = numel / spec.dp if spec.zero_stage >= 1 else numel
        return local * optimizer_step_bytes(self.ctx.optimizer, self.ctx.param_dtype, self.ctx.mixed) / self.ctx.device.memory_bandwidth

    def _collective(self, op: str, spec: _Spec, pipeline_rank: int) -> tuple[float, float]:
        """(seconds at 0 bytes, seconds per byte) of ``op`` over the dp group of a pipeline
        rank: the alpha-beta collectives are affine in the bytes, so two prices give all."""
        key = (op, spec.dp, spec.tp, pipeline_rank)
        found = self.collective_cache.get(key)
        if found is None:
            ranks = [mesh_rank(spec.mesh, pipeline_rank, d, 0) for d in range(spec.dp)]
            price = getattr(self.ctx.cost_model, op)
            zero = price(0.0, ranks)
            found = (zero, (price(float(GiB), ranks) - zero) / GiB)
            self.collective_cache[key] = found
        return found

    def _fsdp_holds_whole(self, spec: _Spec) -> tuple[bool, bool]:
        """(accumulates, gathered) of :func:`partc.cost_model.training_memory` for ``spec``:
        gradients summed over several microbatches (accumulation, a pipeline), which FSDP2
        holds unsharded until the last; parameters gathered at the peak (a pipeline stage
        after its first backward, a module FSDP2 shards as one unit)."""
        return spec.microbatches > 1 or spec.pp > 1, spec.pp > 1 or self._one_fsdp_unit(spec)

    def _one_fsdp_unit(self, spec: _Spec) -> bool:
        """Whether the runtime runs a generated module (a pipeline stage, a tensor-parallel
        module, checkpointed layers, an exported graph, a graph whose model computes a loss
        taken over the global batch once it is split), which FSDP2 shards as one unit; the
        user's own fx-traced model is sharded block by block (partc.runtime.data_parallel)."""
        if spec.pp > 1 or spec.tp > 1 or spec.recompute or graph_info(self.ctx.gm).frontend != FX_FRONTEND:
            return True
        return spec.dp * spec.microbatches > 1 and self.ctx.runs_graph_for_global_mean

    def _dp_exposed(self, spec: _Spec, r: int, weight_bytes: float, forward: float, backward: float, window: float) -> float:
        """Exposed dp traffic of pipeline rank ``r`` (module doc, "Data-parallel synchronisation")."""
        if spec.dp == 1:
            return 0.0
        grads = weight_bytes  # gradients in the same dtype as the weights
        bucket = min(DDP_BUCKET_BYTES, grads)

        def cost(op: str, nbytes: float) -> float:
            a, b = self._collective(op, spec, r)
            return a + b * nbytes

        z, m = spec.zero_stage, spec.microbatches
        if z == 0:
            return max(cost("all_reduce", grads) - window, cost("all_reduce", bucket))
        if self._one_fsdp_unit(spec):
            # FSDP2 shards a generated module as one unit: it gathers every weight before the
            # (each, with ZeRO-3: forward and backward of every microbatch) and reduce-scatters
            # after the last backward, overlapping nothing
            return cost("reduce_scatter", grads) + (1 if z <= 2 else 2 * m) * cost("all_gather", weight_bytes)
        exposed = max(cost("reduce_scatter", grads) - window, cost("reduce_scatter", bucket))
        if z <= 2:
            return exposed + max(cost("all_gather", weight_bytes) - forward, cost("all_gather", min(DDP_BUCKET_BYTES, weight_bytes)))
        gather = cost("all_gather", weight_bytes)
        return exposed + m * (max(0.0, gather - forward) + max(0.0, gather - backward))

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        for tp in sorted({s.tp for s in self.specs}):
            found = self._prices(tp)
            if isinstance(found, PartcError):
                for mesh in sorted({(s.pp, s.dp) for s in self.specs if s.tp == tp}):
                    self.rejected.append(Rejection({"pp": mesh[0], "dp": mesh[1], "tp": tp}, None, None, None, None, None, "sharding", f"no tensor-parallel plan for tp={tp}: {found.message}"))
        specs = [s for s in self.specs if not isinstance(self.prices[s.tp], PartcError)]
        bounds = {s: self.lower_bound(s) for s in specs}
        order = sorted(specs, key=lambda s: (bounds[s][0], s.order(self.schedules)))
        kth: list[float] = []  # the top_k best step times so far, ascending
        for spec in order:
            bound_time, bound_memory = bounds[spec]
            if spec.pp > 1 and bound_memory > self.limit:
                # (without a pipeline the bound is the price: priced below, exact)
                self.rejected.append(_spec_rejection(spec, "memory", f"over memory by at least {_gib(bound_memory - self.limit)} ({_gib(bound_memory)} of {_gib(self.limit)} per device)", bound_time, bound_memory))
                continue
            if len(kth) >= self.top_k and bound_time > max(kth[self.top_k - 1], kth[0] * (1 + TIE_WITHIN)) * (1 + _REL) and (spec.pp > 1 or bound_memory <= self.limit):
                best = kth[0]
                self.rejected.append(_spec_rejection(spec, "slower", f"slower: at least {_percent(bound_time, best)} (lower bound {_ms(bound_time)} vs {_ms(best)}; not priced)", bound_time, None))
                continue
            outcome = self.price(spec)
            if isinstance(outcome, Rejection):
                self.rejected.append(outcome)
                continue
            self.feasible.append(outcome)
            kth.append(outcome.predicted_step_time)
            kth.sort()
            del kth[self.top_k:]

    def price(self, spec: _Spec) -> Candidate | Rejection:
        table = self._table(spec)
        if spec.pp == 1:
            return self._price_flat(spec, table)
        return self._price_pipeline(spec, table)

    def _price_flat(self, spec: _Spec, table: _LayerTable) -> Candidate | Rejection:
        ctx, prices = self.ctx, self.prices[spec.tp]
        numel = prices.total_owned_numel
        weight_bytes = numel * ctx.param_dtype.itemsize
        m = spec.microbatches
        exposed = self._dp_exposed(spec, 0, weight_bytes, table.total_forward, table.total_backward, table.total_backward)
        optimizer = self._optimizer_time(numel, spec)
        memory = self._memory(spec, numel, prices.total_buffers, table.total_activations, self._transient(spec, table))
        breakdown = StepBreakdown(
            compute=m * float((table.forward_compute + table.backward_compute).sum()),
            recompute=m * float(table.recompute.sum()),
            tp_communication=m * float((table.forward_comm + table.backward_comm).sum()),
            pipeline_transfer=0.0,
            pipeline_bubble=0.0,
            dp_sync_exposed=exposed,
            optimizer=optimizer,
        )
        return self._candidate(spec, breakdown, memory, None, "exact")

    def _memory(self, spec: _Spec, numel: float, buffers: float, activations: float, transient: float) -> MemoryBreakdown:
        ctx = self.ctx
        accumulates, gathered = self._fsdp_holds_whole(spec)
        memory = training_memory(
            int(round(numel)), ctx.param_dtype, activations, optimizer=ctx.optimizer, mixed_precision=ctx.mixed,
            zero_stage=spec.zero_stage, dp=spec.dp, transient_bytes=transient, accumulates=accumulates, gathered=gathered,
        )
        return memory + MemoryBreakdown(parameters=buffers, gradients=0.0, optimizer_state=0.0, activations=0.0)

    def _candidate(self, spec, breakdown, memory, partition, status) -> Candidate | Rejection:
        step = breakdown.total
        if memory.total > self.limit:
            return _spec_rejection(spec, "memory", f"over memory by {_gib(memory.total - self.limit)} ({_gib(memory.total)} of {_gib(self.limit)} per device)", step, memory.total)
        prices = self.prices[spec.tp]
        return Candidate(
            mesh=spec.mesh,
            microbatches=spec.microbatches,
            schedule=spec.schedule,
            virtual_stages=spec.virtual_stages,
            recompute=spec.recompute,
            zero_stage=spec.zero_stage,
            predicted_step_time=step,
            breakdown=breakdown,
            memory=memory,
            memory_limit=self.limit,
            partition=partition,
            sharding=prices.plan,
            solver_status=status,
        )

    # pipelines -------------------------------------------------------------------------------------
    def _stage_problem(self, spec: _Spec, table: _LayerTable, schedule: str, zero: int | None, budget: float | None) -> StageProblem:
        key = (spec.tp, spec.dp, spec.microbatches, spec.recompute, zero, spec.pp > 1)
        layers = self.layer_costs.get(key)
        if layers is None:
            ctx = self.ctx
            params = self._layer_param_bytes(spec, zero).tolist()
            time_, acts, boundary = table.time.tolist(), table.activations.tolist(), table.boundary.tolist()
            layers = tuple(LayerCost(layer.name, time_[j], params[j], acts[j], boundary[j]) for j, layer in enumerate(ctx.layers))
            self.layer_costs[key] = layers
        speeds, latency, bandwidth = self._links(spec)
        return StageProblem(
            layers=layers,
            stages=spec.stages,
            microbatches=spec.microbatches,
            schedule=schedule,
            virtual_stages=spec.virtual_stages,
            stage_speed=speeds,
            memory_budget=(budget,) * spec.stages if budget is not None else (),
            link_latency=latency,
            link_bandwidth=bandwidth,
            time_limit=_STAGE_TIME_LIMIT,
        )

    def _links(self, spec: _Spec) -> tuple:
        key = (spec.pp, spec.dp, spec.tp, spec.virtual_stages)
        if key not in self.links:
            self.links[key] = self._pipeline_links(spec)
        return self.links[key]

    def _pipeline_links(self, spec: _Spec):
        cluster, R = self.ctx.cluster, spec.pp
        first = [mesh_rank(spec.mesh, r, 0, 0) for r in range(R)]
        reference = self.ctx.device.flops(self.ctx.dtype_name)
        speeds = []
        for r in range(R):
            group = range(first[r], first[r] + spec.dp * spec.tp)
            speeds.append(cluster.slowest_device(group).flops(self.ctx.dtype_name) / reference)
        stage_speed = tuple(speeds[i % R] for i in range(spec.stages)) if any(s != 1.0 for s in speeds) else ()
        latency, bandwidth = [], []
        for i in range(spec.stages - 1):
            link = cluster.link([first[i % R], first[(i + 1) % R]])
            latency.append(link.latency)
            bandwidth.append(link.bandwidth)
        return stage_speed, tuple(latency), tuple(bandwidth)

    def _time_optimal(self, spec: _Spec, table: _LayerTable) -> StagePartition | PartcError:
        """The cut with the least pipeline time and no memory budget, shared across ZeRO
        stages and between GPipe and 1F1B (module doc, "Reuse")."""
        family = "1f1b" if spec.schedule in ("gpipe", "1f1b") else spec.schedule
        key = (spec.tp, spec.pp, spec.dp, spec.microbatches, spec.recompute, family, spec.virtual_stages)
        if key not in self.unconstrained:
            problem = self._stage_problem(spec, table, family, None, None)
            # the same chain at another microbatch count has nearly the same best cut
            hint = (spec.tp, spec.pp, spec.dp, spec.recompute, family, spec.virtual_stages)
            self.unconstrained[key] = self._cut(problem, self.forbidden[spec.schedule], None, hint)
        return self.unconstrained[key]

    def _cut(self, problem: StageProblem, forbidden: frozenset[int], budget: float | None, hint: tuple | None = None) -> StagePartition | PartcError:
        """The optimal cut for one stage per rank: the stage pass's exact DP
        (``exact_chain_partition``: the ILP's objective and memory rows, numpy, 2-3x quicker
        than CBC's process start and model build here), or its ILP when cuts are forbidden.
        For several stages per rank (interleaved, zero-bubble) the local search of
        :func:`_interleaved_cut`: CBC does not close those models within seconds (96 layers,
        4 ranks x 2 stages: still "feasible" at a 30 s limit, at a step 0.03% below this
        search's)."""
        if problem.virtual_stages == 1:
            try:
                self.solves += 1
                if forbidden:
                    return solve_stages_without_cuts(problem, forbidden)
                return exact_chain_partition(problem)
            except SolverError:
                raise
            except PartcError as e:
                return e
        started = time.perf_counter()
        self.heuristic_cuts += 1
        starts = _interleaved_cut(problem, forbidden, budget, self.cut_hints.get(hint) if hint is not None else None)
        if hint is not None and starts is not None:
            self.cut_hints[hint] = starts
        if starts is None:
            return InfeasiblePlanError("no stage cut fits the memory budget", ErrorContext(pass_name=_PASS))
        return evaluate_partition(problem, starts, status="heuristic", solve_seconds=time.perf_counter() - started)

    def _price_pipeline(self, spec: _Spec, table: _LayerTable) -> Candidate | Rejection:
        transient = self._transient(spec, table)
        budget = self.limit - transient
        if budget <= 0:
            return _spec_rejection(spec, "memory", f"over memory by at least {_gib(transient - self.limit)} (transient buffers alone need {_gib(transient)})", None, transient)
        inflight = self._inflight(spec)
        forbidden = self.forbidden[spec.schedule]
        # the mean rank's bytes bound every cut's fullest rank: above the budget (with a
        # margin for rounding) no cut fits, and none is looked for
        mean = self._mean_rank_bytes(spec, table, inflight)
        can_fit = mean <= budget * (1 + 1e-9)
        if can_fit:
            fastest = self._time_optimal(spec, table)
            if isinstance(fastest, PartcError):
                return _spec_rejection(spec, "schedule", f"no stage cut: {fastest.message}", None, None)
            if self._fits(spec, table, fastest.starts, inflight, budget):
                # its stage times and step are this schedule's too (same objective); its stage
                # memory is re-priced with this ZeRO stage for the candidates returned
                return self._pipeline_candidate(spec, table, fastest, inflight, transient)
        # Cut again within the budget, but only with proof that a cut fits: CBC proving
        # a budget infeasible (and sizing it) takes seconds where this takes milliseconds.
        problem = None
        if spec.virtual_stages == 1:
            problem = self._stage_problem(spec, table, spec.schedule, spec.zero_stage, budget)
            least, qualifier = least_peak_stage_memory(problem), "" if not forbidden else "at least "
            feasible = least <= budget
        else:
            least, qualifier, feasible = mean, "at least ", False
            if can_fit:
                problem = self._stage_problem(spec, table, spec.schedule, spec.zero_stage, budget)
                lightest = _lightest_cut(problem, forbidden)
                feasible = lightest is not None and self._fits(spec, table, lightest, inflight, budget)
        if feasible:
            found = self._cut(problem, forbidden, budget)
            if isinstance(found, InfeasiblePlanError):
                feasible = False
            elif isinstance(found, PartcError):
                return _spec_rejection(spec, "schedule", f"no stage cut: {found.message}", None, None)
            else:
                return self._pipeline_candidate(spec, table, found, inflight, transient)
        over = least + transient - self.limit
        return _spec_rejection(
            spec, "memory",
            f"over memory by {qualifier}{_gib(max(over, 0.0))} (no stage cut fits: the lightest needs {qualifier}{_gib(least + transient)} of {_gib(self.limit)} per device)",
            None, least + transient,
        )

    def _inflight(self, spec: _Spec) -> tuple[float, ...]:
        """Microbatches in flight per stage, as the stage pass counts them."""
        key = (spec.stages, spec.virtual_stages, spec.microbatches, spec.schedule)
        if key not in self.inflight:
            shape = StageProblem((LayerCost("", 0.0, 0.0, 0.0, 0.0),), stages=spec.stages, microbatches=spec.microbatches, schedule=spec.schedule, virtual_stages=spec.virtual_stages)
            self.inflight[key] = shape.inflights()
        return self.inflight[key]

    def _layer_param_bytes(self, spec: _Spec, zero: int | None) -> np.ndarray:
        """Per layer: the bytes its stage holds for parameters under ZeRO stage ``zero`` (None:
        buffers only, for the cuts that ignore memory) (the stage pass's convention: a shared
        weight charged to every layer that reads it)."""
        tp, dp = spec.tp, spec.dp
        holds_whole = self._fsdp_holds_whole(spec)
        key = (tp, dp, zero, holds_whole)
        if key not in self.param_bytes:
            prices = self.prices[tp]
            per_param = self.ctx.bytes_per_param(zero, dp, *holds_whole) if zero is not None else 0.0
            self.param_bytes[key] = (prices.owned_numel + prices.shared_numel) * per_param + prices.buffers + prices.shared_buffers
        return self.param_bytes[key]

    def _mean_rank_bytes(self, spec: _Spec, table: _LayerTable, inflight: Sequence[float]) -> float:
        """A lower bound on any cut's fullest rank: the mean rank's bytes, every stage
        holding the fewest microbatches in flight."""
        params = self._layer_param_bytes(spec, spec.zero_stage)
        return float(params.sum() + min(inflight) * table.total_activations) / spec.pp

    def _fits(self, spec: _Spec, table: _LayerTable, starts: Sequence[int], inflight: Sequence[float], budget: float) -> bool:
        """Whether ``_fullest_rank(...) <= budget``: from prefix sums when they clear the
        budget by a margin (1e-9 of the budget or of all the bytes, far above what summing
        in another order changes), by :meth:`_fullest_rank` otherwise."""
        params = self._prefix(self._layer_param_bytes(spec, spec.zero_stage))
        acts = self._prefix(table.activations)
        ends = list(starts[1:]) + [self.ctx.num_layers]
        ranks = [0.0] * spec.pp
        for i, (a, b) in enumerate(zip(starts, ends)):
            ranks[i % spec.pp] += params[b] - params[a] + inflight[i] * (acts[b] - acts[a])
        margin = 1e-9 * max(budget, params[-1] + max(inflight) * acts[-1])
        fullest = max(ranks)
        if fullest < budget - margin:
            return True
        if fullest > budget + margin:
            return False
        return self._fullest_rank(spec, table, starts, inflight) <= budget

    def _prefix(self, values: np.ndarray) -> list[float]:
        """[0, values[0], values[0] + values[1], ...] (cached per array: the search's per-layer
        arrays live as long as it does)."""
        found = self.prefixes.get(id(values))
        if found is None or found[0] is not values:
            found = (values, [0.0] + np.cumsum(values).tolist())
            self.prefixes[id(values)] = found
        return found[1]

    def _fullest_rank(self, spec: _Spec, table: _LayerTable, starts: Sequence[int], inflight: Sequence[float]) -> float:
        """The largest bytes a pipeline rank holds for the cut ``starts`` (the ILP's memory row)."""
        params, acts = self._layer_param_bytes(spec, spec.zero_stage), self._stage_sums(table, starts, "activations")
        ends = list(starts[1:]) + [self.ctx.num_layers]
        ranks = [0.0] * spec.pp
        for i, (a, b) in enumerate(zip(starts, ends)):
            ranks[i % spec.pp] += float(params[a:b].sum()) + inflight[i] * acts[i]
        return max(ranks)

    def finish(self, c: Candidate) -> Candidate:
        """The returned candidate's partition priced under its own schedule and ZeRO stage
        (the search shares one cut across them and prices memory from arrays)."""
        if c.partition is None:
            return c
        spec = _Spec(c.mesh["pp"], c.mesh["dp"], c.mesh["tp"], c.microbatches, c.schedule, c.virtual_stages, c.recompute, c.zero_stage)
        table = self._table(spec)
        problem = self._stage_problem(spec, table, spec.schedule, spec.zero_stage, self.limit - self._transient(spec, table))
        partition = evaluate_partition(problem, c.partition.starts, status=c.partition.status, solve_seconds=c.partition.solve_seconds)
        return dataclasses.replace(c, partition=partition)

    def _stage_sums(self, table: _LayerTable, starts: Sequence[int], column: str) -> list[float]:
        """Per stage of the cut ``starts``: the sum of one of the table's per-layer costs
        (``column``: a _LayerTable field, "compute" or "comm"); the ZeRO stages of a
        candidate share its cut and table, so each is summed once for all of them."""
        key = (id(table), tuple(starts), column)  # tables live as long as the search (_LayerPrices.table)
        found = self.stage_sums.get(key)
        if found is None:
            if column in ("compute", "comm"):
                values = getattr(table, f"forward_{column}") + getattr(table, f"backward_{column}")
            else:
                values = getattr(table, column)
            ends = list(starts[1:]) + [self.ctx.num_layers]
            found = [float(values[a:b].sum()) for a, b in zip(starts, ends)]
            self.stage_sums[key] = found
        return found

    def _pipeline_candidate(self, spec, table, partition, inflight, transient) -> Candidate | Rejection:
        ctx, prices = self.ctx, self.prices[spec.tp]
        R, p, m = spec.pp, spec.stages, spec.microbatches
        speed = self._links(spec)[0] or (1.0,) * p
        ends = list(partition.starts[1:]) + [ctx.num_layers]
        held = [np.zeros(ctx.num_layers, dtype=bool) for _ in range(R)]
        for i in range(p):
            held[i % R][partition.starts[i]:ends[i]] = True

        run = {column: self._stage_sums(table, partition.starts, column) for column in ("compute", "recompute", "comm", "time", "forward", "backward", "activations")}
        per_rank = {k: [0.0] * R for k in ("compute", "recompute", "comm", "layers", "forward", "backward", "activations")}
        for i in range(p):
            r = i % R
            s = speed[i]
            per_rank["compute"][r] += run["compute"][i] / s
            per_rank["recompute"][r] += run["recompute"][i] / s
            per_rank["comm"][r] += run["comm"][i] / s
            per_rank["layers"][r] += run["time"][i] / s
            per_rank["forward"][r] += run["forward"][i] / s
            per_rank["backward"][r] += run["backward"][i] / s
            per_rank["activations"][r] += inflight[i] * run["activations"][i]
        per_rank["numel"], per_rank["buffers"] = (list(x) for x in zip(*(prices.held(mask) for mask in held)))
        rank_time = [sum(partition.stage_times[i] for i in range(r, p, R)) for r in range(R)]
        slowest = max(range(R), key=lambda r: rank_time[r])

        itemsize = ctx.param_dtype.itemsize
        exposed, drained = 0.0, 0.0
        for r in range(R):
            drained += run["backward"][r] / speed[r]  # chunk-0 stages 0..r drain after rank r's last backward
            exposed = max(exposed, self._dp_exposed(spec, r, per_rank["numel"][r] * itemsize, per_rank["forward"][r], per_rank["backward"][r], drained))
        optimizer = max(self._optimizer_time(n, spec) for n in per_rank["numel"])
        breakdown = StepBreakdown(
            compute=m * per_rank["compute"][slowest],
            recompute=m * per_rank["recompute"][slowest],
            tp_communication=m * per_rank["comm"][slowest],
            pipeline_transfer=m * (rank_time[slowest] - per_rank["layers"][slowest]),
            pipeline_bubble=partition.step_time - m * rank_time[slowest],
            dp_sync_exposed=exposed,
            optimizer=optimizer,
        )
        memories = [self._memory(spec, per_rank["numel"][r], per_rank["buffers"][r], per_rank["activations"][r], transient) for r in range(R)]
        fullest = max(range(R), key=lambda r: memories[r].total)
        return self._candidate(spec, breakdown, memories[fullest], partition, partition.status)

    # failure -------------------------------------------------------------------------------------
    def infeasible_error(self) -> InfeasiblePlanError:
        over = sorted((r for r in self.rejected if r.kind == "memory" and r.memory is not None), key=lambda r: (r.memory, _rejection_key(r)))
        if over:
            closest = over[0]
            message = (
                f"no layout of the model fits {_gib(self.limit)} per device on {self.ctx.cluster.world_size} devices: "
                f"the closest is {closest.label}, {closest.reason}"
            )
            fix = f"give at least {_gib(closest.memory)} per device, more devices, or a smaller batch"
        else:
            reasons = sorted({r.reason for r in self.rejected})[:3]
            message = f"no layout of the model runs on {self.ctx.cluster.world_size} devices with these options: " + "; ".join(reasons)
            fix = "unpin the mesh, allow other microbatch counts or schedules, or change the global batch"
        error = InfeasiblePlanError(message, ErrorContext(pass_name=_PASS, fix=fix))
        error.rejected = tuple(sorted(self.rejected, key=_rejection_key))
        return error


class _CutCosts:
    """Stage and step times of a cut by the formulas of passes/stages.py, on prefix sums
    (the local search evaluates thousands of cuts; evaluate_partition prices the answer)."""

    def __init__(self, problem: StageProblem):
        self.problem = problem
        layers = problem.layers
        L, p = len(layers), problem.stages
        self.L, self.p, self.R = L, p, problem.ranks
        prefix = np.concatenate([[0.0], np.cumsum([l.time for l in layers])])
        boundary = np.array([l.boundary_bytes for l in layers], dtype=np.float64)
        speed = np.array(problem.stage_speed or (1.0,) * p, dtype=np.float64)
        alpha = np.array(problem.link_latency or (0.0,) * (p - 1), dtype=np.float64)
        inv_bw = np.array([1.0 / b for b in problem.link_bandwidth] if problem.link_bandwidth else [0.0] * (p - 1), dtype=np.float64)
        # A stage's time is its compute, plus its receive (not the first stage) and its send
        # (not the last); both transfers of cut k, right after layer j, are 2 (alpha_k + B_j / bw_k).
        transfer = 2 * (alpha[:, None] + boundary[None, :] * inv_bw[:, None])  # [k, j]
        receive = np.zeros((p, L))  # [i, first]: stage i's receive
        receive[1:, 1:] = transfer[:, :-1]
        receive[1:, 0] = transfer[:, -1]  # (a stage after the first never starts at layer 0)
        send = np.zeros((p, L))  # [i, last]: stage i's send
        send[:-1] = transfer
        self._arrays = (prefix, speed, transfer, receive, send)  # for _polish's numpy screen
        self._positions = np.arange(1, L)  # where a cut may be: the first layer of a stage
        self._uniform_speed = bool((speed == 1.0).all())
        beside = np.eye(self.R, dtype=bool)
        self._other_ranks = ~(beside | np.roll(beside, 1, axis=1))  # [r]: all but ranks r and r + 1
        self.prefix_time, self.boundary, self.speed = prefix.tolist(), boundary.tolist(), speed.tolist()
        self.alpha, self.inv_bw = alpha.tolist(), inv_bw.tolist()
        # as lists for the fills' scalar reads; the rows of boundaries on equal links are
        # equal, so each distinct row is converted once and shared (pipeline ranks on
        # separate nodes all talk over one kind of link)
        rows: dict[tuple[float, float], tuple[list[float], list[float]]] = {}
        self.receive, self.send = [receive[0].tolist()], []
        for k, link in enumerate(zip(self.alpha, self.inv_bw)):
            if link not in rows:
                rows[link] = (receive[k + 1].tolist(), send[k].tolist())
            self.receive.append(rows[link][0])
            self.send.append(rows[link][1])
        self.send.append(send[p - 1].tolist())
        self.divisor = problem.fill_drain_divisor
        self.param = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in layers])]).tolist()
        self.act = np.concatenate([[0.0], np.cumsum([l.activation_bytes for l in layers])]).tolist()
        self.inflight = problem.inflights()

    def stage_time(self, i: int, first: int, last: int) -> float:
        """Seconds of stage ``i`` holding layers ``first..last``, transfers included."""
        return (self.prefix_time[last + 1] - self.prefix_time[first]) / self.speed[i] + self.receive[i][first] + self.send[i][last]

    def movable_cuts(self, starts: list[int], stage: list[float], ranks: list[float], best: tuple[float, float], allowed: np.ndarray, first_cut: int) -> list[int]:
        """The cuts ``k >= first_cut`` of ``starts`` (ascending) that may have a position that
        :func:`_polish` takes over ``best``, every position of every cut priced at once with
        numpy. A screen that keeps every cut that could move: its step and evenness are
        _polish's own floats (the same operations in the same order; sums accumulate left to
        right), and only the step's rounding to 12 digits is bracketed, by a few ulps."""
        prefix, speed, transfer, receive, send = self._arrays
        L, p, R = self.L, self.p, self.R
        k_first = max(first_cut, 1)
        bounds = np.array(starts + [L])  # stage i holds layers bounds[i] .. bounds[i + 1] - 1
        at = bounds[:-1]
        j = self._positions[starts[k_first - 1]:]  # the layers past cut k_first - 1: where cuts k >= k_first may go
        s = np.searchsorted(at, j, side="right") - 1  # the stage holding layer j
        free = (at[s] != j) & allowed[j - 1]  # j is no cut yet and may be one
        # j can take cut s (moved later: stage s-1 grows) or cut s + 1 (moved earlier; s + 1 >= k_first here)
        later, earlier = free & (s >= k_first), free & (s < p - 1)
        k = np.concatenate([s[later], s[earlier] + 1])
        cut = np.concatenate([j[later], j[earlier]])
        i = k - 1  # the stage before cut k
        first, last = at[i], bounds[k + 1]
        moved = transfer[i, cut - 1]
        if self._uniform_speed:  # x / 1.0 is x: the same floats without the divisions
            before = prefix[cut] - prefix[first] + receive[i, first] + moved
            after = prefix[last] - prefix[cut] + moved + send[k, last - 1]
        else:
            before = (prefix[cut] - prefix[first]) / speed[i] + receive[i, first] + moved
            after = (prefix[last] - prefix[cut]) / speed[k] + moved + send[k, last - 1]
        stage_t, rank_t = np.array(stage), np.array(ranks)
        a = i % R  # cut k sits between ranks a and a + 1 (mod R)
        ra = rank_t[a] - stage_t[i] + before
        rb = rank_t[k % R] - stage_t[k] + after
        others = np.where(self._other_ranks, rank_t, 0.0)  # rank times are >= 0: a 0 changes no max or sum
        top = others.max(axis=1)[a]
        total = others.cumsum(axis=1)[:, -1][a]  # sums left to right, as _polish's
        squares = (others * others).cumsum(axis=1)[:, -1][a]
        slowest = np.maximum(top, np.maximum(ra, rb))
        step = self.problem.microbatches * slowest + (total + ra + rb - slowest) / self.divisor
        evenness = squares + ra * ra + rb * rb
        # round(x, 12) < best[0] needs x below best[0] - 0.5e-12, == best[0] x up to best[0] + 0.5e-12
        fuzz = 4 * float(np.spacing(abs(best[0])))
        lower = step < best[0] - 0.5e-12 + fuzz
        tied = (step <= best[0] + 0.5e-12 + fuzz) & (evenness * (1 + 1e-12) < best[1])
        flagged = np.zeros(p, dtype=bool)
        flagged[k[lower | tied]] = True
        return np.flatnonzero(flagged).tolist()

    def step(self, starts: Sequence[int]) -> float:
        ends = list(starts[1:]) + [self.L]
        ranks = [0.0] * self.R
        for i, (a, b) in enumerate(zip(starts, ends)):
            ranks[i % self.R] += self.stage_time(i, a, b - 1)
        slowest = max(ranks)
        return self.problem.microbatches * slowest + (sum(ranks) - slowest) / self.divisor

    def rank_bytes(self, starts: Sequence[int]) -> list[float]:
        ends = list(starts[1:]) + [self.L]
        ranks = [0.0] * self.R
        for i, (a, b) in enumerate(zip(starts, ends)):
            ranks[i % self.R] += self.param[b] - self.param[a] + self.inflight[i] * (self.act[b] - self.act[a])
        return ranks

    def rank_memory(self, starts: Sequence[int]) -> float:
        return max(self.rank_bytes(starts))


def _interleaved_cut(problem: StageProblem, forbidden: frozenset[int], budget: float | None, hint: Sequence[int] | None = None) -> list[int] | None:
    """A good cut for ranks that hold several stages: the smallest cap on a stage's time
    (transfers included) that a greedy fill meets (bisection) and a few looser caps, each
    improved by :func:`_polish`; within ``budget`` per rank when given (from the lightest cut
    when no balanced one fits). ``hint``: a good cut of a nearly equal problem (the same
    chain at another microbatch count), polished as one more start. None when no cut fits."""
    costs = _CutCosts(problem)
    L, p = costs.L, costs.p
    allowed = [j not in forbidden for j in range(L)]
    hinted = hint is not None and len(hint) == p and all(allowed[c - 1] for c in hint[1:])
    prefix = costs.prefix_time

    def fits(starts) -> bool:
        return budget is None or costs.rank_memory(starts) <= budget

    # speed of stages i.. together: the compute they can hold under a cap, transfers aside
    later_speed = np.cumsum(costs.speed[::-1])[::-1].tolist()

    def fill(cap: float, known: Sequence[int] = ()) -> tuple[bool, list[int]]:
        def last_layer(i: int, first: int) -> int:
            # costs.stage_time(i, first, j), inlined: the fills run it ~100,000 times
            start, speed, receive, send = prefix[first], costs.speed[i], costs.receive[i][first], costs.send[i]
            if prefix[L] - start > cap * later_speed[i] * (1 + 1e-9):
                # the layers left exceed what stages i.. hold within the cap (their
                # compute alone, with a margin over rounding): this fill fails
                return first - 1
            if (prefix[first + 1] - start) / speed + receive + send[first] > cap and allowed[first]:
                return first - 1  # not even one layer fits (the common failure: stop early)
            # the longest run within the cap on compute alone, then back to a cut that
            # is allowed and within the cap with its transfers
            j = min(bisect.bisect_right(prefix, start + cap * speed) - 2, L - (p - i))
            while j >= first and not (allowed[j] and (prefix[j + 1] - start) / speed + receive + send[j] <= cap):
                j -= 1
            return j

        return _greedy_cut(L, p, last_layer, lambda first: costs.stage_time(p - 1, first, L - 1) <= cap, known)

    # Greedy filling succeeds once the cap reaches the mean stage plus the largest layer
    # and transfer (each stage but the last then holds at least the mean).
    slowest = min(costs.speed)
    widest = max(costs.boundary[:-1], default=0.0)
    transfers = 2 * max((2 * (a + widest * b) for a, b in zip(costs.alpha, costs.inv_bw)), default=0.0)
    largest = max(b - a for a, b in zip(prefix, prefix[1:]))
    guess = (prefix[-1] / p + largest) / slowest + transfers
    balanced = _smallest_cap(fill, guess, prefix[-1] / slowest + transfers)
    seeds = []
    if balanced is not None:
        # the balanced cut and a few looser ones: rank sums, not stages, pace the step
        cap = max(costs.stage_time(i, a, b - 1) for i, (a, b) in enumerate(zip(balanced, balanced[1:] + [L])))
        slack = (1.05,) if hinted else (1.02, 1.05, 1.1)
        seeds = [balanced] + [found for more in slack for placed, found in [fill(cap * more)] if placed]
    if hinted:
        seeds.append(list(hint))
    if budget is not None:
        seeds = [_repair(costs, seed, allowed, budget) if not fits(seed) else seed for seed in seeds]
    seeds = [s for s in seeds if s is not None and fits(s)]
    if not seeds:
        lightest = _lightest_cut(problem, forbidden)
        if lightest is None or not fits(lightest):
            return None
        seeds = [lightest]
    return min(_polish(costs, list(seed), allowed, fits) for seed in dict.fromkeys(map(tuple, seeds)))[1]  # each distinct seed once


def _polish(costs: "_CutCosts", starts: list[int], allowed: list[bool], fits) -> tuple[float, list[int]]:
    """Coordinate descent on the cuts: each cut in turn moves to its best position between
    its neighbours, until no move improves; (step, cut). A move is better when it lowers the
    step, or keeps it and evens the ranks out (less sum of squares), so load can travel
    through ranks that do not pace the step. Only the two stages beside a cut change.

    Most cuts have no better position: a numpy screen (:meth:`_CutCosts.movable_cuts`)
    prices every position of every later cut at once, and only the cuts it keeps are priced
    exactly, one position at a time, in order; the screen runs again after each move."""
    L, p, R = costs.L, costs.p, costs.R
    starts = list(starts)
    ends = starts[1:] + [L]
    stage = [costs.stage_time(i, a, b - 1) for i, (a, b) in enumerate(zip(starts, ends))]
    ranks = [sum(stage[i] for i in range(r, p, R)) for r in range(R)]
    m, d = costs.problem.microbatches, costs.divisor
    stage_time = costs.stage_time
    allowed_array = np.array(allowed, dtype=bool)

    def score(values) -> tuple[float, float]:
        slowest = max(values)
        return round(m * slowest + (sum(values) - slowest) / d, 12), sum(t * t for t in values)

    def move(k: int) -> bool:
        """Cut k to its best position if one beats ``best``."""
        nonlocal best
        a, b = (k - 1) % R, k % R  # the ranks of the stages before and after cut k
        others = [t for r, t in enumerate(ranks) if r != a and r != b]
        top, total, squares = max(others, default=0.0), sum(others), sum(t * t for t in others)
        base_a, base_b = ranks[a] - stage[k - 1], ranks[b] - stage[k]
        nxt = starts[k + 1] if k + 1 < p else L
        found = None
        for cut in range(starts[k - 1] + 1, nxt):  # the first layer of stage k
            if cut == starts[k] or not allowed[cut - 1]:
                continue
            before = stage_time(k - 1, starts[k - 1], cut - 1)
            after = stage_time(k, cut, nxt - 1)
            ra, rb = base_a + before, base_b + after
            slowest = max(top, ra, rb)
            value = (round(m * slowest + (total + ra + rb - slowest) / d, 12), squares + ra * ra + rb * rb)
            if (value[0], value[1] * (1 + 1e-12)) < best and fits(starts[:k] + [cut] + starts[k + 1:]):
                best, found = value, (cut, before, after)
        if found is None:
            return False
        cut, stage[k - 1], stage[k] = found
        starts[k] = cut
        ranks[a], ranks[b] = base_a + stage[k - 1], base_b + stage[k]
        return True

    best = score(ranks)
    improved = True
    while improved:
        improved = False
        todo = costs.movable_cuts(starts, stage, ranks, best, allowed_array, 1)
        while todo:
            k = todo.pop(0)
            if move(k):
                improved = True
                todo = costs.movable_cuts(starts, stage, ranks, best, allowed_array, k + 1) if k + 1 < p else []
    return costs.step(starts), starts


def _repair(costs: "_CutCosts", starts: list[int], allowed: list[bool], budget: float) -> list[int] | None:
    """A cut within ``budget`` bytes per rank near ``starts``: while a rank is over, move one
    cut of its stages by one layer towards it (to a neighbour stage), the move that lowers
    the fullest rank's bytes at the least step time; None when no move helps."""
    L, p = costs.L, costs.p
    starts = list(starts)
    while costs.rank_memory(starts) > budget:
        held = costs.rank_bytes(starts)
        worst = max(held)
        full = held.index(worst)
        found = None
        for i in range(full, p, costs.R):
            for k, move in ((i, 1), (i + 1, -1)):  # stage i gives its first / last layer away
                if not 1 <= k < p:
                    continue
                trial = list(starts)
                trial[k] += move
                if not (trial[k - 1] < trial[k] and (k + 1 == p or trial[k] < trial[k + 1]) and trial[k] < L and allowed[trial[k] - 1]):
                    continue
                peak = costs.rank_memory(trial)
                if peak < worst:
                    key = (costs.step(trial), peak)
                    if found is None or key < found[0]:
                        found = (key, trial)
        if found is None:
            return None
        starts = found[1]
    return starts


def _smallest_cap(fill: Callable[[float, Sequence[int]], tuple[bool, list[int]]], guess: float, hi: float) -> list[int] | None:
    """The cut ``fill`` gives at the smallest cap, to 1e-4 relative (the polish that follows
    does the rest): bisection from ``guess`` (or ``hi`` when the guess fails) down to 0;
    None when even ``hi`` gives none. ``fill(cap, known)`` is a :func:`_greedy_cut`.

    A greedy stage's end is monotone in the cap once its first layer fits (its run grows
    with the cap), so where the fills at the bisection's two ends agree on the first stages,
    every cap between them fills those stages alike: each fill starts after the stages the
    last failing fill and the last successful one share (the same cut, fewer stages filled)."""
    placed, best = fill(guess, ())
    if not placed:
        guess = hi
        placed, best = fill(hi, ())
        if not placed:
            return None
    lo, hi = 0.0, guess
    failed: list[int] = []  # the stage starts the fill at lo reached (none at 0: never filled)
    for _ in range(60):
        if hi - lo <= 1e-4 * hi:
            break
        mid = (lo + hi) / 2
        shared = 0
        for a, b in zip(failed, best):
            if a != b:
                break
            shared += 1
        placed, found = fill(mid, best[:shared])
        if placed:
            hi, best = mid, found
        else:
            lo, failed = mid, found
    return best


def _greedy_cut(L: int, p: int, last_layer: Callable[[int, int], int], last_stage_fits: Callable[[int], bool], known: Sequence[int] = ()) -> tuple[bool, list[int]]:
    """Stages filled in order, each as far as it may go: stage ``i`` starts after the
    previous one and ends at ``last_layer(i, first)`` (below ``first``: nothing fits); the
    last stage takes the rest if ``last_stage_fits(first)``. ``known``: the starts of the
    first stages, known to be what filling them gives; the stage that starts at the last
    of them is filled here. (whether every layer is placed, the stage starts reached: all
    of them when placed)."""
    starts = list(known[:-1])
    first = known[-1] if known else 0
    for i in range(len(starts), p):
        if first >= L:
            return False, starts
        starts.append(first)
        if i == p - 1:
            return last_stage_fits(first), starts
        j = last_layer(i, first)
        if j < first:
            return False, starts
        first = j + 1
    return False, starts


def _lightest_cut(problem: StageProblem, forbidden: frozenset[int]) -> list[int] | None:
    """A cut that keeps every stage's bytes low: the smallest cap on a stage's bytes for
    which filling stages greedily (ending only where a cut is allowed) places every layer;
    None when no cut exists."""
    L, p = len(problem.layers), problem.stages
    param = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in problem.layers])])
    act = np.concatenate([[0.0], np.cumsum([l.activation_bytes for l in problem.layers])])
    held = [(param + n * act).tolist() for n in problem.inflights()]  # bytes of layers 0..j-1 on stage i
    allowed = [j not in forbidden for j in range(L)]

    def fill(cap: float, known: Sequence[int] = ()) -> tuple[bool, list[int]]:
        def last_layer(i: int, first: int) -> int:
            prefix = held[i]
            j = min(bisect.bisect_right(prefix, prefix[first] + cap) - 2, L - (p - i))
            while j >= first and not allowed[j]:
                j -= 1
            return j

        return _greedy_cut(L, p, last_layer, lambda first: held[p - 1][L] - held[p - 1][first] <= cap, known)

    most = float(max(h[L] for h in held))
    return _smallest_cap(fill, most, most)


# -- helpers -------------------------------------------------------------------------------------------
def _spec_rejection(spec: _Spec, kind: str, reason: str, step: float | None, memory: float | None) -> Rejection:
    return Rejection(spec.mesh, spec.microbatches, spec.schedule, spec.virtual_stages, spec.recompute, spec.zero_stage, kind, reason, step, memory)


def _rejection(c: Candidate, kind: str, reason: str, step: float | None, memory: float | None) -> Rejection:
    return Rejection(c.mesh, c.microbatches, c.schedule, c.virtual_stages, c.recompute, c.zero_stage, kind, reason, step, memory)


_KIND_ORDER = ("slower", "memory", "schedule", "indivisible", "sharding", "topology")


def _rejection_key(r: Rejection) -> tuple:
    return (
        _KIND_ORDER.index(r.kind) if r.kind in _KIND_ORDER else len(_KIND_ORDER),
        r.predicted_step_time if r.predicted_step_time is not None else math.inf,
        r.memory if r.memory is not None else math.inf,
        r.mesh["pp"], r.mesh["dp"], r.mesh["tp"],
        r.microbatches or 0, r.schedule or "", r.virtual_stages or 0, bool(r.recompute), r.zero_stage or 0,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _percent(value: float, best: float) -> str:
    return f"{(value / best - 1) * 100:+.1f}%" if best > 0 else "+inf%"


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} us"
    return f"{seconds * 1e3:,.2f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _check_pinned(pinned: dict[str, int] | None, world: int) -> dict[str, int]:
    pinned = dict(pinned or {})
    unknown = sorted(set(pinned) - set(_MESH_DIMS))
    if unknown:
        raise PartcError(f"unknown mesh dimension(s) {unknown}", ErrorContext(pass_name=_PASS, fix='pin "dp", "tp" or "pp"'))
    for k, v in pinned.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PartcError(f"mesh degree {k}={v!r} must be an integer >= 1", ErrorContext(pass_name=_PASS))
    product = math.prod(pinned.values())
    if world % product:
        raise PartcError(
            f"pinned mesh {pinned} does not divide the cluster's {world} devices",
            ErrorContext(pass_name=_PASS, fix=f"pin degrees whose product divides {world}"),
        )
    return pinned


def _check_arguments(batch_size, schedules, zero_options, recompute_options, top_k, optimizer, virtual_options) -> None:
    def bad(message: str, fix: str | None = None):
        raise PartcError(message, ErrorContext(pass_name=_PASS, fix=fix))

    if not isinstance(batch_size, int) or batch_size < 1:
        bad(f"batch_size must be an integer >= 1, got {batch_size!r}")
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown or not schedules:
        bad(f"unknown or no pipeline schedules {list(schedules)}", f"choose from {', '.join(SCHEDULES)}")
    if not zero_options or any(z not in (0, 1, 2, 3) for z in zero_options):
        bad(f"zero_options must be ZeRO stages 0-3, got {list(zero_options)}")
    if not recompute_options:
        bad("recompute_options is empty", "pass (False,), (True,) or (False, True)")
    if not isinstance(top_k, int) or top_k < 1:
        bad(f"top_k must be an integer >= 1, got {top_k!r}")
    if optimizer not in ("adamw", "adam", "sgd"):
        bad(f"unknown optimizer {optimizer!r}", "use adamw, adam or sgd")
    if not virtual_options or any(not isinstance(v, int) or v < 2 for v in virtual_options):
        bad(f"virtual_stage_options must be integers >= 2, got {list(virtual_options)}")


# -- reading the result ----------------------------------------------------------------------------------
def explain(result: SearchResult, *, alternatives: int = 8, rejections: int = 3) -> str:
    """The best candidates with predicted time and memory, and why the others lost."""
    best = result.best
    header = ["#", "pp", "dp", "tp", "m", "schedule", "recomp", "zero", "step", "vs best", "memory", "why not chosen"]
    rows = []
    for i, c in enumerate(result.candidates[:alternatives]):
        schedule = c.schedule if c.virtual_stages == 1 else f"{c.schedule} v={c.virtual_stages}"
        why = "chosen" if i == 0 else _why_slower(c, best)
        rows.append([
            str(i + 1), str(c.mesh["pp"]), str(c.mesh["dp"]), str(c.mesh["tp"]), str(c.microbatches), schedule,
            "yes" if c.recompute else "no", str(c.zero_stage), _ms(c.predicted_step_time),
            "-" if i == 0 else _percent(c.predicted_step_time, best.predicted_step_time),
            f"{c.memory.total / GiB:.1f} GiB", why,
        ])
    b = best.breakdown
    lines = [
        f"searched {result.searched} configurations in {result.seconds:.2f} s ({result.stage_solves} exact stage cuts, {result.heuristic_cuts} interleaved, "
        f"sharding {result.sharding_seconds:.2f} s); memory limit {result.memory_limit / GiB:.1f} GiB per device",
        f"best: {best.label}: {_ms(best.predicted_step_time)} per step of {result.batch_size} samples, "
        f"{best.memory.total / GiB:.1f} GiB on the fullest device",
        f"  compute {_ms(b.compute)}, recompute {_ms(b.recompute)}, tp comm {_ms(b.tp_communication)}, "
        f"pp transfers {_ms(b.pipeline_transfer)}, pp bubble {_ms(b.pipeline_bubble)}, dp sync exposed {_ms(b.dp_sync_exposed)}, "
        f"optimizer {_ms(b.optimizer)}",
        "",
        _table(header, rows),
    ]
    by_kind: dict[str, list[Rejection]] = {}
    for r in result.rejected:
        by_kind.setdefault(r.kind, []).append(r)
    if by_kind:
        lines += ["", f"rejected ({len(result.rejected)}):"]
        for kind in _KIND_ORDER + tuple(k for k in by_kind if k not in _KIND_ORDER):
            group = by_kind.get(kind)
            if not group:
                continue
            lines.append(f"  {kind} ({len(group)}):")
            for r in group[:rejections]:
                lines.append(f"    {r.label}: {r.reason}")
            if len(group) > rejections:
                lines.append(f"    ... and {len(group) - rejections} more")
    return "\n".join(lines)


# Predicted times closer than this are a tie: the cost model is not that precise (measured
# step times differ from the predictions by tens of percent; docs/benchmarks.md), and the
# simpler plan is the safer bet: no recomputation, fewer pipeline and tensor-parallel ranks,
# DDP before ZeRO (FSDP2's gathers are less hidden than the formulas assume: GPT-2 350M on
# 2 H200s ran 94 ms with ZeRO-1 against DDP's 74 ms, where the model predicted ZeRO-1 3%
# faster), fewer microbatches.
TIE_WITHIN = 0.05


def _simplicity(c: Candidate) -> tuple:
    """Smaller is simpler: no recomputation, fewer model-parallel ranks, DDP before ZeRO."""
    return (c.recompute, c.mesh["pp"] * c.mesh["tp"], c.zero_stage, c.mesh["pp"], c.microbatches)


def _simplest_first_among_ties(feasible: list[Candidate]) -> list[Candidate]:
    """``feasible`` (fastest first) with the simplest candidate within TIE_WITHIN of the
    fastest moved to the front."""
    fastest = feasible[0].predicted_step_time
    ties = [c for c in feasible if c.predicted_step_time <= fastest * (1 + TIE_WITHIN)]
    chosen = min(ties, key=lambda c: (_simplicity(c), c.predicted_step_time))
    return [chosen] + [c for c in feasible if c is not chosen]


def _why_slower(c: Candidate, best: Candidate) -> str:
    """The parts of the step where ``c`` loses most against the best."""
    if c.predicted_step_time <= best.predicted_step_time * (1 + TIE_WITHIN):
        if c.predicted_step_time < best.predicted_step_time:
            return f"a tie (within {TIE_WITHIN:.0%}): the chosen plan is simpler"
        return f"a tie (within {TIE_WITHIN:.0%}), not simpler"
    names = {
        "compute": "compute", "recompute": "recompute", "tp_communication": "tp comm", "pipeline_transfer": "pp transfers",
        "pipeline_bubble": "pp bubble", "dp_sync_exposed": "dp sync", "optimizer": "optimizer",
    }
    deltas = sorted(((getattr(c.breakdown, k) - getattr(best.breakdown, k), label) for k, label in names.items()), reverse=True)
    worse = [f"{label} +{_ms(d)}" for d, label in deltas[:2] if d > 1e-3 * best.predicted_step_time]
    return "slower: " + (", ".join(worse) if worse else "ties, more memory or a later option")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i not in (5, len(header) - 1) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *(line(r) for r in rows)])


# -- utilisation ----------------------------------------------------------------------------------------
def model_flops_utilization(
    step_time: float,
    gm: fx.GraphModule,
    cluster: Cluster,
    compute_dtype: torch.dtype | None = None,
    *,
    batch_size: int | None = None,
) -> float:
    """Model FLOPs utilisation of a step: the graph's annotated forward + backward FLOPs
    (the ``6 N T``-style training FLOPs, attention included; recomputation not counted),
    scaled to ``batch_size`` samples when the graph was traced at another batch (default:
    the traced batch is the step's), over ``step_time x`` the summed datasheet peak FLOP/s
    of every device in ``compute_dtype`` (fp32 when None)."""
    if step_time <= 0:
        raise PartcError(f"step_time must be > 0 s, got {step_time}", ErrorContext(pass_name=_PASS))
    flops = sum(node_info(n).fwd_flops + node_info(n).bwd_flops for n in gm.graph.nodes)
    if batch_size is not None:
        flops *= batch_size / graph_info(gm).input_specs[0].shape[0]
    name = str(compute_dtype or torch.float32).removeprefix("torch.")
    peak = 0.0
    for r in range(cluster.world_size):
        device = cluster.device(r)
        peak += device.peak_flops.get(name, max(device.peak_flops.values()))
    return flops / (step_time * peak)
