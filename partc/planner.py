"""``partc.plan``: run the passes over a model and return a :class:`~partc.plan.Plan`.

The passes run in order, each timed; a failure that is not already a
:class:`~partc.PartcError` is reported with the name of the pass that failed and the
passes that ran before it::

    capture -> propagate -> annotate -> estimate -> stages (pipeline plans)

Without a mesh, or with several degrees pinned, the search pass picks DP x TP x PP;
one degree over the whole cluster (``{"dp": world}``, ``{"pp": world}``, ``{"tp": world}``)
plans that kind directly.

One plan everywhere: :func:`replan` gives every other rank the plan rank 0 made (its
JSON) without solving anything: it captures, propagates and annotates the model (cheap
and deterministic), refuses a plan made for another model, cluster, options or partc /
torch version (:class:`~partc.PlanMismatchError` naming which), and attaches the graph.
``plan(..., cache=DIR)`` does the same from an on-disk cache (:mod:`partc.plan_cache`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from partc.cluster import Cluster
from partc.cost_model import (
    CostModel,
    MemoryBreakdown,
    optimizer_step_bytes,
    training_memory,
)
from partc.errors import ErrorContext, PartcError, PlanMismatchError
from partc.passes.annotate import annotate
from partc.passes.capture import attach_loss, capture
from partc.passes.estimate import Estimate, batch_size, estimate_data_parallel
from partc.passes.ir import OpKind, gc_paused, graph_info, node_info
from partc.passes.propagate import propagate
from partc.passes.search import SearchResult, explain, search
from partc.passes.sharding import ShardingPlan, plan_sharding
from partc.passes.stages import (
    PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS,
    SCHEDULES,
    StagePartition,
    equal_layer_split,
    gradient_free_cuts,
    solve_stages_without_cuts,
    stage_problem_from_graph,
)
from partc.plan import (
    Plan,
    StagePlan,
    canonical_json,
    current_versions,
    graph_fingerprint,
    graph_identity,
)
from partc.plan_cache import PlanCache

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class _Pipeline:
    """The pipeline options after defaults are filled in."""

    stages: int  # pipeline ranks
    microbatches: int
    schedule: str
    virtual_stages: int


@gc_paused()  # once for every pass (ir.gc_paused)
def plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs: Any,
    *,
    loss_fn: Callable | None = None,
    example_targets: torch.Tensor | None = None,
    mesh: dict[str, int] | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    recompute: bool | None = None,
    zero_stage: int | None = None,
    mixed_precision: str | torch.dtype | None = None,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    training: bool = True,
    frontend: str = "auto",
    cache: str | os.PathLike | bool | None = None,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Plan ``model`` for ``cluster``; no GPU and no process group needed.

    example_inputs: the global batch (a tensor or a tuple of tensors).
    loss_fn, example_targets: with both, loss_fn(output, targets) is traced into the graph
        and planned like the model's own operators (the logits' softmax often weighs as
        much as a block).
    mesh: None (default) searches DP x TP x PP, microbatches, schedule, recompute and ZeRO
        for the fastest plan that fits; pinning some degrees ({"tp": 2} on 8 devices,
        {"tp": 2, "pp": 2}) searches the rest; one degree over the whole cluster
        ({"dp": world}, {"pp": world}, {"tp": world}) plans that kind directly (with
        microbatches and no pipeline, recompute or zero_stage: searched, as only the search
        prices those).
    microbatches, schedule, virtual_stages: pipeline options ("gpipe", "1f1b",
        "interleaved", "zero_bubble"; interleaved schedules default to 2 stages per rank,
        microbatches to the largest divisor of the batch up to 4 per pipeline rank).
    recompute, zero_stage: pin activation recomputation (True/False) or the ZeRO stage over
        data parallelism (0 = DDP, 1-3 = FSDP2); either one sends the plan to the search.
    mixed_precision: "bf16"/"fp16" to run matmuls in that dtype with fp32 master weights.
    memory_limit: bytes per device (default: the smallest device's memory).
    cache: a directory (or True for ``$XDG_CACHE_HOME/partc``, default ``~/.cache/partc``)
        of plans keyed by the graph, parameters, inputs, cluster, options and versions
        (:mod:`partc.plan_cache`): a hit skips the search and the solvers
        (``plan.pass_times["cache hit"]``); a miss plans and stores the plan atomically.
    progress: called with one line per finished pass (the CLI prints them).
    """
    _check_cluster(cluster)
    options = plan_options(mesh=mesh, microbatches=microbatches, schedule=schedule, virtual_stages=virtual_stages, recompute=recompute, zero_stage=zero_stage, mixed_precision=mixed_precision,
                           optimizer=optimizer, memory_limit=memory_limit, training=training, frontend=frontend)
    passes = _Passes(progress)
    gm = _annotated_graph(passes, model, example_inputs, loss_fn, example_targets, frontend)
    store = key = None
    if cache is not None and cache is not False:
        store = PlanCache(cache)
        key = store.key(gm, cluster, options)
        hit = passes.run("cache", lambda: store.load(key, gm, cluster, options))
        if hit is not None:
            passes.rename("cache", "cache hit", f"{store.path(key)}: search and solvers skipped")
            return replace(hit, graph=gm, pass_times=passes.times)
        passes.rename("cache", "cache miss", f"{store.path(key)}")
    result = _plan_graph(gm, model, cluster, passes, options, mesh=mesh, microbatches=microbatches, schedule=schedule, virtual_stages=virtual_stages,
                         recompute=recompute, zero_stage=zero_stage, mixed_precision=mixed_precision, optimizer=optimizer, memory_limit=memory_limit, training=training)
    if store is not None:
        passes.run("cache store", lambda: store.save(key, result))
    return result


