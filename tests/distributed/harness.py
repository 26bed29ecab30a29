"""What the torchrun workers share: run each case, report one JSON line per rank and case.

A worker calls :func:`serve` with its ``run_case(case)``, which returns the failures
(``list[str]``) or a dict of them (``"failures"``) and figures to report beside them;
tests/parity.py's :func:`run_parity` launches it and collects the reports.
:func:`train_and_compare` is the check the parity workers make: a compiled module and a
single-device reference copy trained side by side for a few AdamW steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

import partc

RTOL, ATOL = 1e-5, 1e-6
LR = 1e-4


def serve(run_case: Callable[[dict], list[str] | dict], *, cases_help: str, backend: str | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help=cases_help)
    parser.add_argument("--report-dir", required=True, help="each rank appends one JSON line per case to RANK.jsonl here")
    args = parser.parse_args()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    with open(f"{args.report_dir}/{dist.get_rank()}.jsonl", "a") as report:

        def verdict(case: dict, failures: list[str], figures: dict | None = None) -> None:
            report.write(json.dumps({"rank": dist.get_rank(), "case": case, "failures": failures[:20], **(figures or {})}) + "\n")
            report.flush()

        any_failed = False
        for case in json.loads(args.cases):
            try:
                result = run_case(case)
            except Exception as e:
                # The other ranks may be waiting in a collective: report, then exit so that
                # torchrun stops them all (the remaining cases report nothing).
                verdict(case, [f"{type(e).__name__}: {e}"])
                raise
            figures = dict(result) if isinstance(result, dict) else {"failures": result}
            failures = figures.pop("failures")
            any_failed |= bool(failures)
            verdict(case, failures, figures)
            dist.barrier()
    dist.destroy_process_group()
    return 1 if any_failed else 0


def case_cluster(kind: str | None, world: int, nodes: int = 1) -> partc.Cluster:
    """The cluster a case plans on: ``"tp-test"`` has devices slow against their links, so
    that tensor parallelism pays at test sizes (on H100s these models would stay
    replicated); ``"tp-test:1e10"`` sets the devices' FLOP/s (the search prices layouts at
    one sample, where devices must be slower still for sharding to pay); anything else is
    the ``cpu`` preset. ``nodes``: the ``world`` devices split over that many nodes, joined
    by a link 10x slower than the one inside a node."""
    if kind is not None and kind.startswith("tp-test"):
        from tp_worker import favourable_cluster  # tp_worker imports this module

        _, _, flops = kind.partition(":")
        slow = favourable_cluster(float(flops)) if flops else favourable_cluster()
        node = dataclasses.replace(slow.nodes[0], devices=world // nodes)
        inter = dataclasses.replace(slow.inter_link, bandwidth=slow.inter_link.bandwidth / 10)
        return dataclasses.replace(slow, nodes=(node,) * nodes, inter_link=inter)
    return partc.Cluster.preset("cpu", nodes=nodes, devices_per_node=world // nodes)


@dataclasses.dataclass
class Comparison:
    """What :func:`train_and_compare` found: the mismatches, and the largest absolute
    difference over every tensor compared (a figure for docs/models.md)."""

    failures: list[str] = dataclasses.field(default_factory=list)
    max_abs_error: float = 0.0
    rtol: float = RTOL
    atol: float = ATOL
    losses: list[float] = dataclasses.field(default_factory=list)  # the compiled module's, step by step

    def check(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        """Record a failure unless ``got`` matches ``want`` (floats to rtol/atol, integers exactly)."""
        if hasattr(got, "full_tensor"):  # a DTensor (FSDP2 shards over "dp"): compare the whole
            got = got.full_tensor()
        got, want = got.detach().cpu(), want.detach().cpu()
        if got.shape != want.shape:
            self.failures.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
            return
        if not got.is_floating_point():  # counters (num_batches_tracked) must match exactly
            if not torch.equal(got, want):
                self.failures.append(f"{what}: {got.flatten()[:4].tolist()}..., expected {want.flatten()[:4].tolist()}...")
            return
        error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        self.max_abs_error = max(self.max_abs_error, error)
        if not torch.allclose(got, want, rtol=self.rtol, atol=self.atol):
            self.failures.append(f"{what}: max abs diff {error:.3e}")


def whole_batch_step(reference: nn.Module, inputs: tuple, targets: Any, loss_fn: Callable) -> torch.Tensor:
    """The reference's training step: forward and backward on the whole global batch."""
    loss = loss_fn(reference(*inputs), targets)
    loss.backward()
    return loss.detach()


