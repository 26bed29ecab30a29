"""``partc calibrate``: measure this machine and write the cluster JSON the planner reads.

Run it under torchrun on the real machine, one process per device::

    torchrun --nproc-per-node 8 -m partc.calibrate --out cluster.json
    torchrun --nproc-per-node 8 --no-python partc calibrate --out cluster.json
    # several nodes: the usual torchrun rendezvous (--nnodes, --rdzv-endpoint, ...)

Without torchrun (no ``RANK``/``WORLD_SIZE`` in the environment) it runs in one process,
measures the device only, and writes a cluster of one node of one device whose links are
placeholders (the preset's), which it says.

What it measures
----------------
* **Matmul FLOP/s per dtype** (GPU: bfloat16, float16, float32; CPU: float32, bfloat16)
  from timed square matmuls: a warm-up, then the median of several timed repeats. The
  size is the device's target (8192 on GPU, 1024 on CPU) unless one product would take
  longer than a time budget (CPUs without bf16 units run bf16 at ~1 GFLOP/s), in which
  case it shrinks. fp32 is timed with PyTorch's defaults: no TF32 unless the user turned
  it on, which is what the planner's fp32 numbers mean.
* **Memory bandwidth** from a large tensor copy: (bytes read + bytes written) / time.
* **Usable memory**: on GPU ``torch.cuda.get_device_properties().total_memory``; on CPU
  the host's physical RAM (``os.sysconf``) divided by the processes on this node.
* **Links** (alpha-beta): all-reduce, all-gather, reduce-scatter and a send/recv
  ping-pong, each over a sweep of message sizes, median over repeats with a barrier before
  each timing, the slowest rank's median taken (a collective where the backend lacks it,
  like gloo's reduce-scatter in older torch releases, is skipped and the output says so).
  ``alpha`` (latency) and ``beta``
  (seconds per byte) are fitted by least squares to ``t = a*alpha + b*S*beta`` with each
  collective's ring coefficients (all-reduce a=2(n-1), b=2(n-1)/n; all-gather and
  reduce-scatter a=n-1, b=(n-1)/n; point-to-point a=1, b=1; S is the full tensor's
  bytes), the same formulas the cost model prices collectives with, so the fitted link
  predicts what the planner will predict. Rows are weighted by 1/t, so the fit minimises
  *relative* error over sizes spanning four orders of magnitude. Each collective is also
  fitted on its own and its relative residual reported; the link written is the joint
  fit over all collectives whose own fit is not degenerate (a backend's non-ring
  implementation would otherwise drag the shared beta negative). ``alpha`` is clamped to >= 0 (beta refitted); a fit with
  beta <= 0 is degenerate and falls back to the largest message's bandwidth (said so).

  The intra-node link of each node is fitted on that node's local ranks (all nodes
  measure at once, each on its own group). The inter-node link is fitted on groups with
  one rank per node (local rank j of every node; all j at once, since every device
  crosses the network at once in data-parallel training). On a single node the
  inter-node link is not measured and is copied from the intra-node fit.

Why ``matmul_efficiency=1.0``
-----------------------------
Presets carry datasheet peaks and a guessed efficiency. A calibration measures what
large matmuls *achieve*, so it writes the measured FLOP/s as ``peak_flops`` with
``matmul_efficiency=1.0``: ``DeviceSpec.flops()`` (peak x efficiency) then returns
exactly the measured rate, and no guessed ratio is stacked on top of a measurement.

Rank 0 prints one line per measurement and a summary table, and writes the JSON
atomically (``Cluster.to_json``); every rank returns the same :class:`Cluster`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from partc.cluster import PRESETS, Cluster, DeviceSpec, Link, NodeSpec
from partc.errors import ClusterError, PartcError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


# -- settings ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    """Sizes and repeats for one device kind; ``--quick`` shrinks them."""

    matmul_size: int  # target square size
    matmul_budget_s: float  # most seconds one product may take (the size shrinks to fit)
    matmul_min_time_s: float  # one timed repeat runs products for at least this long
    copy_bytes: int  # bytes of the tensor copied for memory bandwidth
    message_sizes: tuple[int, ...]  # bytes, the collective sweep
    warmup: int
    repeats: int
    attention_tokens: int  # sequence length of the timed attention (batch x heads fill the device)
    attention_rows: int  # batch x heads of the timed attention


def _settings(cuda: bool, quick: bool) -> _Settings:
    if cuda:
        if quick:
            return _Settings(2048, 0.5, 0.01, 256 * MiB, _sweep(4 * KiB, 64 * MiB, 16), 2, 5, 1024, 64)
        return _Settings(8192, 2.0, 0.05, 1 * GiB, _sweep(4 * KiB, 64 * MiB, 4), 3, 10, 2048, 128)
    # CPU collectives are cheap (~0.1-10 ms) but noisy: gloo's threads share the cores with
    # the other ranks, and single timings jump by a scheduler time slice (~3 ms on a
    # 2-core VM). More repeats keep the median on the common case.
    if quick:
        return _Settings(512, 0.05, 0.005, 32 * MiB, (4 * KiB, 64 * KiB, 1 * MiB), 2, 7, 64, 2)
    return _Settings(1024, 0.25, 0.05, 256 * MiB, _sweep(4 * KiB, 4 * MiB, 4), 3, 21, 256, 8)


def _sweep(lo: int, hi: int, factor: int) -> tuple[int, ...]:
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= factor
    return tuple(sizes)


def _matmul_dtypes(cuda: bool) -> tuple[torch.dtype, ...]:
    return (torch.bfloat16, torch.float16, torch.float32) if cuda else (torch.float32, torch.bfloat16)


# -- output -----------------------------------------------------------------------------
class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[calibrate] {message}", flush=True)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


# -- timing -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], device: torch.device, iters: int = 1) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _median_time(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, min_time: float) -> float:
    """Median seconds per call: ``warmup`` calls, then ``repeats`` timings of enough
    back-to-back calls that each timing lasts ``min_time``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    single = _time_once(fn, device)
    iters = max(1, math.ceil(min_time / max(single, 1e-9)))
    return statistics.median(_time_once(fn, device, iters) for _ in range(repeats))


