"""Data parallelism: replicas over the mesh's "dp" dimension, on DDP or FSDP2.

:func:`replicate_over_dp` wraps what one replica runs (the user's model, a generated
tensor-parallel module, or one pipeline stage) for the data-parallel group:

* ZeRO stage 0: ``DistributedDataParallel`` (gradients all-reduced, overlapped with
  backward), with an optional communication hook that compresses gradients: ``"bf16"``
  or ``"fp16"`` (halves the bytes; the sum is taken in that dtype) or ``"powersgd"``
  (rank-1 PowerSGD with error feedback after 2 uncompressed steps). Compression changes
  the numbers, so it is never on unless asked for.
* ZeRO stages 1 to 3: FSDP2 ``fully_shard`` over the "dp" sub-mesh: parameters, gradients
  and optimizer state are sharded; with stage 3 parameters are freed again after forward
  (``reshard_after_forward=True``), with 1 and 2 they stay gathered until backward has
  run, as ZeRO-2 keeps them. The user's own model is sharded layer by layer (``units``:
  each layer's module is an FSDP unit, so one layer's all-gather overlaps the previous
  layer's compute), then the root. A generated module (tensor-parallel, a pipeline stage)
  is one unit: its code reads every parameter from the root, so a per-layer unit would
  never see its forward hook fire.

:class:`ReplicaRunner` runs a step of a plan without a pipeline: each replica takes its
slice of the global batch (rank order along "dp") and runs forward, loss and backward;
the wrapper averages gradients. With ``loss_reduction="mean"`` that is the gradient of the
mean loss over the global batch and the returned loss is the mean of the replicas'
losses; with ``"sum"`` the local loss is scaled by the replica count before backward so
the averaged gradients are those of the summed loss, and the returned loss is the sum.
A "mean" over class indices traced into the graph runs as ``"sum"``: compile rewrote it
to divide by the whole global batch's normaliser, which the runner sets before each step
(:class:`partc.runtime.loss_normaliser.GlobalLossNormaliser`, :mod:`partc.passes.global_mean`), since the replicas' and microbatches'
means average to torch's only when they keep equal numbers of targets.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree

from partc.errors import ErrorContext, PartcError
from partc.runtime.mesh import RankMesh, is_dtensor
from partc.runtime.mixed_precision import autocast
from partc.runtime.pipeline import split_microbatches

if TYPE_CHECKING:
    from partc.runtime.loss_normaliser import GlobalLossNormaliser

GRADIENT_COMPRESSION = ("bf16", "fp16", "powersgd")


def fully_shard_function() -> Callable:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def check_data_parallel_options(zero_stage: int, gradient_compression: str | None) -> None:
    if zero_stage not in (0, 1, 2, 3):
        raise PartcError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}", ErrorContext(pass_name="runtime"))
    if gradient_compression is not None and gradient_compression not in GRADIENT_COMPRESSION:
        raise PartcError(
            f"unknown gradient_compression {gradient_compression!r}",
            ErrorContext(pass_name="runtime", fix=f"use one of {', '.join(GRADIENT_COMPRESSION)}, or None"),
        )
    if gradient_compression is not None and zero_stage > 0:
        raise PartcError(
            f"gradient_compression={gradient_compression!r} needs DDP's communication hooks; ZeRO stage {zero_stage} runs on FSDP2",
            ErrorContext(pass_name="runtime", fix='use data_parallel="ddp" (ZeRO 0) with compression, or drop the compression'),
        )


def replicate_over_dp(
    module: nn.Module,
    mesh: RankMesh,
    *,
    zero_stage: int,
    gradient_compression: str | None,
    device: torch.device,
    units: Sequence[str] = (),
) -> nn.Module:
    """``module`` moved to ``device`` and wrapped for the "dp" group (see the module doc).
    Returned unchanged when there is one replica or nothing to train. ``units``: paths of
    submodules FSDP2 shards as units of their own before the root."""
    module.to(device)
    if mesh.dp == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if zero_stage > 0:
        fully_shard = fully_shard_function()
        for path in units:
            fully_shard(module.get_submodule(path), mesh=mesh.submesh("dp"), reshard_after_forward=zero_stage == 3)
        fully_shard(module, mesh=mesh.submesh("dp"), reshard_after_forward=zero_stage == 3)
        return module
    group = mesh.group("dp")
    # buffers are averaged after the step instead (average_buffers_over_dp); gradients live in
    # the all-reduce buckets (no second copy of every gradient)
    ddp = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, process_group=group, broadcast_buffers=False, gradient_as_bucket_view=True)
    if gradient_compression == "bf16" and dist.get_backend(group) != "nccl":
        raise PartcError(
            f"bf16 gradient compression needs NCCL (torch's hook checks for it); this group runs on {dist.get_backend(group)}",
            ErrorContext(pass_name="runtime", fix='use gradient_compression="fp16" on CPUs / gloo'),
        )
    if gradient_compression in ("bf16", "fp16"):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.bf16_compress_hook if gradient_compression == "bf16" else default_hooks.fp16_compress_hook
        ddp.register_comm_hook(group, hook)
    elif gradient_compression == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp


def fsdp_units(model: nn.Module, layer_modules: Sequence[str]) -> list[str]:
    """The layers' modules that can be FSDP units of their own: they exist in ``model``, hold
    parameters, share none with another module (a tied embedding stays with the root),
    and do not contain one another."""
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name)
    units: list[str] = []
    for path in dict.fromkeys(layer_modules):
        if not path or any(path == u or path.startswith(u + ".") or u.startswith(path + ".") for u in units):
            continue
        try:
            sub = model.get_submodule(path)
        except AttributeError:
            continue
        params = list(sub.named_parameters(prefix=path, remove_duplicate=False))
        if params and all(owners[id(p)] == {name} for name, p in params):
            units.append(path)
    return units


def average_buffers_over_dp(modules: Sequence[nn.Module], mesh: RankMesh) -> None:
    """Average the persistent floating-point buffers (BatchNorm's running statistics) over
    the replicas after a step: each replica updated them from its own slice of the batch,
    and the replicas must stay identical. (DDP's own ``broadcast_buffers`` would instead
    copy replica 0's statistics and drop the others'.)"""
    if mesh.dp == 1:
        return
    for module in modules:
        params = {id(p) for p in module.parameters()}
        for tensor in module.state_dict(keep_vars=True).values():
            if id(tensor) not in params and tensor.is_floating_point() and not is_dtensor(tensor):
                dist.all_reduce(tensor.data, group=mesh.group("dp"))
                tensor.data /= mesh.dp


def replica_slice(value: Any, mesh: RankMesh) -> Any:
    """This replica's part of a global-batch tensor (dim 0, in "dp" rank order)."""
    if not isinstance(value, torch.Tensor) or mesh.dp == 1:
        return value
    return split_microbatches(value, mesh.dp, what="the data-parallel batch")[mesh.dp_index]


def average_over_dp(loss: torch.Tensor, mesh: RankMesh, reduction: str) -> torch.Tensor:
    """The global batch's loss from this replica's: the mean (or sum) over replicas."""
    if mesh.dp == 1:
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh.group("dp"))
    return total / mesh.dp if reduction == "mean" else total


