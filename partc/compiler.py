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
this process. Under torchrun rank 0 plans and broadcasts the plan; the other ranks bind it
to their own model (:func:`partc.planner.replan`), and every rank checks the plan's hash
before the run's first collective.
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
from partc.planner import replan
from partc.passes.capture import traced_loss
from partc.passes.global_mean import global_mean_loss
from partc.passes.ir import FX_FRONTEND
from partc.passes.recompute import checkpoint_layers
from partc.passes.split_stages import StageModule, split_stages
from partc.passes.tp_codegen import emit_tensor_parallel
from partc.runtime.data_parallel import ReplicaRunner, check_data_parallel_options, fsdp_units, replicate_over_dp
from partc.runtime.checkpoint import load_whole_tensor_state, whole_tensor_state
from partc.runtime.loss_normaliser import GlobalLossNormaliser
from partc.runtime.mesh import RankMesh, build_rank_mesh
from partc.runtime.mixed_precision import cast_outputs_to_trace, compute_dtype
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
        self._captured_training = model.training
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
        held_as: dict[str, str] = {}  # each name -> the name this rank's module holds the tensor by
        for module in self._modules:
            for name, tensor in module.state_dict(keep_vars=True).items():
                for alias in by_tensor.get(id(model_state[name]), [name]) if name in model_state else [name]:
                    self._state.setdefault(alias, tensor)
                    held_as.setdefault(alias, name)
        tensor_parallel = rank_mesh is not None and rank_mesh.tp > 1 and plan.sharding is not None
        # each name's tensor-parallel layout (a tied name shares its tensor's)
        self._layouts: dict[str, Any] = {}
        for alias, name in held_as.items() if tensor_parallel else ():
            # the plan knows a tied tensor under one of its names; the module may list another first
            names = by_tensor.get(id(model_state[name]), [name]) if name in model_state else [name]
            planned = [n for n in names if n in plan.sharding.parameters]
            if planned:
                self._layouts[alias] = plan.sharding.parameters[planned[0]]
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
        """This rank's tensors under the single-device model's names (tied tensors under each
        of their names), each standing for the whole tensor: tensor-parallel slices and FSDP2
        shards as DTensors (see :mod:`partc.runtime.checkpoint`). ``dcp.save`` writes a
        checkpoint that the single-device model and any other plan load."""
        return whole_tensor_state(self._state, self._layouts, self.rank_mesh)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load whole tensors (a single-device state dict, or what ``dcp.load`` filled into
        ``self.state_dict()``) into this rank's pieces."""
        load_whole_tensor_state(self._state, state_dict, self._layouts, self.rank_mesh)

    def train(self, mode: bool = True) -> "ParallelModule":
        """Set the mode of what this rank runs. A captured graph froze the mode it was
        captured in (dropout, BatchNorm), so a graph compiled in one mode refuses the other."""
        if mode != self._captured_training and any(isinstance(m, fx.GraphModule) for m in self._modules):
            captured = "training" if self._captured_training else "eval"
            raise PartcError(
                f"this module was compiled in {captured} mode, which its captured graph froze (dropout, BatchNorm); it cannot switch to {'training' if mode else 'eval'} mode",
                ErrorContext(pass_name="compile", fix=f"call model.{'train' if mode else 'eval'}() before partc.compile for a module in that mode"),
            )
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

    The loss of a step split into microbatches and data-parallel replicas: with
    example_targets, a ``cross_entropy`` / ``nll_loss`` "mean" over class indices that the
    graph returns is torch's mean over the whole global batch (its sum divided by the
    whole batch's count of targets that are not ``ignore_index``, or their class-weight
    sum; :mod:`partc.passes.global_mean`), however unevenly padding falls; also behind
    casts and scalar factors (``loss.float() / accum_steps``), and from either frontend.
    Without example_targets loss_fn runs on each microbatch and a "mean" averages the
    microbatches' and replicas' results, as DDP does, which is the global mean only when
    every piece keeps as many targets (a model that computes such a mean itself gets a
    warning). So does a mean that partc cannot count ahead of the step: inside a larger
    loss (``ce + aux``), or over targets drawn at random in forward (BERT-style masking).
    For the exact mean then, pass example_targets (masking the labels in the data
    pipeline), or pass ``loss_reduction="sum"`` with a loss_fn that sums and divides by
    the whole batch's count, computed by the caller::

        kept = (targets != -100).sum()
        loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / kept
    """
    if not callable(loss_fn):
        raise PartcError("compile() needs loss_fn(outputs, targets) -> scalar loss", ErrorContext(fix="pass loss_fn=..."))
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = _device()  # before any collective: NCCL binds a communicator to the current device
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    with_loss = example_targets is not None
    plan_options = dict(plan_options, loss_fn=loss_fn if with_loss else None, example_targets=example_targets)
    result = _one_plan_everywhere(model, cluster, example_inputs, plan_options) if distributed else make_plan(model, cluster, example_inputs, **plan_options)
    zero_stage = _zero_stage(result, data_parallel)
    check_data_parallel_options(zero_stage, gradient_compression)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    pp, dp, tp = result.mesh.get("pp", 1), result.mesh.get("dp", 1), result.mesh.get("tp", 1)
    graph_inputs = (*inputs, example_targets) if with_loss else inputs
    persistent = set(model.state_dict().keys())

    recompute = bool(result.search and result.search["recompute"])
    precision = compute_dtype(result.options)
    # A traced "mean" over class indices, divided by the whole global batch's normaliser
    # instead of each microbatch's: its pieces then add up as a summed loss does.
    global_mean = global_mean_loss(result.graph, dp * result.microbatches, targets_traced=with_loss)
    normaliser: GlobalLossNormaliser | None = None  # set by cut(): the rewritten loss's
    if global_mean is not None:
        loss_reduction = "sum"

    def cut(source: fx.GraphModule, stage_of_layer: list[int]) -> list[StageModule]:
        nonlocal normaliser
        stages = split_stages(source, stage_of_layer, _microbatch_inputs(graph_inputs, dp * result.microbatches), persistent_names=persistent)
        if global_mean is not None:
            normaliser = global_mean.rewrite(stages[-1].module)  # before recomputation wraps the loss's layer
        for st in stages if recompute else ():
            checkpoint_layers(st.module)
        for st in stages if precision is not None else ():
            # what the next stage expects; the last stage too: torch < 2.13 checks its outputs
            # against the traced dtypes (the loss, computed in fp32 under autocast, sees the same values)
            cast_outputs_to_trace(st.module, [spec.dtype for spec in st.output_specs])
        return stages

    if not distributed:
        stages = cut(result.graph, result.stage_of_layer())
        runner = LocalPipelineRunner(
            stages, microbatches=result.microbatches * dp, loss_fn=None if with_loss else loss_fn, loss_reduction=loss_reduction, autocast_dtype=precision, normaliser=normaliser
        )
        return ParallelModule(result, runner, [st.module for st in stages], model)

    mesh = build_rank_mesh(pp, dp, tp, device.type)
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
            autocast_dtype=precision,
            normaliser=normaliser,
        )
        modules = [st.module for st in runner.local]
    else:
        # The user's model runs as it is only when fx traced it: a model that needed torch.export
        # may branch on shapes, and a replica must take the branch the global batch took. A
        # loss taken over the global batch: loss_fn's own graph rewritten when loss_fn takes
        # the mean (the model keeps its per-block FSDP2 units), else the rewritten graph.
        runs_model = program is model and not recompute and result.frontend == FX_FRONTEND
        replica_loss: Callable = loss_fn
        if runs_model and global_mean is not None and global_mean.in_loss_fn:
            replica_loss = traced_loss(result.graph).to(device)  # loss_fn's constants (class weights) and the normaliser
            normaliser = global_mean.rewrite(replica_loss.traced, state=model)
        elif recompute or global_mean is not None or (program is model and result.frontend != FX_FRONTEND):
            program = cut(source, [0] * len(result.layers))[0].module  # one stage (layers checkpointed if recompute)
        loss_in_program = with_loss and program is not model  # the user's model computes no loss; the graphs do
        units = fsdp_units(model, [layer.name for layer in result.layers]) if program is model else ()
        runner = ReplicaRunner(
            replicate(program, units=units),
            microbatches=result.microbatches,
            mesh=mesh,
            loss_fn=None if loss_in_program else replica_loss,
            loss_reduction=loss_reduction,
            device=device,
            autocast_dtype=precision,
            normaliser=normaliser,
        )
        modules = [program]
    _release_traced_tensors(result.graph)
    return ParallelModule(result, runner, modules, model, mesh)


def _release_traced_tensors(graph: fx.GraphModule) -> None:
    """Make the plan's graph hold meta tensors of its parameters' and buffers' shapes, not
    the model's tensors. The runtime built above holds what this rank trains; the graph
    kept for inspection (``pm.plan``: summary, report, source) would otherwise keep the
    whole unsharded model alive on every rank where FSDP2 or the stage and tensor-parallel
    modules replaced it: one full copy of the weights per GPU (measured on 8 x H200:
    ZeRO-3 on a 6.7B GPT used 103 GiB where hand-written FSDP2 used 91). Only the graph's
    own references change (its attribute holders are its own modules, not the model's)."""
    for node in graph.graph.nodes:
        if node.op != "get_attr":
            continue
        *path, name = str(node.target).split(".")
        owner = graph.get_submodule(".".join(path)) if path else graph
        value = getattr(owner, name, None)
        if not isinstance(value, torch.Tensor) or value.device.type == "meta" or type(value) not in (torch.Tensor, nn.Parameter):
            continue
        shell = torch.empty_like(value, device="meta")
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(shell, requires_grad=value.requires_grad)
        elif name in owner._buffers:
            owner._buffers[name] = shell
        else:
            setattr(owner, name, shell)


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


def _one_plan_everywhere(model: nn.Module, cluster: Cluster, example_inputs: Any, options: dict[str, Any]) -> Plan:
    """Rank 0 plans and broadcasts the plan's JSON; every other rank binds it to its own copy
    of the model (:func:`partc.planner.replan`: capture and checks, nothing solved). Then
    every rank compares plan hashes before any collective of the run. A rank that cannot
    plan or bind makes every rank fail with its reason, rather than leaving them waiting."""
    rank, world = dist.get_rank(), dist.get_world_size()
    message: list[Any] = [None]
    result: Plan | None = None
    if rank == 0:
        try:
            result = make_plan(model, cluster, example_inputs, **options)
            message[0] = {"plan": result.to_json()}
        except PartcError as e:
            message[0] = {"error": f"{type(e).__name__}: {e}"}
    dist.broadcast_object_list(message, src=0)
    mine: str
    if "error" in message[0]:
        mine = "rank 0 could not plan"
    elif rank == 0:
        mine = result.hash
    else:
        try:
            replan_options = {k: v for k, v in options.items() if k != "cache"}
            result = replan(model, example_inputs, message[0]["plan"], cluster=cluster, **replan_options)
            mine = result.hash
        except PartcError as e:
            mine = f"error: {type(e).__name__}: {e}"
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if "error" in message[0]:
        raise PartcError(f"rank 0 could not plan: {message[0]['error']}", ErrorContext(pass_name="compile"))
    differing = {r: value for r, value in enumerate(everyone) if value != everyone[0]}
    if differing:
        details = "; ".join(f"rank {r}: {value}" for r, value in list(differing.items())[:4])
        raise PlanMismatchError(
            f"ranks disagree on the plan (rank 0's hash {everyone[0][:12]}): {details}",
            ErrorContext(pass_name="compile", fix="build the same model with the same example_inputs, cluster and options on every rank"),
        )
    return result