# -- device -----------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine() or 'unknown'})"


def _device_memory(device: torch.device, local_world_size: int) -> tuple[float, str | None]:
    """Bytes one process may use, and a note when it is a guess."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if total > 0:
            return float(total) / max(local_world_size, 1), None
    except (ValueError, OSError, AttributeError):
        pass
    fallback = PRESETS["cpu"][0].memory
    return fallback, f"cannot read the host's RAM (os.sysconf); assuming {fallback / GiB:.0f} GiB per process"


def _matmul_flops(dtype: torch.dtype, device: torch.device, s: _Settings) -> tuple[float, int]:
    """Achieved FLOP/s of square ``dtype`` matmuls, and the size used.

    The size is the target unless one product would overrun the time budget: probe at
    256, doubling while the next size surely fits (small products run below the large
    ones' rate, so the estimate errs long), then take the target or the largest size
    the last rate allows."""

    def operands(n: int):
        return torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)

    n = min(256, s.matmul_size)
    while True:
        a, b = operands(n)
        a @ b  # first call at this size: kernel selection, library loading
        _sync(device)
        rate = 2 * n**3 / max(_time_once(lambda: a @ b, device), 1e-9)
        if 2 * s.matmul_size**3 / rate <= s.matmul_budget_s:
            n = s.matmul_size
            break
        if n * 2 >= s.matmul_size or 2 * (2 * n) ** 3 / rate > s.matmul_budget_s:
            n = max(128, min(s.matmul_size, int((s.matmul_budget_s * rate / 2) ** (1 / 3)) // 64 * 64))
            break
        n *= 2
    a, b = operands(n)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _median_time(lambda: torch.matmul(a, b, out=out), device, warmup=s.warmup, repeats=s.repeats, min_time=s.matmul_min_time_s)
    return 2 * n**3 / seconds, n


def _memory_bandwidth(device: torch.device, s: _Settings) -> float:
    """Bytes/s of a large copy, counting bytes read and written."""
    numel = s.copy_bytes // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), device, warmup=s.warmup, repeats=s.repeats, min_time=s.matmul_min_time_s)
    return 2 * s.copy_bytes / seconds


ATTENTION_HEAD_DIMS = (64, 128)
KERNEL_OVERHEAD_OPS = 2000  # back-to-back tiny kernels per timing


def _kernel_overhead(device: torch.device, s: _Settings) -> float:
    """Seconds per eager kernel when the kernels themselves are tiny: one-element in-place
    adds issued back to back from Python, synchronised once at the end. That is the
    dispatch-and-launch floor under every kernel a training step runs eagerly."""
    x = torch.zeros(1, device=device)

    def burst() -> None:
        for _ in range(KERNEL_OVERHEAD_OPS):
            x.add_(1.0)

    for _ in range(s.warmup):
        burst()
    samples = []
    for _ in range(s.repeats):
        _sync(device)
        t0 = time.perf_counter()
        burst()
        _sync(device)
        samples.append((time.perf_counter() - t0) / KERNEL_OVERHEAD_OPS)
    return statistics.median(samples)


def attention_flops(batch_heads: int, tokens: int, head_dim: int) -> float:
    """FLOPs of one causal attention forward + backward as the annotate pass counts them:
    QK^T and PV over the causal half of the square (``4·BH·L²·E / 2``), backward 2.5x."""
    return 3.5 * 2 * batch_heads * tokens * tokens * head_dim


def _attention_efficiency(device: torch.device, s: _Settings, matmul_rates: dict[str, float]) -> dict[str, float]:
    """Fused causal attention (``scaled_dot_product_attention``, forward + backward) FLOP/s
    over the matmul rate of the same dtype, per head dimension: flash kernels run below the
    rate of a large matmul, the more so at small head dimensions."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = matmul_rates.get(str(dtype).removeprefix("torch."))
    if not matmul:
        return {}
    result = {}
    for head_dim in ATTENTION_HEAD_DIMS:
        shape = (s.attention_rows, 1, s.attention_tokens, head_dim)  # heads folded into the batch
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype)

        def step(q=q, k=k, v=v, grad=grad) -> None:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)

        seconds = _median_time(step, device, warmup=s.warmup, repeats=s.repeats, min_time=s.matmul_min_time_s)
        result[str(head_dim)] = attention_flops(s.attention_rows, s.attention_tokens, head_dim) / seconds / matmul
    return result


