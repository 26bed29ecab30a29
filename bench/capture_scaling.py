"""Benchmark: capture + propagate + annotate of GPT-3-shaped models (d=12288) on the meta device.

    python bench/capture_scaling.py            # 12, 24, 48, 96 layers
    python bench/capture_scaling.py --layers 96 --repeats 3
    python bench/capture_scaling.py --trace-every-block   # capture without copying repeated blocks

Target (issue #2): 96 layers under 5 s on 2 CPU cores, time linear in layers. Prints the
median of --repeats runs per depth, per pass, and the time per layer; model construction
(on the meta device) is excluded and printed separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from partc.models import GPT, gpt3_shaped
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.ir import graph_info
from partc.passes.propagate import propagate


def measure(n_layer: int, batch: int, seq: int, reuse_blocks: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT(gpt3_shaped(n_layer))
        idx = torch.zeros(batch, seq, dtype=torch.long)
    times = {"build (excluded)": time.perf_counter() - start}
    cpu = time.process_time()
    start = time.perf_counter()
    gm = capture(model, (idx,), reuse_blocks=reuse_blocks)
    times["capture"] = time.perf_counter() - start
    start = time.perf_counter()
    propagate(gm, (idx,))
    times["propagate"] = time.perf_counter() - start
    start = time.perf_counter()
    annotate(gm)
    times["annotate"] = time.perf_counter() - start
    times["total"] = times["capture"] + times["propagate"] + times["annotate"]
    times["cpu"] = time.process_time() - cpu  # the same three passes in CPU seconds (a shared machine waits)
    times["nodes"] = len(gm.graph.nodes)
    times["layers"] = len(graph_info(gm).layers)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--trace-every-block", action="store_true", help="trace every repeated block (capture's reuse_blocks=False)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    measure(2, args.batch, args.seq)  # warm-up: first-call costs of fx and fake tensors
    header = f"{'layers':>6} {'nodes':>6} {'build':>7} {'capture':>8} {'propagate':>10} {'annotate':>9} {'total':>7} {'ms/layer':>9} {'CPU':>6}"
    print(header)
    print("-" * len(header))
    totals = {}
    for n_layer in args.layers:
        runs = [measure(n_layer, args.batch, args.seq, not args.trace_every_block) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        totals[n_layer] = med["total"]
        print(
            f"{n_layer:>6} {int(med['nodes']):>6} {med['build (excluded)']:>6.2f}s {med['capture']:>7.2f}s "
            f"{med['propagate']:>9.2f}s {med['annotate']:>8.2f}s {med['total']:>6.2f}s {1e3 * med['total'] / n_layer:>9.1f} {med['cpu']:>5.2f}s"
        )
    if len(totals) > 1:
        lo, hi = min(totals), max(totals)
        print(f"time({hi}) / time({lo}) = {totals[hi] / totals[lo]:.2f} (linear would be {hi / lo:.2f})")


if __name__ == "__main__":
    main()
