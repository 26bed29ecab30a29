"""Plan a model from Python: a GPT-3-shaped model on 64 H100s, built on the meta device;
the search picks data, tensor and pipeline degrees, microbatches, schedule, recompute and ZeRO.

    python examples/plan_gpt.py [--layers 96] [--nodes 8]

No GPU is needed and no weights are allocated: planning reads shapes only.
"""

import argparse

import torch

import partc
from partc.models import GPT, gpt3_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences of 2048 tokens)")
    args = parser.parse_args()

    with torch.device("meta"):
        model = GPT(gpt3_shaped(args.layers))
        tokens = torch.zeros(args.batch, 2048, dtype=torch.long)
    cluster = partc.Cluster.preset("h100", nodes=args.nodes, devices_per_node=8)
    plan = partc.plan(model, cluster, tokens, mixed_precision="bf16", progress=lambda line: print(f"  [partc] {line}"))
    print(plan.summary())
    print()
    print(plan.explain())


if __name__ == "__main__":
    main()
