"""Stage pass: cut a chain of layers into pipeline stages that minimise the step time.

The unit is the layer (``gm.meta["partc"].layers``: a transformer block, the embedding,
the LM head), not the fx node: a 96-layer GPT has ~100 layers but ~3,000 nodes, and a
node x stage assignment of the latter takes CBC minutes. A layer is a contiguous run of
nodes, so cutting between layers keeps every edge pointing forward.

The problem (:class:`StageProblem`, built from a graph by :func:`stage_problem_from_graph`)
--------------------------------------------------------------------------------------------
Sets: layers ``j = 0..L-1`` in graph order; stages ``i = 0..p-1``; ranks ``r = 0..R-1``
with ``R = p / v`` (``v`` virtual stages per rank). Stage ``i`` runs on rank ``i mod R``
(torch's loop placement for interleaved schedules; ``v = 1``: stage i on rank i).

Data per layer: ``t_j`` forward+backward seconds of one microbatch on a speed-1.0 device,
``P_j`` parameter bytes (weights + gradients + optimizer state), ``A_j`` activation bytes
kept per microbatch in flight, ``B_j`` bytes live across a cut right after layer j.
Per stage: speed ``s_i``, memory budget ``M_i``, microbatches in flight ``n_i``. Per
boundary ``k`` (between stage k and k+1): latency ``alpha_k``, bandwidth ``bw_k``.

Variables (the monotone prefix formulation)::

    u[j,i] in {0,1}    u[j,i] = 1  iff  layer j sits in a stage <= i      (i = 0..p-2;
                                                                          u[j,p-1] = 1)
    x[j,i]   = u[j,i] - u[j,i-1]      layer j is in stage i                (u[j,-1] = 0)
    cut[j,k] = u[j,k] - u[j+1,k]      the cut after stage k is right after layer j
    T        >= 0                     the pace: the slowest rank's time per microbatch

Stage time (one microbatch)::

    t_i = sum_j t_j x[j,i] / s_i
        + [i > 0]   2 (alpha_{i-1} + sum_j B_j cut[j,i-1] / bw_{i-1})   receive; its gradient back
        + [i < p-1] 2 (alpha_i     + sum_j B_j cut[j,i]   / bw_i)       send;    its gradient back

Every boundary is crossed twice per microbatch (the activations forward, their gradients
backward) and both stages beside it pay for it: transfers are not overlapped here.

Objective (:meth:`_StageILP.set_step_time_objective`)::

    minimise  (m - 1/d) T + (1/d) sum_i t_i   (+ eps sum_{j,i} u[j,i])

which is ``m * T + (sum of rank times - T) / d``: the slowest rank paces the ``m``
microbatches and the others fill and drain the pipe once (:func:`partc.cost_model.
pipeline_step_time`). ``d = 1`` for GPipe and 1F1B, ``d = v`` for interleaved 1F1B, and
``d = 3v`` for zero-bubble: splitting backward into input- and weight-gradient halves lets
the weight half fill the bubble, which cuts 1F1B's bubble to about a third (ZB-H1,
arXiv 2401.10241); zero-bubble is otherwise priced like interleaved (same placement,
same rank pace). The tiny ``eps`` term prefers the earliest cuts among equal step times;
the answer does not depend on the run or PYTHONHASHSEED (fixed build order, CBC on one
thread).

Constraint families, each added by the named method of :class:`_StageILP`::

    assignment  u[j,i-1] <= u[j,i]              each layer in exactly one stage:      add_assignment
                                                x >= 0 and sum_i x[j,i] = u[j,p-1] = 1
    contiguity  u[j+1,i] <= u[j,i]              stages are contiguous runs, so no     add_contiguity
                                                edge goes backwards
    non-empty   sum_j u[j,i] - sum_j u[j,i-1] >= 1                                    add_nonempty
    memory      sum_{i on r} sum_j (P_j + n_i A_j) x[j,i] <= M_r   per rank r          add_memory
    pace        T >= sum_{i on r} t_i                              per rank r          add_pace
    pace floor  T >= min over cuts of max_i t_i   (valid inequality)                  add_pace_floor

Microbatches in flight ``n_i`` (activations kept for backward), ``m`` microbatches:

    GPipe:        n_i = m                        (all forwards before any backward)
    1F1B:         n_i = min(p - i, m)            (stage i of p, 0-based)
    interleaved:  n_i = W_r / v,  W_r = min(m v, (v-1) q + 2 (R-1-r) + 1)
    zero-bubble:  n_i = W_r / v,  W_r = min(m v, (v-1) q +   (R-1-r) + 1)

``W_r`` is the rank's warm-up forwards plus the one in progress, exactly as
``torch.distributed.pipelining`` schedules them (``_get_warmup_ops``, ``q`` =
microbatches per round); they are spread evenly over the rank's ``v`` chunks, which is
exact when its chunks hold equal activations. Zero-bubble with ``v = 1`` gives 1F1B's
``min(p - i, m)``.

Presolve, so that the model stays small and CBC proves optimality fast:

* incumbent (:func:`_incumbent`): the best feasible cut among a greedy fill (bisection on a
  cap of the stage compute time) and the cuts that are best for each half of the objective
  alone (least ``sum_i t_i``, least slowest stage; DPs with memory but without the other
  half), each polished by one-layer cut moves. It warm-starts CBC.
* cut windows (:func:`_cut_windows`): with the incumbent's step ``Z``, the last layer
  ``e_i`` of stage i may be ``j`` only if two lower bounds on every cut through it stay
  ``<= Z``: the least sum ``F + G`` of stage times before and after the cut (so the step is
  at least ``(m - 1/d) max(least slowest stage, (F + G) / R) + (F + G) / d``), and the
  compute the stages on each side can hold at a pace ``T <= (Z - S_min/d) / (m - 1/d)``.
  ``u`` is fixed outside each window; with no incumbent, only the non-empty windows
  ``i <= e_i <= L-p+i`` apply and all ``L (p-1)`` variables stay free.
* a valid inequality on the pace, ``T >= least slowest stage over all cuts`` (a DP), added
  by :meth:`_StageILP.add_pace_floor` as constraint ``pace_floor``: it lifts the LP bound
  to the integer one when the step is dominated by the slowest stage.

Exactness: :func:`exact_chain_partition` solves the same objective by dynamic programming
(one rank per stage): for each candidate pace ``T`` (every possible stage time), a DP
minimises ``sum_i t_i`` with every stage ``<= T``; the best ``(m - 1/d) T + (1/d) S(T)``
is the optimum. Candidates are visited in increasing order from the smallest feasible
``T`` and the scan stops once ``(m - 1/d) T`` plus the smallest possible sum exceeds the
best found.

All three functions (:func:`solve_stages`, :func:`exact_chain_partition`,
:func:`equal_layer_split`) report their answer through one evaluation,
:func:`evaluate_partition`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pulp
import torch
import torch.fx as fx

from partc.cluster import GiB
from partc.cost_model import CostModel, training_memory
from partc.errors import ErrorContext, InfeasiblePlanError, PartcError, SolverError
from partc.passes.estimate import _parameter_dtype, batch_size, roofline_time
from partc.passes.ilp import INSTALL_CBC, require_cbc, solver_status
from partc.passes.ir import OpKind, graph_info, node_info
from partc.passes.split_stages import recomputable_nodes

__all__ = [
    "LayerCost",
    "StageProblem",
    "StagePartition",
    "solve_stages",
    "exact_chain_partition",
    "equal_layer_split",
    "evaluate_partition",
    "least_peak_stage_memory",
    "stage_problem_from_graph",
    "SCHEDULES",
]

_PASS = "stages"
# torch.distributed.pipelining before 2.13 expects a gradient for every tensor a stage
# receives (2.11 fails with "has gradients None"; 2.13 handles integer inputs), so no cut
# may carry a value without one (gradient_free_cuts), and zero-bubble does not run there.
PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
# Each boundary is crossed twice per microbatch: activations forward, gradients backward.
_TRANSFERS_PER_BOUNDARY = 2
# Zero-bubble's weight-gradient pass fills about two thirds of 1F1B's bubble (ZB-H1).
_ZERO_BUBBLE_FACTOR = 3
# Total weight of the tie-break term, in units of the mean stage time: it prefers earlier
# cuts among equal step times and moves the step by at most ~1e-8 relative. The answer is
# reproducible because the model is built in a fixed order (no set or hash-ordered
# iteration) and single-threaded CBC is deterministic on the same input.
_TIE_BREAK = 1e-7
_RELATIVE_GAP = 1e-9  # CBC stops when (incumbent - bound) <= this x |incumbent|


# -- problem data -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCost:
    """What one layer costs, as the stage partitioner sees it."""

    name: str
    time: float  # forward+backward seconds of ONE microbatch on a speed-1.0 device
    param_bytes: float  # bytes the owning stage holds for this layer's parameters: weights+grads+optimizer state
    activation_bytes: float  # bytes kept for backward per microbatch in flight
    boundary_bytes: float  # bytes of every value live across a cut placed right AFTER this layer (skip connections and inputs needed later included)


@dataclass(frozen=True)
class StageProblem:
    """A chain of layers to cut into ``stages`` pipeline stages."""

    layers: tuple[LayerCost, ...]
    stages: int  # p (total stages = ranks * virtual_stages)
    microbatches: int  # m
    schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved" | "zero_bubble"
    virtual_stages: int = 1  # stages per rank (interleaved / zero-bubble)
    stage_speed: tuple[float, ...] = ()  # relative speed of the device running stage i (1.0 = reference; empty = all 1.0); heterogeneous clusters
    memory_budget: tuple[float, ...] = ()  # bytes per device of stage i (empty = unlimited)
    link_latency: tuple[float, ...] = ()  # per boundary i (between stage i and i+1), seconds (empty = 0)
    link_bandwidth: tuple[float, ...] = ()  # per boundary i, bytes/s (empty = free communication)
    time_limit: float = 30.0  # CBC seconds
    reserved_bytes: float = 0.0  # per device, kept free of stages: one microbatch's transient buffers (the logits' workspace)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("stage_speed", "memory_budget", "link_latency", "link_bandwidth"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        p, v = self.stages, self.virtual_stages
        _require(isinstance(p, int) and p >= 1, lambda: f"stages must be an integer >= 1, got {p!r}")
        _require(isinstance(self.microbatches, int) and self.microbatches >= 1, lambda: f"microbatches must be an integer >= 1, got {self.microbatches!r}")
        _require(self.schedule in SCHEDULES, lambda: f"unknown pipeline schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        _require(isinstance(v, int) and v >= 1, lambda: f"virtual_stages must be an integer >= 1, got {v!r}")
        _require(v == 1 or self.schedule in ("interleaved", "zero_bubble"), lambda: f"schedule {self.schedule!r} runs one stage per rank; virtual_stages={v} needs 'interleaved' or 'zero_bubble'")
        _require(p % v == 0, lambda: f"{p} stages do not split into {v} virtual stages per rank")
        _require(len(self.layers) >= 1, "a stage problem needs at least one layer")
        # one pass without generators: the search builds hundreds of problems
        inf = math.inf
        bad = [l for l in self.layers if not (0 <= l.time < inf and 0 <= l.param_bytes < inf and 0 <= l.activation_bytes < inf and 0 <= l.boundary_bytes < inf)]
        if bad:
            _require(False, lambda: f"layer {bad[0].name!r}: costs must be finite and >= 0, got {bad[0]}")
        for name, length in (("stage_speed", p), ("memory_budget", p), ("link_latency", p - 1), ("link_bandwidth", p - 1)):
            values = getattr(self, name)
            _require(len(values) in (0, length), f"{name} needs {length} values (one per {'stage' if length == p else 'boundary'}) or none, got {len(values)}")
        _require(all(0 < s < math.inf for s in self.stage_speed), lambda: f"stage speeds must be finite and > 0, got {self.stage_speed}")
        _require(all(b > 0 for b in self.memory_budget), lambda: f"memory budgets must be > 0 bytes, got {self.memory_budget}")
        _require(all(0 <= a < math.inf for a in self.link_latency), lambda: f"link latencies must be finite and >= 0 s, got {self.link_latency}")
        _require(all(b > 0 for b in self.link_bandwidth), lambda: f"link bandwidths must be > 0 B/s, got {self.link_bandwidth}")
        _require(self.time_limit > 0, lambda: f"time_limit must be > 0 s, got {self.time_limit}")
        _require(0 <= self.reserved_bytes < math.inf, lambda: f"reserved_bytes must be finite and >= 0, got {self.reserved_bytes}")

    @property
    def ranks(self) -> int:
        """R: devices in the pipeline."""
        return self.stages // self.virtual_stages

    @property
    def fill_drain_divisor(self) -> float:
        """d: how much the schedule shrinks the fill-and-drain term (1, v or 3v)."""
        if self.schedule in ("gpipe", "1f1b"):
            return 1.0
        return float(self.virtual_stages * (_ZERO_BUBBLE_FACTOR if self.schedule == "zero_bubble" else 1))

    def rank_of(self, stage: int) -> int:
        return stage % self.ranks

    def inflight(self, stage: int) -> float:
        """Microbatches whose activations stage ``stage`` holds at its peak (see the module doc)."""
        return self.inflights()[stage]

    def inflights(self) -> tuple[float, ...]:
        """:meth:`inflight` of every stage (cached per shape: a search builds hundreds of
        problems of a few shapes)."""
        return _inflights(self.stages, self.microbatches, self.schedule, self.virtual_stages)


@functools.lru_cache(maxsize=4096)
def _inflights(p: int, m: int, schedule: str, v: int) -> tuple[float, ...]:
    if schedule == "gpipe":
        return (float(m),) * p
    if schedule == "1f1b":
        return tuple(float(min(p - stage, m)) for stage in range(p))
    R = p // v
    rounds = max(1, m // R)
    per_round = m // rounds
    hops = 2 if schedule == "interleaved" else 1
    return tuple(min(m * v, (v - 1) * per_round + hops * (R - 1 - stage % R) + 1) / v for stage in range(p))


@dataclass(frozen=True)
class StagePartition:
    """A cut of the layers into stages and what it costs."""

    starts: tuple[int, ...]  # index of the first layer of each stage
    stage_layers: tuple[tuple[str, ...], ...]  # layer names per stage
    stage_times: tuple[float, ...]  # seconds per microbatch (forward+backward+transfers) per stage
    stage_memory: tuple[float, ...]  # peak bytes per stage: parameters, gradients, optimizer state, activations in flight
    step_time: float  # predicted seconds per step of all microbatches (the objective)
    max_over_mean: float  # slowest rank time / mean rank time (= stage times when v = 1); 1.0 is perfect balance
    bubble_fraction: float  # idle over busy device time, imbalance included; (p-1)/(v m) for balanced stages
    status: str  # "optimal" | "feasible" (not proven optimal) | "heuristic" | "evaluated"
    solve_seconds: float  # wall time spent finding this partition

    def stage_of_layer(self, j: int) -> int:
        """The stage that holds layer ``j``."""
        if j < 0:
            raise IndexError(f"layer index {j} is negative")
        return bisect.bisect_right(self.starts, j) - 1


# -- one evaluation for every partitioner --------------------------------------------------------
class _ChainCosts:
    """The cost formulas of the module doc, on prefix sums, shared by every partitioner."""

    def __init__(self, problem: StageProblem):
        self.problem = problem
        layers = problem.layers
        self.L, self.p, self.R = len(layers), problem.stages, problem.ranks
        columns = np.array([(l.time, l.param_bytes, l.activation_bytes, l.boundary_bytes) for l in layers], dtype=np.float64).T
        self.time, self.param, self.act, self.boundary = (np.ascontiguousarray(c) for c in columns)
        self.prefix_time = np.concatenate([[0.0], np.cumsum(self.time)])
        self.prefix_param = np.concatenate([[0.0], np.cumsum(self.param)])
        self.prefix_act = np.concatenate([[0.0], np.cumsum(self.act)])
        p = self.p
        self.speed = np.array(problem.stage_speed or (1.0,) * p)
        self.alpha = np.array(problem.link_latency or (0.0,) * (p - 1))
        self.inv_bw = np.array([1.0 / b for b in problem.link_bandwidth] if problem.link_bandwidth else [0.0] * (p - 1))
        self.inflight = np.array(problem.inflights())
        budget = problem.memory_budget or (math.inf,) * p
        # A rank holds all its stages; its budget is the smallest its stages were given.
        # (less what every device keeps for transient buffers)
        self.rank_budget = np.array([min(budget[i] for i in range(r, p, self.R)) - problem.reserved_bytes for r in range(self.R)])
        self.has_budget = bool(problem.memory_budget)
        self._time_bands: np.ndarray | None = None
        self._memory_bands: np.ndarray | None = None

    def transfer(self, boundary: int, last_layer: int) -> float:
        """Seconds per microbatch one stage beside ``boundary`` spends on it, the cut right after ``last_layer``."""
        return _TRANSFERS_PER_BOUNDARY * (self.alpha[boundary] + self.boundary[last_layer] * self.inv_bw[boundary])

    def stage_time(self, i: int, first: int, last: int) -> float:
        """t_i for stage ``i`` holding layers ``first..last``."""
        t = (self.prefix_time[last + 1] - self.prefix_time[first]) / self.speed[i]
        if i > 0:
            t += self.transfer(i - 1, first - 1)
        if i < self.p - 1:
            t += self.transfer(i, last)
        return float(t)

    def stage_memory(self, i: int, first: int, last: int) -> float:
        params = self.prefix_param[last + 1] - self.prefix_param[first]
        return float(params + self.inflight[i] * (self.prefix_act[last + 1] - self.prefix_act[first]))

    def stage_times(self, starts: Sequence[int]) -> list[float]:
        """:meth:`stage_time` of every stage of the cut ``starts`` (numpy over the stages:
        the same operations on the same floats, a transfer a stage lacks adding 0.0)."""
        first, end = self._runs(starts)
        t = (self.prefix_time[end] - self.prefix_time[first]) / self.speed
        receive, send = np.zeros(self.p), np.zeros(self.p)
        receive[1:] = _TRANSFERS_PER_BOUNDARY * (self.alpha + self.boundary[first[1:] - 1] * self.inv_bw)
        send[:-1] = _TRANSFERS_PER_BOUNDARY * (self.alpha + self.boundary[end[:-1] - 1] * self.inv_bw)
        t += receive
        t += send
        return t.tolist()

    def stage_memories(self, starts: Sequence[int]) -> list[float]:
        """:meth:`stage_memory` of every stage of the cut ``starts``."""
        first, end = self._runs(starts)
        params = self.prefix_param[end] - self.prefix_param[first]
        return (params + self.inflight * (self.prefix_act[end] - self.prefix_act[first])).tolist()

    def _runs(self, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(first layer, one past the last) of every stage of the cut ``starts``."""
        bounds = np.array(list(starts) + [self.L])
        return bounds[:-1], bounds[1:]

    def step_time(self, stage_times: Sequence[float]) -> tuple[float, list[float]]:
        """(step seconds, rank times): m * slowest + (sum - slowest) / d over the ranks."""
        rank_times = [sum(stage_times[i] for i in range(r, self.p, self.R)) for r in range(self.R)]
        slowest = max(rank_times)
        return self.problem.microbatches * slowest + (sum(rank_times) - slowest) / self.problem.fill_drain_divisor, rank_times

    def fits(self, starts: Sequence[int]) -> bool:
        """Every rank within its memory budget."""
        if not self.has_budget:
            return True
        per_stage = self.stage_memories(starts)
        return all(sum(per_stage[i] for i in range(r, self.p, self.R)) <= self.rank_budget[r] for r in range(self.R))

    @property
    def width(self) -> int:
        """W = L - p + 1: the layers a stage may start (or end) at while every stage keeps one."""
        return self.L - self.p + 1

    def time_band(self, i: int) -> np.ndarray:
        """Seconds of stage ``i`` (transfers included) holding layers ``i + a .. i + b``, as a
        W x W matrix [a, b] (``first - i``, ``last - i``: the only runs that leave every other
        stage a layer); inf where ``a > b``."""
        return self.time_bands()[i].T

    def time_bands(self) -> np.ndarray:
        """:meth:`time_band` of every stage as one p x W x W array [i, b, a] (by last layer,
        then first: the DP of :func:`_best_cut` takes its minima over contiguous rows). Built
        once, from :meth:`_run_sums` (a view) in three passes over one array; each element
        is the same operations on the same floats as stage by stage."""
        if self._time_bands is None:
            W, p = self.width, self.p
            first = np.arange(W)[None, :] + np.arange(p)[:, None]  # [i, a]: layer i + a (also the last layers)
            receive = np.zeros((p, W))  # [i, a]: stage i's receive when it starts at i + a (none for stage 0)
            send = np.zeros((p, W))  # [i, b]: stage i's send when it ends at i + b (none for the last)
            receive[1:] = _TRANSFERS_PER_BOUNDARY * (self.alpha[:, None] + self.boundary[first[1:] - 1] * self.inv_bw[:, None])
            send[:-1] = _TRANSFERS_PER_BOUNDARY * (self.alpha[:, None] + self.boundary[first[:-1]] * self.inv_bw[:, None])
            with np.errstate(invalid="ignore"):
                t = self._run_sums(self.prefix_time) / self.speed[:, None, None]
            t += receive[:, None, :]  # adding 0.0 leaves a float as it is; inf stays inf
            t += send[:, :, None]
            self._time_bands = t
        return self._time_bands

    def feasible_time_bands(self) -> np.ndarray:
        """:meth:`time_bands`, inf where the run does not fit its stage's budget (one stage
        per rank: stage i is rank i)."""
        if not self.has_budget:
            return self.time_bands()
        over = np.less_equal(self.memory_bands(), self.rank_budget[:, None, None])
        np.logical_not(over, out=over)  # not within: over, or NaN
        times = self.time_bands().copy()
        np.copyto(times, np.inf, where=over)
        return times

    def memory_bands(self) -> np.ndarray:
        """Bytes of stage ``i`` holding layers ``i + a .. i + b``, as :meth:`time_bands`: [i, b, a]."""
        if self._memory_bands is None:
            held = self._run_sums(self.prefix_act) * self.inflight[:, None, None]
            held += self._run_sums(self.prefix_param)
            self._memory_bands = held
        return self._memory_bands

    def _run_sums(self, prefix: np.ndarray) -> np.ndarray:
        """The sum of a per-layer column over every run ``i + a .. i + b`` of stage ``i``, from its
        prefix sums, as :meth:`time_bands`: [i, b, a], inf where ``a > b``. A read-only strided
        view (no copy) of one L x L table [last, first]: stage ``i``'s runs are its
        W x W block at (i, i), the next stage's one step down the diagonal."""
        table = prefix[1:, None] - prefix[None, :-1]  # [last, first]
        np.copyto(table, np.inf, where=_reversed(self.L).T)
        row, column = table.strides
        return np.lib.stride_tricks.as_strided(table, shape=(self.p, self.width, self.width), strides=(row + column, row, column), writeable=False)

    def time_matrix(self, i: int) -> np.ndarray:
        """:meth:`time_band` as an L x L matrix [first, last]; inf where stage ``i`` cannot
        hold the run (reversed, or leaving another stage empty)."""
        full = np.full((self.L, self.L), np.inf)
        full[i : i + self.width, i : i + self.width] = self.time_band(i)
        return full


