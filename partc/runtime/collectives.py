"""Tensor-parallel collectives as autograd functions: what partc's generated code calls.

Every function turns one layout of a tensor over the tensor-parallel group into another
(the layouts of :mod:`partc.passes.layouts`: ``S(d)`` a 1/tp slice of dim d, ``R`` the
whole tensor, ``P`` a whole-shaped partial sum) and has the adjoint collective as its
backward, so that gradients stay consistent without any hook outside the graph::

    function                                 forward                 backward
    copy_to_tp(x, tp)                        identity (R -> R)       all-reduce      Megatron's f
    reduce_from_tp(x, tp)                    all-reduce (P -> R)     identity        Megatron's g
    gather_from_tp(x, dim, tp)               all-gather (S -> R)     slice
    gather_from_sp(x, dim, tp)               all-gather (S -> R)     reduce-scatter  sequence parallel
    scatter_to_tp(x, dim, tp)                slice (R -> S)          all-gather
    reduce_scatter_to_tp(x, dim, tp)         reduce-scatter (P -> S) all-gather
    all_to_all_tp(x, src, dst, tp)           all-to-all (S -> S)     all-to-all back
    broadcast_from_tp(x, owner, tp)          broadcast (O(owner) -> R) identity (the owner
                                             holds the whole gradient already)
    to_partial(x, tp)                        R -> P: rank 0 keeps x, the others hold zeros;
                                             the gradient passes through unchanged
    pad_to_partial(x, dim, tp)               S -> P: x placed in zeros of the whole shape;
                                             backward slices
    keep_shard_for_backward(out, tp, (full, x, dim))
                                             after an operator that saved the gathered
                                             ``full``: keep only the shard ``x`` and
                                             all-gather it again in backward (Megatron-SP)
    vocab_parallel_embedding(idx, w, tp)     masked lookup in this rank's rows (-> P), local
    vocab_parallel_embedding_bag(idx, w, tp) the same for fixed-size bags, pooled (-> P)
    table_wise_embedding(idx, w, tp, owner)  the whole table on rank ``owner``: its lookup
    table_wise_embedding_bag(...)            there, zeros elsewhere (-> O(owner)), local
    vocab_parallel_cross_entropy(z, t, tp)   on class-sharded logits: all-reduce of the row
                                             max, one all-reduce of (sum of exp, target
                                             logit); backward is local (softmax - one-hot)
    divide_by_kept_targets(loss, t, tp)      torch's "mean" of a batch-parallel class loss:
                                             this rank's summed loss over the all-reduced
                                             count (or class-weight sum) of kept targets
    divide_by_global_normaliser(loss, n)     a microbatch's summed loss over the whole
                                             global batch's normaliser (a buffer, no
                                             communication)

``blocks=k`` (fused projections such as GPT's qkv) means the sharded dim holds k equal
blocks, each sliced over the ranks on its own: rank r holds its slice of every block.

The group argument ``tp`` is a :class:`TensorParallelGroup`: this rank's place in the
group, the process group it communicates on (bound late: a ``ProcessGroup``, a named
``DeviceMesh`` dimension, or a :class:`ThreadedGroup` that runs every rank as a thread
of one process, for tests), and a :class:`CollectiveCounter` of the collectives run, by
phase and kind, in the format of ``ShardingPlan.collectives_per_step()``. A bare
``ProcessGroup`` is accepted too (then nothing is counted).

Collectives use the plain ``torch.distributed`` calls that gloo and NCCL both run on
torch 2.5 .. 2.13 (all-reduce on a copy, all-gather into a list); a backend without
reduce-scatter or all-to-all gets the same result from an all-reduce or an all-gather
and a slice (counted as the collective the plan asked for). On fake or meta tensors
nothing is communicated: every collective returns a tensor of the right shape, so the
generated code can be shape-checked without a process group.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from partc.errors import ErrorContext, PartcError, PlanMismatchError

__all__ = [
    "CollectiveCounter",
    "TensorParallelGroup",
    "ThreadedGroup",
    "run_threaded",
    "copy_to_tp",
    "reduce_from_tp",
    "gather_from_tp",
    "gather_from_sp",
    "scatter_to_tp",
    "reduce_scatter_to_tp",
    "all_to_all_tp",
    "broadcast_from_tp",
    "to_partial",
    "pad_to_partial",
    "keep_shard_for_backward",
    "vocab_parallel_embedding",
    "vocab_parallel_cross_entropy",
    "divide_by_kept_targets",
    "divide_by_global_normaliser",
    "kept_target_normaliser",
    "vocab_parallel_embedding_bag",
    "table_wise_embedding",
    "table_wise_embedding_bag",
    "shard_of",
    "global_size",
    "GENERATED_CODE_FUNCTIONS",
]

PHASES = ("forward", "backward")


# -- counting -------------------------------------------------------------------------------
class CollectiveCounter:
    """How many collectives ran, by phase ("forward", "backward") and kind ("all_reduce",
    "all_gather", "reduce_scatter", "all_to_all"). Thread-safe; one per group holder."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = {phase: Counter() for phase in PHASES}

    def record(self, kind: str, phase: str) -> None:
        with self._lock:
            self._counts[phase][kind] += 1

    def per_step(self) -> dict[str, dict[str, int]]:
        """The counts since the last reset, shaped like ``ShardingPlan.collectives_per_step()``."""
        with self._lock:
            return {phase: dict(sorted(c.items())) for phase, c in self._counts.items()}

    def reset(self) -> None:
        with self._lock:
            for c in self._counts.values():
                c.clear()

    def __repr__(self) -> str:
        return f"CollectiveCounter({self.per_step()})"


