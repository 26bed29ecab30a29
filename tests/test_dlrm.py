"""The DLRM model and the embedding layouts made for it: row-wise (vocab_parallel: rows
split, partial pooled sums), table-wise (O(r): the whole table and its lookup on one rank,
broadcast), column-wise (hidden_parallel) and replicated tables.

* The model: the interaction is the strictly-lower triangle of the feature dot products.
* The layout vocabulary: O(r) conversions and their prices (broadcast).
* The sharding ILP's choice per table under a tight budget equals the cheapest feasible
  combination found by enumerating every table's options with the cost model's formulas
  (independently of passes/sharding.py): table-wise for the small tables and row-wise for
  the huge one when the width does not divide by tp, column-wise when it does.
* Parity: the plan with table-wise and row-wise lookups against the single-device model,
  ranks as threads here and as processes on gloo (slow).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from parity import case_key, run_parity
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.layouts import (
    Owned,
    P,
    R,
    Shard,
    adjoint,
    grad_layout,
    reshard_cost,
    transition,
)
from partc.passes.propagate import propagate
from partc.passes.sharding import COLLECTIVE_CALL_PENALTY, plan_sharding

from partc.cluster import Cluster, DeviceSpec, Link, NodeSpec
from partc.cost_model import CostModel, training_memory
from partc.models import training_case
from partc.models.dlrm import DLRM, DLRMConfig, click_batch

WORKER = Path(__file__).parent / "distributed" / "sharded_models_worker.py"
_spec = importlib.util.spec_from_file_location("sharded_models_worker", WORKER)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ranks run as threads
    yield
    torch.set_num_threads(threads)


# -- the model -------------------------------------------------------------------------------------
def test_interaction_is_every_pair_of_features_once():
    torch.manual_seed(0)
    config = DLRMConfig(table_sizes=(10, 7, 5), embedding_dim=4, dense_features=3, bottom_mlp=(8,), top_mlp=(6,), bag_size=2)
    model = DLRM(config)
    (dense, sparse), _ = click_batch(config, 5)
    x = model.bottom(dense)
    features = [x] + [table(sparse[:, t]) for t, table in enumerate(model.tables)]
    pairs = [(features[i] * features[j]).sum(-1) for i in range(len(features)) for j in range(i)]
    want = model.top(torch.cat([x, torch.stack(pairs, dim=1)], dim=1)).squeeze(-1)
    assert config.interactions == 6
    torch.testing.assert_close(model(dense, sparse), want)


def test_registry_builds_the_tiny_model_and_the_criteo_one_on_meta():
    case = training_case("dlrm-tiny", batch_size=4)
    loss = case.loss_fn(case.model(*case.inputs), case.targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    big = training_case("dlrm-criteo", batch_size=2)
    assert next(big.model.parameters()).device.type == "meta"
    assert len(big.model.tables) == 26 and big.inputs[1].shape == (2, 26, 1)


# -- the O(r) layout -----------------------------------------------------------------------------
def test_owned_conversions_and_gradients():
    owned = Owned(1)
    assert str(owned) == "O(1)"
    assert transition(owned, R) == "broadcast"
    assert transition(owned, P) is None  # the other ranks hold zeros: already a partial sum
    assert transition(owned, Shard(0)) == "reduce_scatter"
    assert adjoint(owned) == owned
    # gradients into the owner: R is there already, P is summed, S(d) gathered
    assert transition(R, owned) is None and transition(P, owned) == "all_reduce" and transition(Shard(0), owned) == "all_gather"
    assert transition(Owned(0), owned) == "incompatible"
    assert grad_layout(owned, None) == owned


def test_broadcast_is_priced_as_a_pipelined_chain():
    link = Link(2e-6, 1e9)
    device = DeviceSpec("d", {"float32": 1e12}, 2**30, 1e12, 1.0)
    cost = CostModel(Cluster(nodes=(NodeSpec(device, 4, link),), inter_link=Link(1e-5, 1e8), name="t"))
    # n-1 latencies and the whole tensor through a link once
    assert cost.broadcast(1e6, [0, 1, 2, 3]) == pytest.approx(3 * 2e-6 + 1e6 / 1e9)
    assert cost.broadcast(1e6, [0]) == 0.0
    assert reshard_cost(Owned(0), R, 1e6, cost, [0, 1, 2, 3]) == (cost.broadcast(1e6, [0, 1, 2, 3]), "broadcast")
    # two nodes of two ranks: the chain over the nodes, then within each
    two = CostModel(Cluster(nodes=(NodeSpec(device, 2, link), NodeSpec(device, 2, link)), inter_link=Link(1e-5, 1e8), name="t"))
    assert two.broadcast(1e6, [0, 1, 2, 3]) == pytest.approx((1e-5 + 1e6 / 1e8) + (2e-6 + 1e6 / 1e9))


# -- the ILP's choice, checked by enumeration ---------------------------------------------------------
TP = 2


def table_options(rows: int, dim: int, cost: CostModel) -> dict[str, tuple[tuple[float, ...], float]]:
    """Each layout of one table of the worker's "tables" case: (memory on each rank,
    seconds per step), from the cost model's formulas. Layouts that keep the whole table on
    every rank and communicate (batch-parallel lookups) are left out: replication has
    their memory and no traffic."""
    ranks = list(range(TP))
    whole = training_memory(rows * dim, torch.float32, 0.0).total
    out = W.BATCH * dim * 4  # the pooled [B, D] fp32 output
    options = {
        "replicate": ((whole,) * TP, 0.0),
        "vocab_parallel": ((whole / TP,) * TP, cost.all_reduce(out, ranks) + COLLECTIVE_CALL_PENALTY),
        # the weight sharded and all-gathered before a replicated lookup (FSDP-like)
        "gathered": ((whole / TP,) * TP, cost.all_gather(rows * dim * 4, ranks) + COLLECTIVE_CALL_PENALTY),
    }
    for r in ranks:
        options[f"table_wise@{r}"] = (tuple(whole if q == r else 0.0 for q in ranks), cost.broadcast(out, ranks) + COLLECTIVE_CALL_PENALTY)
    if dim % TP == 0:
        options["hidden_parallel"] = ((whole / TP,) * TP, cost.all_gather(out, ranks) + COLLECTIVE_CALL_PENALTY)
    return options


def cheapest(dim: int, budget: float) -> tuple[tuple[str, ...], float, float]:
    """The cheapest combination of per-table layouts that fits ``budget`` on every rank,
    with its time and the next cheapest feasible time (to check the answer is clear)."""
    cost = CostModel(W.comm_bound_cluster())
    options = [table_options(rows, dim, cost) for rows in W.TABLE_ROWS]
    feasible = []
    for combo in itertools.product(*(o.items() for o in options)):
        memory = [sum(mem[r] for _, (mem, _) in combo) for r in range(TP)]
        if max(memory) <= budget:
            feasible.append((sum(t for _, (_, t) in combo), tuple(name for name, _ in combo)))
    feasible.sort()
    distinct = [t for t, names in feasible if t > feasible[0][0] * (1 + 1e-9)]
    return feasible[0][1], feasible[0][0], distinct[0] if distinct else math.inf


def planned_layouts(dim: int, budget: float | None = None):
    model, inputs, _, _ = W.build("tables", dim)
    if budget is None:
        _, plan = W.make_plan("tables", model, inputs, TP, dim)
    else:
        gm = annotate(propagate(capture(model, inputs), inputs))
        plan = plan_sharding(gm, CostModel(W.comm_bound_cluster()), tp=TP, memory_limit=budget)
    chosen = []
    for t in range(len(W.TABLE_ROWS)):
        lookup = plan.strategies["embedding_bag" + (f"_{t}" if t else "")]
        weight = plan.parameters[f"tables.{t}.weight"]
        if lookup.name == "table_wise":
            chosen.append(f"table_wise@{lookup.outputs[0].rank}")
        elif lookup.name == "replicate" and isinstance(weight.layout, Shard):
            chosen.append("gathered")
        else:
            chosen.append(lookup.name)
    return tuple(chosen), plan


@pytest.mark.parametrize("dim", [15, 16], ids=["width-odd", "width-even"])
def test_ilp_places_tables_as_the_cost_formulas_say(dim):
    """Budget (W.tables_budget): half the huge table, the larger small table whole, and a
    slack. Neither small table can then be replicated beside the other's share, nor the
    huge one held whole.

    D = 15 (not divisible by tp=2; no column-wise layout): the formulas give row-wise for
    the huge table and table-wise for the small ones, on different ranks: a broadcast
    (latency + S/bandwidth) beats an all-reduce (2 latencies + S/bandwidth at tp=2).
    D = 16: column-wise (an all-gather of half the bytes) beats both, for every table."""
    budget = W.tables_budget(dim, TP)
    want, best, runner_up = cheapest(dim, budget)
    got, plan = planned_layouts(dim)
    assert plan.memory.activations < W.TABLE_SLACK  # the enumeration leaves activations to the slack
    assert runner_up - best > 1e-7  # a clear optimum, far above compute (~1e-12 s)
    if dim == 15:
        assert want[0] == "vocab_parallel" and {want[1], want[2]} == {"table_wise@0", "table_wise@1"}
        assert got[0] == "vocab_parallel" and sorted(got[1:]) == ["table_wise@0", "table_wise@1"]
        assert plan.collectives_per_step()["forward"] == {"all_reduce": 1, "broadcast": 2}
    else:
        assert want == ("hidden_parallel",) * 3
        assert got == want
    assert plan.memory.total <= budget  # the busiest rank's memory is what the budget bounds


def test_a_table_too_large_for_any_rank_is_refused_with_the_least_memory():
    from partc.errors import InfeasiblePlanError

    with pytest.raises(InfeasiblePlanError, match="the least memory any layout needs"):
        planned_layouts(15, W.table_weight_bytes(15)[0] / TP / 2)


def test_in_the_whole_dlrm_row_wise_partials_are_summed_once():
    """In DLRM the pooled lookups are stacked before the interaction: row-wise partial sums
    (and table-wise ones: O(r) is a P) stack as one P, and one all-reduce serves every
    table. Table-wise would then only add the owner's whole lookup: the ILP takes row-wise."""
    model, inputs, _, _ = W.build("dlrm")
    _, plan = W.make_plan("dlrm", model, inputs, TP)
    lookups = [s.name for n, s in plan.strategies.items() if n.startswith("embedding_bag")]
    assert lookups == ["vocab_parallel"] * 4
    assert plan.strategies["stack"].name == "partial"
    assert plan.collectives_per_step()["forward"].get("all_reduce") == 1