def _misaligned_matmul_efficiency(device: torch.device, s: _Settings, matmul_rates: dict[str, float]) -> float:
    """A linear layer's forward + backward FLOP/s when one dimension is not a multiple of 16
    bytes (``n x n`` inputs, ``n + 1`` outputs: a 50257-token LM head is such a layer) over
    the matmul rate of the same dtype, at most 1. GPUs fall back to slower kernels there."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = matmul_rates.get(str(dtype).removeprefix("torch."))
    if not matmul:
        return 1.0
    n = s.matmul_size // 2
    x = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(n + 1, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, n + 1, device=device, dtype=dtype)

    def step() -> None:
        torch.nn.functional.linear(x, weight).backward(grad)

    seconds = _median_time(step, device, warmup=s.warmup, repeats=s.repeats, min_time=s.matmul_min_time_s)
    return min(1.0, 3 * 2 * n * n * (n + 1) / seconds / matmul)


def _measure_device(device: torch.device, s: _Settings, local_world_size: int, log: _Log) -> dict[str, Any]:
    """This process's device: name, FLOP/s per dtype, memory bandwidth, memory."""
    name = _device_name(device)
    flops: dict[str, float] = {}
    for dtype in _matmul_dtypes(device.type == "cuda"):
        dname = str(dtype).removeprefix("torch.")
        try:
            rate, n = _matmul_flops(dtype, device, s)
        except RuntimeError as e:  # a dtype this device or build cannot multiply
            log(f"matmul {dname}: skipped ({str(e).splitlines()[0]})")
            continue
        flops[dname] = rate
        log(f"matmul {dname:9} {n}x{n}: {rate / 1e12:.3f} TFLOP/s (rank 0)")
    bandwidth = _memory_bandwidth(device, s)
    log(f"memory bandwidth copy {_fmt_bytes(s.copy_bytes)}: {bandwidth / 1e9:.1f} GB/s (rank 0)")
    overhead = _kernel_overhead(device, s)
    log(f"kernel overhead: {overhead * 1e6:.2f} us per eager kernel (rank 0)")
    attention = _attention_efficiency(device, s, flops)
    for head_dim, ratio in attention.items():
        log(f"attention head dim {head_dim:>3}, {s.attention_tokens} tokens: {ratio:.1%} of the matmul rate (rank 0)")
    misaligned = _misaligned_matmul_efficiency(device, s, flops)
    log(f"matmul with a dimension not a multiple of 16 bytes: {misaligned:.1%} of the matmul rate (rank 0)")
    memory, note = _device_memory(device, local_world_size)
    log(f"memory: {memory / GiB:.1f} GiB usable per process" + (f" ({note})" if note else ""))
    return {
        "name": name, "peak_flops": flops, "memory_bandwidth": bandwidth, "memory": memory, "notes": [note] if note else [],
        "kernel_overhead": overhead, "attention_efficiency": attention, "misaligned_matmul_efficiency": misaligned,
    }


