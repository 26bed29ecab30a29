"""``partc.compile``: plan a model and return the module each rank runs.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) ``compile`` initialises the default
process group when the caller has not (NCCL on GPUs, gloo on CPUs), plans, and builds
this rank's part of the plan:

* a pipeline plan (``pp > 1``): the stages this rank owns, on
  ``torch.distributed.pipelining`` (:mod:`partc.runtime.pipeline`);
* a data-parallel plan: the user's model under ``DistributedDataParallel``, each rank on
  its slice of the global batch (:mod:`partc.runtime.data_parallel`);
* a tensor-parallel plan: this rank's generated module, sliced parameters and explicit
  collectives (:mod:`partc.passes.tp_codegen`, :mod:`partc.runtime.tensor_parallel`).

Outside torchrun it returns a module that runs the plan's stages one after another in
this process. Every rank plans on its own; the plan is deterministic (same graph, same
solver input, same answer), and ranks compare plan fingerprints before the first step.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from partc.cluster import Cluster
from partc.errors import ErrorContext, PartcError, PlanMismatchError
from partc.plan import Plan
from partc.planner import plan as make_plan
from partc.passes.split_stages import split_stages
from partc.passes.tp_codegen import emit_tensor_parallel
from partc.runtime.data_parallel import DataParallelRunner
from partc.runtime.pipeline import LocalPipelineRunner, PipelineRunner
from partc.runtime.tensor_parallel import TensorParallelRunner


class ParallelModule:
    """What ``partc.compile`` returns: this rank's part of the plan.

    ``step(inputs, targets)`` runs forward and backward over the whole global batch and
    returns the loss (the same scalar on every rank); the user's optimizer then steps
    over ``parameters()``. ``state_dict()`` uses the single-device model's names.
    """

    def __init__(self, plan: Plan, runner: Any, modules: Sequence[nn.Module], model: nn.Module):
        self.plan = plan
        self._runner = runner
        self._modules = list(modules)  # what this rank runs; their tensors keep the original names
        aliases: dict[int, list[str]] = {}  # id(tensor) -> every state-dict name the model gives it
        for name, tensor in model.state_dict(keep_vars=True).items():
            aliases.setdefault(id(tensor), []).append(name)
        # This rank's persistent tensors by original name; a tensor the model knows under two
        # names (a tied embedding and LM head) that a stage holds under one gets both.
        self._state: dict[str, torch.Tensor] = {}
        for module in self._modules:
            for name, tensor in module.state_dict(keep_vars=True).items():
                for alias in aliases.get(id(tensor), [name]):
                    self._state.setdefault(alias, tensor)
        self._parameters: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for module in self._modules:
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self._parameters[name] = p

    def step(self, inputs: Any, targets: Any) -> torch.Tensor:
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        return self._runner.step(inputs, targets)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        forward = getattr(self._runner, "forward", None)
        if getattr(self._runner, "loss_in_graph", False):
            raise PartcError(
                "this module was compiled with example_targets: its graph ends in the loss",
                ErrorContext(fix="call step(inputs, targets), or compile without example_targets to get outputs"),
            )
        if forward is None:
            raise PartcError(
                "a pipeline-parallel module computes its output only inside step()",
                ErrorContext(fix="call step(inputs, targets) to train; forward-only pipelines are not supported yet"),
            )
        return forward(*inputs)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters (each once) under their original names."""
        yield from self._parameters.items()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's tensors under the original names (tied tensors under each of their names).
        With tensor parallelism these are this rank's slices (``plan.tensor_parallel`` names
        each parameter's layout)."""
        return {name: tensor.detach() for name, tensor in self._state.items()}

    def train(self, mode: bool = True) -> "ParallelModule":
        for module in self._modules:
            module.train(mode)
        return self

    def eval(self) -> "ParallelModule":
        return self.train(False)


