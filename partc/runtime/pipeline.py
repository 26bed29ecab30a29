"""Running pipeline stages: on ``torch.distributed.pipelining`` across ranks, or in one process.

:class:`PipelineRunner` wraps each stage this rank owns in a ``PipelineStage`` and drives
them with one of torch's schedules. Stage ``s`` of ``S`` runs on pipeline rank ``s % pp``
(the loop placement torch's interleaved schedules expect), so with ``v = S / pp`` stages
per rank the first and last stages sit on ranks 0 and pp-1.

Loss and gradients
    With ``loss_reduction="mean"`` (the user's ``loss_fn`` averages over the batch), each
    microbatch's loss is divided by the microbatch count, so the sum of the microbatch
    losses, and the gradients it produces, equal the single-device run on the whole batch.
    With ``"sum"``, nothing is scaled. torch's own ``scale_grads`` is turned off so that
    scaling happens in exactly one place. A loss traced into the graph whose "mean" runs
    over class indices (``ignore_index``, class weights) is the exception: the average of
    microbatch means is not torch's mean when microbatches keep different numbers of
    targets, so compile rewrites it to a sum over the whole batch's normaliser
    (:mod:`partc.passes.global_mean`), runs it as ``"sum"``, and the runner sets the
    normaliser from the global batch before each step
    (:mod:`partc.runtime.loss_normaliser`).

Tied parameters
    A parameter held by stages on different ranks (an embedding tied to the LM head) gets
    gradients from each; after the step they are all-reduced (summed) among the ranks
    that hold it, so every copy takes the same optimizer step.

Inside a 3-D mesh
    The pipeline runs along the mesh's "pp" dimension. Each data-parallel replica takes its
    slice of the global batch and splits it into the microbatches; its stage modules are
    wrapped for the "dp" group before torch sees them (DDP or FSDP2: torch's stages turn
    gradient synchronisation off for every microbatch but the last), and the step's loss is
    averaged over the replicas. With tensor parallelism the stages are cut from the
    generated per-rank module, so their boundary tensors are this rank's shards.

:class:`LocalPipelineRunner` runs the same stage modules one after another in this
process (no process group): the reference the distributed run is compared against, and
what ``partc.compile`` returns outside torchrun.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from partc.errors import ErrorContext, PartcError
from partc.passes.split_stages import StageModule
from partc.runtime.mesh import RankMesh, is_dtensor
from partc.runtime.mixed_precision import autocast

if TYPE_CHECKING:
    from partc.runtime.loss_normaliser import GlobalLossNormaliser

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


def _loss_is_output(output, target):
    return output


def scaled_loss(loss_fn: Callable | None, microbatches: int, reduction: str, replicas: int = 1) -> Callable:
    """The per-microbatch loss that backward starts from (``loss_fn=None``: the stages
    already output the loss). ``replicas``: data-parallel replicas, whose gradients are
    averaged; a summed loss is scaled up by their count to undo the average."""
    loss_fn = loss_fn or _loss_is_output
    if reduction not in ("mean", "sum"):
        raise PartcError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}", ErrorContext(fix="say how loss_fn reduces over the batch"))
    if reduction == "sum" and replicas == 1:
        return loss_fn

    def microbatch_loss(output, target):
        loss = loss_fn(output, target)
        return loss * replicas if reduction == "sum" else loss / microbatches

    return microbatch_loss


def _device_of(values: Sequence[Any]) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def split_microbatches(value: Any, microbatches: int, *, what: str) -> list[Any]:
    """Split a batch along dim 0 into equal microbatches (refusing a remainder)."""
    if not isinstance(value, torch.Tensor):
        return [value] * microbatches
    if value.dim() == 0 or value.shape[0] % microbatches:
        raise PartcError(
            f"{what}: a batch of {value.shape[0] if value.dim() else 'a scalar'} does not split into {microbatches} equal microbatches",
            ErrorContext(pass_name="runtime", fix=f"use a batch size that is a multiple of {microbatches}, or another microbatch count"),
        )
    return list(value.chunk(microbatches))


class LocalPipelineRunner:
    """All stages in this process, microbatch by microbatch (GPipe order)."""

    def __init__(
        self,
        stages: Sequence[StageModule],
        *,
        microbatches: int,
        loss_fn: Callable | None,
        loss_reduction: str = "mean",
        autocast_dtype: torch.dtype | None = None,
        normaliser: GlobalLossNormaliser | None = None,
    ):
        """loss_fn: applied to the last stage's output; None when the graph computes the
        loss itself (then the targets are the stages' last input). normaliser: the
        graph's loss divides by the global batch's normaliser, set here before each step."""
        self.stages = list(stages)
        self.microbatches = microbatches
        self.loss_in_graph = loss_fn is None
        self.loss_fn = scaled_loss(loss_fn, microbatches, loss_reduction)
        self.autocast_dtype = autocast_dtype
        self.normaliser = normaliser

    def forward(self, *inputs: torch.Tensor) -> Any:
        values: tuple = inputs
        with autocast(_device_of(inputs), self.autocast_dtype):
            for stage in self.stages:
                out = stage.module(*values)
                values = out if isinstance(out, tuple) and stage is not self.stages[-1] else (out,)
        return values[0]

    def step(self, inputs: Sequence[torch.Tensor], targets: Any) -> torch.Tensor:
        inputs = (*inputs, targets) if self.loss_in_graph else tuple(inputs)
        if self.normaliser is not None:
            self.normaliser.set_batch(inputs)
        chunks = [split_microbatches(x, self.microbatches, what="inputs") for x in inputs]
        target_chunks = split_microbatches(targets, self.microbatches, what="targets")
        total = torch.zeros(())
        for i in range(self.microbatches):
            microbatch = [c[i] for c in chunks]
            with autocast(_device_of(microbatch), self.autocast_dtype):
                loss = self.loss_fn(self.forward(*microbatch), target_chunks[i])
            loss.backward()
            total = total + loss.detach()
        return total


class PipelineRunner:
    """This rank's stages on torch.distributed.pipelining."""

    def __init__(
        self,
        stages: Sequence[StageModule],
        *,
        mesh: RankMesh,
        schedule: str,
        microbatches: int,
        loss_fn: Callable | None,
        loss_reduction: str,
        device: torch.device,
        replicate: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module,
        autocast_dtype: torch.dtype | None = None,
        normaliser: GlobalLossNormaliser | None = None,
    ):
        """loss_fn: applied to the last stage's output; None when the graph computes the
        loss itself (the targets then enter at stage 0 and are routed to the loss).
        microbatches: per data-parallel replica. replicate: wraps a stage module for the
        "dp" group (:func:`partc.runtime.data_parallel.replicate_over_dp`). normaliser:
        the last stage's loss divides by the global batch's normaliser, set here."""
        from torch.distributed import pipelining

        if schedule not in SCHEDULES:
            raise PartcError(f"unknown schedule {schedule!r}", ErrorContext(fix=f"use one of {', '.join(SCHEDULES)}"))
        pp_size = mesh.pp
        num_stages = len(stages)
        if num_stages % pp_size:
            raise PartcError(f"{num_stages} stages do not spread evenly over {pp_size} pipeline ranks")
        virtual = num_stages // pp_size
        if schedule in ("gpipe", "1f1b") and virtual != 1:
            raise PartcError(f"schedule {schedule!r} runs one stage per rank, the plan has {virtual}", ErrorContext(fix="use 'interleaved' or 'zero_bubble'"))
        if schedule in ("interleaved", "zero_bubble") and virtual < 2:
            raise PartcError(f"schedule {schedule!r} needs at least 2 stages per rank, the plan has {virtual}", ErrorContext(fix="plan with virtual_stages >= 2"))

        self.mesh, self.device = mesh, device
        self.autocast_dtype = autocast_dtype  # mixed precision: forwards and the loss under autocast
        self.group = mesh.group("pp")
        self.microbatches = microbatches
        self.reduction = loss_reduction
        self.loss_in_graph = loss_fn is None
        self.normaliser = normaliser
        self.stage_rank = [s % pp_size for s in range(num_stages)]
        self.local = [st for st in stages if self.stage_rank[st.index] == mesh.pp_index]
        # Shapes are known from the plan: giving them makes torch skip its shape inference,
        # which runs stages on uninitialised tensors (token ids out of range, for one).
        last_stage = _TensorOutputs.wrap_if_structured(self.local[-1]) if self.local[-1].index == num_stages - 1 else None
        self._pipeline_stages = [
            pipelining.PipelineStage(
                replicate(last_stage if last_stage is not None and st is self.local[-1] else st.module),
                st.index,
                num_stages,
                device,
                input_args=_examples(st.input_specs, st.input_grads, device),
                output_args=_examples(st.output_specs, st.output_grads, device),
                group=self.group,
            )
            for st in self.local
        ]
        schedule_class = {
            "gpipe": pipelining.ScheduleGPipe,
            "1f1b": pipelining.Schedule1F1B,
            "interleaved": pipelining.ScheduleInterleaved1F1B,
            "zero_bubble": pipelining.ScheduleInterleavedZeroBubble,
        }[schedule]
        kwargs: dict[str, Any] = {"loss_fn": scaled_loss(loss_fn, microbatches, loss_reduction, mesh.dp)}
        if last_stage is not None:
            kwargs["loss_fn"] = last_stage.on_structured_output(kwargs["loss_fn"])
        if "scale_grads" in inspect.signature(schedule_class.__init__).parameters:
            kwargs["scale_grads"] = False  # partc scales the loss itself (see the module docstring)
        target = self._pipeline_stages[0] if virtual == 1 else self._pipeline_stages
        self._schedule = schedule_class(target, microbatches, **kwargs)
        self._can_skip_outputs = "return_outputs" in inspect.signature(self._schedule.step).parameters
        self.holds_first = any(st.index == 0 for st in self.local)
        self.holds_last = any(st.index == num_stages - 1 for st in self.local)
        self._last_rank_global = dist.get_global_rank(self.group, self.stage_rank[-1])
        self._tied_groups = _tied_parameter_groups(stages, self.stage_rank, mesh)

    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        named: dict[str, torch.nn.Parameter] = {}
        for st in self.local:
            for name, p in st.module.named_parameters():
                named.setdefault(name, p)
        return named

    def step(self, inputs: Sequence[torch.Tensor], targets: Any) -> torch.Tensor:
        from partc.runtime.data_parallel import average_buffers_over_dp, average_over_dp, replica_slice

        if self.normaliser is not None and self.holds_last:
            self.normaliser.set_batch((*inputs, targets))
        inputs, targets = [replica_slice(x, self.mesh) for x in inputs], replica_slice(targets, self.mesh)
        for x in (*inputs, targets):
            split_microbatches(x, self.microbatches, what="inputs and targets")  # clear error before any send
        graph_inputs = (*inputs, targets) if self.loss_in_graph else tuple(inputs)
        # contiguous: the schedule's microbatches must have the strides of the stage's example
        # inputs (torch < 2.13 checks them), and a slice such as idx[:, :-1] has its base's
        args = [x.to(self.device).contiguous() for x in graph_inputs] if self.holds_first else []
        losses: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {}
        if self.holds_last:
            # With the loss in the graph the schedule's target is a placeholder it only chunks.
            target = torch.zeros(len(targets), device=self.device) if self.loss_in_graph else targets.to(self.device)
            kwargs = {"target": target, "losses": losses}
        if self._can_skip_outputs:
            kwargs["return_outputs"] = False  # the step only needs the losses
        with autocast(self.device, self.autocast_dtype):  # backward follows the dtypes forward recorded
            self._schedule.step(*args, **kwargs)
        self._sync_tied_gradients()
        average_buffers_over_dp([st.module for st in self.local], self.mesh)
        loss = torch.stack([l.detach() for l in losses]).sum() if self.holds_last else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self._last_rank_global, group=self.group)
        if self.reduction == "sum":
            loss = loss / self.mesh.dp  # the microbatch losses were scaled up by the replica count
        return average_over_dp(loss, self.mesh, self.reduction)

    def _sync_tied_gradients(self) -> None:
        params = self.parameters_by_name()
        for name, group in self._tied_groups:
            p = params.get(name)
            if p is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.to_local() if is_dtensor(p.grad) else p.grad  # FSDP2: this rank's shard
            dist.all_reduce(grad, group=group)


