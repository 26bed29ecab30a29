"""One model under every layout: the torchrun worker that ``bench/gpu/run.py`` launches.

    torchrun --nproc-per-node N bench/gpu/worker.py --model gpt3-1.3b --batch 16 --seq 2048 \\
        --layouts '["partc", "ddp", "pp-m8"]' --cluster cluster.json --out results.jsonl

For each layout in turn, every rank builds the model afresh (same seed: the same weights
on every rank), wraps it, runs ``--warmup`` steps that are not timed and ``--steps`` that
are, and frees it all before the next. A step's time is the slowest rank's (the ranks
wait on each other in every layout anyway); the figure reported is the median over the
timed steps. Peak memory is ``torch.cuda.max_memory_allocated`` from the first step on
(the model build is not counted), the fullest rank's.

Rank 0 appends one JSON line per layout to ``--out``: first ``{"event": "start"}``, then
the result, so a crash (a rank out of memory while another waits in a collective, killed
by the NCCL timeout) leaves a trace of which layout it was; ``run.py`` relaunches the rest.

Layout names: ``partc`` (partc.compile with no mesh: partc picks; when that plan fails
(out of memory, refused) ``partc-fallback`` runs next: ``mesh=`` of the fastest single kind
partc predicts to fit), ``partc-tp``
(partc.compile with ``mesh={"tp": N}``: the codegen-overhead comparison), ``partc-zero<K>``
(partc.compile with ``zero_stage=K``: partc's best plan with that ZeRO stage), ``ddp``,
``fsdp2``, ``ddp-acc<M>`` and ``fsdp2-acc<M>`` (M microbatches accumulated), ``tp``, ``pp-m<M>`` (pipeline over all ranks, M microbatches), and
``3d-tp<T>-pp<P>-m<M>`` (Megatron's tp x pp x dp).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layouts

import partc
from partc.models import training_case


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True, help="global batch, in sequences")
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--layouts", required=True, help="JSON list of layout names")
    parser.add_argument("--cluster", required=True, help="cluster JSON (partc calibrate) or a preset spec such as h200x2")
    parser.add_argument("--out", required=True, help="rank 0 appends one JSON line per layout here")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds a collective may wait before the process group gives up")
    return parser.parse_args(argv)


# -- building --------------------------------------------------------------------------
def model_builder(name: str, batch: int, seq: int, device: torch.device) -> Callable[[], Any]:
    """The model in bf16 on ``device`` and the global batch, identical on every rank."""

    def build():
        torch.manual_seed(0)
        case = training_case(name, batch_size=batch, seq_len=seq, device=device)
        case.model.to(torch.bfloat16)
        return case

    return build


def partc_trainer(setup: layouts.Setup, cluster: partc.Cluster, mesh: dict[str, int] | None, **pinned: Any) -> layouts.Trainer:
    """partc.compile through its public API, with the loss traced into the graph. If compile
    refuses that, the refusal is recorded and it is tried without the loss in the graph,
    then with ``mesh=`` of the fastest single kind partc predicts to fit. ``pinned``: more
    of partc.plan's keywords (``zero_stage=3`` for partc-zero3)."""
    case = setup.build()
    tokens, targets = case.inputs[0], case.targets
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("loss in graph", {"example_targets": targets}),
        ("loss after the graph", {}),
    ]
    refusals: list[str] = []
    pm = None
    for label, options in attempts:
        try:
            pm = partc.compile(case.model, cluster, case.inputs, loss_fn=layouts.language_model_loss, mesh=mesh, **pinned, **options)
            break
        except partc.PartcError as e:
            refusals.append(f"{label}: {str(e).splitlines()[0]}")
    fallback = None
    if pm is None and mesh is None and not pinned:
        fallback = fastest_single_kind(case, cluster)
        refusals.append(f"fell back to mesh={fallback}")
        case = setup.build()
        tokens, targets = case.inputs[0], case.targets
        pm = partc.compile(case.model, cluster, case.inputs, loss_fn=layouts.language_model_loss, mesh=fallback)
    if pm is None:
        raise partc.PartcError("partc.compile refused every attempt: " + " | ".join(refusals))
    del case
    plan = pm.plan
    parameters = list(pm.parameters())
    optimizer = layouts.make_optimizer(parameters) if parameters else None

    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        pm.step(tokens, targets)
        if optimizer is not None:
            optimizer.step()

    search = plan.search or {}
    detail = {
        "mesh": dict(plan.mesh),
        "schedule": plan.schedule,
        "microbatches": plan.microbatches,
        "predicted_step_time": plan.predicted_step_time,
        "predicted_memory": plan.memory.total,
        "searched_best": search.get("best"),
        "zero_stage": search.get("zero_stage"),
        "recompute": search.get("recompute"),
        "refusals": refusals,
        "fallback_mesh": fallback,
    }
    return layouts.Trainer(step, detail, [pm, optimizer])