# -- parity -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def verdicts():
    return {}


@pytest.mark.parametrize("case", ["tables", "dlrm"])
def test_table_wise_and_row_wise_lookups_match_the_single_device_model(case):
    failures, plan = W.simulate(case, 2)
    assert not failures, failures[:10]
    if case == "tables":
        owners = {s.outputs[0].rank for s in plan.strategies.values() if s.name == "table_wise"}
        assert owners == {0, 1}  # the small tables spread over both ranks


def test_a_non_owner_holds_an_empty_table_under_the_same_name():
    from partc.passes.tp_codegen import emit_tensor_parallel

    model, inputs, _, _ = W.build("tables")
    gm, plan = W.make_plan("tables", model, inputs, 2)
    name, owner = next((p.name, p.layout.rank) for p in plan.parameters.values() if isinstance(p.layout, Owned))
    other = emit_tensor_parallel(gm, plan, rank=1 - owner, tp=2, state_dict=model.state_dict(keep_vars=True))
    mine = emit_tensor_parallel(gm, plan, rank=owner, tp=2, state_dict=model.state_dict(keep_vars=True))
    assert other.module.state_dict()[name].shape == (0, W.DLRM_WIDTH)
    assert torch.equal(mine.module.state_dict()[name], model.state_dict()[name])
    assert f"{name}  O({owner})" in other.source()
    assert re.search(r"table_wise_embedding_bag\(getitem_\d, tables_\d_weight, tp_group, \d", other.source())
    assert "broadcast_from_tp(" in other.source()


@pytest.mark.slow
@pytest.mark.parametrize("case", [{"model": "tables"}, {"model": "dlrm"}], ids=lambda c: c["model"])
def test_dlrm_parity_on_gloo(case, verdicts):
    if not verdicts:
        verdicts.update(run_parity([{"model": "tables"}, {"model": "dlrm"}], nproc=2, timeout=300, worker=WORKER))
    ranks = verdicts.get(case_key(case), [])
    assert len(ranks) == 2, f"only {len(ranks)} of 2 ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