class ReplicaRunner:
    """A plan without a pipeline: the whole model (or this rank's tensor-parallel shard of
    it) on this replica's slice of the batch, in ``microbatches`` chunks whose gradients
    accumulate (the plan's memory counts one chunk's activations); gradients are
    synchronised over "dp" once, in the last chunk's backward."""

    def __init__(
        self,
        module: nn.Module,
        *,
        mesh: RankMesh,
        loss_fn: Callable | None,
        loss_reduction: str,
        device: torch.device,
        microbatches: int = 1,
        autocast_dtype: torch.dtype | None = None,
        normaliser: GlobalLossNormaliser | None = None,
    ):
        """module: already wrapped by :func:`replicate_over_dp`. loss_fn: applied to the
        output; None when the module's graph ends in the loss (targets are its last input).
        normaliser: the graph's loss divides by the global batch's normaliser, set here."""
        if loss_reduction not in ("mean", "sum"):
            raise PartcError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}", ErrorContext(fix="say how loss_fn reduces over the batch"))
        self.module, self.mesh, self.device = module, mesh, device
        self.loss_fn, self.reduction = loss_fn, loss_reduction
        self.loss_in_graph = loss_fn is None
        self.microbatches = microbatches
        self.autocast_dtype = autocast_dtype  # mixed precision: forward and loss under autocast
        self.normaliser = normaliser

    def _local(self, value: Any) -> Any:
        value = replica_slice(value, self.mesh)
        return value.to(self.device) if isinstance(value, torch.Tensor) else value

    def forward(self, *inputs: Any) -> Any:
        """The whole output: every replica's slice, gathered in "dp" order."""
        with autocast(self.device, self.autocast_dtype):
            local = self.module(*(self._local(x) for x in inputs))
        if self.mesh.dp == 1:
            return local

        def gather(piece: torch.Tensor) -> torch.Tensor:
            pieces = [torch.empty_like(piece) for _ in range(self.mesh.dp)]
            dist.all_gather(pieces, piece.contiguous(), group=self.mesh.group("dp"))
            return torch.cat(pieces)

        return pytree.tree_map_only(torch.Tensor, gather, local)

    def step(self, inputs: Sequence[Any], targets: Any) -> torch.Tensor:
        m = self.microbatches
        if self.normaliser is not None:
            self.normaliser.set_batch((*inputs, targets))
        chunks = [split_microbatches(self._local(x), m, what="the replica's batch") for x in (*inputs, targets)]
        total = torch.zeros((), device=self.device)
        for i in range(m):
            *chunk_inputs, chunk_targets = (c[i] for c in chunks)
            with self._gradient_sync(last=i == m - 1):
                with autocast(self.device, self.autocast_dtype):
                    if self.loss_in_graph:
                        loss = self.module(*chunk_inputs, chunk_targets)
                    else:
                        loss = self.loss_fn(self.module(*chunk_inputs), chunk_targets)
                loss = loss / m if self.reduction == "mean" else loss
                (loss * self.mesh.dp if self.reduction == "sum" else loss).backward()
            total += loss.detach()
        average_buffers_over_dp([self.module], self.mesh)
        return average_over_dp(total, self.mesh, self.reduction)

    @contextlib.contextmanager
    def _gradient_sync(self, *, last: bool):
        """DDP and FSDP2 synchronise gradients in the last chunk's backward only."""
        if isinstance(self.module, DistributedDataParallel) and not last:
            with self.module.no_sync():
                yield
            return
        if hasattr(self.module, "set_requires_gradient_sync"):  # an FSDP2 module
            self.module.set_requires_gradient_sync(last)
        yield