def _reversed(W: int) -> np.ndarray:
    """[a, b]: True where a > b (a run that ends before it starts)."""
    return np.arange(W)[:, None] > np.arange(W)[None, :]


def evaluate_partition(problem: StageProblem, starts: Sequence[int], *, status: str = "evaluated", solve_seconds: float = 0.0) -> StagePartition:
    """Price the cut ``starts`` (first layer of each stage) with the module doc's formulas."""
    costs = _ChainCosts(problem)
    L, p, R, m = costs.L, costs.p, costs.R, problem.microbatches
    starts = tuple(int(s) for s in starts)
    valid = len(starts) == p and starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < L
    if not valid:
        raise PartcError(f"starts {starts} is not a cut of {L} layers into {p} non-empty stages (need 0 = s_0 < s_1 < ... < s_{p - 1} < {L})")
    ends = starts[1:] + (L,)
    names = [l.name for l in problem.layers]
    stage_times = tuple(costs.stage_times(starts))
    stage_memory = tuple(costs.stage_memories(starts))
    step, rank_times = costs.step_time(stage_times)
    slowest, total = max(rank_times), sum(rank_times)
    return StagePartition(
        starts=starts,
        stage_layers=tuple(tuple(names[a:b]) for a, b in zip(starts, ends)),
        stage_times=stage_times,
        stage_memory=stage_memory,
        step_time=step,
        max_over_mean=slowest / (total / R) if total > 0 else 1.0,
        bubble_fraction=R * step / (m * total) - 1.0 if total > 0 else 0.0,
        status=status,
        solve_seconds=solve_seconds,
    )