# -- slicing helpers ------------------------------------------------------------------------
def shard_of(x: torch.Tensor, dim: int, rank: int, size: int, blocks: int = 1) -> torch.Tensor:
    """Rank ``rank``'s piece of the whole ``x`` sharded on ``dim`` over ``size`` ranks (a view
    when ``blocks == 1``); with ``blocks > 1`` its slice of each block, concatenated."""
    if blocks == 1:
        step = x.size(dim) // size
        return x.narrow(dim, rank * step, step)
    return torch.cat([b.narrow(dim, rank * (b.size(dim) // size), b.size(dim) // size) for b in x.chunk(blocks, dim)], dim)


def _assemble(pieces: Sequence[torch.Tensor], dim: int, blocks: int = 1) -> torch.Tensor:
    """The whole tensor from every rank's piece (the inverse of :func:`shard_of`)."""
    if blocks == 1:
        return torch.cat(list(pieces), dim)
    split = [p.chunk(blocks, dim) for p in pieces]
    return torch.cat([split[r][b] for b in range(blocks) for r in range(len(pieces))], dim)


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) or x.device.type == "meta"


# -- backends -------------------------------------------------------------------------------
class _TorchBackend:
    """torch.distributed on one process group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.native_reduce_scatter = True
        self.native_all_to_all = True

    def all_reduce(self, x: torch.Tensor, rank: int, op: str) -> torch.Tensor:
        y = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return y

    def all_gather(self, x: torch.Tensor, rank: int) -> list[torch.Tensor]:
        x = x.detach().contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x, group=self.group)
        return parts

    def reduce_scatter(self, pieces: list[torch.Tensor], rank: int) -> torch.Tensor:
        pieces = [p.detach().contiguous() for p in pieces]
        if self.native_reduce_scatter:
            out = torch.empty_like(pieces[rank])
            try:
                dist.reduce_scatter(out, pieces, group=self.group)
                return out
            except (RuntimeError, NotImplementedError) as e:
                if not _unsupported(e):
                    raise
                self.native_reduce_scatter = False  # older gloo: every rank fails the same way, before any send
        total = torch.cat([p.flatten() for p in pieces])
        dist.all_reduce(total, group=self.group)
        offset = sum(p.numel() for p in pieces[:rank])
        return total[offset : offset + pieces[rank].numel()].view_as(pieces[rank]).clone()

    def broadcast(self, x: torch.Tensor, rank: int, src: int) -> torch.Tensor:
        y = x.detach().clone(memory_format=torch.contiguous_format)
        dist.broadcast(y, src=dist.get_global_rank(self.group, src) if self.group is not None else src, group=self.group)
        return y

    def all_to_all(self, pieces: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
        pieces = [p.detach().contiguous() for p in pieces]
        if self.native_all_to_all:
            received = [torch.empty_like(p) for p in pieces]
            try:
                dist.all_to_all(received, pieces, group=self.group)
                return received
            except (RuntimeError, NotImplementedError) as e:
                if not _unsupported(e):
                    raise
                self.native_all_to_all = False
        # every rank's pieces, then keep the ones addressed to this rank
        flat = torch.cat([p.flatten() for p in pieces])
        everyone = [torch.empty_like(flat) for _ in pieces]
        dist.all_gather(everyone, flat, group=self.group)
        offset = sum(p.numel() for p in pieces[:rank])
        return [e[offset : offset + pieces[rank].numel()].view_as(pieces[rank]) for e in everyone]


def _unsupported(error: Exception) -> bool:
    """A backend that lacks the collective (not a failure of one that has it)."""
    text = str(error).lower()
    return isinstance(error, NotImplementedError) or "not support" in text or "unsupported" in text or "not implemented" in text


class _ShapeOnlyBackend:
    """Fake or meta tensors: no communication, every rank is assumed to hold what this one does."""

    def __init__(self, size: int):
        self.size = size

    def all_reduce(self, x, rank, op):
        return x.clone()

    def all_gather(self, x, rank):
        return [x] * self.size

    def reduce_scatter(self, pieces, rank):
        return pieces[rank].clone()

    def all_to_all(self, pieces, rank):
        return [pieces[rank]] * self.size

    def broadcast(self, x, rank, src):
        return x.clone()


class ThreadedGroup:
    """A tensor-parallel group whose ranks are threads of this process (tests, debugging).

    Every rank's module is bound to the same ``ThreadedGroup``; :func:`run_threaded` runs
    one function per rank, each in its own thread. A collective waits at a barrier until
    every rank has contributed, like a real one; sums run in rank order."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self._slots: list[Any] = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)

    def abort(self) -> None:
        """Release every waiting rank (with an error): one rank failed."""
        self._barrier.abort()

    def _exchange(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._barrier.wait()
        everyone = list(self._slots)
        self._barrier.wait()  # nobody writes the next collective's value before all have read
        return everyone

    def all_reduce(self, x, rank, op):
        parts = self._exchange(rank, x.detach())
        total = parts[0].clone()
        for p in parts[1:]:
            total = torch.maximum(total, p) if op == "max" else total + p
        return total

    def all_gather(self, x, rank):
        return [p.clone() for p in self._exchange(rank, x.detach())]

    def reduce_scatter(self, pieces, rank):
        everyone = self._exchange(rank, [p.detach() for p in pieces])
        total = everyone[0][rank].clone()
        for sent in everyone[1:]:
            total = total + sent[rank]
        return total

    def all_to_all(self, pieces, rank):
        everyone = self._exchange(rank, [p.detach() for p in pieces])
        return [sent[rank].clone() for sent in everyone]

    def broadcast(self, x, rank, src):
        return self._exchange(rank, x.detach())[src].clone()


def run_threaded(fn, size: int, group: ThreadedGroup | None = None) -> list[Any]:
    """Run ``fn(rank)`` for every rank of a :class:`ThreadedGroup`, each in a thread; return
    the results in rank order, or re-raise the first failure (after releasing the others)."""
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def main(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = e
            if group is not None:
                group.abort()

    threads = [threading.Thread(target=main, args=(r,), name=f"tp-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # report the root cause, not the BrokenBarrierError of the ranks it released
    failures = [e for e in errors if e is not None]
    for e in failures:
        if not isinstance(e, threading.BrokenBarrierError):
            raise e
    if failures:
        raise failures[0]
    return results


# -- the group a generated module runs on ------------------------------------------------------
class TensorParallelGroup(nn.Module):
    """This rank's place in a tensor-parallel group, the process group it talks on, and the
    counter of the collectives it ran. Generated modules hold one as ``self.tp_group``.

    rank, size: this rank's index in the group and the group's size (the plan's ``tp``).
    name: the DeviceMesh dimension to take the process group from (``"tp"``).
    group: a ``ProcessGroup``, a ``DeviceMesh`` with a dimension called ``name``, or a
        :class:`ThreadedGroup`; None binds late (:meth:`bind`), and an unbound group whose
        size is the whole world uses the default process group.
    """

    def __init__(self, rank: int, size: int, *, name: str = "tp", group: Any = None, counter: CollectiveCounter | None = None):
        super().__init__()
        if not 0 <= rank < size:
            raise PartcError(f"tensor-parallel rank {rank} is outside a group of {size}")
        self.rank, self.size, self.name = rank, size, name
        self.counter = counter if counter is not None else CollectiveCounter()
        self._group: Any = None
        self._backend: Any = None
        if group is not None:
            self.bind(group)

    def bind(self, group: Any) -> "TensorParallelGroup":
        """Communicate on ``group`` (ProcessGroup, DeviceMesh or ThreadedGroup) from now on."""
        if isinstance(group, ThreadedGroup):
            if group.size != self.size:
                raise PlanMismatchError(f"a ThreadedGroup of {group.size} ranks cannot run a tensor-parallel group of {self.size}")
            backend = group
        else:
            pg = group
            if hasattr(group, "get_group") and not isinstance(group, dist.ProcessGroup):  # a DeviceMesh
                pg = group.get_group(self.name) if group.mesh_dim_names else group.get_group()
            size, rank = dist.get_world_size(pg), dist.get_rank(pg)
            if size != self.size or rank != self.rank:
                raise PlanMismatchError(
                    f"the module was generated for tensor-parallel rank {self.rank} of {self.size}, but the process group "
                    f"makes this process rank {rank} of {size}",
                    ErrorContext(pass_name="runtime", fix="generate the module with rank=<rank in the tp group> and tp=<group size>"),
                )
            backend = _TorchBackend(pg)
        self._group, self._backend = group, backend
        return self

    @property
    def process_group(self) -> Any:
        self._resolve()
        return self._group

    def _resolve(self) -> Any:
        if self._backend is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() == self.size:
                self.bind(dist.group.WORLD)
            else:
                raise PartcError(
                    f"this tensor-parallel module (rank {self.rank} of {self.size}) has no process group",
                    ErrorContext(
                        pass_name="runtime",
                        fix="call module.tp_group.bind(group) with the tensor-parallel ProcessGroup or DeviceMesh "
                        f"(dimension {self.name!r}) before the first forward",
                    ),
                )
        return self._backend

    def extra_repr(self) -> str:
        bound = type(self._group).__name__ if self._group is not None else "unbound"
        return f"rank={self.rank}, size={self.size}, name={self.name!r}, group={bound}"

    def __deepcopy__(self, memo):
        # process groups cannot be copied; a copy shares the group and counts on its own
        clone = TensorParallelGroup(self.rank, self.size, name=self.name)
        clone._group, clone._backend = self._group, self._backend
        return clone

    # -- primitives: each counts one collective ---------------------------------------------------
    def _backend_for(self, x: torch.Tensor, kind: str, phase: str):
        if _is_fake(x):
            return _ShapeOnlyBackend(self.size)  # shape propagation: nothing runs, nothing is counted
        backend = self._resolve()
        self.counter.record(kind, phase)
        return backend

    def all_reduce(self, x: torch.Tensor, *, phase: str, op: str = "sum") -> torch.Tensor:
        return self._backend_for(x, "all_reduce", phase).all_reduce(x, self.rank, op)

    def all_gather(self, x: torch.Tensor, dim: int, *, phase: str, blocks: int = 1) -> torch.Tensor:
        return _assemble(self._backend_for(x, "all_gather", phase).all_gather(x, self.rank), dim, blocks)

    def reduce_scatter(self, x: torch.Tensor, dim: int, *, phase: str, blocks: int = 1) -> torch.Tensor:
        pieces = [shard_of(x, dim, r, self.size, blocks) for r in range(self.size)]
        return self._backend_for(x, "reduce_scatter", phase).reduce_scatter(pieces, self.rank)

    def all_to_all(self, x: torch.Tensor, src_dim: int, dst_dim: int, *, phase: str, src_blocks: int = 1, dst_blocks: int = 1) -> torch.Tensor:
        """S(src_dim) -> S(dst_dim): send rank j its slice of dst_dim, assemble src_dim."""
        pieces = [shard_of(x, dst_dim, r, self.size, dst_blocks) for r in range(self.size)]
        return _assemble(self._backend_for(x, "all_to_all", phase).all_to_all(pieces, self.rank), src_dim, src_blocks)

    def broadcast(self, x: torch.Tensor, src: int, *, phase: str) -> torch.Tensor:
        """Every rank gets rank ``src``'s ``x`` (the others pass a tensor of the same shape)."""
        return self._backend_for(x, "broadcast", phase).broadcast(x, self.rank, src)

    def shard(self, x: torch.Tensor, dim: int, blocks: int = 1) -> torch.Tensor:
        """This rank's piece of the whole ``x`` (a copy)."""
        return shard_of(x, dim, self.rank, self.size, blocks).clone()

    def place(self, x: torch.Tensor, dim: int, blocks: int = 1) -> torch.Tensor:
        """Zeros of the whole shape with this rank's piece ``x`` in its place."""
        shape = list(x.shape)
        shape[dim] *= self.size
        full = x.new_zeros(shape)
        for whole, mine in zip(full.chunk(blocks, dim), x.chunk(blocks, dim)):
            shard_of(whole, dim, self.rank, self.size).copy_(mine)
        return full


def _as_group(group: Any) -> TensorParallelGroup:
    if isinstance(group, TensorParallelGroup):
        return group
    if isinstance(group, dist.ProcessGroup):
        return TensorParallelGroup(dist.get_rank(group), dist.get_world_size(group), group=group)
    raise TypeError(f"expected a TensorParallelGroup or a ProcessGroup, got {type(group).__name__}")


# -- the conversions ----------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce(grad, phase="backward"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return tp.all_reduce(x, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, blocks, reduce_grad):
        ctx.dim, ctx.tp, ctx.blocks, ctx.reduce_grad = dim, tp, blocks, reduce_grad
        return tp.all_gather(x, dim, phase="forward", blocks=blocks)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            out = ctx.tp.reduce_scatter(grad, ctx.dim, phase="backward", blocks=ctx.blocks)
        else:
            out = ctx.tp.shard(grad, ctx.dim, ctx.blocks)
        return out, None, None, None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, blocks):
        ctx.dim, ctx.tp, ctx.blocks = dim, tp, blocks
        return tp.shard(x, dim, blocks)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_gather(grad, ctx.dim, phase="backward", blocks=ctx.blocks), None, None, None


class _ReduceScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, blocks):
        ctx.dim, ctx.tp, ctx.blocks = dim, tp, blocks
        return tp.reduce_scatter(x, dim, phase="forward", blocks=blocks)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_gather(grad, ctx.dim, phase="backward", blocks=ctx.blocks), None, None, None


class _AllToAllTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src_dim, dst_dim, tp, src_blocks, dst_blocks):
        ctx.args = (src_dim, dst_dim, tp, src_blocks, dst_blocks)
        return tp.all_to_all(x, src_dim, dst_dim, phase="forward", src_blocks=src_blocks, dst_blocks=dst_blocks)

    @staticmethod
    def backward(ctx, grad):
        src_dim, dst_dim, tp, src_blocks, dst_blocks = ctx.args
        back = tp.all_to_all(grad, dst_dim, src_dim, phase="backward", src_blocks=dst_blocks, dst_blocks=src_blocks)
        return back, None, None, None, None, None


class _BroadcastFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner, tp):
        return tp.broadcast(x, owner, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return x.clone() if tp.rank == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _PadToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tp, blocks):
        ctx.dim, ctx.tp, ctx.blocks = dim, tp, blocks
        return tp.place(x, dim, blocks)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.shard(grad, ctx.dim, ctx.blocks), None, None, None


def copy_to_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """R -> R into a sharded computation. Forward: identity. Backward: all-reduce (the
    consumers' partial gradients sum to the whole). Megatron's ``f``."""
    return _CopyToTP.apply(x, _as_group(tp))


def reduce_from_tp(x: torch.Tensor, tp) -> torch.Tensor:
    """P -> R. Forward: all-reduce (sum). Backward: identity (the gradient is replicated).
    Megatron's ``g``."""
    return _ReduceFromTP.apply(x, _as_group(tp))


def gather_from_tp(x: torch.Tensor, dim: int, tp, *, blocks: int = 1) -> torch.Tensor:
    """S(dim) -> R. Forward: all-gather along ``dim``. Backward: this rank's slice of the
    (replicated) gradient."""
    return _GatherFromTP.apply(x, dim, _as_group(tp), blocks, False)


def gather_from_sp(x: torch.Tensor, dim: int, tp, *, blocks: int = 1) -> torch.Tensor:
    """S(dim) -> R before a sharded computation (sequence parallelism). Forward: all-gather
    along ``dim``. Backward: reduce-scatter (the consumers' gradients are partial sums)."""
    return _GatherFromTP.apply(x, dim, _as_group(tp), blocks, True)


def scatter_to_tp(x: torch.Tensor, dim: int, tp, *, blocks: int = 1) -> torch.Tensor:
    """R -> S(dim). Forward: keep this rank's slice (local). Backward: all-gather."""
    return _ScatterToTP.apply(x, dim, _as_group(tp), blocks)


def reduce_scatter_to_tp(x: torch.Tensor, dim: int, tp, *, blocks: int = 1) -> torch.Tensor:
    """P -> S(dim). Forward: reduce-scatter along ``dim``. Backward: all-gather."""
    return _ReduceScatterToTP.apply(x, dim, _as_group(tp), blocks)


def all_to_all_tp(x: torch.Tensor, src_dim: int, dst_dim: int, tp, *, src_blocks: int = 1, dst_blocks: int = 1) -> torch.Tensor:
    """S(src_dim) -> S(dst_dim). Forward: all-to-all. Backward: the all-to-all back."""
    return _AllToAllTP.apply(x, src_dim, dst_dim, _as_group(tp), src_blocks, dst_blocks)


def broadcast_from_tp(x: torch.Tensor, owner: int, tp) -> torch.Tensor:
    """O(owner) -> R. Forward: broadcast from tensor-parallel rank ``owner`` (the others
    pass zeros of the shape). Backward: identity (the gradient is replicated, so the owner
    holds all of it; what the other ranks return goes nowhere)."""
    return _BroadcastFromTP.apply(x, owner, _as_group(tp))


def to_partial(x: torch.Tensor, tp) -> torch.Tensor:
    """R -> P (local). Forward: rank 0 keeps ``x``, the other ranks hold zeros, so the sum
    over ranks is ``x`` once (a row-parallel linear's bias). Backward: identity."""
    return _ToPartial.apply(x, _as_group(tp))


def pad_to_partial(x: torch.Tensor, dim: int, tp, *, blocks: int = 1) -> torch.Tensor:
    """S(dim) -> P (local). Forward: this rank's slice placed in zeros of the whole shape.
    Backward: this rank's slice of the (replicated) gradient."""
    return _PadToPartial.apply(x, dim, _as_group(tp), blocks)


# -- keeping only the shard of a gathered input (Megatron's sequence parallelism) ---------------------
class _Regathered:
    """One gathered value whose saved copies were dropped: gathered again on first unpack,
    kept until every saved copy has been unpacked."""

    def __init__(self, shard: torch.Tensor, dim: int, tp: TensorParallelGroup, blocks: int):
        self.shard, self.dim, self.tp, self.blocks = shard, dim, tp, blocks
        self.pending = 0
        self.full: torch.Tensor | None = None

    def unpack(self, geometry: tuple) -> torch.Tensor:
        if self.full is None:
            self.full = self.tp.all_gather(self.shard.detach(), self.dim, phase="backward", blocks=self.blocks)
        size, stride, offset = geometry
        view = self.full.as_strided(size, stride, offset)
        self.pending -= 1
        if self.pending <= 0:
            self.full = None
        return view


def keep_shard_for_backward(output: Any, tp, *gathered: tuple, inputs: Sequence[Any] = ()) -> None:
    """After an operator that saved all-gathered inputs for its backward: replace those
    saved copies by the shards they were gathered from, and all-gather each again when the
    backward needs it (one all-gather in backward per gathered value, however many
    operators and copies saved it). Megatron's sequence parallelism does this.

    ``gathered``: one ``(gathered, shard, dim)`` or ``(gathered, shard, dim, blocks)`` per
    gathered input. ``output`` is what the operator returned and ``inputs`` its tensor
    inputs: the autograd nodes between them are the operator's, and every tensor they saved
    that shares a gathered input's storage is re-packed (``SavedTensor.register_hooks``),
    so the gathered activation is freed once the forward no longer reads it."""
    tp = _as_group(tp)
    if not torch.is_grad_enabled() or not gathered or _is_fake(gathered[0][0]):
        return
    sources: dict[int, _Regathered] = {}
    for spec in gathered:
        full, shard, dim = spec[:3]
        source = getattr(full, "_partc_regathered", None)
        if source is None:  # one source per gathered value, shared by every operator that saved it
            source = full._partc_regathered = _Regathered(shard, dim, tp, spec[3] if len(spec) > 3 else 1)
        sources[full.untyped_storage().data_ptr()] = source

    stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    frontier = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen: set = set()
    while frontier:
        node = frontier.pop()
        if node is None or node in seen or node in stop or type(node).__name__ == "AccumulateGrad":
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_raw_saved_"):
                continue
            raw = getattr(node, attr)
            saved = getattr(node, "_saved_" + attr[len("_raw_saved_") :], None)
            raws = raw if isinstance(raw, (tuple, list)) else (raw,)
            values = saved if isinstance(saved, (tuple, list)) else (saved,)
            for r, value in zip(raws, values):
                source = sources.get(value.untyped_storage().data_ptr()) if isinstance(value, torch.Tensor) else None
                if source is not None:
                    r.register_hooks(_packer(source), source.unpack)
        frontier.extend(next_node for next_node, _ in node.next_functions)


def _packer(source: _Regathered):
    def pack(t: torch.Tensor) -> tuple:
        source.pending += 1
        return (t.size(), t.stride(), t.storage_offset())

    return pack


# -- vocabulary-parallel embedding and cross entropy -----------------------------------------------
def vocab_parallel_embedding(indices: torch.Tensor, weight: torch.Tensor, tp, **embedding_kwargs: Any) -> torch.Tensor:
    """Embedding with the vocabulary sharded over the ranks (``weight`` holds rows
    [rank * V/tp, (rank + 1) * V/tp)): look up this rank's rows, zero elsewhere. The sum
    over ranks (a P layout) is the whole lookup. No communication."""
    tp = _as_group(tp)
    rows = weight.size(0)
    start = tp.rank * rows
    outside = (indices < start) | (indices >= start + rows)
    local = (indices - start).masked_fill(outside, 0)
    out = F.embedding(local, weight, **embedding_kwargs)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def vocab_parallel_embedding_bag(indices: torch.Tensor, weight: torch.Tensor, tp, *, mode: str = "mean") -> torch.Tensor:
    """``F.embedding_bag`` over bags of a fixed size (``indices`` [B, L]) with the rows
    sharded as in :func:`vocab_parallel_embedding`: each rank pools its own rows' lookups,
    the sum over ranks (a P layout) is the whole pooled bag. No communication."""
    if mode not in ("sum", "mean"):
        raise PartcError(f"a row-wise embedding bag pools by sum or mean, not {mode!r}", ErrorContext(pass_name="runtime"))
    rows = vocab_parallel_embedding(indices, weight, tp)
    return rows.sum(1) if mode == "sum" else rows.mean(1)


def table_wise_embedding(indices: torch.Tensor, weight: torch.Tensor, tp, owner: int, **embedding_kwargs: Any) -> torch.Tensor:
    """``F.embedding`` on the rank that holds the whole table (``owner``); zeros of the
    output's shape on the others, whose ``weight`` is an empty [0, D] slice (an O(owner)
    layout). No communication."""
    if _as_group(tp).rank == owner:
        return F.embedding(indices, weight, **embedding_kwargs)
    return weight.new_zeros(*indices.shape, weight.size(1))


def table_wise_embedding_bag(indices: torch.Tensor, weight: torch.Tensor, tp, owner: int, **bag_kwargs: Any) -> torch.Tensor:
    """``F.embedding_bag`` (fixed-size bags, ``indices`` [B, L]) on the table's owner,
    zeros [B, D] elsewhere, as :func:`table_wise_embedding`."""
    if _as_group(tp).rank == owner:
        return F.embedding_bag(indices, weight, **bag_kwargs)
    return weight.new_zeros(indices.size(0), weight.size(1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's cross entropy on logits sharded along the classes (last dim here)."""

    @staticmethod
    def forward(ctx, logits, target, tp, ignore_index, reduction):
        classes = logits.size(-1)
        start = tp.rank * classes
        ctx.input_dtype = logits.dtype
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        row_max = tp.all_reduce(logits.max(dim=-1).values, phase="forward", op="max")
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        mine = (target >= start) & (target < start + classes)
        local_target = (target - start).masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        sums = tp.all_reduce(torch.stack([exp.sum(-1), target_logit]), phase="forward")
        sum_exp, target_logit = sums[0], sums[1]
        valid = target != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        count = valid.sum()
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, mine & valid, valid, count)
        ctx.reduction = reduction
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, mine, valid, count = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_target.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        scale = grad.unsqueeze(-1) if ctx.reduction == "none" else grad if ctx.reduction == "sum" else grad / count
        # ignored rows get exactly zero, as in torch, also when every target is ignored
        # (a "mean" of 0 / 0: the loss is nan, the gradient zero)
        g = (g * scale).masked_fill(~valid.unsqueeze(-1), 0.0)
        return g.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tp, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """``F.cross_entropy(logits, target)`` with ``logits`` sharded over the ranks along the
    class dim (dim 1, or dim 0 for one unbatched row) and ``target`` (class indices)
    replicated; the result is replicated. Forward: one all-reduce (max) of the row maxima,
    one all-reduce (sum) of the rows' sum of exp and target logit. Backward: local."""
    if target.is_floating_point():
        raise PartcError("vocab-parallel cross entropy takes class indices, not class probabilities", ErrorContext(pass_name="runtime"))
    if reduction not in ("mean", "sum", "none"):
        raise PartcError(f"unknown cross-entropy reduction {reduction!r}", ErrorContext(pass_name="runtime"))
    if logits.dim() >= 2:
        logits = logits.movedim(1, -1)
    return _VocabParallelCrossEntropy.apply(logits, target, _as_group(tp), ignore_index, reduction)


def kept_target_normaliser(target: torch.Tensor, *, weight: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """What torch's ``reduction="mean"`` of ``cross_entropy`` / ``nll_loss`` over class
    indices divides the summed loss by: the number of kept targets (``target !=
    ignore_index``), or with ``weight=`` the sum of their class weights (label smoothing's
    term is divided by the same). A float64 scalar on ``target``'s device, without gradient
    (torch's carries none). The one place that knows the rule: the tensor-parallel lowering
    and the global batch's normaliser (:mod:`partc.passes.global_mean`) both call it."""
    kept = target != ignore_index
    if weight is None:
        return kept.sum(dtype=torch.float64)
    classes = target.masked_fill(~kept, 0).reshape(-1)
    weights = weight.detach().to(target.device, torch.float64).gather(0, classes)
    return weights.masked_fill(~kept.reshape(-1), 0.0).sum()


def divide_by_kept_targets(
    loss_sum: torch.Tensor, target: torch.Tensor, tp, *, weight: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """torch's ``reduction="mean"`` of ``cross_entropy`` / ``nll_loss`` over class indices,
    with the samples sharded over the ranks: ``loss_sum`` (this rank's loss with
    ``reduction="sum"``) divided by the normaliser of the whole batch, the sum over the
    ranks of :func:`kept_target_normaliser`. The ranks' results add up to the mean (a P).
    One all-reduce of a float64 scalar in forward; the normaliser carries no gradient."""
    local = kept_target_normaliser(target, weight=weight, ignore_index=ignore_index)
    return divide_by_global_normaliser(loss_sum, _as_group(tp).all_reduce(local, phase="forward"))


def divide_by_global_normaliser(loss_sum: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """A microbatch's summed loss over the normaliser of the whole global batch (a buffer
    the runner sets before each step, :class:`partc.runtime.loss_normaliser.GlobalLossNormaliser`):
    the microbatches' results over every replica add up to torch's "mean" of the batch."""
    return loss_sum / normaliser.to(loss_sum.dtype)


def global_size(size: Sequence[int], dim: int, factor: int) -> torch.Size:
    """The whole tensor's size from a shard's ``size``: dim ``dim`` times ``factor``."""
    size = list(size)
    size[dim] *= factor
    return torch.Size(size)


# What the generated code calls, by the name it calls them.
GENERATED_CODE_FUNCTIONS = {
    f.__name__: f
    for f in (
        copy_to_tp,
        reduce_from_tp,
        gather_from_tp,
        gather_from_sp,
        scatter_to_tp,
        reduce_scatter_to_tp,
        all_to_all_tp,
        broadcast_from_tp,
        to_partial,
        pad_to_partial,
        keep_shard_for_backward,
        vocab_parallel_embedding,
        vocab_parallel_cross_entropy,
        divide_by_kept_targets,
        divide_by_global_normaliser,
        kept_target_normaliser,
        vocab_parallel_embedding_bag,
        table_wise_embedding,
        table_wise_embedding_bag,
        global_size,
    )
}
