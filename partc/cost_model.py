"""An analytic cost model: roofline compute, alpha-beta collectives, per-device memory.

Every number the planner compares comes from the formulas below; they are kept few and
plain so that a predicted step time can be checked by hand.

Notation: ``n`` ranks in a group, ``S`` bytes, ``alpha`` = link latency (s),
``beta`` = 1 / link bandwidth (s/B).

Compute (roofline, one kernel)::

    time = max(FLOPs / (peak x matmul_efficiency x e), bytes_moved / memory_bandwidth, kernel_overhead)

``e`` is the kernel's rate relative to a large aligned matmul (1 unless the caller knows
better: fused attention and matmuls with a dimension that is not a multiple of 16 bytes
run far below it; :func:`partc.passes.estimate.kernel_efficiency`). ``kernel_overhead``
is the measured floor of one eager kernel (dispatch and launch): short kernels cost it
whatever their FLOPs and bytes. Both come from ``partc calibrate`` (presets: 1 and 0).

Collectives inside one node (ring algorithms on that node's intra link)::

    all_reduce(S, n)     = 2(n-1)·alpha + 2(n-1)/n · S·beta
    all_gather(S, n)     =  (n-1)·alpha +  (n-1)/n · S·beta   S = the full, gathered tensor
    reduce_scatter(S, n) =  (n-1)·alpha +  (n-1)/n · S·beta   S = the full, unscattered input
    all_to_all(S, n)     =  (n-1)·alpha +  (n-1)/n · S·beta   S = bytes one rank holds
    p2p(S)               =        alpha +           S·beta
    any collective with n == 1 costs 0.

Collectives over ranks on ``k`` nodes, ``g`` ranks on each (hierarchical, as NCCL does)::

    all_reduce     = reduce_scatter_intra(S, g) + all_reduce_inter(S/g, k) + all_gather_intra(S, g)
    all_gather     = all_gather_inter(S/g, k)   + all_gather_intra(S, g)
    reduce_scatter = reduce_scatter_intra(S, g) + reduce_scatter_inter(S/g, k)
    all_to_all     = all_to_all(S, n) on the inter-node link (every rank talks to every node)

The intra parts run on the slowest intra link among the nodes touched (heterogeneous
clusters); the inter parts on ``cluster.inter_link``. A group that puts different
numbers of ranks on the nodes it touches has no clean hierarchy: it is priced as one flat
ring over all ``n`` ranks on the inter-node link.

Overlap: communication that runs beside compute (DDP's bucketed gradient all-reduce during
backward, FSDP prefetch, pipeline sends) costs only its exposed part,
``max(0, comm - compute)``.

Memory per device (:func:`training_memory`), with ``N`` parameters of itemsize ``b``::

    parameters      = N·b               / dp if ZeRO-3
    gradients       = N·b               / dp if ZeRO >= 2   (0 for inference)
    optimizer_state = N·(8 [AdamW] + 4 [fp32 master copy if mixed precision])
                                        / dp if ZeRO >= 1   (0 for inference)
    + activations in flight + transient buffers (given by the caller)

The optimizer step (:func:`optimizer_step_bytes`) is memory-bound: torch's default AdamW
(the foreach implementation) makes eight passes over the parameters, 20 element accesses
per parameter in the dtype of its state (the parameters' own; fp32 under mixed precision).

Pipelines (:func:`pipeline_step_time`), ``p`` stages, ``m`` microbatches, stage times
``t_i`` per microbatch (forward + backward), ``v`` virtual stages per rank::

    GPipe / 1F1B:  step = sum(t_i) + (m-1)·max(t_i)  =  m·max(t_i) + (sum(t_i) - max(t_i))
    interleaved:   step = m·max(t_i) + (sum(t_i) - max(t_i)) / v
    bubble fraction (balanced stages, idle time over ideal time) = (p-1) / (v·m)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from partc.cluster import Cluster, DeviceSpec, Link
from partc.errors import PartcError

__all__ = ["CostModel", "MemoryBreakdown", "training_memory", "pipeline_step_time", "bubble_fraction", "roofline", "optimizer_step_bytes"]


class CostModel:
    """Seconds for compute and collectives on one :class:`~partc.cluster.Cluster`."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    # -- compute --------------------------------------------------------------------------
    def compute_time(self, flops: float, bytes_moved: float, dtype: torch.dtype, device: DeviceSpec, efficiency: float = 1.0) -> float:
        """Roofline time of one kernel: the slower of doing the math (at ``efficiency`` of
        the matmul rate) and moving the bytes, and never less than the kernel overhead."""
        if not (flops or bytes_moved):
            return 0.0
        return float(roofline(flops, bytes_moved, device.flops(dtype) * efficiency, device.memory_bandwidth, device.kernel_overhead))

    # -- collectives ----------------------------------------------------------------------
    def all_reduce(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Ring all-reduce of an ``nbytes`` tensor held whole by every rank."""
        group = self._group(ranks)
        if group.size <= 1:
            return 0.0
        if group.flat_link is not None:
            return _ring_all_reduce(group.flat_link, group.size, nbytes)
        g, k = group.ranks_per_node, group.nodes
        return (
            _ring_gather(group.intra_link, g, nbytes)  # reduce-scatter inside each node
            + _ring_all_reduce(self.cluster.inter_link, k, nbytes / g)  # each rank's shard across nodes
            + _ring_gather(group.intra_link, g, nbytes)  # all-gather inside each node
        )

    def all_gather(self, nbytes: float, ranks: Sequence[int]) -> float:
        """All-gather whose result, on every rank, is ``nbytes``."""
        group = self._group(ranks)
        if group.size <= 1:
            return 0.0
        if group.flat_link is not None:
            return _ring_gather(group.flat_link, group.size, nbytes)
        g, k = group.ranks_per_node, group.nodes
        return _ring_gather(self.cluster.inter_link, k, nbytes / g) + _ring_gather(group.intra_link, g, nbytes)

    def reduce_scatter(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Reduce-scatter of an ``nbytes`` input held whole by every rank."""
        group = self._group(ranks)
        if group.size <= 1:
            return 0.0
        if group.flat_link is not None:
            return _ring_gather(group.flat_link, group.size, nbytes)
        g, k = group.ranks_per_node, group.nodes
        return _ring_gather(group.intra_link, g, nbytes) + _ring_gather(self.cluster.inter_link, k, nbytes / g)

    def all_to_all(self, nbytes: float, ranks: Sequence[int]) -> float:
        """All-to-all where each rank holds ``nbytes`` before the exchange.

        Across nodes it runs flat on the inter-node link: every rank sends to ranks on
        every other node, so there is no cheap intra-node phase to split off."""
        group = self._group(ranks)
        if group.size <= 1:
            return 0.0
        link = group.intra_link if group.nodes == 1 else self.cluster.inter_link
        return _ring_gather(link, group.size, nbytes)

    def broadcast(self, nbytes: float, ranks: Sequence[int]) -> float:
        """Broadcast of an ``nbytes`` tensor from one rank to the others, pipelined along a
        chain (NCCL's ring broadcast): n-1 latencies, the whole tensor through each link
        once. Across nodes, the chain over the nodes and then within each, added (no
        overlap between the two is assumed)."""
        group = self._group(ranks)
        if group.size <= 1:
            return 0.0
        if group.flat_link is not None:
            return _alpha_beta(group.flat_link, steps=group.size - 1, fraction=1.0, nbytes=nbytes)
        g, k = group.ranks_per_node, group.nodes
        inter = _alpha_beta(self.cluster.inter_link, steps=k - 1, fraction=1.0, nbytes=nbytes) if k > 1 else 0.0
        return inter + (_alpha_beta(group.intra_link, steps=g - 1, fraction=1.0, nbytes=nbytes) if g > 1 else 0.0)

    def p2p(self, nbytes: float, src: int, dst: int) -> float:
        """One send from ``src`` to ``dst``; free when they are the same rank."""
        if src == dst:
            self.cluster.node_of(src)  # still reject a rank outside the cluster
            return 0.0
        return _alpha_beta(self.cluster.link([src, dst]), steps=1, fraction=1.0, nbytes=nbytes)

    @staticmethod
    def exposed(comm_time: float, overlappable_compute: float) -> float:
        """The part of ``comm_time`` not hidden behind the compute it runs beside."""
        return max(0.0, comm_time - overlappable_compute)

    # -- helpers --------------------------------------------------------------------------
    def _group(self, ranks: Sequence[int]) -> "_GroupShape":
        ranks = list(ranks)
        per_node = Counter(self.cluster.node_of(r) for r in ranks)  # also validates every rank
        if len(ranks) <= 1:
            return _GroupShape(size=len(ranks), nodes=len(per_node), ranks_per_node=len(ranks))
        intra = self.cluster.intra_link(ranks)
        if len(per_node) == 1:
            return _GroupShape(size=len(ranks), nodes=1, ranks_per_node=len(ranks), intra_link=intra)
        counts = set(per_node.values())
        if len(counts) > 1:
            # No clean two-level hierarchy: one ring through every rank, paced by the slow link.
            return _GroupShape(size=len(ranks), nodes=len(per_node), ranks_per_node=0, flat_link=self.cluster.inter_link)
        return _GroupShape(size=len(ranks), nodes=len(per_node), ranks_per_node=counts.pop(), intra_link=intra)


def roofline(flops, bytes_moved, rate, bandwidth: float, overhead: float):
    """Seconds of kernels doing ``flops`` at ``rate`` and moving ``bytes_moved`` at
    ``bandwidth``, each at least ``overhead``: numbers or numpy arrays (the search prices
    every node of a graph at once)."""
    return np.maximum(np.maximum(np.divide(flops, rate), np.divide(bytes_moved, bandwidth)), overhead)


@dataclass(frozen=True)
class _GroupShape:
    """How a process group sits on the cluster's nodes."""

    size: int  # n, ranks in the group
    nodes: int  # k, nodes the group touches
    ranks_per_node: int  # g, the same on every node touched; 0 when uneven
    intra_link: Link | None = None  # slowest intra-node link among the nodes touched
    flat_link: Link | None = None  # set when the group is priced as one flat ring (uneven groups)


def _alpha_beta(link: Link, steps: float, fraction: float, nbytes: float) -> float:
    """``steps`` message latencies plus ``fraction`` of ``nbytes`` pushed through ``link``."""
    return steps * link.latency + fraction * nbytes * link.seconds_per_byte


def _ring_all_reduce(link: Link, n: int, nbytes: float) -> float:
    if n <= 1:
        return 0.0
    return _alpha_beta(link, steps=2 * (n - 1), fraction=2 * (n - 1) / n, nbytes=nbytes)


def _ring_gather(link: Link, n: int, nbytes: float) -> float:
    """All-gather, reduce-scatter and all-to-all share this shape: n-1 steps, (n-1)/n of S."""
    if n <= 1:
        return 0.0
    return _alpha_beta(link, steps=n - 1, fraction=(n - 1) / n, nbytes=nbytes)


# -- the optimizer step -----------------------------------------------------------------------
# torch.optim.AdamW's default (foreach) step, per parameter, in element accesses:
# p *= 1 - lr·wd (2), m.lerp_(g) (3), v *= beta2 (2), v.addcmul_(g, g) (3), s = sqrt(v) (2),
# s /= bias correction (2), s += eps (2), p.addcdiv_(m, s) (4).
ADAMW_ACCESSES_PER_PARAM = 20
_OPTIMIZER_ACCESSES = {"adamw": ADAMW_ACCESSES_PER_PARAM, "adam": ADAMW_ACCESSES_PER_PARAM, "sgd": 0}


def optimizer_step_bytes(optimizer: str, param_dtype: torch.dtype, mixed_precision: bool = False) -> float:
    """Bytes one parameter's optimizer step reads and writes. The state is in the
    parameters' dtype (torch keeps the moments like the weights), fp32 under mixed
    precision, where the step also writes the ``param_dtype`` copy the model computes with."""
    if optimizer not in _OPTIMIZER_ACCESSES:
        raise PartcError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(sorted(_OPTIMIZER_ACCESSES))}")
    accesses = _OPTIMIZER_ACCESSES[optimizer]
    if not accesses:
        return 0.0
    if mixed_precision:
        return accesses * 4 + param_dtype.itemsize
    return accesses * param_dtype.itemsize