def equal_layer_split(problem: StageProblem) -> StagePartition:
    """The naive split: ``L / p`` layers per stage (earlier stages get the shorter share)."""
    start = time.perf_counter()
    _check_stage_count(problem)
    L, p = len(problem.layers), problem.stages
    starts = [i * L // p for i in range(p)]
    return evaluate_partition(problem, starts, status="heuristic", solve_seconds=time.perf_counter() - start)


# -- the ILP --------------------------------------------------------------------------------------
def solve_stages(problem: StageProblem) -> StagePartition:
    """The partition of ``problem`` that minimises the pipeline step time (PuLP + CBC).

    Raises :class:`InfeasiblePlanError` when no partition fits the memory budgets (saying
    which stage binds and what would fit) or there are more stages than layers, and
    :class:`SolverError` when CBC is missing or fails.
    """
    return _solve_ilp(problem)


def _solve_ilp(problem: StageProblem, *, use_incumbent: bool = True, use_windows: bool = True) -> StagePartition:
    """solve_stages, with the incumbent (warm start) and the cut windows switchable: the
    tests and the benchmark solve the full model too."""
    start = time.perf_counter()
    _check_stage_count(problem)
    require_cbc(_PASS)
    costs = _ChainCosts(problem)
    if costs.has_budget and problem.virtual_stages == 1:
        _check_memory_feasible(problem, costs)  # exact, and far quicker than CBC proving infeasibility
    times = [costs.time_matrix(i) for i in range(problem.stages)]
    incumbent = _incumbent(problem, costs) if use_incumbent else None
    model = _StageILP(problem, costs, _cut_windows(problem, costs, incumbent if use_windows else None, times))
    model.add_assignment()
    model.add_contiguity()
    model.add_nonempty()
    model.add_memory()
    model.add_pace()
    model.add_pace_floor(float(_partial_bests(times, np.maximum)[0][-1][-1]))
    model.set_step_time_objective()
    status, starts = model.solve(problem.time_limit, incumbent.starts if incumbent else None)
    if status == "infeasible":
        if not costs.has_budget:
            raise SolverError("CBC reports the stage partition infeasible without a memory budget", ErrorContext(pass_name=_PASS, fix="please report this with the model"))
        _raise_memory_infeasible(problem, costs, _min_max_memory(problem, costs))
    if status == "unbounded":
        raise SolverError("CBC reports the stage partition unbounded", ErrorContext(pass_name=_PASS, fix="please report this with the model"))
    if status in ("no_solution", "error"):
        if incumbent is None:
            raise SolverError(
                f"CBC found no stage partition within the time limit of {problem.time_limit:g} s",
                ErrorContext(pass_name=_PASS, fix="raise StageProblem.time_limit"),
            )
        status, starts = "feasible", incumbent.starts  # a valid partition; optimality not proven
    return evaluate_partition(problem, starts, status=status, solve_seconds=time.perf_counter() - start)


class _StageILP:
    """The PuLP model of the module doc; one method per constraint family."""

    def __init__(self, problem: StageProblem, costs: _ChainCosts, windows: list[tuple[int, int]]):
        self.problem, self.costs, self.windows = problem, costs, windows
        self.model = pulp.LpProblem("stage_partition", pulp.LpMinimize)
        # Times in units of the mean stage time keep CBC's tolerances meaningful.
        total = float(costs.prefix_time[-1])
        self.unit = total / problem.stages if total > 0 else 1.0
        self.u: dict[tuple[int, int], pulp.LpVariable] = {}
        self._add_prefix_variables()
        self.pace = self.model.add_variable("pace", lowBound=0)

    # variables ---------------------------------------------------------------------------------
    def _add_prefix_variables(self) -> None:
        """u[j,i] for lo_i < j <= hi_i; outside its window u is the constant 1 (j <= lo_i) or 0."""
        for i, (lo, hi) in enumerate(self.windows[:-1]):
            for j in range(lo + 1, hi + 1):
                self.u[j, i] = self.model.add_variable(f"u_{j}_{i}", cat=pulp.LpBinary)

    def prefix(self, j: int, i: int) -> pulp.LpVariable | int:
        """u[j,i], with the constants of the module doc (u[j,-1] = 0, u[j,p-1] = 1, u[L,i] = 0)."""
        if i < 0 or j >= self.costs.L:
            return 0
        if i == self.problem.stages - 1:
            return 1
        var = self.u.get((j, i))
        if var is not None:
            return var
        return 1 if j <= self.windows[i][0] else 0

    def stage_range(self, i: int) -> range:
        """Layers stage ``i`` can hold: after the earliest end of stage i-1, up to its own latest end."""
        first = self.windows[i - 1][0] + 1 if i > 0 else 0
        return range(first, self.windows[i][1] + 1)

    def _expression(self, terms: list[tuple[float, pulp.LpVariable | int]], constant: float = 0.0) -> pulp.LpAffineExpression:
        coefficients: dict[pulp.LpVariable, float] = {}
        for coefficient, value in terms:
            if isinstance(value, int):
                constant += coefficient * value
            elif coefficient:
                coefficients[value] = coefficients.get(value, 0.0) + coefficient
        return pulp.LpAffineExpression(list(coefficients.items()), constant)

    def membership(self, i: int, weights: np.ndarray) -> pulp.LpAffineExpression:
        """sum_j w_j x[j,i]."""
        terms = []
        for j in self.stage_range(i):
            terms += [(weights[j], self.prefix(j, i)), (-weights[j], self.prefix(j, i - 1))]
        return self._expression(terms)

    def transfer(self, boundary: int) -> pulp.LpAffineExpression:
        """One side's seconds at ``boundary``: 2 (alpha + sum_j B_j cut[j,boundary] / bw)."""
        costs = self.costs
        lo, hi = self.windows[boundary]
        terms = []
        for j in range(lo, hi + 1):
            weight = _TRANSFERS_PER_BOUNDARY * costs.boundary[j] * costs.inv_bw[boundary]
            terms += [(weight, self.prefix(j, boundary)), (-weight, self.prefix(j + 1, boundary))]
        return self._expression(terms, _TRANSFERS_PER_BOUNDARY * costs.alpha[boundary])

    def stage_time(self, i: int) -> pulp.LpAffineExpression:
        """t_i, in units of the mean stage time."""
        t = self.membership(i, self.costs.time / self.costs.speed[i])
        if i > 0:
            t = t + self.transfer(i - 1)
        if i < self.problem.stages - 1:
            t = t + self.transfer(i)
        return t * (1.0 / self.unit)

    def stages_of_rank(self, r: int) -> range:
        return range(r, self.problem.stages, self.problem.ranks)

    # constraint families -------------------------------------------------------------------------
    def add_assignment(self) -> None:
        """u[j,i-1] <= u[j,i]: once in a stage <= i-1, a layer is in a stage <= i."""
        for (j, i), var in self.u.items():
            if i > 0 and isinstance(self.prefix(j, i - 1), pulp.LpVariable):
                self.model += self.prefix(j, i - 1) <= var, f"assign_{j}_{i}"

    def add_contiguity(self) -> None:
        """u[j+1,i] <= u[j,i]: a later layer never sits in an earlier stage."""
        for (j, i), var in self.u.items():
            later = self.prefix(j + 1, i)
            if isinstance(later, pulp.LpVariable):
                self.model += later <= var, f"contiguous_{j}_{i}"

    def add_nonempty(self) -> None:
        """sum_j u[j,i] - sum_j u[j,i-1] >= 1: every stage holds a layer."""
        L = self.costs.L
        for i in range(self.problem.stages):
            terms = [(1.0, self.prefix(j, i)) for j in range(L)] + [(-1.0, self.prefix(j, i - 1)) for j in range(L)]
            expression = self._expression(terms)
            if expression.isNumericalConstant():
                continue  # fixed by the windows, which keep every stage non-empty
            self.model += expression >= 1, f"nonempty_{i}"

    def add_memory(self) -> None:
        """sum_{i on r} sum_j (P_j + n_i A_j) x[j,i] <= M_r, scaled by 1/M_r."""
        costs = self.costs
        if not costs.has_budget:
            return
        for r in range(self.problem.ranks):
            budget = costs.rank_budget[r]
            total = self._expression([])
            for i in self.stages_of_rank(r):
                total = total + self.membership(i, (costs.param + costs.inflight[i] * costs.act) / budget)
            self.model += total <= 1.0, f"memory_{r}"

    def add_pace(self) -> None:
        """T >= sum_{i on r} t_i: the pace is the slowest rank's time per microbatch."""
        for r in range(self.problem.ranks):
            total = self._expression([])
            for i in self.stages_of_rank(r):
                total = total + self.stage_time(i)
            self.model += self.pace >= total, f"pace_{r}"

    def add_pace_floor(self, least_slowest_stage: float) -> None:
        """T >= the least slowest stage time of any cut (a DP): valid, and it lifts the LP bound."""
        self.model += self.pace >= least_slowest_stage / self.unit, "pace_floor"

    # objectives -------------------------------------------------------------------------------
    def set_step_time_objective(self) -> None:
        """(m - 1/d) T + (1/d) sum_i t_i + eps sum u: the step time, earliest cuts on ties."""
        d, m = self.problem.fill_drain_divisor, self.problem.microbatches
        total = self._expression([])
        for i in range(self.problem.stages):
            total = total + self.stage_time(i)
        eps = _TIE_BREAK / max(1, len(self.u))
        tie_break = self._expression([(eps, var) for var in self.u.values()])
        self.model += (m - 1.0 / d) * self.pace + (1.0 / d) * total + tie_break, "step_time"

    # solving -------------------------------------------------------------------------------
    def solve(self, time_limit: float, warm_start: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
        """(status, starts) from CBC; starts is empty unless a solution was found."""
        if warm_start is not None:
            ends = list(warm_start[1:])
            for (j, i), var in self.u.items():
                var.setInitialValue(1 if j < ends[i] else 0)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, warmStart=warm_start is not None, gapRel=_RELATIVE_GAP, threads=1)
        try:
            self.model.solve(solver)
        except pulp.PulpSolverError as e:
            raise SolverError(f"CBC failed on the stage partition: {e}", ErrorContext(pass_name=_PASS, fix=INSTALL_CBC)) from e
        status = solver_status(self.model.status, self.model.sol_status)
        if status not in ("optimal", "feasible"):
            return status, ()
        return status, self.starts()

    def starts(self) -> tuple[int, ...]:
        L, p = self.costs.L, self.problem.stages
        starts = [0]
        for i in range(p - 1):
            inside = sum(round(pulp.value(v)) if isinstance(v, pulp.LpVariable) else v for v in (self.prefix(j, i) for j in range(L)))
            starts.append(int(inside))
        if any(a >= b for a, b in zip(starts, starts[1:])) or starts[-1] >= L:
            raise SolverError(f"CBC returned an invalid stage partition {starts}", ErrorContext(pass_name=_PASS, fix="please report this with the model"))
        return tuple(starts)


# -- incumbent and windows --------------------------------------------------------------------------
def _incumbent(problem: StageProblem, costs: _ChainCosts) -> StagePartition | None:
    """A good feasible cut, to warm-start CBC and bound the windows; None if none is found.

    Candidates: a greedy fill (bisect on a cap of each stage's compute time; each stage takes
    the longest run within the cap and its memory, leaving a layer for each later stage), and
    the cuts best for each half of the objective alone (the least sum of stage times, the
    least slowest stage; DPs). Each is polished by single-cut moves; the best that fits wins.
    """
    L, p = costs.L, costs.p
    budget = [costs.rank_budget[problem.rank_of(i)] for i in range(p)]

    def fill(cap: float) -> list[int] | None:
        starts, first = [], 0
        for i in range(p):
            last = first
            if costs.stage_memory(i, first, last) > budget[i] or (costs.prefix_time[last + 1] - costs.prefix_time[first]) / costs.speed[i] > cap:
                return None
            limit = L - 1 if i == p - 1 else L - p + i
            while last < limit:
                within_time = (costs.prefix_time[last + 2] - costs.prefix_time[first]) / costs.speed[i] <= cap
                if not (within_time and costs.stage_memory(i, first, last + 1) <= budget[i]):
                    break
                last += 1
            starts.append(first)
            first = last + 1
        return starts if first == L else None

    candidates = []
    lo, hi = 0.0, float(costs.prefix_time[-1] / costs.speed.min())
    if fill(hi) is not None:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fill(mid) is not None else (mid, hi)
        candidates.append(fill(hi))
    bands = costs.feasible_time_bands() if problem.virtual_stages == 1 else costs.time_bands()
    candidates += [list(_best_cut(bands, combine)[1]) for combine in (np.add, np.maximum)]
    best = None
    for starts in candidates:
        if starts and costs.fits(starts):
            starts = _improve(costs, starts)
            value = costs.step_time(costs.stage_times(starts))[0]
            if best is None or value < best[0]:
                best = (value, starts)
    return evaluate_partition(problem, best[1]) if best else None


def _improve(costs: _ChainCosts, starts: list[int]) -> list[int]:
    """Move single cuts by one layer while the step time (transfers included) drops."""
    best = costs.step_time(costs.stage_times(starts))[0]
    improved = True
    while improved:
        improved = False
        for k in range(1, costs.p):
            for move in (-1, 1):
                trial = list(starts)
                trial[k] += move
                if not (trial[k - 1] < trial[k] and (k + 1 == costs.p or trial[k] < trial[k + 1]) and trial[k] < costs.L):
                    continue
                value = costs.step_time(costs.stage_times(trial))[0]
                if value < best and costs.fits(trial):
                    best, starts, improved = value, trial, True
    return starts


def _cut_windows(problem: StageProblem, costs: _ChainCosts, incumbent: StagePartition | None, times: list[np.ndarray]) -> list[tuple[int, int]]:
    """[lo_i, hi_i] holding the last layer e_i of stage i in every optimum (module doc).

    Without an incumbent: every stage keeps a layer (i <= e_i <= L-p+i). With one, of step
    Z, a cut e_i = j survives only if no bound proves every partition through it worse:

    * sum: sum_i t_i >= F_i(j) + G_i(j), the least time of layers 0..j in stages 0..i plus
      that of the rest in the later stages (DPs with the pace and memory relaxed), and the
      pace is at least the mean rank time, so the step is at least
      (m - 1/d) (F + G) / R + (F + G) / d;
    * pace: T <= (Z - S_min / d) / (m - 1/d), so stage k holds at most s_k (T - its least
      transfer time) seconds of layers: layers 0..j must fit stages 0..i, the rest the others.
    """
    L, p, R = costs.L, costs.p, costs.R
    lo = [i for i in range(p)]
    hi = [L - p + i for i in range(p)]
    if incumbent is not None and p > 1:
        d, m = problem.fill_drain_divisor, problem.microbatches
        slope = m - 1.0 / d
        limit = incumbent.step_time * (1 + 1e-9) + 1e-300
        sum_before, sum_after = _partial_bests(times, np.add)
        max_before, max_after = _partial_bests(times, np.maximum)
        least_total = float(sum_before[p - 1][L - 1])
        allowed = [np.ones(L, dtype=bool) for _ in range(p - 1)]
        for i in range(p - 1):
            # j = L-1 would leave the later stages empty
            total = sum_before[i] + np.append(sum_after[i + 1][1:], np.inf)
            slowest = np.maximum(max_before[i], np.append(max_after[i + 1][1:], np.inf))
            with np.errstate(invalid="ignore"):
                allowed[i] &= slope * np.maximum(slowest, total / R) + total / d <= limit
        if slope > 0:
            smallest_boundary = float(costs.boundary[:-1].min())
            comm = np.zeros(p)  # the least each stage spends on transfers
            for k in range(p - 1):
                side = _TRANSFERS_PER_BOUNDARY * (costs.alpha[k] + smallest_boundary * costs.inv_bw[k])
                comm[k] += side
                comm[k + 1] += side
            pace = (incumbent.step_time - least_total / d) / slope
            pace = pace * (1 + 1e-9) + 1e-12 * max(1.0, abs(pace))
            capacity = costs.speed * np.maximum(pace - comm, 0.0)  # compute seconds a stage can hold
            total = float(costs.prefix_time[-1])
            slack = 1e-9 * max(total, 1e-300)
            upto = costs.prefix_time[1:]  # seconds of layers 0..j
            for i in range(p - 1):
                allowed[i] &= upto <= capacity[: i + 1].sum() + slack
                allowed[i] &= total - upto <= capacity[i + 1 :].sum() + slack
        ends = [s - 1 for s in incumbent.starts[1:]]
        for i in range(p - 1):
            allowed[i][ends[i]] = True  # the incumbent always survives, whatever the rounding
            where = np.flatnonzero(allowed[i])
            lo[i], hi[i] = max(lo[i], int(where[0])), min(hi[i], int(where[-1]))
    for i in range(1, p):
        lo[i] = max(lo[i], lo[i - 1] + 1)
    for i in range(p - 2, -1, -1):
        hi[i] = min(hi[i], hi[i + 1] - 1)
    lo[p - 1] = hi[p - 1] = L - 1
    return list(zip(lo, hi))


def _partial_bests(times: list[np.ndarray], combine) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Best prefixes and suffixes of a cut, where a cut's value combines its stage times
    with ``combine`` (np.add: the least sum; np.maximum: the least slowest stage):
    forward[i][j] over layers 0..j in stages 0..i; backward[i][a] over a..L-1 in i..p-1."""
    p, L = len(times), times[0].shape[0]
    forward, best = [], np.concatenate([[0.0], np.full(L, np.inf)])
    for i in range(p):
        best = np.concatenate([[np.inf], combine(best[:L, None], times[i]).min(axis=0)])
        forward.append(best[1:])
    backward = [np.empty(0)] * p
    after = np.concatenate([np.full(L, np.inf), [0.0]])  # after[b]: layers b.. in the later stages
    for i in range(p - 1, -1, -1):
        after = np.concatenate([combine(times[i], after[None, 1:]).min(axis=1), [np.inf]])
        backward[i] = after[:L]
    return forward, backward


# -- memory feasibility ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _MemoryBound:
    ratio: float  # the smallest achievable max over ranks of memory / budget
    starts: tuple[int, ...]  # a partition achieving it
    memory: tuple[float, ...]  # bytes per rank in that partition


def _min_max_memory(problem: StageProblem, costs: _ChainCosts) -> _MemoryBound:
    """Exactly the partition that minimises the largest memory / budget over the ranks:
    a DP for one stage per rank, a small ILP when ranks hold several stages."""
    L, p = costs.L, costs.p
    if problem.virtual_stages == 1:
        _, starts = _best_cut(costs.memory_bands() / costs.rank_budget[:, None, None], np.maximum)
    else:
        starts = _min_max_memory_ilp(problem, costs)
    ends = starts[1:] + (L,)
    per_stage = [costs.stage_memory(i, a, b - 1) for i, (a, b) in enumerate(zip(starts, ends))]
    per_rank = tuple(sum(per_stage[i] for i in range(r, p, costs.R)) for r in range(costs.R))
    return _MemoryBound(ratio=max(mem / b for mem, b in zip(per_rank, costs.rank_budget)), starts=starts, memory=per_rank)


def _min_max_memory_ilp(problem: StageProblem, costs: _ChainCosts) -> tuple[int, ...]:
    model = _StageILP(problem, costs, _cut_windows(problem, costs, None, []))
    model.add_assignment()
    model.add_contiguity()
    model.add_nonempty()
    worst = model.model.add_variable("worst_memory_ratio", lowBound=0)
    for r in range(problem.ranks):
        total = model._expression([])
        for i in model.stages_of_rank(r):
            total = total + model.membership(i, (costs.param + costs.inflight[i] * costs.act) / costs.rank_budget[r])
        model.model += total <= worst, f"memory_{r}"
    model.model += worst, "worst_memory_ratio"
    status, starts = model.solve(problem.time_limit, None)
    if not starts:
        raise SolverError(f"CBC could not size the memory of the stages (status {status})", ErrorContext(pass_name=_PASS, fix="raise StageProblem.time_limit"))
    return starts


def least_peak_stage_memory(problem: StageProblem) -> float:
    """The least, over cuts into one stage per rank, of the fullest stage's bytes
    (parameters and activations in flight, the budget ignored; a DP): no cut needs less."""
    costs = _ChainCosts(problem)
    return _best_cut(costs.memory_bands(), np.maximum)[0]


def _check_memory_feasible(problem: StageProblem, costs: _ChainCosts) -> None:
    bound = _min_max_memory(problem, costs)
    if bound.ratio > 1.0:
        _raise_memory_infeasible(problem, costs, bound)


def _raise_memory_infeasible(problem: StageProblem, costs: _ChainCosts, bound: _MemoryBound) -> None:
    p, L = problem.stages, costs.L
    binding = max(range(costs.R), key=lambda r: bound.memory[r] / max(costs.rank_budget[r], 1.0))
    # what a device needs and has, the transient buffers included
    needed, budget = bound.memory[binding] + problem.reserved_bytes, costs.rank_budget[binding] + problem.reserved_bytes
    uniform = len(set(costs.rank_budget.tolist())) == 1
    where = f"stage {binding}" if problem.virtual_stages == 1 else f"rank {binding} (stages {', '.join(map(str, range(binding, p, costs.R)))})"
    if uniform:
        message = (
            f"no cut of {L} layers into {p} stages fits the memory budget: the best split needs at least "
            f"{needed / GiB:.2f} GiB per device ({where}); budget is {budget / GiB:.2f} GiB"
        )
    else:
        message = (
            f"no cut of {L} layers into {p} stages fits the per-device memory budgets: at best {where} "
            f"needs {needed / GiB:.2f} GiB; its budget is {budget / GiB:.2f} GiB ({bound.ratio:.2f}x over)"
        )
    enough = _stages_that_fit(problem) if uniform and problem.virtual_stages == 1 else None
    if enough is not None:
        fix = f"use at least {enough} stages, or devices with {needed / GiB:.2f} GiB; or shard the model (TP / ZeRO)"
    else:
        fix = f"use more stages or devices with at least {needed / GiB:.2f} GiB; or shard the model (TP / ZeRO)"
    raise InfeasiblePlanError(message, ErrorContext(pass_name=_PASS, fix=fix))


def _stages_that_fit(problem: StageProblem) -> int | None:
    """The fewest stages (same per-device budget) whose best split fits, if any does."""
    budget = problem.memory_budget[0]
    for stages in range(problem.stages + 1, len(problem.layers) + 1):
        bigger = StageProblem(
            layers=problem.layers,
            stages=stages,
            microbatches=problem.microbatches,
            schedule=problem.schedule,
            memory_budget=(budget,) * stages,
        )
        if _min_max_memory(bigger, _ChainCosts(bigger)).ratio <= 1.0:
            return stages
    return None


def _check_stage_count(problem: StageProblem) -> None:
    L, p = len(problem.layers), problem.stages
    if p > L:
        raise InfeasiblePlanError(
            f"cannot cut {L} layers into {p} non-empty pipeline stages: there are more stages ({p}) than layers ({L})",
            ErrorContext(pass_name=_PASS, fix=f"use at most {L} stages (fewer pipeline ranks or virtual stages), or a model with more layers"),
        )


def _best_cut(bands: np.ndarray, combine, cap: float = math.inf) -> tuple[float, tuple[int, ...]]:
    """(best value, its starts) over cuts into ``len(bands)`` non-empty stages, where stage
    i holding layers i+a..i+b is worth ``bands[i][b, a]`` (:meth:`_ChainCosts.time_bands`),
    stages combine with ``combine`` (np.add: a sum; np.maximum: the worst stage), and no
    stage may exceed ``cap``. A DP over (stage, last layer); (inf, ()) when no cut qualifies."""
    p, W = len(bands), bands[0].shape[0]
    best = np.full(W, np.inf)  # best[a]: layers 0..i+a-1 in stages 0..i-1 (stage i starts at i+a)
    best[0] = 0.0
    choice = np.zeros((p, W), dtype=np.int64)
    rows = np.arange(W)
    for i in range(p):
        value = combine(bands[i] if cap == math.inf else np.where(bands[i] <= cap, bands[i], np.inf), best[None, :])  # [b, a]
        choice[i] = value.argmin(axis=1)
        best = value[rows, choice[i]]  # the row minima; by b: stage i ends at i+b, so stage i+1 starts at (i+1)+b
    if not math.isfinite(best[W - 1]):
        return math.inf, ()
    starts, end = [], W + p - 2  # the last layer
    for i in range(p - 1, -1, -1):
        first = i + int(choice[i][end - i])
        starts.append(first)
        end = first - 1
    return float(best[W - 1]), tuple(reversed(starts))


# -- the exact chain partitioner ---------------------------------------------------------------------
def exact_chain_partition(problem: StageProblem) -> StagePartition:
    """The true optimum of the ILP's objective by dynamic programming (one stage per rank).

    For a pace ``T``, ``S(T)`` is the least ``sum_i t_i`` over cuts with every stage time
    ``<= T`` (and within memory), found by a DP over (stage, last layer). The optimum is
    ``min_T (m - 1/d) T + (1/d) S(T)`` over the candidate paces: every stage time any cut
    can produce. Candidates are scanned upwards from the smallest feasible pace (the least
    slowest stage over all cuts, one DP) and the scan stops at the first ``T`` with
    ``(m - 1/d) T + (1/d) S(inf)`` above the best.
    """
    start = time.perf_counter()
    _check_stage_count(problem)
    if problem.virtual_stages != 1:
        raise PartcError(
            "exact_chain_partition prices one stage per rank; a rank holding several stages paces on their sum",
            ErrorContext(pass_name=_PASS, fix="use solve_stages for virtual_stages > 1"),
        )
    costs = _ChainCosts(problem)
    times = costs.feasible_time_bands()

    def least_sum(pace: float) -> tuple[float, tuple[int, ...]]:
        return _best_cut(times, np.add, pace)

    unconstrained, starts = least_sum(math.inf)
    if not starts:
        if costs.has_budget:
            _raise_memory_infeasible(problem, costs, _min_max_memory(problem, costs))
        raise PartcError("no cut of the layers exists", ErrorContext(pass_name=_PASS))
    d, m = problem.fill_drain_divisor, problem.microbatches
    slope = m - 1.0 / d
    if slope > 0:
        # The smallest feasible pace is the least slowest stage over all cuts (least_sum(T)
        # finds a cut iff T is at least that): one DP instead of a bisection of DPs.
        fastest = _best_cut(times, np.maximum)[0]
        total, starts = least_sum(fastest)
        best_value = slope * fastest + total / d
        # Paces above `beyond` cannot beat best_value; the candidates are listed up to it
        # first (a few hundred of the ~p L^2 / 2 stage times), the rest only if needed.
        beyond = (best_value - unconstrained / d) / slope * (1 + 1e-6)
        for pace in _distinct_paces(times, fastest, beyond):
            if slope * pace + unconstrained / d >= best_value:
                break
            total, cut = least_sum(pace)
            value = slope * pace + total / d
            if value < best_value:
                best_value, starts = value, cut
    return evaluate_partition(problem, starts, status="optimal", solve_seconds=time.perf_counter() - start)


def _distinct_paces(times: np.ndarray, above: float, split: float):
    """The distinct finite stage times in ``times`` (p x W x W) greater than ``above``,
    ascending: those up to ``split`` first, then (computed only when the caller gets that
    far) the rest, the smallest of them before the others are sorted (the caller mostly
    stops at it)."""
    above_finite = (times > above) & (times < math.inf)
    within = times <= split
    yield from np.unique(times[above_finite & within])
    rest = times[above_finite & ~within]
    if rest.size:
        least = rest.min()
        yield least
        yield from np.unique(rest[rest > least])


# -- from an annotated graph --------------------------------------------------------------------------
def stage_problem_from_graph(
    gm: fx.GraphModule,
    cost_model: CostModel,
    *,
    stages: int,
    microbatches: int,
    schedule: str = "1f1b",
    virtual_stages: int = 1,
    ranks: Sequence[int] | None = None,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    dp: int = 1,
    time_limit: float = 30.0,
    reserved_bytes: float = 0.0,
) -> StageProblem:
    """The :class:`StageProblem` of the annotated ``gm`` on ``cost_model``'s cluster.

    One microbatch is ``batch / (dp * microbatches)`` samples. Per layer:

    * ``time``: the roofline of :mod:`partc.passes.estimate` (forward, and backward at 2x the
      bytes) summed over its nodes, on the device of stage 0 (speed 1.0); stage i's speed is
      its device's FLOP/s in the compute dtype over that device's.
    * ``param_bytes``: :func:`training_memory` per parameter (mixed precision and the optimizer
      honoured) plus buffers. A parameter read by several layers (a tied embedding and LM
      head) is charged to each of them: every stage that uses it holds a copy, its gradient
      and its optimizer state (over-counted when they share a stage).
    * ``activation_bytes``: the annotated bytes saved for backward, at microbatch size.
    * ``boundary_bytes``: every value (user inputs included, parameters excluded) made in layer
      ``a`` and last read in layer ``b > a`` is added to each cut ``a..b-1``. User inputs enter
      at the first stage. A tensor whose leading dimension is the batch is counted at
      microbatch size; others (position ids, masks) whole.

    Stage i runs on ``ranks[i % R]`` (``R = stages / virtual_stages``, default ranks ``0..R-1``);
    boundary i uses ``cluster.link`` between the ranks of stages i and i+1 (free on one rank).
    ``memory_limit``: bytes per device; ``None`` = each stage's device memory; ``math.inf`` =
    unlimited. ``reserved_bytes``: memory every device keeps for one microbatch's transient
    buffers (the logits' workspace), which the stages may not use.
    """
    cluster = cost_model.cluster
    _require(isinstance(stages, int) and stages >= 1, f"stages must be an integer >= 1, got {stages!r}")
    _require(isinstance(virtual_stages, int) and virtual_stages >= 1 and stages % virtual_stages == 0, f"{stages} stages do not split into {virtual_stages!r} virtual stages per rank")
    _require(isinstance(dp, int) and dp >= 1, f"dp must be an integer >= 1, got {dp!r}")
    _require(isinstance(microbatches, int) and microbatches >= 1, f"microbatches must be an integer >= 1, got {microbatches!r}")
    pipeline_ranks = stages // virtual_stages
    ranks = list(range(pipeline_ranks)) if ranks is None else list(ranks)
    _require(len(ranks) == pipeline_ranks, f"{stages} stages with {virtual_stages} per rank need {pipeline_ranks} ranks, got {len(ranks)}")
    stage_rank = [ranks[i % pipeline_ranks] for i in range(stages)]

    batch = batch_size(gm)
    split = dp * microbatches
    if batch % split:
        raise InfeasiblePlanError(
            f"the global batch of {batch} does not split into {dp} replica(s) x {microbatches} microbatches",
            ErrorContext(pass_name=_PASS, fix=f"use a global batch that is a multiple of {split}, or other microbatch counts"),
        )

    info = graph_info(gm)
    nodes = list(gm.graph.nodes)
    infos = {n: node_info(n) for n in nodes}
    weight_dtype = _parameter_dtype(list(infos.values()))
    mixed = compute_dtype is not None
    param_dtype = compute_dtype or weight_dtype
    per_param = training_memory(1, param_dtype, 0.0, optimizer=optimizer, mixed_precision=mixed).total
    reference = cluster.device(stage_rank[0])

    def node_time(i, flops: float, moved: float) -> float:
        return roofline_time(cost_model, i, flops / split, moved / split, compute_dtype, reference)

    def held_bytes(numel: int, nbytes: int) -> float:
        return numel * per_param + max(nbytes - numel * weight_dtype.itemsize, 0)

    L = len(info.layers)
    shared = [0.0] * L  # parameters a layer reads but another layer owns
    boundary_diff = [0.0] * (L + 1)
    recomputed = recomputable_nodes(gm)  # rebuilt by each stage that reads them, never sent
    for n in nodes:
        i = infos[n]
        if i.op == OpKind.PARAMETER:
            readers = sorted({infos[u].layer for u in n.users} - {i.layer})
            for layer in readers:
                shared[layer] += held_bytes(i.param_numel, i.param_bytes)
            continue
        if i.op == OpKind.OUTPUT or not i.outputs or not n.users or n in recomputed:
            continue
        made = 0 if i.op == OpKind.INPUT else i.layer
        last_read = max(infos[u].layer for u in n.users)
        if last_read > made:
            nbytes = sum(s.nbytes / split if s.shape and s.shape[0] == batch else s.nbytes for s in i.outputs)
            boundary_diff[made] += nbytes
            boundary_diff[last_read] -= nbytes

    layers = []
    live = 0.0
    by_name = {n.name: infos[n] for n in nodes}
    for layer in info.layers:
        members = [by_name[name] for name in layer.nodes]
        forward = sum(node_time(i, i.fwd_flops, i.bytes_moved) for i in members)
        backward = sum(node_time(i, i.bwd_flops, 2 * i.bytes_moved) for i in members if i.bwd_flops)
        live += boundary_diff[layer.index]
        layers.append(
            LayerCost(
                name=layer.name,
                time=forward + backward,
                param_bytes=held_bytes(layer.param_numel, layer.param_bytes) + shared[layer.index],
                activation_bytes=layer.activation_bytes / split,
                boundary_bytes=max(live, 0.0) if layer.index < L - 1 else 0.0,
            )
        )

    dtype_name = str(param_dtype).removeprefix("torch.")
    speeds = tuple(cluster.device(r).flops(dtype_name) / reference.flops(dtype_name) for r in stage_rank)
    latency, bandwidth = [], []
    for a, b in zip(stage_rank, stage_rank[1:]):
        if a == b:
            latency.append(0.0)
            bandwidth.append(math.inf)
        else:
            link = cluster.link([a, b])
            latency.append(link.latency)
            bandwidth.append(link.bandwidth)
    if memory_limit is None:
        budget = tuple(cluster.device(r).memory for r in stage_rank)
    elif math.isinf(memory_limit):
        budget = ()
    else:
        budget = (float(memory_limit),) * stages
    return StageProblem(
        layers=tuple(layers),
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        stage_speed=speeds,
        memory_budget=budget,
        link_latency=tuple(latency),
        link_bandwidth=tuple(bandwidth),
        time_limit=time_limit,
        reserved_bytes=reserved_bytes,
    )


def _require(condition: bool, message: str | Callable[[], str]) -> None:
    """Raise a PartcError with ``message`` unless ``condition``; a callable message is built
    only then (StageProblem's checks would otherwise format its tuples for every problem)."""
    if not condition:
        raise PartcError(message() if callable(message) else message, ErrorContext(pass_name=_PASS))


# -- cuts a schedule cannot use ----------------------------------------------------------------
def gradient_free_cuts(gm: fx.GraphModule, *, every_value: bool = False, recomputed: set[fx.Node] | None = None) -> frozenset[int]:
    """Layers ``j`` after which a cut would send tensors that carry no gradient back.

    ``every_value=False``: cuts across which *nothing* carries a gradient. torch's
    zero-bubble schedules compute a stage's weight gradients from the graph of its input
    gradients, so a stage (other than the first) whose inputs carry no gradient (token
    ids only) would never get its weight gradients.

    ``every_value=True``: cuts across which *anything* carries no gradient (token ids,
    position ids, targets routed to the loss). torch's pipelining before 2.13 expects a
    gradient for every tensor a stage receives (seen on 2.11: "has gradients None and is
    expecting to send gradients").

    The planner solves with these cuts merged away (:func:`solve_stages_without_cuts`).
    ``recomputed``: ``recomputable_nodes(gm)`` when the caller has it already.
    """
    layer_of = {n: node_info(n).layer for n in gm.graph.nodes}
    num_layers = len(graph_info(gm).layers)
    with_gradient = [False] * num_layers
    without_gradient = [False] * num_layers
    local = recomputable_nodes(gm) if recomputed is None else recomputed
    for n in gm.graph.nodes:
        if n in local or not node_info(n).outputs:
            continue
        first = 0 if n.op == "placeholder" else layer_of[n]
        last = max((layer_of[u] for u in n.users), default=first)
        crossed = with_gradient if node_info(n).requires_grad else without_gradient
        for j in range(first, last):
            crossed[j] = True
    if every_value:
        return frozenset(j for j in range(num_layers - 1) if without_gradient[j])
    return frozenset(j for j in range(num_layers - 1) if not with_gradient[j])


def solve_stages_without_cuts(problem: StageProblem, forbidden: frozenset[int]) -> StagePartition:
    """:func:`solve_stages` with no cut right after the layers in ``forbidden``.

    Each forbidden layer is merged with the next one into a single layer of the problem
    (times, parameters and activations add; the boundary is the later layer's), the merged
    problem is solved, and its answer is mapped back and priced on the original layers."""
    if not forbidden:
        return solve_stages(problem)
    groups: list[list[int]] = [[0]]
    for j in range(1, len(problem.layers)):
        if j - 1 in forbidden:
            groups[-1].append(j)
        else:
            groups.append([j])
    merged = tuple(
        LayerCost(
            name=problem.layers[group[0]].name,
            time=sum(problem.layers[j].time for j in group),
            param_bytes=sum(problem.layers[j].param_bytes for j in group),
            activation_bytes=sum(problem.layers[j].activation_bytes for j in group),
            boundary_bytes=problem.layers[group[-1]].boundary_bytes,
        )
        for group in groups
    )
    if len(merged) < problem.stages:
        raise InfeasiblePlanError(
            f"{problem.stages} stages need {problem.stages - 1} cuts, but only {len(merged) - 1} cut positions carry gradients as the schedule and torch version need",
            ErrorContext(pass_name=_PASS, fix="use fewer stages; or a schedule other than zero_bubble; on torch < 2.13, compile without example_targets (targets cross every cut)"),
        )
    answer = solve_stages(dataclasses.replace(problem, layers=merged))
    starts = [groups[s][0] for s in answer.starts]
    return evaluate_partition(problem, starts, status=answer.status, solve_seconds=answer.solve_seconds)
