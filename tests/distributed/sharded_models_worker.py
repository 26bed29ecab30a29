"""Parity worker for the DLRM and mixture-of-experts models under the layouts made for
them (table-wise / row-wise embeddings, expert parallelism), launched by torchrun from
tests/test_dlrm.py and tests/test_moe.py; those tests also import it to run the same
cases with every rank a thread (ThreadedGroup).

Every rank builds the model (same seed), plans it on the case's cluster and memory budget,
checks that the plan chose the layout the case is about, emits its tensor-parallel module
and trains 3 AdamW steps beside a single-device copy: loss, every gradient (the reference
gradient sliced by the parameter's slice rule; a table another rank owns has an empty
slice and no gradient) and every parameter after the steps (fp32, rtol 1e-5, atol 1e-6),
and the collectives per step against the plan's count.

    torchrun --nproc-per-node 2 tests/distributed/sharded_models_worker.py --cases '[{"model": "dlrm"}]' --report-dir /tmp/r
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from harness import serve
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.propagate import propagate
from partc.passes.sharding import ShardingPlan, plan_sharding
from tp_worker import EPS, LR, STEPS, compare, favourable_cluster, plan_digest

from partc.cluster import Cluster, DeviceSpec, Link, NodeSpec
from partc.cost_model import CostModel, training_memory
from partc.errors import InfeasiblePlanError
from partc.models import (
    dlrm,
    training_case,
)

BATCH = 8
CASES = ("dlrm", "tables", "moe")
# DLRM: bytes above the least memory any layout needs (InfeasiblePlanError.required_bytes),
# too few to replicate the tables. The width is 15, not the registry's 16: with a width
# that tp divides, column-wise tables (an all-gather of half the bytes) beat row-wise ones.
DLRM_SLACK = 16_000
DLRM_WIDTH = 15

# "tables": embedding bags only, each pooled output a graph output, so their layouts meet
# only in the memory budget (tests/test_dlrm.py enumerates the choices).
TABLE_ROWS = (4096, 64, 56)  # one huge table, two small ones of different sizes
TABLE_BAG = 2
TABLE_SLACK = 2000  # budget above the weights, for the saved indices
TABLE_LATENCY, TABLE_BANDWIDTH = 1e-6, 1e8


class Tables(nn.Module):
    def __init__(self, rows: tuple[int, ...], dim: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum") for n in rows)

    def forward(self, ids):
        return tuple(table(ids[:, t]) for t, table in enumerate(self.tables))


def tables_loss(outputs, targets) -> torch.Tensor:
    return sum(F.mse_loss(o, t) for o, t in zip(outputs, targets))


def comm_bound_cluster() -> Cluster:
    """Devices so fast that compute is ~1e-12 s, links slow: communication decides."""
    device = DeviceSpec("fast", {"float32": 1e15}, 2**30, 1e15, 1.0)
    link = Link(TABLE_LATENCY, TABLE_BANDWIDTH)
    return Cluster(nodes=(NodeSpec(device, 8, link),), inter_link=link, name="comm-bound")


def table_weight_bytes(dim: int) -> list[float]:
    """Weights, gradients and AdamW state of each table, whole."""
    return [training_memory(rows * dim, torch.float32, 0.0).total for rows in TABLE_ROWS]


def tables_budget(dim: int, tp: int) -> float:
    """Half the huge table, the larger small table whole, and the slack: neither small
    table fits replicated beside the other's share, and the huge one fits on no rank whole."""
    weights = table_weight_bytes(dim)
    return weights[0] / tp + weights[1] + TABLE_SLACK


def build(name: str, dim: int = DLRM_WIDTH):
    """(model, inputs, targets, loss_fn) of a case, seeded."""
    torch.manual_seed(0)
    if name == "tables":
        model = Tables(TABLE_ROWS, dim)
        ids = torch.stack([torch.randint(0, n, (BATCH, TABLE_BAG)) for n in TABLE_ROWS], dim=1)
        return model, (ids,), tuple(torch.randn(BATCH, dim) for _ in TABLE_ROWS), tables_loss
    if name == "dlrm":
        config = dataclasses.replace(dlrm.dlrm_tiny(), embedding_dim=dim)
        model = dlrm.DLRM(config)
        inputs, targets = dlrm.click_batch(config, BATCH)
        return model, inputs, targets, dlrm.click_loss
    case = training_case("moe-tiny", batch_size=BATCH, seq_len=16, device="cpu")
    return case.model, case.inputs, case.targets, case.loss_fn