def _median_device(records: Sequence[dict[str, Any]]) -> tuple[DeviceSpec, list[str]]:
    """One DeviceSpec from the records of a node's ranks: the median of each number."""
    notes: list[str] = []
    names = sorted({r["name"] for r in records})
    if len(names) > 1:
        notes.append(f"ranks of one node report different devices {names}; using {names[0]!r}")
    dtypes = sorted(set.intersection(*(set(r["peak_flops"]) for r in records)))
    if not dtypes:
        raise ClusterError("no matmul dtype could be measured on every rank of a node")
    flops = {d: statistics.median(r["peak_flops"][d] for r in records) for d in dtypes}
    for r in records:
        notes.extend(r.get("notes", []))
    device = DeviceSpec(
        name=names[0],
        peak_flops=flops,
        memory=statistics.median(r["memory"] for r in records),
        memory_bandwidth=statistics.median(r["memory_bandwidth"] for r in records),
        matmul_efficiency=1.0,
        kernel_overhead=statistics.median(r["kernel_overhead"] for r in records),
        misaligned_matmul_efficiency=statistics.median(r["misaligned_matmul_efficiency"] for r in records),
        attention_efficiency={
            d: statistics.median(r["attention_efficiency"][d] for r in records)
            for d in set.intersection(*(set(r["attention_efficiency"]) for r in records))
        },
    )
    return device, sorted(set(notes))


# -- alpha-beta fit ---------------------------------------------------------------------
def _coefficients(collective: str, n: int) -> tuple[float, float]:
    """Ring coefficients (a, b) of ``t = a*alpha + b*S*beta`` for ``n`` ranks."""
    if collective == "all_reduce":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(n - 1), (n - 1) / n
    if collective == "p2p":
        return 1.0, 1.0
    raise ValueError(f"unknown collective {collective!r}")


@dataclass(frozen=True)
class Fit:
    """A fitted alpha-beta link, with the fit's quality."""

    alpha: float  # seconds
    beta: float  # seconds per byte
    residual: float  # root-mean-square relative error of the fit over its points
    points: int
    note: str | None = None  # set when the fit was clamped or fell back
    degenerate: bool = False  # beta came from the largest message, not from the fit

    @property
    def bandwidth(self) -> float:
        return 1.0 / self.beta

    def link(self) -> Link:
        return Link(latency=self.alpha, bandwidth=self.bandwidth)


