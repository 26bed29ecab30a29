"""Train a small GPT with partc, under torchrun or in one process.

    torchrun --nproc-per-node 8 examples/train_gpt.py --mesh pp=2,dp=2,tp=2 --schedule 1f1b
    torchrun --nproc-per-node 2 examples/train_gpt.py --mesh pp=2 --schedule 1f1b
    torchrun --nproc-per-node 4 examples/train_gpt.py --mesh auto   # partc searches the layout
    python examples/train_gpt.py --mesh pp=2            # the same plan, stages run in this process

Every rank builds the same model from the same seed; partc plans, splits and runs it
(gloo on CPUs, NCCL on GPUs). Rank 0 prints one line per step. The data is random tokens
(a next-token task over a fixed sequence set), enough to see the loss fall.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import partc
from partc.cli import parse_mesh
from partc.models import GPT, GPTConfig


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="auto", help="e.g. pp=2, dp=2,tp=2 or pp=2,dp=2,tp=2; auto: partc searches")
    parser.add_argument("--schedule", default=None, help="gpipe, 1f1b, interleaved, zero_bubble (pipelines)")
    parser.add_argument("--microbatches", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh = None if args.mesh == "auto" else parse_mesh(args.mesh)
    devices = world if "WORLD_SIZE" in os.environ else math.prod((mesh or {"dp": 1}).values())
    kind = "h100" if torch.cuda.is_available() else "cpu"
    cluster = partc.Cluster.preset(kind, devices_per_node=devices)

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.layers, n_head=4, d_model=args.width, dropout=0.0)
    model = GPT(config)
    data = torch.randint(0, config.vocab_size, (args.batch * 4, args.seq + 1), generator=torch.Generator().manual_seed(0))
    tokens, targets = data[: args.batch, :-1], data[: args.batch, 1:]

    options = {k: v for k, v in (("schedule", args.schedule), ("microbatches", args.microbatches)) if v is not None}
    pm = partc.compile(model, cluster, tokens, loss_fn=loss_fn, mesh=mesh, **options)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(pm.plan.summary(), flush=True)
    params = list(pm.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3) if params else None

    for step in range(args.steps):
        batch = data[(step % 4) * args.batch : (step % 4 + 1) * args.batch]
        tokens, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        start = time.perf_counter()
        if optimizer:
            optimizer.zero_grad()
        loss = pm.step(tokens, targets)
        if optimizer:
            optimizer.step()
        seconds = time.perf_counter() - start
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  {args.batch * args.seq / seconds:10,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
