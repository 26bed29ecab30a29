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
from tp_worker import favourable_cluster
from partc.models.llama import llama_tiny

RTOL, ATOL = 1e-5, 1e-6
LR = 1e-4
BATCH, SEQ, VOCAB = 8, 16, 128
from harness import serve  # noqa: E402


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


def compare(what: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    got, want = got.cpu(), want.cpu()
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        diff = (got - want).abs().max().item()
        failures.append(f"{what}: max abs diff {diff:.3e}")


def run_case(case: dict) -> list[str]:
    """Compile one case, train it beside the reference, return what differed."""
    torch.manual_seed(0)
    model = build(case["model"])
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)

    world = dist.get_world_size()
    options = {key: case[key] for key in ("mesh", "microbatches", "schedule", "virtual_stages") if key in case}
    if case.get("loss_in_graph"):
        options["example_targets"] = targets
    # "tp-test": devices slow against their links, so that tensor parallelism pays at these
    # tiny sizes (on H100s these models would stay replicated).
    if case.get("cluster") == "tp-test":
        slow = favourable_cluster()
        cluster = dataclasses.replace(slow, nodes=(dataclasses.replace(slow.nodes[0], devices=world),))
    else:
        cluster = partc.Cluster.preset("cpu", devices_per_node=world)
    pm = partc.compile(model, cluster, (inputs,), loss_fn=loss_fn, **options)
    sharding = pm.plan.sharding
    if case["mesh"].get("tp", 1) > 1 and not any(str(p.layout) != "R" for p in sharding.parameters.values()):
        return ["the tensor-parallel plan shards nothing: the case would test nothing"]

    def local(name: str, full: torch.Tensor) -> torch.Tensor:
        """The reference tensor as this rank holds it (its slice under tensor parallelism)."""
        if sharding is None or name not in sharding.parameters:
            return full
        return sharding.parameters[name].local(full, dist.get_rank())

    # The reference runs where partc runs (compile set the CUDA device on GPUs): CPU and GPU
    # kernels round differently, which AdamW would amplify past the tolerances.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reference.to(device)
    reference_params = dict(reference.state_dict(keep_vars=True))
    # Adam moves every element by about lr whatever its gradient's size, so an element whose
    # gradient is ~1e-7 turns fp32 rounding (~1e-10) into a step difference of ~lr * 1e-3.
    # At lr 1e-4 that stays below ATOL, while a wrong gradient still moves parameters by
    # ~lr = 1e-4, a hundred times ATOL. Gradients themselves are compared every step.
    held = list(pm.parameters())  # a stage may hold no parameters (the root's own code, say)
    # Tensor parallelism also reorders sums inside a layer; eps 1e-6 keeps AdamW from turning
    # the rounding of near-zero gradients (~1e-9) into parameter differences above ATOL.
    eps = 1e-6 if sharding is not None else 1e-8
    optimizer = torch.optim.AdamW(held, lr=LR, eps=eps) if held else None
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=eps)
    failures: list[str] = []
    steps = case.get("steps", 3)
    for step in range(steps):
        if optimizer:
            optimizer.zero_grad()
        loss = pm.step(inputs, targets)
        reference_optimizer.zero_grad()
        reference_loss = loss_fn(reference(inputs.to(device)), targets.to(device))
        reference_loss.backward()
        compare(f"step {step} loss", loss, reference_loss.detach(), failures)
        for name, p in pm.named_parameters():
            if p.grad is None:
                failures.append(f"step {step} grad {name}: missing")
            else:
                compare(f"step {step} grad {name}", p.grad, local(name, reference_params[name].grad), failures)
        if optimizer:
            optimizer.step()
        reference_optimizer.step()
    for name, p in pm.named_parameters():
        compare(f"param {name} after {steps} steps", p.detach(), local(name, reference_params[name].detach()), failures)

    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(pm.state_dict()))
    union = set().union(*map(set, keys))
    if union != set(reference.state_dict()):
        failures.append(f"state-dict keys: missing {sorted(set(reference.state_dict()) - union)}, extra {sorted(union - set(reference.state_dict()))}")
    return failures


def main() -> int:
    return serve(run_case, cases_help="a JSON list of cases: {model, mesh, microbatches?, schedule?, virtual_stages?, loss_in_graph?, cluster?}")


if __name__ == "__main__":
    sys.exit(main())
