"""``partc.plan``: run the passes over a model and return a :class:`~partc.plan.Plan`.

The passes run in order, each timed; a failure that is not already a
:class:`~partc.PartcError` is reported with the name of the pass that failed and the
passes that ran before it::

    capture -> propagate -> annotate -> estimate
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from partc.cluster import Cluster
from partc.cost_model import CostModel
from partc.errors import ErrorContext, PartcError
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.estimate import batch_size, estimate_data_parallel
from partc.passes.ir import OpKind, graph_info, node_info
from partc.passes.propagate import propagate
from partc.plan import Plan, StagePlan, graph_fingerprint

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def plan(
    model: nn.Module,
    cluster: Cluster,
    example_inputs: Any,
    *,
    loss_fn: Callable | None = None,
    mesh: dict[str, int] | None = None,
    mixed_precision: str | torch.dtype | None = None,
    optimizer: str = "adamw",
    memory_limit: float | None = None,
    training: bool = True,
    frontend: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Plan ``model`` for ``cluster``; no GPU and no process group needed.

    example_inputs: the global batch (a tensor or a tuple of tensors).
    mesh: parallel degrees to pin; this version plans data parallelism over every device
        ({"dp": world size}) and refuses other degrees.
    mixed_precision: "bf16"/"fp16" to run matmuls in that dtype with fp32 master weights.
    memory_limit: bytes per device (default: the smallest device's memory).
    progress: called with one line per finished pass (the CLI prints them).
    """
    if not isinstance(cluster, Cluster):
        raise PartcError(f"cluster must be a partc.Cluster, got {type(cluster).__name__}", ErrorContext(fix='use partc.Cluster.preset("h100") or partc.Cluster.from_json(path)'))
    inputs = _as_tuple(example_inputs)
    compute_dtype = _dtype(mixed_precision)
    dp = _data_parallel_degree(cluster, mesh)
    if loss_fn is not None:
        warnings.warn("partc.plan: loss_fn is not priced yet (the model's forward is planned on its own)", stacklevel=2)

    times: dict[str, float] = {}
    passes: list[tuple[str, Callable[[Any], Any]]] = [
        ("capture", lambda _: capture(model, inputs, frontend=frontend)),
        ("propagate", lambda gm: propagate(gm, inputs)),
        ("annotate", annotate),
        ("estimate", lambda gm: (gm, estimate_data_parallel(gm, CostModel(cluster), dp=dp, compute_dtype=compute_dtype, optimizer=optimizer, training=training))),
    ]
    value: Any = None
    for index, (name, run) in enumerate(passes):
        start = time.perf_counter()
        try:
            value = run(value)
        except PartcError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: name the pass
            before = ", ".join(n for n, _ in passes[:index]) or "none"
            raise PartcError(
                f"pass {name!r} failed: {type(e).__name__}: {e}",
                ErrorContext(pass_name=name, fix=f"passes that ran before it: {before}; please report this with the model"),
            ) from e
        times[name] = time.perf_counter() - start
        if progress is not None:
            progress(f"{name:<10} {times[name]:7.3f} s")
    gm, estimate = value

    limit = memory_limit if memory_limit is not None else min(cluster.device(r).memory for r in range(cluster.world_size))
    unsupported = tuple(n.name for n in gm.graph.nodes if node_info(n).op == OpKind.OTHER)
    info = graph_info(gm)
    return Plan(
        model=type(model).__name__,
        frontend=info.frontend,
        fallback_reason=info.fallback_reason,
        mesh={"pp": 1, "dp": dp, "tp": 1},
        batch_size=batch_size(gm),
        compute_dtype=estimate.compute_dtype,
        cluster=cluster,
        layers=estimate.layers,
        predicted_step_time=estimate.step_time,
        compute_time=estimate.compute_time,
        exposed_communication_time=estimate.exposed_sync_time,
        optimizer_time=estimate.optimizer_time,
        memory=estimate.memory,
        memory_limit=limit,
        fingerprint=graph_fingerprint(gm),
        stages=(
            StagePlan(
                index=0,
                rank=0,
                first_layer=0,
                last_layer=len(estimate.layers) - 1,
                layers=tuple(l.name for l in estimate.layers),
                predicted_time=estimate.compute_time,
                peak_memory=estimate.memory.total,
            ),
        ),
        unsupported_ops=unsupported,
        pass_times=times,
        graph=gm,
    )


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


def _data_parallel_degree(cluster: Cluster, mesh: dict[str, int] | None) -> int:
    pinned = dict(mesh or {})
    unknown = set(pinned) - {"dp", "tp", "pp"}
    if unknown:
        raise PartcError(f"unknown mesh dimension(s) {sorted(unknown)}", ErrorContext(fix='name mesh dimensions "dp", "tp" and "pp"'))
    if pinned.get("tp", 1) != 1 or pinned.get("pp", 1) != 1:
        raise PartcError(
            f"mesh {pinned} asks for tensor or pipeline parallelism, which this partc version does not plan yet",
            ErrorContext(fix='pin only "dp" for now'),
        )
    dp = pinned.get("dp", cluster.world_size)
    if dp != cluster.world_size:
        raise PartcError(f"dp={dp} does not use the cluster's {cluster.world_size} devices", ErrorContext(fix=f"use dp={cluster.world_size}"))
    return dp