def fastest_single_kind(case, cluster: partc.Cluster) -> dict[str, int]:
    """The fastest of dp, pp and tp over the whole cluster that partc predicts to fit."""
    world = cluster.world_size
    best = None
    for mesh in ({"dp": world}, {"pp": world}, {"tp": world}):
        try:
            plan = partc.plan(case.model, cluster, case.inputs, mesh=mesh)
        except partc.PartcError:
            continue
        if plan.fits and (best is None or plan.predicted_step_time < best[0]):
            best = (plan.predicted_step_time, mesh)
    if best is None:
        raise partc.PartcError("no single kind of parallelism fits: nothing to fall back to")
    return best[1]


def trainer_for(layout: str, setup: layouts.Setup, cluster: partc.Cluster) -> layouts.Trainer:
    if layout == "partc":
        return partc_trainer(setup, cluster, None)
    if layout == "partc-fallback":
        case = setup.build()
        mesh = fastest_single_kind(case, cluster)
        del case
        trainer = partc_trainer(setup, cluster, mesh)
        trainer.detail["fallback_mesh"] = mesh
        return trainer
    if layout == "partc-tp":
        return partc_trainer(setup, cluster, {"tp": setup.world})
    match = re.fullmatch(r"partc-zero(\d)", layout)
    if match:  # the best plan partc finds with that ZeRO stage: what a different tie-break would run
        return partc_trainer(setup, cluster, None, zero_stage=int(match.group(1)))
    match = re.fullmatch(r"(ddp|fsdp2)(?:-acc(\d+))?", layout)
    if match:
        build = layouts.ddp if match.group(1) == "ddp" else layouts.fsdp2
        return build(setup, int(match.group(2) or 1))
    if layout == "tp":
        return layouts.tensor_parallel(setup)
    match = re.fullmatch(r"pp-m(\d+)", layout)
    if match:
        return layouts.pipeline(setup, int(match.group(1)))
    match = re.fullmatch(r"3d-tp(\d+)-pp(\d+)-m(\d+)", layout)
    if match:
        tp, pp, m = map(int, match.groups())
        return layouts.megatron_3d(setup, tp=tp, pp=pp, microbatches=m)
    raise ValueError(f"unknown layout {layout!r}")


# -- measuring -------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(e: BaseException, during: str) -> dict[str, Any]:
    """A layout's error as a result: out of memory, refused by partc, or anything else."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"status": "oom", "error": str(e).splitlines()[0][:300], "during": during}
    if isinstance(e, partc.PartcError):
        return {"status": "refused", "error": str(e)[:1500], "during": during}
    status = "oom" if "out of memory" in str(e).lower() else "error"
    return {"status": status, "during": during, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], "traceback": traceback.format_exc()[-2000:]}


def everyone_built(built: bool) -> bool:
    """Whether every rank built the layout: a rank whose build failed must not leave the
    others waiting in the first step's collectives until the timeout kills the launch."""
    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, built)
    return all(flags)