# -- memory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one device holds at its peak, by kind."""

    parameters: float  # model weights, in the compute dtype
    gradients: float  # one gradient per weight, same dtype; 0 for inference
    optimizer_state: float  # optimizer moments and the fp32 master copy; 0 for inference
    activations: float  # activations saved for backward (or in flight in a pipeline)
    transient: float = 0.0  # short-lived buffers: collective staging, gathered ZeRO-3 weights

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: object) -> "MemoryBreakdown":
        if not isinstance(other, MemoryBreakdown):
            return NotImplemented
        return MemoryBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __radd__(self, other: object) -> "MemoryBreakdown":
        # Lets sum() start from its default 0.
        if other == 0:
            return self
        return NotImplemented


# Optimizer state in bytes per parameter: AdamW keeps two fp32 moments; plain SGD none.
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0}
_MASTER_COPY_BYTES = 4  # fp32 weights the optimizer updates under mixed precision
_ZERO_STAGES = (0, 1, 2, 3)


def training_memory(
    param_numel: int,
    param_dtype: torch.dtype,
    activation_bytes: float,
    *,
    optimizer: str = "adamw",
    mixed_precision: bool = False,
    zero_stage: int = 0,
    dp: int = 1,
    transient_bytes: float = 0.0,
    training: bool = True,
    accumulates: bool = False,
    gathered: bool = False,
) -> MemoryBreakdown:
    """Per-device memory for ``param_numel`` parameters held on this device.

    ``param_dtype`` is the dtype weights and gradients are kept in for compute; with
    ``mixed_precision`` the optimizer also keeps an fp32 master copy. ZeRO shards over the
    ``dp`` data-parallel replicas: stage 1 the optimizer state, 2 also gradients, 3 also
    parameters. ``training=False`` prices inference: weights and activations only.

    What FSDP2 (partc's ZeRO) actually holds at the peak of a step:
    ``accumulates``: the gradients of several microbatches are summed before the
    data-parallel reduction (gradient accumulation, every pipeline); FSDP2 holds them
    unsharded until the last microbatch's backward (``set_requires_gradient_sync(False)``),
    so ZeRO-2/3 shard gradients only without accumulation. ``gathered``: FSDP2 holds the
    parameters gathered at the peak: torch's pipeline stages keep them from the first
    backward to the end of the step (``set_reshard_after_backward(False)``), and a module
    FSDP2 shards as one unit is gathered whole for its forward and for its backward; ZeRO-3
    shards parameters at the peak only otherwise (one unit per layer, outside a pipeline).
    (Measured on 8 x H200, FSDP2 on a 6.7B GPT with 2 and 4 accumulated microbatches: 91.0
    and 54.3 GiB against 80.5 and 45.3 priced with sharded gradients.)
    """
    if optimizer not in _OPTIMIZER_STATE_BYTES:
        raise PartcError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(sorted(_OPTIMIZER_STATE_BYTES))}")
    if zero_stage not in _ZERO_STAGES:
        raise PartcError(f"zero_stage must be one of {', '.join(map(str, _ZERO_STAGES))}, got {zero_stage!r}")
    if not isinstance(dp, int) or dp < 1:
        raise PartcError(f"dp must be an integer >= 1, got {dp!r}")
    if param_numel < 0:
        raise PartcError(f"param_numel must be >= 0, got {param_numel!r}")

    weight_bytes = param_numel * param_dtype.itemsize
    parameters = weight_bytes / dp if zero_stage >= 3 and not gathered else weight_bytes
    if not training:
        return MemoryBreakdown(parameters, 0.0, 0.0, activation_bytes, transient_bytes)

    state_per_param = _OPTIMIZER_STATE_BYTES[optimizer] + (_MASTER_COPY_BYTES if mixed_precision else 0)
    optimizer_state = param_numel * state_per_param
    gradients = weight_bytes
    if zero_stage >= 1:
        optimizer_state /= dp
    if zero_stage >= 2 and not accumulates:
        gradients /= dp
    return MemoryBreakdown(parameters, gradients, optimizer_state, activation_bytes, transient_bytes)