def _fit_alpha_beta(points: Sequence[tuple[float, float, float, float]]) -> Fit:
    """Least-squares alpha, beta from ``(a, b, size_bytes, seconds)`` points.

    Rows are weighted by 1/t (relative error). alpha is clamped to >= 0 (beta is then
    refitted through the origin); if beta is not positive the fit is degenerate and
    beta falls back to the largest message's ``t / (b*S)``."""
    pts = [(a, b, s, t) for a, b, s, t in points if a > 0 and b > 0 and s > 0 and t > 0 and math.isfinite(t)]
    if not pts:
        raise ClusterError("no usable timings to fit a link to (every timing was zero or not finite)")
    A = np.array([[a, b * s] for a, b, s, _ in pts], dtype=np.float64)
    t = np.array([p[3] for p in pts], dtype=np.float64)
    w = 1.0 / t
    note, degenerate = None, False
    sizes = {s for _, _, s, _ in pts}
    if len(sizes) >= 2:
        (alpha, beta), *_ = np.linalg.lstsq(A * w[:, None], t * w, rcond=None)
    else:
        alpha, beta = -1.0, -1.0  # one size cannot separate latency from bandwidth
    if beta > 0 and alpha < 0:
        x = A[:, 1] * w
        beta = float(np.dot(x, t * w) / np.dot(x, x))
        alpha = 0.0
        note = "alpha < 0 clamped to 0"
    if not (beta > 0 and math.isfinite(beta)):
        a, b, s, tl = max(pts, key=lambda p: (p[2], -p[3]))
        beta = tl / (b * s)
        small = min(pts, key=lambda p: p[2])
        alpha = max(0.0, (small[3] - small[1] * small[2] * beta) / small[0])
        note = "degenerate fit (beta <= 0 or one message size): bandwidth from the largest message"
        degenerate = True
    pred = A @ np.array([alpha, beta])
    residual = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return Fit(alpha=float(alpha), beta=float(beta), residual=residual, points=len(pts), note=note, degenerate=degenerate)


