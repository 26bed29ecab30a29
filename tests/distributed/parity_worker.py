"""Parity worker, launched by torchrun from tests/test_parity_*.py (not collected by pytest).

Every rank builds the same model (same seed), compiles it with partc for the case given,
and runs 3 AdamW steps beside a single-device reference copy; it checks, rank by rank:
the loss of every step, every gradient this rank holds (by original parameter name), and
every parameter after the steps (fp32, rtol 1e-5, atol 1e-6); and that the union of the
ranks' state-dict keys is the model's. Any mismatch exits non-zero with the details.

    torchrun --nproc-per-node 2 tests/distributed/parity_worker.py \
        --cases '[{"model": "gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4}]'
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import GPT, GPTConfig, Llama
from partc.models.llama import llama_tiny

BATCH, SEQ, VOCAB = 8, 16, 128
from harness import LR, case_cluster, serve, train_and_compare  # noqa: E402, F401 (LR: checkpoint_worker's)


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
    if name == "llama":  # grouped-query attention (4 heads, 2 KV heads), 6 blocks
        return Llama(dataclasses.replace(llama_tiny(), n_layer=6))
    if name == "skip":
        return SkipNet()
    raise SystemExit(f"unknown model {name}")


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run_case(case: dict) -> list[str]:
    """Compile one case, train it beside the reference, return what differed."""
    torch.manual_seed(0)
    model = build(case["model"])
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)

    options = {key: case[key] for key in ("mesh", "microbatches", "schedule", "virtual_stages", "data_parallel", "gradient_compression") if key in case}
    if case.get("loss_in_graph"):
        options["example_targets"] = targets
    cluster = case_cluster(case.get("cluster"), dist.get_world_size())
    pm = partc.compile(model, cluster, (inputs,), loss_fn=loss_fn, **options)
    if case["mesh"].get("tp", 1) > 1 and not any(str(p.layout) != "R" for p in pm.plan.sharding.parameters.values()):
        return ["the tensor-parallel plan shards nothing: the case would test nothing"]
    return train_and_compare(pm, reference, (inputs,), targets, loss_fn, steps=case.get("steps", 3)).failures


def main() -> int:
    return serve(run_case, cases_help="a JSON list of cases: {model, mesh, microbatches?, schedule?, virtual_stages?, loss_in_graph?, cluster?}")


if __name__ == "__main__":
    sys.exit(main())