def compile(
    model: nn.Module,
    cluster: Cluster,
    example_inputs: Any,
    *,
    loss_fn: Callable,
    loss_reduction: str = "mean",
    example_targets: torch.Tensor | None = None,
    **plan_options: Any,
) -> ParallelModule:
    """Plan ``model`` and build this rank's part of the plan (see the module docstring).

    loss_fn(outputs, targets) -> scalar, as called on the single-device model's output.
    loss_reduction: "mean" if loss_fn averages over the batch, "sum" if it sums.
    example_targets: targets shaped like the global batch's; with them the loss is traced
        into the graph, planned with the model, and computed by the last pipeline stage
        (the targets are routed to it); without them loss_fn runs on the last stage's output.
    plan_options: the keywords of :func:`partc.plan` (mesh, microbatches, schedule, ...).
        Without a mesh, compile plans data, pipeline and tensor parallelism over the whole
        cluster and runs the fastest that fits (the runtime composes them in a later version).
    """
    if not callable(loss_fn):
        raise PartcError("compile() needs loss_fn(outputs, targets) -> scalar loss", ErrorContext(fix="pass loss_fn=..."))
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = _device()  # before any collective: NCCL binds a communicator to the current device
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with_loss = example_targets is not None
    plan_options = dict(plan_options, loss_fn=loss_fn if with_loss else None, example_targets=example_targets)
    result = _runnable_plan(model, cluster, example_inputs, plan_options)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pp, dp, tp = result.mesh.get("pp", 1), result.mesh.get("dp", 1), result.mesh.get("tp", 1)

    persistent = set(model.state_dict().keys())
    if distributed:
        world = dist.get_world_size()
        if world != pp * dp * tp:
            raise PlanMismatchError(
                f"the plan needs {pp * dp * tp} ranks ({result.mesh}) but torchrun started {world}",
                ErrorContext(fix=f"launch with --nproc-per-node/--nnodes giving {pp * dp * tp} processes, or plan for {world}"),
            )
        _check_same_plan_everywhere(result)

    if tp > 1 and distributed:
        parallel = emit_tensor_parallel(
            result.graph, result.sharding, rank=dist.get_rank(), tp=tp, group=dist.group.WORLD, state_dict=model.state_dict(keep_vars=True)
        )
        runner = TensorParallelRunner(parallel.module, loss_fn=None if with_loss else loss_fn, device=device)
        modules = [parallel.module]
    elif pp > 1 or not distributed:
        graph_inputs = (*inputs, example_targets) if with_loss else inputs
        microbatch = _microbatch_inputs(graph_inputs, dp * result.microbatches)
        stages = split_stages(result.graph, result.stage_of_layer(), microbatch, persistent_names=persistent)
        if distributed:
            runner = PipelineRunner(
                stages,
                pp_rank=dist.get_rank(),
                pp_size=pp,
                group=dist.group.WORLD,
                schedule=result.schedule,
                microbatches=result.microbatches,
                loss_fn=None if with_loss else loss_fn,
                loss_reduction=loss_reduction,
                device=device,
            )
            local_stages = runner.local
        else:
            runner = LocalPipelineRunner(stages, microbatches=result.microbatches * dp, loss_fn=None if with_loss else loss_fn, loss_reduction=loss_reduction)
            local_stages = stages
        modules = [st.module for st in local_stages]
    else:
        runner = DataParallelRunner(model, loss_fn=loss_fn, loss_reduction=loss_reduction, device=device)
        modules = [model]

    return ParallelModule(result, runner, modules, model)


def _runnable_plan(model: nn.Module, cluster: Cluster, example_inputs: Any, options: dict[str, Any]) -> Plan:
    """The plan compile() runs: the pinned mesh, or the fastest single kind of parallelism.

    The search may prefer a combination (pp x dp x tp, ZeRO, recomputation) that this
    version's runtime cannot compose yet; compile() then plans each kind over the whole
    cluster and runs the fastest that fits, and says so."""
    mesh = options.pop("mesh", None)
    if mesh and sum(1 for degree in mesh.values() if degree > 1) <= 1:
        return make_plan(model, cluster, example_inputs, mesh=mesh, **options)
    if mesh:
        raise PartcError(
            f"compile() runs one kind of parallelism at a time in this version; mesh {mesh} combines several",
            ErrorContext(fix=f'pin one of {{"dp": {cluster.world_size}}}, {{"pp": {cluster.world_size}}} or {{"tp": n}} within a node; partc.plan() can still price the combination'),
        )
    world = cluster.world_size
    kinds = [{"dp": world}, {"pp": world}] + ([{"tp": world}] if not cluster.spans_nodes(range(world)) else [])
    plans, reasons = [], []
    for kind in kinds:
        try:
            candidate = make_plan(model, cluster, example_inputs, mesh=kind, **options)
        except PartcError as e:
            reasons.append(f"{kind}: {e.message}")
            continue
        (plans if candidate.fits else reasons).append(candidate if candidate.fits else f"{kind}: over memory")
    if not plans:
        raise PartcError("no single kind of parallelism fits: " + "; ".join(reasons), ErrorContext(fix="pin a mesh, or reduce the batch or the model"))
    return min(plans, key=lambda p: p.predicted_step_time)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _microbatch_inputs(inputs: Sequence[Any], parts: int) -> tuple:
    """Meta tensors shaped like one microbatch (only shapes are read)."""
    result = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            if x.shape[0] % parts:
                raise PartcError(
                    f"the global batch of {x.shape[0]} does not split into {parts} microbatches",
                    ErrorContext(pass_name="compile", fix=f"use a batch size that is a multiple of {parts}"),
                )
            result.append(torch.empty((x.shape[0] // parts, *x.shape[1:]), dtype=x.dtype, device="meta"))
        else:
            result.append(x)
    return tuple(result)


def _check_same_plan_everywhere(plan: Plan) -> None:
    """Every rank must run the same plan: compare fingerprints before the first collective."""
    mine = f"{plan.fingerprint}:{plan.mesh}:{plan.schedule}:{plan.microbatches}:{plan.stage_of_layer()}"
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        differing = [r for r, value in enumerate(everyone) if value != everyone[0]]
        raise PlanMismatchError(
            f"ranks computed different plans (ranks {differing} differ from rank 0)",
            ErrorContext(pass_name="compile", fix="build the same model with the same example_inputs and options on every rank"),
        )