# -- pipelines --------------------------------------------------------------------------------
_SCHEDULES = ("gpipe", "1f1b", "interleaved")


def pipeline_step_time(stage_times: Sequence[float], microbatches: int, schedule: str = "1f1b", virtual_stages: int = 1) -> float:
    """Seconds for one step of ``microbatches`` through stages taking ``stage_times`` each.

    ``stage_times[i]`` is stage i's forward + backward time for one microbatch (for
    "interleaved", all of rank i's ``virtual_stages`` chunks together). The slowest stage
    paces the steady state (``m·max``); filling and draining the pipe adds the other
    stages once (``sum - max``), which interleaving divides by ``virtual_stages``.
    """
    _check_pipeline(len(stage_times), microbatches, virtual_stages)
    if schedule not in _SCHEDULES:
        raise PartcError(f"unknown pipeline schedule {schedule!r}; accepted: {', '.join(_SCHEDULES)}")
    if schedule != "interleaved" and virtual_stages != 1:
        raise PartcError(f"schedule {schedule!r} runs one stage per rank; virtual_stages={virtual_stages} needs 'interleaved'")
    if any(t < 0 for t in stage_times):
        raise PartcError(f"stage times must be >= 0 s, got {list(stage_times)}")
    slowest = max(stage_times)
    fill_and_drain = sum(stage_times) - slowest
    return microbatches * slowest + fill_and_drain / virtual_stages


def bubble_fraction(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle time over useful time for balanced stages: ``(p-1) / (v·m)``."""
    _check_pipeline(stages, microbatches, virtual_stages)
    return (stages - 1) / (virtual_stages * microbatches)


def _check_pipeline(stages: int, microbatches: int, virtual_stages: int) -> None:
    if stages < 1:
        raise PartcError(f"a pipeline needs >= 1 stage, got {stages}")
    if microbatches < 1:
        raise PartcError(f"microbatches must be >= 1, got {microbatches}")
    if virtual_stages < 1:
        raise PartcError(f"virtual_stages must be >= 1, got {virtual_stages}")