class _TensorOutputs(torch.nn.Module):
    """The last stage as torch.distributed.pipelining runs it when the model returns a
    structure (a dict, an HF ``ModelOutput``): a tuple of tensors, as torch expects (it
    detaches each output after backward). The loss gets the structure back, so loss_fn
    sees what the single-device model returns."""

    def __init__(self, stage: torch.nn.Module):
        super().__init__()
        self.stage = stage
        self.structure: Any = None  # the pytree spec of the last output

    @classmethod
    def wrap_if_structured(cls, stage: StageModule) -> "_TensorOutputs | None":
        output = next(n for n in reversed(stage.module.graph.nodes) if n.op == "output")
        return None if isinstance(output.args[0], torch.fx.Node) else cls(stage.module)

    def forward(self, *args: Any) -> tuple:
        leaves, self.structure = pytree.tree_flatten(self.stage(*args))
        return tuple(leaves)

    def on_structured_output(self, loss_fn: Callable) -> Callable:
        """loss_fn called on the structure of the microbatch just computed (torch runs the
        loss right after the last stage's forward of that microbatch)."""

        def loss_on_structure(output: tuple, target: Any) -> torch.Tensor:
            return loss_fn(pytree.tree_unflatten(list(output), self.structure), target)

        return loss_on_structure


def _examples(specs, requires_grad: Sequence[bool], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Uninitialised tensors that tell torch each boundary tensor's shape, dtype and whether a gradient flows."""
    return tuple(torch.empty(spec.shape, dtype=spec.dtype, device=device, requires_grad=grad) for spec, grad in zip(specs, requires_grad))


def _tied_parameter_groups(stages: Sequence[StageModule], stage_rank: list[int], mesh: RankMesh) -> list[tuple[str, Any]]:
    """A process group per parameter that stages on different pipeline ranks hold, for this
    rank's pipeline (same (dp, tp) coordinates). Every rank creates every pipeline's
    groups, in the same order, as ``new_group`` requires."""
    holders: dict[str, set[int]] = {}
    for st in stages:
        for name in st.shared:
            holders.setdefault(name, set()).add(stage_rank[st.index])
    result = []
    for name in sorted(holders):
        if len(holders[name]) < 2:
            continue
        for dp_index, tp_index in mesh.lines_along_pp():
            ranks = [mesh.global_rank(r, dp_index, tp_index) for r in sorted(holders[name])]
            subgroup = dist.new_group(ranks)
            if (dp_index, tp_index) == (mesh.dp_index, mesh.tp_index):
                result.append((name, subgroup))
    return result