def measure(layout: str, setup: layouts.Setup, cluster: partc.Cluster, warmup: int, steps: int) -> dict[str, Any]:
    """This rank's figures for one layout (or its error)."""
    device = setup.device
    _free(device)
    result: dict[str, Any] = {"status": "ok"}
    trainer = None
    try:
        trainer = trainer_for(layout, setup, cluster)
    except Exception as e:  # noqa: BLE001 - a layout that fails is reported, the others still run
        result = failure(e, "build")
    if not everyone_built(trainer is not None):
        if trainer is not None:
            result = {"status": "error", "during": "build", "error": "another rank failed to build this layout", "peer": True}
    else:
        try:
            _free(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(warmup + steps):
                dist.barrier()
                _sync(device)
                start = time.perf_counter()
                trainer.step()
                _sync(device)
                times.append(time.perf_counter() - start)
            result["times"] = times[warmup:]
            result["detail"] = trainer.detail
            if device.type == "cuda":
                result["peak_memory"] = torch.cuda.max_memory_allocated(device)
                result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        except Exception as e:  # noqa: BLE001 - as above
            result = failure(e, "steps")
    if trainer is not None and result["status"] != "ok":
        result["detail"] = trainer.detail  # what was built before it failed (partc's plan, say)
    del trainer
    _free(device)
    return result


def combine(layout: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from every rank's: the slowest rank per step, the fullest rank's memory."""
    failed = [r for r in per_rank if r["status"] != "ok"]
    if failed:
        first = next((r for r in failed if not r.get("peer")), failed[0])  # the rank that failed, not one that waited on it
        return {
            "layout": layout, "status": first["status"], "error": first.get("error"), "during": first.get("during"), "detail": first.get("detail"),
            "traceback": first.get("traceback"), "failed_ranks": [i for i, r in enumerate(per_rank) if r["status"] != "ok"],
        }
    step_times = [max(ts) for ts in zip(*(r["times"] for r in per_rank))]
    result = {
        "layout": layout,
        "status": "ok",
        "step_time": statistics.median(step_times),
        "step_times": step_times,
        "detail": per_rank[0]["detail"],
    }
    if "peak_memory" in per_rank[0]:
        result["peak_memory"] = max(r["peak_memory"] for r in per_rank)
        result["peak_memory_per_rank"] = [r["peak_memory"] for r in per_rank]
        result["peak_reserved"] = max(r["peak_reserved"] for r in per_rank)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    timeout = datetime.timedelta(seconds=args.timeout)
    if cuda:
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    cluster = partc.Cluster.parse(args.cluster)
    setup = layouts.Setup(build=model_builder(args.model, args.batch, args.seq, device), device=device, rank=rank, world=world, batch_size=args.batch)

    def record(line: dict[str, Any]) -> None:
        if rank == 0:
            with open(args.out, "a") as f:
                f.write(json.dumps({"model": args.model, "batch": args.batch, "seq": args.seq, "world": world, **line}) + "\n")

    queue = list(json.loads(args.layouts))
    while queue:
        layout = queue.pop(0)
        record({"event": "start", "layout": layout})
        mine = measure(layout, setup, cluster, args.warmup, args.steps)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        result = combine(layout, everyone)
        record({"event": "result", **result})
        if layout == "partc" and result["status"] != "ok":
            queue.insert(0, "partc-fallback")  # partc's pick did not run: the fastest single kind it predicts to fit
        if rank == 0:
            shown = f"{result['step_time'] * 1e3:.1f} ms" if result["status"] == "ok" else f"{result['status']}: {result.get('error')}"
            print(f"[bench] {args.model} {layout}: {shown}", flush=True)
    dist.barrier()
    # Every result is written. destroy_process_group() hung here after the pipeline and 3-D
    # layouts on NCCL (torch 2.11, 4 and 8 x H200: every such launch sat until run.py's
    # timeout), as in pytorch/pytorch#190396 (an eagerly initialised NCCL group, here
    # device_id=, destroyed after collectives on several DeviceMesh / new_group groups), so
    # the worker leaves without it, as the parity workers do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
