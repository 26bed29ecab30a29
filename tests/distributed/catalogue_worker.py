"""Torchrun worker for the failure catalogue's entries that must work across real processes
(tests/test_failure_catalogue.py; not collected by pytest).

Each case names one of the models below and a mesh; every rank builds it with the same
seed, compiles it with partc and trains it beside a single-device copy with
:func:`harness.train_and_compare` (loss, every gradient, every tensor after 3 AdamW steps).

    torchrun --nproc-per-node 2 tests/distributed/catalogue_worker.py \
        --cases '[{"model": "inplace-after-cut", "mesh": {"pp": 2}, "microbatches": 2}]' --report-dir DIR
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from harness import serve, train_and_compare

import partc
from partc.models import GPT, GPTConfig

BATCH, WIDTH, VOCAB, SEQ = 8, 16, 64, 8


class ScaleInPlace(nn.Module):
    """A block that halves its input in place first: when a pipeline cut falls before it,
    the in-place op writes into the tensor its stage received."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        x.mul_(0.5)
        return self.linear(torch.tanh(x))


class InPlaceAfterCut(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(ScaleInPlace(WIDTH) for _ in range(4))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return h


class LateInput(nn.Module):
    """A second input that only the head reads: the pipeline must relay it to the last stage."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, offset):
        for block in self.blocks:
            x = block(x)
        return self.head(x) + offset


class BatchBranch(nn.Module):
    """Branches on the batch size: a data-parallel replica sees a smaller batch than the
    single-device model does."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x)) if x.shape[0] > BATCH // 2 else block(x)
        return x


def mse(outputs, targets):
    return F.mse_loss(outputs, targets)


def token_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(name: str, generator: torch.Generator):
    """(model, inputs, targets, loss_fn) of one catalogue model."""
    dense = lambda *shape: torch.randn(*shape, generator=generator)
    if name == "tied-gpt":  # embedding and LM head share one weight
        config = GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=4, n_head=2, d_model=32, dropout=0.0, bias=False, tie_weights=True)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        return GPT(config), (tokens[:, :-1],), tokens[:, 1:], token_loss
    if name == "inplace-after-cut":
        return InPlaceAfterCut(), (dense(BATCH, WIDTH),), dense(BATCH, WIDTH), mse
    if name == "late-input":
        return LateInput(), (dense(BATCH, WIDTH), dense(BATCH, WIDTH)), dense(BATCH, WIDTH), mse
    if name == "batch-branch":
        return BatchBranch(), (dense(BATCH, WIDTH),), dense(BATCH, WIDTH), mse
    raise SystemExit(f"unknown model {name}")


def run_case(case: dict) -> dict:
    torch.manual_seed(0)
    model, inputs, targets, loss_fn = build(case["model"], torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    options = {key: case[key] for key in ("mesh", "microbatches", "schedule") if key in case}
    if case.get("loss_in_graph"):
        options["example_targets"] = targets
    cluster = partc.Cluster.preset("cpu", devices_per_node=dist.get_world_size())
    pm = partc.compile(model, cluster, inputs, loss_fn=loss_fn, **options)
    comparison = train_and_compare(pm, reference, inputs, targets, loss_fn)
    # The parameters this rank holds, for the test to see where the tied weight went.
    return {"failures": comparison.failures, "held": sorted(name for name, _ in pm.named_parameters())}


if __name__ == "__main__":
    sys.exit(serve(run_case, cases_help="a JSON list of {model, mesh, microbatches?, schedule?, loss_in_graph?}"))