def make_plan(name: str, model, inputs, tp: int, dim: int = DLRM_WIDTH) -> tuple:
    """Capture, annotate and plan a case: DLRM under a budget a little above the least
    memory any layout needs; the tables on the communication-bound cluster under
    :func:`tables_budget`; the MoE on devices slow against fast links."""
    gm = annotate(propagate(capture(model, inputs), inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "dlrm":
            cost_model = CostModel(favourable_cluster())
            try:
                plan_sharding(gm, cost_model, tp=tp, memory_limit=0)
            except InfeasiblePlanError as e:
                least = e.required_bytes
            return gm, plan_sharding(gm, cost_model, tp=tp, memory_limit=least + DLRM_SLACK)
        if name == "tables":
            return gm, plan_sharding(gm, CostModel(comm_bound_cluster()), tp=tp, memory_limit=tables_budget(dim, tp))
        return gm, plan_sharding(gm, CostModel(favourable_cluster(flops=1e9, latency=1e-9, bandwidth=1e12)), tp=tp)


def layout_failures(name: str, plan: ShardingPlan) -> list[str]:
    """Where the plan is not the layout the case is about."""
    lookups = {s.name for n, s in plan.strategies.items() if n.startswith("embedding_bag")}
    if name in ("dlrm", "tables"):
        wanted = {"vocab_parallel"} | ({"table_wise"} if name == "tables" else set())
        return [f"no {m} embedding in the plan (lookups: {sorted(lookups)})" for m in sorted(wanted - lookups)]
    experts = [p for n, p in plan.parameters.items() if n.endswith(("w_in", "w_out"))]
    failures = [f"expert weights {p.name} are {p.layout}, not sharded over experts (S(0))" for p in experts if str(p.layout) != "S(0)"]
    kinds = plan.collectives_per_step()["forward"]
    if not kinds.get("all_to_all"):
        failures.append(f"no all-to-all dispatch in the plan: {kinds}")
    return failures + ([] if experts else ["no expert weights found"])


def compare_gradients(tpm, reference_params, what: str, failures: list[str]) -> None:
    for pname, p in tpm.module.named_parameters():
        want = tpm.local(pname, reference_params[pname].grad)
        if p.grad is None and want.numel() == 0:
            continue  # a table another rank owns: absent here
        if p.grad is None:
            failures.append(f"{what} grad {pname}: missing")
        else:
            compare(f"{what} grad {pname}", p.grad, want, failures)


def compare_parameters(tpm, reference_params, what: str, failures: list[str]) -> None:
    for pname, p in tpm.module.named_parameters():
        compare(f"{what} param {pname}", p.detach(), tpm.local(pname, reference_params[pname].detach()), failures)


def simulate(name: str, tp: int, steps: int = STEPS) -> tuple[list[str], ShardingPlan]:
    """The case with every rank a thread of this process (ThreadedGroup), beside one
    single-device copy: what differed, and the plan."""
    from partc.passes.tp_codegen import emit_tensor_parallel

    from partc.runtime.collectives import ThreadedGroup, run_threaded

    model, inputs, targets, loss_fn = build(name)
    reference = copy.deepcopy(model)
    gm, plan = make_plan(name, model, inputs, tp)
    failures = layout_failures(name, plan)
    world = ThreadedGroup(tp, timeout=60)
    state = model.state_dict(keep_vars=True)
    modules = [emit_tensor_parallel(gm, plan, rank=r, tp=tp, group=world, state_dict=state) for r in range(tp)]
    optimizers = [torch.optim.AdamW(m.module.parameters(), lr=LR, eps=EPS) for m in modules]
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    reference_params = dict(reference.named_parameters())
    for step in range(steps):

        def train(r: int):
            optimizers[r].zero_grad()
            modules[r].counter.reset()
            loss = loss_fn(modules[r].module(*inputs), targets)
            loss.backward()
            return loss.detach()

        losses = run_threaded(train, tp, world)
        reference_optimizer.zero_grad()
        want = loss_fn(reference(*inputs), targets)
        want.backward()
        for r, (tpm, loss) in enumerate(zip(modules, losses)):
            compare(f"step {step} rank {r} loss", loss, want.detach(), failures)
            if tpm.counter.per_step() != plan.collectives_per_step():
                failures.append(f"rank {r} ran {tpm.counter.per_step()}, the plan predicts {plan.collectives_per_step()}")
            compare_gradients(tpm, reference_params, f"step {step} rank {r}", failures)
        for optimizer in optimizers:
            optimizer.step()
        reference_optimizer.step()
    for r, tpm in enumerate(modules):
        compare_parameters(tpm, reference_params, f"rank {r} after {steps} steps", failures)
    return failures, plan


def run_case(case: dict) -> list[str]:
    from partc.passes.tp_codegen import emit_tensor_parallel

    tp, rank = dist.get_world_size(), dist.get_rank()
    name = case["model"]
    model, inputs, targets, loss_fn = build(name)
    reference = copy.deepcopy(model)
    gm, plan = make_plan(name, model, inputs, tp)
    failures = layout_failures(name, plan)
    digests: list = [None] * tp
    dist.all_gather_object(digests, plan_digest(plan))
    if len(set(digests)) != 1:
        return failures + [f"ranks planned differently: {digests}"]

    tpm = emit_tensor_parallel(gm, plan, rank=rank, tp=tp, group=dist.group.WORLD, state_dict=model.state_dict(keep_vars=True))
    if sorted(tpm.module.state_dict()) != sorted(model.state_dict()):
        failures.append(f"state-dict keys {sorted(tpm.module.state_dict())} != {sorted(model.state_dict())}")
    reference_params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW(tpm.module.parameters(), lr=LR, eps=EPS)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    for step in range(STEPS):
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        tpm.counter.reset()
        loss = loss_fn(tpm.module(*inputs), targets)
        loss.backward()
        reference_loss = loss_fn(reference(*inputs), targets)
        reference_loss.backward()
        compare(f"step {step} loss", loss.detach(), reference_loss.detach(), failures)
        if tpm.counter.per_step() != plan.collectives_per_step():
            failures.append(f"step {step} collectives {tpm.counter.per_step()}, the plan predicts {plan.collectives_per_step()}")
        compare_gradients(tpm, reference_params, f"step {step}", failures)
        optimizer.step()
        reference_optimizer.step()
    compare_parameters(tpm, reference_params, f"after {STEPS} steps", failures)
    return failures


def main() -> int:
    return serve(run_case, cases_help='a JSON list of cases: {"model": one of ' + ", ".join(CASES) + "}", backend="gloo")


if __name__ == "__main__":
    sys.exit(main())
