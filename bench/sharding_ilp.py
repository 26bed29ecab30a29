"""Benchmark: the tensor-parallel sharding ILP on a 96-layer GPT-3-shaped model at tp=8.

    python bench/sharding_ilp.py                      # 96 layers, reuse vs no reuse on all 96
    python bench/sharding_ilp.py --no-reuse-layers 24 # the no-reuse comparison on 24 layers

The model is built on the meta device (nothing allocated) and captured once; the figures
are the wall time of ``plan_sharding`` (strategies, prices, ILP build, CBC, plan) and of
CBC alone, the objective (predicted seconds of compute + tensor-parallel communication per
step on one device), and the ILP's size. Target: under 5 s with repeated-block reuse on 2
CPU cores.

GPT-3 175B does not fit 8 x 80 GB with tensor parallelism alone (about 330 GiB per device
with AdamW), so the ILP runs without a memory budget (``memory_limit=math.inf``); the run
with the device's budget is shown too, and reports the least memory any layout needs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from partc.cluster import Cluster
from partc.cost_model import CostModel
from partc.errors import InfeasiblePlanError
from partc.models import GPT, gpt3_shaped
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.propagate import propagate
from partc.passes.sharding import plan_sharding


def captured(layers: int, batch: int, seq: int):
    with torch.device("meta"):
        model = GPT(gpt3_shaped(layers))
        idx = torch.randint(0, 50257, (batch, seq))
    return annotate(propagate(capture(model, (idx,)), (idx,)))


def timed_plan(gm, cost_model, tp: int, reuse: bool, repeats: int, time_limit: float):
    walls, plan = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        plan = plan_sharding(
            gm, cost_model, tp=tp, compute_dtype=torch.bfloat16, memory_limit=math.inf,
            reuse_repeated_blocks=reuse, time_limit=time_limit,
        )
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), plan


def report(label: str, wall: float, plan) -> None:
    counts = plan.collectives_per_step()
    print(
        f"{label:<34} {wall:8.2f} s  (CBC {plan.solve_seconds:5.2f} s, {plan.status})  "
        f"objective {plan.objective * 1e3:10.3f} ms/step  ILP {plan.ilp_variables} vars / {plan.ilp_constraints} constraints"
    )
    print(f"{'':<34} collectives per step: forward {counts['forward']}, backward {counts['backward']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-reuse-layers", type=int, default=None,
                        help="run the no-reuse comparison on a model of this many layers (default: --layers)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs with reuse (median reported)")
    parser.add_argument("--time-limit", type=float, default=600.0)
    args = parser.parse_args(argv)

    cluster = Cluster.preset("h100", nodes=1, devices_per_node=args.tp)
    cost_model = CostModel(cluster)
    print(f"sharding ILP: GPT-3-shaped model (d_model 12288, 96 heads, vocab 50257), batch {args.batch}x{args.seq}, "
          f"tp={args.tp} on {cluster.describe()}, bf16 compute, AdamW; torch {torch.__version__}")

    started = time.perf_counter()
    gm = captured(args.layers, args.batch, args.seq)
    print(f"capture + propagate + annotate of {args.layers} layers ({len(gm.graph.nodes)} nodes): "
          f"{time.perf_counter() - started:.2f} s (not part of the figures below)")

    wall, plan = timed_plan(gm, cost_model, args.tp, True, args.repeats, args.time_limit)
    report(f"{args.layers} layers, reuse (median of {args.repeats})", wall, plan)
    print(f"{'':<34} {plan.reused_layers} layers solved through a representative; "
          f"predicted compute {plan.compute_time * 1e3:.1f} ms + communication {plan.communication_time * 1e3:.1f} ms; "
          f"memory {plan.memory.total / 2**30:.1f} GiB per device")

    no_reuse_layers = args.no_reuse_layers or args.layers
    if no_reuse_layers == args.layers:
        gm_full, label = gm, f"{args.layers} layers, no reuse"
    else:
        gm_full, label = captured(no_reuse_layers, args.batch, args.seq), f"{no_reuse_layers} layers, no reuse"
        print(f"no-reuse comparison on {no_reuse_layers} layers (--no-reuse-layers), not {args.layers}:")
    wall_full, plan_full = timed_plan(gm_full, cost_model, args.tp, False, 1, args.time_limit)
    report(label, wall_full, plan_full)
    if gm_full is not gm:
        _, plan_small = timed_plan(gm_full, cost_model, args.tp, True, 1, args.time_limit)
        report(f"{no_reuse_layers} layers, reuse", _, plan_small)
        plan = plan_small
    gap = (plan.objective - plan_full.objective) / plan_full.objective
    print(f"objective with reuse vs without: {gap * 100:+.4f} %")

    try:
        plan_sharding(gm, cost_model, tp=args.tp, compute_dtype=torch.bfloat16)
    except InfeasiblePlanError as e:
        print(f"with the device budget ({cluster.device(0).memory / 2**30:.0f} GiB): InfeasiblePlanError: {e.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