@gc_paused()
def replan(
    model: nn.Module,
    example_inputs: Any,
    plan: Plan | str | os.PathLike,
    *,
    cluster: Cluster | None = None,
    loss_fn: Callable | None = None,
    example_targets: torch.Tensor | None = None,
    mesh: dict[str, int] | None = None,
    microbatches: int | None = None,
    schedule: str | None = None,
    virtual_stages: int | None = None,
    recompute: bool | None = None,
    zero_stage: int | None = None,
    mixed_precision: str | torch.dtype | None = None,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    training: bool = True,
    frontend: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """The plan another process made (a :class:`Plan`, its JSON text or a JSON file), bound
    to this process's ``model``: ready for codegen (``graph`` and ``sharding`` attached), with
    the same :attr:`~partc.Plan.hash`, and nothing solved.

    Capture, propagation and annotation run as in :func:`plan` (deterministic; a second or
    so for a 96-layer GPT-3), then the plan is checked: the graph's structure, parameter
    names / shapes / dtypes and input specs (:func:`~partc.plan.graph_identity`), the
    ``cluster`` when given, the partc and torch versions, and the options, which take the
    same keywords and defaults as :func:`plan` and must be what the plan was made with.
    Any difference raises :class:`~partc.PlanMismatchError` listing every one.

    partc.compile's protocol: rank 0 plans and broadcasts ``plan.to_json()``; the other
    ranks ``replan`` from it; every rank all-gathers ``plan.hash`` before the first collective.
    """
    if cluster is not None:
        _check_cluster(cluster)
    made = plan if isinstance(plan, Plan) else Plan.from_json(plan)
    options = plan_options(mesh=mesh, microbatches=microbatches, schedule=schedule, virtual_stages=virtual_stages, recompute=recompute, zero_stage=zero_stage, mixed_precision=mixed_precision,
                           optimizer=optimizer, memory_limit=memory_limit, training=training, frontend=frontend)
    passes = _Passes(progress)
    gm = _annotated_graph(passes, model, example_inputs, loss_fn, example_targets, frontend)
    problems = passes.run("replan", lambda: made.mismatches(graph_identity(gm), cluster or made.cluster, options))
    if problems:
        raise PlanMismatchError(
            f"the plan (hash {made.hash[:12]}) was not made for this {type(model).__name__}:\n  " + "\n  ".join(problems),
            ErrorContext(pass_name="replan", fix="plan this model again (partc.plan), or pass the model, inputs, cluster and options the plan was made with"),
        )
    return replace(made, graph=gm, pass_times=passes.times)


def plan_options(
    *, mesh, microbatches, schedule, virtual_stages, recompute, zero_stage, mixed_precision, optimizer, memory_limit, training, frontend
) -> dict[str, Any]:
    """The planning options as plain JSON data, as a plan records them and a cache key and
    :func:`replan` compare them (the mixed-precision dtype by name, the mesh sorted)."""
    dtype = _dtype(mixed_precision)
    options = {
        "mesh": None if mesh is None else dict(sorted(mesh.items())),
        "microbatches": microbatches,
        "schedule": schedule,
        "virtual_stages": virtual_stages,
        "recompute": recompute,
        "zero_stage": zero_stage,
        "mixed_precision": None if dtype is None else str(dtype).removeprefix("torch."),
        "optimizer": optimizer,
        "memory_limit": None if memory_limit is None else float(memory_limit),
        "training": bool(training),
        "frontend": frontend,
    }
    try:
        return json.loads(canonical_json(options))
    except (TypeError, ValueError) as e:
        raise PartcError(f"planning options must be plain values: {e}", ErrorContext(fix="pass numbers, strings and a mesh dict of ints")) from e


class _Passes:
    """Runs passes in order and times each; a failure that is not a PartcError is reported
    with the pass that failed and the passes that ran before it."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.times: dict[str, float] = {}
        self.progress = progress

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        before = list(self.times)
        start = time.perf_counter()
        try:
            value = step()
        except PartcError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: name the pass
            raise PartcError(
                f"pass {name!r} failed: {type(e).__name__}: {e}",
                ErrorContext(pass_name=name, fix=f"passes that ran before it: {', '.join(before) or 'none'}; please report this with the model"),
            ) from e
        self.times[name] = time.perf_counter() - start
        if self.progress is not None and name != "cache":
            self.progress(f"{name:<10} {self.times[name]:7.3f} s")
        return value

    def detail(self, line: str) -> None:
        """A line from inside a running pass (the search's phases), indented under it."""
        if self.progress is not None:
            self.progress("  " + line)

    def rename(self, old: str, new: str, detail: str) -> None:
        """Report pass ``old`` under the name ``new`` (the cache's hit or miss), with ``detail``."""
        self.times[new] = self.times.pop(old)
        if self.progress is not None:
            self.progress(f"{new:<10} {self.times[new]:7.3f} s  {detail}")


def _annotated_graph(passes: _Passes, model: nn.Module, example_inputs: Any, loss_fn: Callable | None, example_targets: torch.Tensor | None, frontend: str):
    """Capture, propagate and annotate: the graph every plan (fresh, cached or re-planned) reads."""
    inputs = _as_tuple(example_inputs)
    if loss_fn is not None and example_targets is None:
        warnings.warn("partc.plan: loss_fn is not priced without example_targets; the model's forward is planned on its own", stacklevel=3)
    with_loss = loss_fn is not None and example_targets is not None
    graph_inputs = (*inputs, example_targets) if with_loss else inputs
    gm = passes.run("capture", lambda: _capture(model, inputs, loss_fn if with_loss else None, frontend))
    passes.run("propagate", lambda: propagate(gm, graph_inputs))
    passes.run("annotate", lambda: annotate(gm))
    return gm


def _plan_graph(gm, model, cluster, passes, plan_opts, *, mesh, microbatches, schedule, virtual_stages, recompute, zero_stage, mixed_precision, optimizer, memory_limit, training) -> Plan:
    """Solve for the annotated ``gm``: the search, or the one kind of parallelism pinned."""
    run = passes.run
    compute_dtype = _dtype(mixed_precision)
    # one kind over the whole cluster is planned directly, except what only the search prices:
    # recomputation, ZeRO, and microbatches without a pipeline (gradient accumulation)
    accumulates = microbatches is not None and (mesh or {}).get("pp", 1) == 1
    searching = not _one_kind_over_cluster(mesh, cluster.world_size) or recompute is not None or zero_stage is not None or accumulates
    dp, tp, pp = (0, 0, 0) if searching else _degrees(cluster, mesh)
    limit = memory_limit if memory_limit is not None else min(cluster.device(r).memory for r in range(cluster.world_size))
    cost_model = CostModel(cluster)
    options = dict(compute_dtype=compute_dtype, optimizer=optimizer, training=training)
    if searching:
        pinned = dict(mesh or {})
        result = run(
            "search",
            lambda: search(
                gm, cluster, cost_model, batch_size=batch_size(gm), pinned=pinned or None,
                schedules=(schedule,) if schedule else SCHEDULES_FOR_SEARCH,
                microbatch_options=(microbatches,) if microbatches else None,
                virtual_stage_options=(virtual_stages,) if virtual_stages and virtual_stages > 1 else (2, 4),
                recompute_options=(recompute,) if recompute is not None else (False, True),
                zero_options=(zero_stage,) if zero_stage is not None else (0, 1, 2, 3),
                compute_dtype=compute_dtype, optimizer=optimizer, memory_limit=limit,
                progress=passes.detail,
            ),
        )
        best = result.best
        dp, tp, pp = best.mesh["dp"], best.mesh["tp"], best.mesh["pp"]
    estimate = run("estimate", lambda: estimate_data_parallel(gm, cost_model, dp=dp, **options))

    info = graph_info(gm)
    common = dict(
        model=type(model).__name__,
        frontend=info.frontend,
        fallback_reason=info.fallback_reason,
        mesh={"pp": pp, "dp": dp, "tp": tp},
        batch_size=batch_size(gm),
        compute_dtype=estimate.compute_dtype,
        cluster=cluster,
        layers=estimate.layers,
        memory_limit=limit,
        fingerprint=graph_fingerprint(gm),
        unsupported_ops=tuple(n.name for n in gm.graph.nodes if node_info(n).op == OpKind.OTHER),
        pass_times=passes.times,
        identity=graph_identity(gm),
        versions=current_versions(),
        options=plan_opts,
        graph=gm,
    )
    if searching:
        return _searched_plan(common, result, estimate)
    if tp > 1:
        sharding = run(
            "sharding",
            lambda: plan_sharding(gm, cost_model, tp=tp, memory_limit=limit, compute_dtype=compute_dtype, optimizer=optimizer, training=training),
        )
        return Plan(
            **{**common, "unsupported_ops": sharding.unsupported},
            predicted_step_time=sharding.step_time,
            compute_time=sharding.compute_time,  # forward, backward and the optimizer update
            exposed_communication_time=sharding.communication_time,
            optimizer_time=0.0,
            memory=sharding.memory,
            stages=(_single_stage(estimate),),
            tensor_parallel=_tensor_parallel_summary(sharding),
            solver_status=sharding.status,
            sharding=sharding,
        )
    if pp == 1:
        return Plan(
            **common,
            predicted_step_time=estimate.step_time,
            compute_time=estimate.compute_time,
            exposed_communication_time=estimate.exposed_sync_time,
            optimizer_time=estimate.optimizer_time,
            memory=estimate.memory,
            stages=(_single_stage(estimate),),
        )

    pipeline = _pipeline_options(pp, microbatches, schedule, virtual_stages, batch_size(gm))

    def solve() -> tuple[StagePartition, StagePartition]:
        problem = stage_problem_from_graph(
            gm,
            cost_model,
            stages=pipeline.stages * pipeline.virtual_stages,
            microbatches=pipeline.microbatches,
            schedule=pipeline.schedule,
            virtual_stages=pipeline.virtual_stages,
            memory_limit=limit,
            compute_dtype=compute_dtype,
            optimizer=optimizer,
            reserved_bytes=estimate.memory.transient / pipeline.microbatches,  # as _pipeline_memory counts it
        )
        forbidden = gradient_free_cuts(gm) if pipeline.schedule == "zero_bubble" else frozenset()
        if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS:
            forbidden |= gradient_free_cuts(gm, every_value=True)
        return solve_stages_without_cuts(problem, forbidden), equal_layer_split(problem)

    partition, equal = run("stages", solve)
    memory, optimizer_time = _pipeline_memory(estimate, partition, pipeline, cluster, compute_dtype, optimizer)
    return Plan(
        **common,
        predicted_step_time=partition.step_time + optimizer_time,
        compute_time=partition.step_time,
        exposed_communication_time=0.0,  # stage-to-stage transfers are inside the stage times
        optimizer_time=optimizer_time,
        memory=memory,
        stages=_stage_plans(partition, estimate, pipeline.stages),
        schedule=pipeline.schedule,
        microbatches=pipeline.microbatches,
        equal_split_stages=_stage_plans(equal, estimate, pipeline.stages),
        solver_status=partition.status,
        bubble_fraction=partition.bubble_fraction,
        equal_split_step_time=equal.step_time + optimizer_time,
    )


def _check_cluster(cluster: Any) -> None:
    if not isinstance(cluster, Cluster):
        raise PartcError(f"cluster must be a partc.Cluster, got {type(cluster).__name__}", ErrorContext(fix='use partc.Cluster.preset("h100") or partc.Cluster.from_json(path)'))


def _capture(model: nn.Module, inputs: tuple, loss_fn: Callable | None, frontend: str):
    gm = capture(model, inputs, frontend=frontend)
    if loss_fn is None:
        return gm
    model_names = {name for name, _ in model.named_modules()} | set(model.state_dict(keep_vars=True).keys())  # (keep_vars: no detach per tensor)
    return attach_loss(gm, loss_fn, reserved=model_names)


def _one_kind_over_cluster(mesh: dict[str, int] | None, world: int) -> bool:
    """Whether ``mesh`` pins one kind of parallelism over every device ({"tp": world}, the
    others absent or 1), which is planned directly; any other mesh ({"tp": 2} on 8 devices,
    {"tp": 2, "pp": 2}) pins those degrees and leaves the rest to the search."""
    if not mesh:
        return False
    degrees = [d for d in mesh.values() if d != 1]
    return len(degrees) == 1 and degrees[0] == world or (not degrees and world == 1)


# torch < 2.13 cannot run zero-bubble (see _pipeline_options): the search leaves it out there.
SCHEDULES_FOR_SEARCH = ("1f1b", "interleaved", "gpipe") + (() if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else ("zero_bubble",))


def _searched_plan(common: dict[str, Any], result: SearchResult, estimate: Estimate) -> Plan:
    """The Plan of the search's best candidate, with the alternatives and why they lost."""
    best = result.best
    b = best.breakdown
    pp = best.mesh["pp"]
    stages = _stage_plans(best.partition, estimate, pp) if best.partition is not None else (_single_stage(estimate),)
    communication = b.tp_communication + b.dp_sync_exposed + b.pipeline_transfer
    return Plan(
        **{**common, "mesh": dict(best.mesh)},
        predicted_step_time=best.predicted_step_time,
        compute_time=best.predicted_step_time - communication - b.optimizer,
        exposed_communication_time=communication,
        optimizer_time=b.optimizer,
        memory=best.memory,
        stages=stages,
        schedule=best.schedule,
        microbatches=best.microbatches,
        solver_status=best.solver_status,
        bubble_fraction=best.partition.bubble_fraction if best.partition is not None else 0.0,
        tensor_parallel=_tensor_parallel_summary(best.sharding) if best.sharding is not None else None,
        sharding=best.sharding,
        search={
            "best": best.label,
            "breakdown": {name: getattr(b, name) for name in ("compute", "recompute", "tp_communication", "pipeline_transfer", "pipeline_bubble", "dp_sync_exposed", "optimizer")},
            "recompute": best.recompute,
            "zero_stage": best.zero_stage,
            "virtual_stages": best.virtual_stages,
            "searched": result.searched,
            "seconds": result.seconds,
            "explain": explain(result),
        },
    )


def _tensor_parallel_summary(sharding: ShardingPlan) -> dict[str, Any]:
    """The JSON-safe part of a sharding plan: layouts, parameter slices, collectives."""
    return {
        "tp": sharding.tp,
        "status": sharding.status,
        "parameters": {name: str(p.layout) for name, p in sorted(sharding.parameters.items())},
        "layouts": {name: f"{s.name}: {' '.join(map(str, s.inputs))} -> {' '.join(map(str, s.outputs))}" for name, s in sharding.strategies.items()},
        "collectives_per_step": sharding.collectives_per_step(),
        "solve_seconds": sharding.solve_seconds,
    }


def _single_stage(estimate: Estimate) -> StagePlan:
    return StagePlan(
        index=0,
        rank=0,
        first_layer=0,
        last_layer=len(estimate.layers) - 1,
        layers=tuple(l.name for l in estimate.layers),
        predicted_time=estimate.compute_time,
        peak_memory=estimate.memory.total,
    )


def _stage_plans(partition: StagePartition, estimate: Estimate, ranks: int) -> tuple[StagePlan, ...]:
    ends = [*partition.starts[1:], len(estimate.layers)]
    return tuple(
        StagePlan(
            index=i,
            rank=i % ranks,
            first_layer=start,
            last_layer=end - 1,
            layers=partition.stage_layers[i],
            predicted_time=partition.stage_times[i],
            peak_memory=partition.stage_memory[i],
        )
        for i, (start, end) in enumerate(zip(partition.starts, ends))
    )


def _pipeline_memory(estimate, partition, pipeline, cluster, compute_dtype, optimizer) -> tuple[MemoryBreakdown, float]:
    """The fullest pipeline rank's memory, split into its parts, and the optimizer step time."""
    per_rank_memory = [0.0] * pipeline.stages
    per_rank_params = [0] * pipeline.stages
    ends = [*partition.starts[1:], len(estimate.layers)]
    for i, (start, end) in enumerate(zip(partition.starts, ends)):
        per_rank_memory[i % pipeline.stages] += partition.stage_memory[i]
        per_rank_params[i % pipeline.stages] += sum(l.param_numel for l in estimate.layers[start:end])
    worst = max(range(pipeline.stages), key=lambda r: per_rank_memory[r])
    dtype = compute_dtype or getattr(torch, estimate.compute_dtype)
    static = training_memory(per_rank_params[worst], dtype, 0.0, optimizer=optimizer, mixed_precision=compute_dtype is not None)
    memory = MemoryBreakdown(
        parameters=static.parameters,
        gradients=static.gradients,
        optimizer_state=static.optimizer_state,
        activations=max(per_rank_memory[worst] - static.total, 0.0),
        transient=estimate.memory.transient / pipeline.microbatches,
    )
    device = cluster.slowest_device(range(pipeline.stages))
    optimizer_time = max(per_rank_params) * optimizer_step_bytes(optimizer, dtype, compute_dtype is not None) / device.memory_bandwidth
    return memory, optimizer_time


def _pipeline_options(pp: int, microbatches: int | None, schedule: str | None, virtual_stages: int | None, batch: int) -> _Pipeline:
    schedule = schedule or ("interleaved" if (virtual_stages or 1) > 1 else "1f1b")
    if schedule not in SCHEDULES:
        raise PartcError(f"unknown schedule {schedule!r}", ErrorContext(fix=f"use one of {', '.join(SCHEDULES)}"))
    if schedule == "zero_bubble" and PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS:
        raise PartcError(
            f"the zero_bubble schedule needs torch >= 2.13 (this is {torch.__version__}; 2.11's fails in backward)",
            ErrorContext(pass_name="stages", fix="use 'interleaved' or '1f1b', or upgrade torch"),
        )
    interleaved = schedule in ("interleaved", "zero_bubble")
    virtual = virtual_stages or (2 if interleaved else 1)
    if interleaved and virtual < 2 or not interleaved and virtual != 1:
        raise PartcError(
            f"schedule {schedule!r} with {virtual} stage(s) per rank",
            ErrorContext(fix="gpipe and 1f1b run 1 stage per rank; interleaved and zero_bubble need 2 or more"),
        )
    if microbatches is None:
        microbatches = max(m for m in range(1, 4 * pp + 1) if batch % m == 0)
    if not isinstance(microbatches, int) or microbatches < 1 or batch % microbatches:
        raise PartcError(
            f"the global batch of {batch} does not split into {microbatches} microbatches",
            ErrorContext(pass_name="stages", fix=f"use a microbatch count that divides {batch}"),
        )
    return _Pipeline(stages=pp, microbatches=microbatches, schedule=schedule, virtual_stages=virtual)


def _as_tuple(example_inputs: Any) -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise PartcError("example_inputs is empty", ErrorContext(fix="pass the global batch, e.g. (token_ids,)"))
    return inputs


def _dtype(mixed_precision: str | torch.dtype | None) -> torch.dtype | None:
    if mixed_precision is None or isinstance(mixed_precision, torch.dtype):
        return mixed_precision
    if mixed_precision not in _DTYPES:
        raise PartcError(f"unknown mixed_precision {mixed_precision!r}", ErrorContext(fix=f"use one of {', '.join(_DTYPES)}"))
    return _DTYPES[mixed_precision]


def _degrees(cluster: Cluster, mesh: dict[str, int] | None) -> tuple[int, int, int]:
    """(dp, tp, pp) from a mesh that pins one kind of parallelism over the whole cluster."""
    pinned = dict(mesh or {})
    unknown = set(pinned) - {"dp", "tp", "pp"}
    if unknown:
        raise PartcError(f"unknown mesh dimension(s) {sorted(unknown)}", ErrorContext(fix='name mesh dimensions "dp", "tp" and "pp"'))
    world = cluster.world_size
    tp, pp = pinned.get("tp", 1), pinned.get("pp", 1)
    dp = pinned.get("dp", world // (tp * pp))
    if tp > 1 and cluster.spans_nodes(range(tp)):
        raise PartcError(f"tensor parallelism over {tp} devices would cross nodes", ErrorContext(fix="keep tp within one node's devices"))
    return dp, tp, pp