# -- collectives ------------------------------------------------------------------------
@dataclass
class _Timings:
    """Median seconds per (collective, size) that one rank saw on one link's group."""

    n: int  # group size
    times: dict[tuple[str, int], float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # collective -> why


def _all_gather_fn(dist, out: torch.Tensor, inp: torch.Tensor, group, n: int) -> Callable[[], Any]:
    for name in ("all_gather_single", "all_gather_into_tensor"):
        fn = getattr(dist, name, None)
        if fn is not None:
            return lambda fn=fn: fn(out, inp, group=group)
    chunks = list(out.chunk(n))
    return lambda: dist.all_gather(chunks, inp, group=group)


def _reduce_scatter_fn(dist, out: torch.Tensor, inp: torch.Tensor, group) -> Callable[[], Any]:
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        fn = getattr(dist, name, None)
        if fn is not None:
            return lambda fn=fn: fn(out, inp, group=group)
    raise RuntimeError("this torch.distributed has no reduce_scatter_tensor")


def _time_collectives(dist, group, ranks: Sequence[int], device: torch.device, s: _Settings) -> _Timings:
    """Time every collective over the message sweep on ``group`` (this rank is in it)."""
    import warnings

    n = len(ranks)
    me = ranks.index(dist.get_rank())
    result = _Timings(n=n)
    # Ping-pong pairs inside the group: (0, 1), (2, 3), ...; an odd last rank sits out.
    partner = me + 1 if me % 2 == 0 else me - 1
    partner = ranks[partner] if partner < n else None
    initiator = me % 2 == 0

    def timed(op: Callable[[], Any]) -> float:
        for _ in range(s.warmup):
            op()
        _sync(device)
        samples = []
        for _ in range(s.repeats):
            dist.barrier(group=group)
            _sync(device)
            samples.append(_time_once(op, device))
        return statistics.median(samples)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # *_into_tensor / *_tensor deprecations
        for collective in COLLECTIVES:
            for size in s.message_sizes:
                numel = max(n, size // 4 // n * n)  # float32, divisible by n
                nbytes = numel * 4
                full = torch.ones(numel, device=device)
                shard = torch.ones(numel // n, device=device)
                try:
                    if collective == "all_reduce":
                        op = lambda: dist.all_reduce(full, group=group)
                    elif collective == "all_gather":
                        op = _all_gather_fn(dist, full, shard, group, n)
                    elif collective == "reduce_scatter":
                        op = _reduce_scatter_fn(dist, shard, full, group)
                    else:
                        op = _ping_pong(dist, full, partner, initiator)
                    seconds = timed(op)
                except (RuntimeError, NotImplementedError) as e:
                    # Every rank of the group fails alike (same backend), so skipping
                    # keeps them in step.
                    result.skipped[collective] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    break
                if collective == "p2p":
                    if partner is None or not initiator:
                        continue  # only the initiator of a pair timed the round trip
                    seconds /= 2  # one way
                result.times[(collective, nbytes)] = seconds
    return result


def _ping_pong(dist, buf: torch.Tensor, partner: int | None, initiator: bool) -> Callable[[], Any]:
    if partner is None:
        return lambda: None
    if initiator:
        def op():
            dist.send(buf, partner)
            dist.recv(buf, partner)
    else:
        def op():
            dist.recv(buf, partner)
            dist.send(buf, partner)
    return op


@dataclass(frozen=True)
class _LinkResult:
    """A link's fit, each collective's own fit, and notes."""

    fit: Fit
    per_collective: dict[str, Fit]
    notes: tuple[str, ...] = ()


def _fit_link(records: Sequence[_Timings], label: str, log: _Log) -> _LinkResult:
    """Fit a link from the timings of every rank that measured it: per point, the
    slowest rank's median (a collective ends when its last rank does)."""
    n = records[0].n
    merged: dict[tuple[str, int], float] = {}
    for r in records:
        for key, seconds in r.times.items():
            merged[key] = max(merged.get(key, 0.0), seconds)
    notes = []
    skipped = {c: why for r in records for c, why in r.skipped.items()}
    for collective, why in sorted(skipped.items()):
        notes.append(f"{collective} skipped: {why}")
    points_by_collective: dict[str, list[tuple[float, float, float, float]]] = {}
    for (collective, nbytes), seconds in sorted(merged.items(), key=lambda kv: (COLLECTIVES.index(kv[0][0]), kv[0][1])):
        a, b = _coefficients(collective, n)
        points_by_collective.setdefault(collective, []).append((a, b, nbytes, seconds))
        log(f"{label} {collective:14} {_fmt_bytes(nbytes):>8}: {seconds * 1e6:10.1f} us  ({nbytes / seconds / 1e9:.2f} GB/s algorithmic)")
    if not points_by_collective:
        raise ClusterError(f"{label}: no collective could be timed ({'; '.join(notes) or 'no timings'})")
    per = {c: _fit_alpha_beta(p) for c, p in points_by_collective.items()}
    for c, f in per.items():
        log(f"{label} fit {c:14} alpha {f.alpha * 1e6:8.1f} us  bandwidth {f.bandwidth / 1e9:8.2f} GB/s  residual {f.residual:6.1%}" + (f"  [{f.note}]" if f.note else ""))
    # The link is the joint fit over the collectives that fit the model on their own; one
    # whose own fit is degenerate (a backend's non-ring implementation, e.g. a
    # size-independent cost) would drag the shared beta negative.
    usable = [c for c, f in per.items() if not f.degenerate] or list(per)
    if len(usable) < len(per):
        dropped = sorted(set(per) - set(usable))
        notes.append(f"{', '.join(dropped)} left out of the link fit: its own fit is degenerate")
    joint = _fit_alpha_beta([p for c in usable for p in points_by_collective[c]])
    log(f"{label} fit {'(all)':14} alpha {joint.alpha * 1e6:8.1f} us  bandwidth {joint.bandwidth / 1e9:8.2f} GB/s  residual {joint.residual:6.1%}" + (f"  [{joint.note}]" if joint.note else ""))
    return _LinkResult(fit=joint, per_collective=per, notes=tuple(notes))


# -- process group ----------------------------------------------------------------------
def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _check_out(out: str) -> str | None:
    """Why ``out`` cannot be written, or None."""
    path = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"--out {out!r} is a directory; give a file path such as {os.path.join(out, 'cluster.json')!r}"
    if not os.path.isdir(parent):
        return f"--out {out!r}: directory {parent!r} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK):
        return f"--out {out!r}: directory {parent!r} is not writable; choose another path"
    return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ClusterError(f"environment variable {name}={value!r} is not an integer; run under torchrun") from None


# -- the work ---------------------------------------------------------------------------
def calibrate(out: str, *, quick: bool = False) -> Cluster:
    """Measure this machine (every rank under torchrun; one process otherwise), write the
    cluster JSON to ``out`` on rank 0, and return the :class:`Cluster` (on every rank)."""
    import torch.distributed as dist

    out = os.fspath(out)
    cuda = torch.cuda.is_available()
    distributed = _under_torchrun() or (dist.is_available() and dist.is_initialized())
    if not distributed:
        problem = _check_out(out)
        if problem:
            raise ClusterError(problem)
        return _calibrate_single(out, cuda, quick)

    if not dist.is_available():
        raise ClusterError("torch.distributed is not available in this torch build; run without torchrun")
    local_rank = _env_int("LOCAL_RANK", 0)
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    owns_group = not dist.is_initialized()
    if owns_group:
        if cuda:  # binding the device lets barriers and subgroups use it without guessing
            # The ping-pong's send/recv on an eagerly initialised 2-rank group is serialised
            # with its other ops, which is what a timed ping-pong wants: mute the warning.
            os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.init_process_group(backend="gloo")
    try:
        return _calibrate_distributed(dist, out, cuda, quick)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _calibrate_single(out: str, cuda: bool, quick: bool) -> Cluster:
    log = _Log(True)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    s = _settings(cuda, quick)
    log(f"single process (not under torchrun) on {_device_name(device)}{' [quick]' if quick else ''}")
    record = _measure_device(device, s, 1, log)
    spec, notes = _median_device([record])
    intra, inter = _placeholder_links(cuda)
    notes.append("not under torchrun: links not measured, preset placeholders written (run under torchrun to measure them)")
    cluster = Cluster(nodes=(NodeSpec(spec, 1, intra),), inter_link=inter, name=f"calibrated 1x1 {spec.name} (links not measured)")
    _write(cluster, out)
    _summary(cluster, {}, None, notes, backend="none", out=out)
    return cluster


def _placeholder_links(cuda: bool) -> tuple[Link, Link]:
    _, intra, inter = PRESETS["h100" if cuda else "cpu"]
    return intra, inter


def _calibrate_distributed(dist, out: str, cuda: bool, quick: bool) -> Cluster:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    backend = str(dist.get_backend())
    log = _Log(rank == 0)

    # Rank 0 checks --out before minutes of measuring; every rank learns the answer.
    verdict = [_check_out(out) if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ClusterError(verdict[0])
    if local_world < 1 or world % local_world:
        raise ClusterError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}: calibrate needs the same "
            "number of processes on every node (torchrun --nproc-per-node N on each)"
        )
    nnodes = world // local_world
    node, local = divmod(rank, local_world)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    s = _settings(cuda, quick)
    log(f"{nnodes} node(s) x {local_world} process(es), backend {backend}, device {_device_name(device)}{' [quick]' if quick else ''}")

    # Device: every rank measures its own; rank 0 takes each node's median.
    record = _measure_device(device, s, local_world, log)
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)

    # Groups. Every rank creates every group, in the same order.
    intra_groups = [list(range(k * local_world, (k + 1) * local_world)) for k in range(nnodes)]
    inter_groups = [list(range(j, world, local_world)) for j in range(local_world)] if nnodes > 1 else []
    intra_handles = [dist.new_group(g) for g in intra_groups]
    inter_handles = [dist.new_group(g) for g in inter_groups]

    notes: list[str] = []
    intra_t: _Timings | None = None
    if local_world > 1:
        log(f"intra-node links: {nnodes} group(s) of {local_world} local ranks, sizes {_fmt_bytes(s.message_sizes[0])}..{_fmt_bytes(s.message_sizes[-1])}")
        intra_t = _time_collectives(dist, intra_handles[node], intra_groups[node], device, s)
    dist.barrier()
    inter_t: _Timings | None = None
    if nnodes > 1:
        log(f"inter-node links: {local_world} group(s) of one rank per node ({nnodes} ranks)")
        inter_t = _time_collectives(dist, inter_handles[local], inter_groups[local], device, s)
    timings: list[Any] = [None] * world
    dist.all_gather_object(timings, (intra_t, inter_t))

    # Every rank builds the same cluster from the gathered data (rank 0 prints and writes).
    nodes, link_results = [], {}
    placeholder_intra, placeholder_inter = _placeholder_links(cuda)
    for k, ranks in enumerate(intra_groups):
        spec, dev_notes = _median_device([records[r] for r in ranks])
        notes.extend(f"node {k}: {n}" for n in dev_notes)
        if local_world > 1:
            res = _fit_link([timings[r][0] for r in ranks], f"node {k} intra", log)
            link_results[f"intra-node (node {k})"] = res
            notes.extend(f"node {k} intra: {n}" for n in res.notes)
            intra_link = res.fit.link()
        else:
            intra_link = placeholder_intra
            notes.append(f"node {k}: one process per node, intra-node link not measured (preset placeholder written)")
        nodes.append(NodeSpec(spec, local_world, intra_link))
    if nnodes > 1:
        res = _fit_link([timings[r][1] for r in range(world)], "inter", log)
        link_results["inter-node"] = res
        notes.extend(f"inter: {n}" for n in res.notes)
        inter_link = res.fit.link()
    elif local_world > 1:
        inter_link = nodes[0].intra_link
        notes.append("single node: inter-node link not measured, copied from intra-node")
    else:
        inter_link = placeholder_inter
        notes.append("world size 1: links not measured, preset placeholders written")
    names = sorted({n.device.name for n in nodes})
    cluster = Cluster(nodes=tuple(nodes), inter_link=inter_link, name=f"calibrated {nnodes}x{local_world} {' + '.join(names)} ({backend})")

    error = [None]
    if rank == 0:
        try:
            _write(cluster, out)
        except PartcError as e:
            error = [str(e)]
        else:
            _summary(cluster, link_results, nnodes, notes, backend=backend, out=out)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ClusterError(error[0])
    return cluster


def _write(cluster: Cluster, out: str) -> None:
    try:
        cluster.to_json(out)
    except OSError as e:
        raise ClusterError(f"cannot write cluster file {out!r}: {e.strerror or e}") from e


def _summary(cluster: Cluster, links: dict[str, _LinkResult], nnodes: int | None, notes: list[str], *, backend: str, out: str) -> None:
    lines = [f"partc calibrate: {cluster.describe()}, backend {backend}", ""]
    dtypes = sorted({d for n in cluster.nodes for d in n.device.peak_flops})
    header = f"{'device':24}" + "".join(f"{d + ' TFLOP/s':>18}" for d in dtypes) + f"{'mem GB/s':>11}{'memory GiB':>12}"
    lines += [header, "-" * len(header)]
    for k, node in enumerate(cluster.nodes):
        dev = node.device
        row = f"{f'node {k}: ' + dev.name:24.24}"
        row += "".join(f"{dev.peak_flops[d] / 1e12:>18.3f}" if d in dev.peak_flops else f"{'-':>18}" for d in dtypes)
        row += f"{dev.memory_bandwidth / 1e9:>11.1f}{dev.memory / GiB:>12.1f}"
        lines.append(row)
    lines.append("")
    header = f"{'link':24}{'alpha us':>10}{'GB/s':>10}{'residual':>10}  note"
    lines += [header, "-" * len(header)]
    for label, res in links.items():
        f = res.fit
        lines.append(f"{label:24}{f.alpha * 1e6:>10.1f}{f.bandwidth / 1e9:>10.2f}{f.residual:>10.1%}  {f.note or 'joint fit'}")
        for c, pf in res.per_collective.items():
            lines.append(f"{'  ' + c:24}{pf.alpha * 1e6:>10.1f}{pf.bandwidth / 1e9:>10.2f}{pf.residual:>10.1%}  {pf.note or ''}".rstrip())
    if not any(label.startswith("intra") for label in links):
        il = cluster.nodes[0].intra_link
        lines.append(f"{'intra-node':24}{il.latency * 1e6:>10.1f}{il.bandwidth / 1e9:>10.2f}{'-':>10}  not measured (placeholder)")
    if "inter-node" not in links:
        il = cluster.inter_link
        why = "copied from intra-node" if nnodes == 1 and links else "not measured (placeholder)"
        lines.append(f"{'inter-node':24}{il.latency * 1e6:>10.1f}{il.bandwidth / 1e9:>10.2f}{'-':>10}  {why}")
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    lines += ["", f"wrote {out}"]
    print("\n".join(lines), flush=True)


# -- command line -----------------------------------------------------------------------
def build_parser(prog: str = "partc calibrate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Measure matmul FLOP/s, memory bandwidth and collective alpha/beta on this machine "
        "and write a cluster JSON for the planner. Run under torchrun, one process per device: "
        "torchrun --nproc-per-node 8 -m partc.calibrate --out cluster.json",
    )
    parser.add_argument("--out", default="cluster.json", help="where to write the cluster JSON (default: cluster.json)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (tests, smoke runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        calibrate(args.out, quick=args.quick)
    except PartcError as e:
        print(f"partc calibrate: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
