"""``partc.compile``: plan a model and return the module each rank runs.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) ``compile`` initialises the default
process group when the caller has not (NCCL on GPUs, gloo on CPUs), plans, and builds
this rank's part of the plan on a 3-D mesh ("pp", "dp", "tp"; :mod:`partc.runtime.mesh`):

1. tensor parallelism (``tp > 1``): the generated per-rank module, sliced parameters and
   explicit collectives on the "tp" group (:mod:`partc.passes.tp_codegen`);
2. pipeline parallelism (``pp > 1``): that module (or the captured graph) cut into stages
   (:mod:`partc.passes.split_stages`), the ones this rank owns run on
   ``torch.distributed.pipelining`` along "pp" (:mod:`partc.runtime.pipeline`);
3. data parallelism (``dp > 1``): what this rank runs, wrapped for the "dp" group in DDP
   (optionally compressing gradients) or FSDP2 for ZeRO (:mod:`partc.runtime.data_parallel`);
   each replica takes its slice of the global batch.

Outside torchrun it returns a module that runs the plan's stages one after another in
this process. Every rank plans on its own; the plan is deterministic (same graph, same
solver input, same answer), and ranks compare plan fingerprints before the first step.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from partc.cluster import Cluster
from partc.errors import ErrorContext, PartcError, PlanMismatchError
from partc.plan import Plan
from partc.planner import plan as make_plan
from partc.passes.recompute import checkpoint_layers
from partc.passes.split_stages import StageModule, split_stages
from partc.passes.tp_codegen import emit_tensor_parallel
from partc.runtime.data_parallel import ReplicaRunner, check_data_parallel_options, replicate_over_dp
from partc.runtime.mesh import RankMesh, build_rank_mesh
from partc.runtime.pipeline import LocalPipelineRunner, PipelineRunner


class ParallelModule:
    """What ``partc.compile`` returns: this rank's part of the plan.

    ``step(inputs, targets)`` runs forward and backward over the whole global batch and
    returns the loss (the same scalar on every rank); the user's optimizer then steps
    over ``parameters()``. ``state_dict()`` uses the single-device model's names.
    """

    def __init__(self, plan: Plan, runner: Any, modules: Sequence[nn.Module], model: nn.Module, rank_mesh: RankMesh | None = None):
        self.plan = plan
        self.rank_mesh = rank_mesh  # this rank's coordinates and groups (None outside torchrun)
        self._runner = runner
        self._modules = list(modules)  # what this rank runs; their tensors keep the original names
        by_tensor: dict[int, list[str]] = {}  # id(tensor) -> every state-dict name the model gives it
        model_state = model.state_dict(keep_vars=True)
        for name, tensor in model_state.items():
            by_tensor.setdefault(id(tensor), []).append(name)
        # This rank's persistent tensors by original name; a tensor the model knows under two
        # names (a tied embedding and LM head) that a stage holds under one gets both. By
        # name, not identity: FSDP2 and tensor parallelism hold tensors of their own.
        self._state: dict[str, torch.Tensor] = {}
        for module in self._modules:
            for name, tensor in module.state_dict(keep_vars=True).items():
                for alias in by_tensor.get(id(model_state[name]), [name]) if name in model_state else [name]:
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
    data_parallel: str | None = None,
    gradient_compression: str | None = None,
    **plan_options: Any,
) -> ParallelModule:
    """Plan ``model`` and build this rank's part of the plan (see the module docstring).

    loss_fn(outputs, targets) -> scalar, as called on the single-device model's output.
    loss_reduction: "mean" if loss_fn averages over the batch, "sum" if it sums.
    example_targets: targets shaped like the global batch's; with them the loss is traced
        into the graph, planned with the model, and computed by the last pipeline stage
        (the targets are routed to it); without them loss_fn runs on the last stage's output.
    data_parallel: "ddp" or "fsdp" to override how the plan replicates over "dp" (by
        default: DDP, or FSDP2 when the plan chose ZeRO sharding; "fsdp" alone means ZeRO-3).
    gradient_compression: None, "bf16", "fp16" or "powersgd": a DDP communication hook
        (changes the numbers; off unless asked for).
    plan_options: the keywords of :func:`partc.plan` (mesh, microbatches, schedule, ...).
        Without a mesh, compile searches data, tensor and pipeline parallelism and their
        combinations and runs the fastest plan that fits.
    """
    if not callable(loss_fn):
        raise PartcError("compile() needs loss_fn(outputs, targets) -> scalar loss", ErrorContext(fix="pass loss_fn=..."))
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = _device()  # before any collective: NCCL binds a communicator to the current device
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with_loss = example_targets is not None
    plan_options = dict(plan_options, loss_fn=loss_fn if with_loss else None, example_targets=example_targets)
    result = make_plan(model, cluster, example_inputs, **plan_options)
    zero_stage = _zero_stage(result, data_parallel)
    check_data_parallel_options(zero_stage, gradient_compression)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pp, dp, tp = result.mesh.get("pp", 1), result.mesh.get("dp", 1), result.mesh.get("tp", 1)
    graph_inputs = (*inputs, example_targets) if with_loss else inputs
    persistent = set(model.state_dict().keys())

    recompute = bool(result.search and result.search["recompute"])

    def cut(source: fx.GraphModule, stage_of_layer: list[int]) -> list[StageModule]:
        stages = split_stages(source, stage_of_layer, _microbatch_inputs(graph_inputs, dp * result.microbatches), persistent_names=persistent)
        for st in stages if recompute else ():
            checkpoint_layers(st.module)
        return stages

    if not distributed:
        stages = cut(result.graph, result.stage_of_layer())
        runner = LocalPipelineRunner(stages, microbatches=result.microbatches * dp, loss_fn=None if with_loss else loss_fn, loss_reduction=loss_reduction)
        return ParallelModule(result, runner, [st.module for st in stages], model)

    mesh = build_rank_mesh(pp, dp, tp, device.type)
    _check_same_plan_everywhere(result)
    replicate = functools.partial(replicate_over_dp, mesh=mesh, zero_stage=zero_stage, gradient_compression=gradient_compression, device=device)
    program: nn.Module = model  # what this rank runs before the pipeline cut
    if tp > 1:
        program = emit_tensor_parallel(
            result.graph, result.sharding, rank=mesh.tp_index, tp=tp, group=mesh.group("tp"), state_dict=model.state_dict(keep_vars=True)
        ).module
    source = program if tp > 1 else result.graph
    if pp > 1:
        stages = cut(source, result.stage_of_layer())
        runner = PipelineRunner(
            stages,
            mesh=mesh,
            schedule=result.schedule,
            microbatches=result.microbatches,
            loss_fn=None if with_loss else loss_fn,
            loss_reduction=loss_reduction,
            device=device,
            replicate=replicate,
        )
        modules = [st.module for st in runner.local]
    else:
        if recompute:  # one stage: the captured graph (or generated module) with checkpointed layers
            program = cut(source, [0] * len(result.layers))[0].module
        loss_in_program = with_loss and program is not model  # the user's model computes no loss; the graphs do
        runner = ReplicaRunner(replicate(program), mesh=mesh, loss_fn=None if loss_in_program else loss_fn, loss_reduction=loss_reduction, device=device)
        modules = [program]
    return ParallelModule(result, runner, modules, model, mesh)


def _zero_stage(plan: Plan, data_parallel: str | None) -> int:
    """ZeRO stage over "dp": the plan's choice, or the caller's ("ddp": 0, "fsdp": 3 unless
    the plan already shards)."""
    planned = int(plan.search["zero_stage"]) if plan.search else 0
    if data_parallel is None:
        return planned
    if data_parallel == "ddp":
        return 0
    if data_parallel == "fsdp":
        return planned or 3
    raise PartcError(f"data_parallel must be 'ddp', 'fsdp' or None, got {data_parallel!r}", ErrorContext(pass_name="compile"))


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