def train_and_compare(
    pm: partc.ParallelModule,
    reference: nn.Module,
    inputs: tuple,
    targets: Any,
    loss_fn: Callable,
    *,
    steps: int = 3,
    reference_step: Callable = whole_batch_step,
    eps: float | None = None,
    tolerance: tuple[float, float] = (RTOL, ATOL),
) -> Comparison:
    """Train ``pm`` and ``reference`` (a single-device copy of the model before compile)
    side by side for ``steps`` AdamW steps on the same global batch; return what differed.

    Checked on this rank: the loss of every step, every gradient it holds (by original
    parameter name; its slice under tensor parallelism), every tensor of its state dict
    after the steps (parameters and buffers, BatchNorm running statistics included), and,
    across ranks, that the union of the state-dict keys is the model's.
    ``reference_step(reference, inputs, targets, loss_fn) -> loss`` runs the reference's
    forward and backward (by default on the whole batch). ``eps``: AdamW's (by default
    1e-6 under tensor parallelism, 1e-8 otherwise; see below).
    """
    sharding = pm.plan.sharding
    world = dist.get_world_size()
    tp_rank = pm.rank_mesh.tp_index if pm.rank_mesh is not None else 0

    # A tied tensor has several state-dict names; the sharding plan knows it under one.
    names_of_tensor: dict[int, list[str]] = {}
    for name, tensor in reference.state_dict(keep_vars=True).items():
        names_of_tensor.setdefault(id(tensor), []).append(name)

    def local(name: str, full: torch.Tensor) -> torch.Tensor:
        """The reference tensor as this rank holds it (its slice under tensor parallelism);
        ``full`` is the tensor named ``name`` or its gradient, so aliases are found by name."""
        planned = [alias for alias in names_of_tensor.get(id(reference_state[name]), [name]) if sharding is not None and alias in sharding.parameters]
        return sharding.parameters[planned[0]].local(full, tp_rank) if planned else full

    # The reference runs where partc runs (compile set the CUDA device on GPUs): CPU and GPU
    # kernels round differently, which AdamW would amplify past the tolerances.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reference.to(device)
    reference_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    reference_targets = targets.to(device) if isinstance(targets, torch.Tensor) else targets
    reference_state = dict(reference.state_dict(keep_vars=True))
    # Adam moves every element by about lr whatever its gradient's size, so an element whose
    # gradient is ~1e-7 turns fp32 rounding (~1e-10) into a step difference of ~lr * 1e-3.
    # At lr 1e-4 that stays below ATOL, while a wrong gradient still moves parameters by
    # ~lr = 1e-4, a hundred times ATOL. Gradients themselves are compared every step.
    held = list(pm.parameters())  # a stage may hold no parameters (the root's own code, say)
    # Tensor parallelism also reorders sums inside a layer; eps 1e-6 keeps AdamW from turning
    # the rounding of near-zero gradients (~1e-9) into parameter differences above ATOL.
    if eps is None:
        eps = 1e-6 if sharding is not None else 1e-8
    optimizer = torch.optim.AdamW(held, lr=LR, eps=eps) if held else None
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=eps)
    result = Comparison(rtol=tolerance[0], atol=tolerance[1])
    for step in range(steps):
        if optimizer:
            optimizer.zero_grad()
        loss = pm.step(inputs, targets)
        result.losses.append(loss.item())
        reference_optimizer.zero_grad()
        reference_loss = reference_step(reference, reference_inputs, reference_targets, loss_fn)
        result.check(f"step {step} loss", loss, reference_loss)
        for name, p in pm.named_parameters():
            if p.grad is None:
                result.failures.append(f"step {step} grad {name}: missing")
            else:
                result.check(f"step {step} grad {name}", p.grad, local(name, reference_state[name].grad))
        if optimizer:
            optimizer.step()
        reference_optimizer.step()
    parameter_names = {name for name, _ in reference.named_parameters(remove_duplicate=False)}
    for name, tensor in pm.state_dict().items():  # whole tensors (DTensors for slices and shards)
        what = "param" if name in parameter_names else "buffer"
        result.check(f"{what} {name} after {steps} steps", tensor, reference_state[name])

    keys: list = [None] * world
    dist.all_gather_object(keys, sorted(pm.state_dict()))
    union, expected = set().union(*map(set, keys)), set(reference.state_dict())
    if union != expected:
        result.failures.append(f"state-dict keys: missing {sorted(expected - union)}, extra {sorted(union - expected)}")
    return result
