"""Parity worker, launched by torchrun from tests/test_parity_*.py (not collected by pytest).

Every rank builds the same model (same seed), compiles it with partc for the case given,
and runs 3 AdamW steps beside a single-device reference copy; it checks, rank by rank:
the loss of every step, every gradient this rank holds (by original parameter name), and
every parameter after the steps (fp32, rtol 1e-5, atol 1e-6); and that the union of the
ranks' state-dict keys is the model's. Any mismatch exits non-zero with the details.

    torchrun --nproc-per-node 2 tests/distributed/parity_worker.py --model gpt --pp 2 --schedule 1f1b --microbatches 4
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import GPT, GPTConfig, Llama
from partc.models.llama import llama_tiny

RTOL, ATOL = 1e-5, 1e-6
BATCH, SEQ, VOCAB = 8, 16, 128


class SkipNet(nn.Module):
    """An MLP whose input embedding is added back just before the head: a skip
    connection that spans every stage between."""

    def __init__(self, width: int = 32, depth: int = 6):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, idx):
        x0 = self.embed(idx)
        h = x0
        for block in self.blocks:
            h = block(h)
        return self.head(h + x0)


def build(name: str) -> nn.Module:
    # bias=False: the key projection's bias has an analytically zero gradient (softmax
    # ignores a constant added to every score), so its computed gradient is rounding
    # noise, which AdamW normalises into full-size steps that differ run to run.
    gpt = dict(vocab_size=VOCAB, block_size=32, n_layer=4, n_head=4, d_model=32, dropout=0.0, bias=False)
    if name == "gpt":
        return GPT(GPTConfig(**gpt, tie_weights=False))
    if name == "gpt-tied":
        return GPT(GPTConfig(**gpt, tie_weights=True))
    if name == "llama":
        return Llama(llama_tiny())
    if name == "skip":
        return SkipNet()
    raise SystemExit(f"unknown model {name}")


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def compare(what: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        diff = (got - want).abs().max().item()
        failures.append(f"{what}: max abs diff {diff:.3e}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build(args.model)
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)

    world = int(__import__("os").environ["WORLD_SIZE"])
    mesh = {"pp": args.pp} if args.pp > 1 else {"dp": args.dp}
    options = dict(mesh=mesh)
    if args.pp > 1:
        options.update(microbatches=args.microbatches, schedule=args.schedule, virtual_stages=args.virtual_stages)
    pm = partc.compile(model, partc.Cluster.preset("cpu", devices_per_node=world), (inputs,), loss_fn=loss_fn, **options)
    rank = dist.get_rank()

    reference_params = dict(reference.state_dict(keep_vars=True))
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    failures: list[str] = []
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = pm.step(inputs, targets)
        reference_optimizer.zero_grad()
        reference_loss = loss_fn(reference(inputs), targets)
        reference_loss.backward()
        compare(f"step {step} loss", loss, reference_loss.detach(), failures)
        for name, p in pm.named_parameters():
            if p.grad is None:
                failures.append(f"step {step} grad {name}: missing")
            else:
                compare(f"step {step} grad {name}", p.grad, reference_params[name].grad, failures)
        optimizer.step()
        reference_optimizer.step()
    for name, p in pm.named_parameters():
        compare(f"param {name} after {args.steps} steps", p.detach(), reference_params[name].detach(), failures)

    keys: list = [None] * dist.get_world_size()
    dist.all_gather_object(keys, sorted(pm.state_dict()))
    union = set().union(*map(set, keys))
    if union != set(reference.state_dict()):
        failures.append(f"state-dict keys: missing {sorted(set(reference.state_dict()) - union)}, extra {sorted(union - set(reference.state_dict()))}")
    held = sorted(name for name, _ in pm.named_parameters())
    print(json.dumps({"rank": rank, "case": vars(args), "parameters": len(held), "failures": failures[:20]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
