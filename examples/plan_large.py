"""Plan a 70B-parameter Llama-style model on 64 H100s (8 nodes x 8), from the meta device.

    python examples/plan_large.py [--batch 64] [--seq 4096] [--nodes 8]

The model is partc's built-in "llama-70b" (80 layers, d_model 8192, grouped-query attention
64/8 heads, SwiGLU, rotary embeddings, vocabulary 32000). It is built under
``torch.device("meta")``: no weight is allocated, planning reads shapes only, so this runs
on a laptop. The search picks data, tensor and pipeline degrees, microbatches, schedule,
recomputation and ZeRO; the summary prints the chosen plan and explain() the alternatives.
"""

import argparse
import time

import partc
from partc.models import build, num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch, in sequences (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=8, help="nodes of 8 H100s (default: %(default)s)")
    parser.add_argument("--cache", metavar="DIR", help="reuse a plan stored in DIR (partc.plan's cache)")
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokens = build("llama-70b", batch_size=args.batch, seq_len=args.seq, device="meta")
    print(f"llama-70b: {num_params(model) / 1e9:.1f}B parameters on the meta device, global batch {args.batch} x {args.seq} tokens")
    cluster = partc.Cluster.preset("h100", nodes=args.nodes, devices_per_node=8)
    plan = partc.plan(model, cluster, tokens, mixed_precision="bf16", cache=args.cache, progress=lambda line: print(f"  [partc] {line}"))
    print(plan.summary())
    print()
    print(plan.explain())
    print()
    print(f"plan hash {plan.hash[:16]}; planned in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
