"""The DP x TP x PP search on small models and synthetic clusters: pinned degrees,
topology, indivisible batches, memory budgets, slow links, ranking, determinism, explain().

Models are built on the meta device. "small" is a 4-block GPT of d_model 2048 (vocab 8192,
0.2B parameters) at 512 tokens: wide enough that tensor parallelism, ZeRO and pipelines
change the price, small enough to capture in well under a second.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.propagate import propagate
from partc.passes.search import (
    SearchResult,
    _Context,
    _CutCosts,
    _interleaved_cut,
    _LayerPrices,
    explain,
    mesh_rank,
    model_flops_utilization,
    search,
)
from partc.passes.sharding import plan_sharding
from partc.passes.stages import (
    LayerCost,
    StageProblem,
    evaluate_partition,
    exact_chain_partition,
    solve_stages,
)

from partc.cluster import GB, PRESETS, Cluster, GiB, Link, NodeSpec
from partc.cost_model import CostModel, optimizer_step_bytes, training_memory
from partc.errors import InfeasiblePlanError, PartcError
from partc.models import GPT, GPTConfig

BF16 = torch.bfloat16


def gpt(n_layer=4, d_model=2048, n_head=16, vocab=8192, seq=512, batch=1):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=n_layer, n_head=n_head, d_model=d_model))
        idx = torch.zeros(batch, seq, dtype=torch.long)
    return annotate(propagate(capture(model, (idx,)), (idx,)))


@pytest.fixture(scope="module")
def small():
    return gpt()


def two_by_two(inter: Link | None = None) -> Cluster:
    """2 nodes x 2 H100s; the inter-node link as given (default: the preset's InfiniBand)."""
    device, intra, ib = PRESETS["h100"]
    return Cluster(nodes=(NodeSpec(device, 2, intra),) * 2, inter_link=inter or ib, name="2x2 h100")


def run(gm, cluster, **kw) -> SearchResult:
    kw.setdefault("batch_size", 32)
    kw.setdefault("compute_dtype", BF16)
    return search(gm, cluster, CostModel(cluster), **kw)


def everything(result: SearchResult) -> list:
    """Every configuration the search considered, as comparable tuples."""
    rows = [("candidate", c.label, c.predicted_step_time, c.memory.total) for c in result.candidates]
    rows += [("rejected", r.label, r.kind, r.reason, r.predicted_step_time, r.memory) for r in result.rejected]
    return rows


# -- the search space ---------------------------------------------------------------------------
def test_pinned_degrees_are_honoured(small):
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    result = run(small, cluster, pinned={"tp": 2})
    assert all(c.mesh["tp"] == 2 for c in result.candidates)
    assert {c.mesh["pp"] * c.mesh["dp"] for c in result.candidates} == {2}
    both = run(small, cluster, pinned={"pp": 2, "dp": 2})
    assert all(c.mesh == {"pp": 2, "dp": 2, "tp": 1} for c in both.candidates)
    assert all(r.mesh == {"pp": 2, "dp": 2, "tp": 1} for r in both.rejected)
    with pytest.raises(PartcError, match="does not divide"):
        run(small, cluster, pinned={"tp": 3})
    with pytest.raises(PartcError, match="unknown mesh dimension"):
        run(small, cluster, pinned={"ep": 2})


def test_tensor_parallelism_stays_inside_a_node(small):
    result = run(small, two_by_two(), top_k=1000)
    assert all(c.mesh["tp"] <= 2 for c in result.candidates)
    (wide,) = [r for r in result.rejected if r.mesh["tp"] == 4]
    assert wide.kind == "topology" and re.search(r"tp=4 exceeds the node \(2 devices per node\)", wide.reason)
    # Megatron's rank order: a tensor-parallel group is consecutive ranks, so inside a node
    mesh = {"pp": 2, "dp": 1, "tp": 2}
    assert [mesh_rank(mesh, 1, 0, t) for t in range(2)] == [2, 3]
    assert mesh_rank({"pp": 2, "dp": 2, "tp": 2}, 1, 1, 0) == 6


def test_indivisible_batch_is_rejected_with_the_reason(small):
    result = run(small, Cluster.preset("h100", nodes=1, devices_per_node=4), batch_size=6)
    (indivisible,) = [r for r in result.rejected if r.mesh == {"pp": 1, "dp": 4, "tp": 1}]
    assert indivisible.kind == "indivisible"
    assert indivisible.reason == "batch 6 does not split over dp=4 x 1 microbatch"
    assert all(6 % (c.mesh["dp"] * c.microbatches) == 0 for c in result.candidates)
    # explicit microbatch counts that do not divide are reported one by one
    explicit = run(small, Cluster.preset("h100", nodes=1, devices_per_node=4), batch_size=8, pinned={"dp": 2, "tp": 2}, microbatch_options=(1, 3))
    assert any(r.reason == "batch 8 does not split over dp=2 x 3 microbatches" for r in explicit.rejected)


def test_schedules_that_cannot_fill_the_pipe_are_rejected(small):
    result = run(small, Cluster.preset("h100", nodes=1, devices_per_node=4), pinned={"pp": 4}, top_k=1000)
    reasons = {(r.schedule, r.microbatches): r.reason for r in result.rejected if r.kind == "schedule"}
    assert "1f1b needs at least 4 microbatches" in reasons[("1f1b", 2)]
    assert "interleaved needs at least 4 microbatches" in reasons[("interleaved", 2)]
    for c in result.candidates:
        assert c.schedule == "gpipe" or c.microbatches >= 4
        assert c.partition is not None and len(c.partition.starts) == 4 * c.virtual_stages


# -- memory -----------------------------------------------------------------------------------------
def test_a_tight_budget_forces_sharding_and_names_the_overshoot(small):
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    plain = run(small, cluster, pinned={"dp": 4}, zero_options=(0,), recompute_options=(False,), microbatch_options=(1,))
    all_dp = plain.best.memory.total
    assert plain.best.label == "pp=1 dp=4 tp=1, m=1, no-recompute, zero-0"
    limit = 0.5 * all_dp
    result = run(small, cluster, memory_limit=limit)
    best = result.best
    assert best.memory.total <= limit
    assert best.mesh["pp"] > 1 or best.mesh["tp"] > 1 or best.zero_stage > 0
    (rejected,) = [r for r in result.rejected if r.label == plain.best.label]
    assert rejected.kind == "memory"
    over = re.fullmatch(r"over memory by (\d+\.\d+) GiB \((\d+\.\d+) GiB of (\d+\.\d+) GiB per device\)", rejected.reason)
    assert over, rejected.reason
    assert float(over.group(1)) == pytest.approx((all_dp - limit) / GiB, abs=0.01)
    assert rejected.memory == pytest.approx(all_dp)


def test_memory_breakdown_follows_training_memory(small):
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    result = run(small, cluster, pinned={"dp": 4}, zero_options=(0, 3), recompute_options=(False,), microbatch_options=(1,), top_k=10)
    by_zero = {c.zero_stage: c for c in result.candidates}
    numel = sum(p.numel() for p in {id(p): p for p in small.parameters()}.values())
    for zero, c in by_zero.items():
        expected = training_memory(numel, BF16, 0.0, mixed_precision=True, zero_stage=zero, dp=4)
        assert c.memory.parameters == pytest.approx(expected.parameters, rel=1e-6)
        assert c.memory.optimizer_state == pytest.approx(expected.optimizer_state, rel=1e-6)
    assert by_zero[3].memory.total < by_zero[0].memory.total
    recompute = run(small, cluster, pinned={"dp": 4}, zero_options=(0,), microbatch_options=(1,), top_k=10)
    kept = {c.recompute: c for c in recompute.candidates}
    assert kept[True].memory.activations < kept[False].memory.activations / 3
    assert kept[True].breakdown.recompute > 0 and kept[False].breakdown.recompute == 0


def test_no_layout_fits_raises_with_the_closest(small):
    with pytest.raises(InfeasiblePlanError, match="the closest is") as caught:
        run(small, Cluster.preset("h100", nodes=1, devices_per_node=4), memory_limit=0.05 * GiB)
    assert caught.value.rejected and all(r.kind != "slower" for r in caught.value.rejected)


# -- links and ranking ------------------------------------------------------------------------------
def test_a_slow_inter_node_link_moves_data_parallelism_inside_the_node(small):
    _, intra, _ = PRESETS["h100"]
    fast = run(small, two_by_two(inter=intra))  # nodes joined as fast as NVLink: topology is moot
    assert fast.best.mesh["pp"] == 1 and fast.best.mesh["dp"] * fast.best.mesh["tp"] == 4  # dp spans both nodes
    slow = run(small, two_by_two(inter=Link(1e-4, 2 * GB)))
    best = slow.best
    assert best.mesh["pp"] == 2 and best.mesh["dp"] * best.mesh["tp"] == 2  # dp inside a node, pipeline across
    # the all-data-parallel layout is what lost, and by much
    all_dp = [r for r in slow.rejected if r.mesh == {"pp": 1, "dp": 4, "tp": 1}]
    assert all_dp and all((r.predicted_step_time or math.inf) > 1.5 * best.predicted_step_time for r in all_dp)


def test_best_is_the_simplest_of_the_fastest_and_the_list_is_ranked(small):
    from partc.passes.search import TIE_WITHIN, _simplicity

    result = run(small, Cluster.preset("h100", nodes=1, devices_per_node=4), top_k=6)
    times = [c.predicted_step_time for c in result.candidates]
    fastest = min(times)
    # the best: the simplest candidate within TIE_WITHIN of the fastest; the rest ranked by time
    assert result.best is result.candidates[0] and times[1:] == sorted(times[1:]) and len(times) == 6
    assert result.best.predicted_step_time <= fastest * (1 + TIE_WITHIN)
    ties = [c for c in result.candidates if c.predicted_step_time <= fastest * (1 + TIE_WITHIN)]
    assert all(_simplicity(result.best) <= _simplicity(c) for c in ties)
    for r in result.rejected:
        if r.kind == "slower":
            assert r.predicted_step_time >= fastest
    for c in result.candidates:
        assert c.predicted_step_time == pytest.approx(c.breakdown.total)
        assert c.memory.total <= c.memory_limit
    assert result.searched == len(result.candidates) + len(result.rejected)
    # every rejected configuration is a distinct point of the space
    assert len({r.label for r in result.rejected if r.microbatches is not None}) == len([r for r in result.rejected if r.microbatches is not None])


def test_same_answer_twice_and_under_another_hash_seed(small):
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    first, second = run(small, cluster), run(small, cluster)
    assert everything(first) == everything(second)
    script = (
        "import torch, hashlib\n"
        "from tests.test_search import gpt, run\n"
        "from partc.cluster import Cluster\n"
        "r = run(gpt(), Cluster.preset('h100', nodes=1, devices_per_node=4))\n"
        "print(hashlib.sha256(repr([(c.label, round(c.predicted_step_time, 12)) for c in r.candidates] + [(x.label, x.reason) for x in r.rejected]).encode()).hexdigest())\n"
    )
    here = hashlib_of(first)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here


def hashlib_of(r: SearchResult) -> str:
    import hashlib

    return hashlib.sha256(repr([(c.label, round(c.predicted_step_time, 12)) for c in r.candidates] + [(x.label, x.reason) for x in r.rejected]).encode()).hexdigest()


def test_explain_lists_alternatives_and_reasons(small):
    result = run(small, two_by_two(), memory_limit=4 * GiB)
    text = explain(result)
    assert "best: " + result.best.label in text
    assert "chosen" in text and "slower:" in text
    for c in result.candidates[1:]:
        assert f"{c.predicted_step_time * 1e3:,.2f} ms" in text
    assert re.search(r"memory \(\d+\):\n    .*over memory by", text)
    assert "tp=4 exceeds the node" in text


# -- pricing -------------------------------------------------------------------------------------------
def test_layer_prices_add_up_to_the_sharding_plan(small):
    """At the traced batch the per-layer prices are the sharding plan's own totals."""
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    cost_model = CostModel(cluster)
    plan = plan_sharding(small, cost_model, tp=4, compute_dtype=BF16, memory_limit=math.inf)
    prices = _LayerPrices(_Context(small, cluster, cost_model, BF16, "adamw", 1), 4, plan)
    fwd, bwd = prices.compute_times(1.0)
    comm_fwd, comm_bwd = prices.communication_times(1.0)
    optimizer = float(prices.owned_numel.sum()) * optimizer_step_bytes("adamw", BF16, mixed_precision=True) / cluster.device(0).memory_bandwidth
    assert fwd.sum() + bwd.sum() + optimizer == pytest.approx(plan.compute_time, rel=1e-9)
    assert comm_fwd.sum() + comm_bwd.sum() == pytest.approx(plan.communication_time, rel=1e-9)
    assert comm_fwd.sum() == pytest.approx(plan.forward_communication_time, rel=1e-9)


def test_a_graph_traced_at_the_global_batch_prices_like_one_traced_at_one_sample():
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    one, eight = gpt(n_layer=2, batch=1), gpt(n_layer=2, batch=8)
    traced = [(n, n.meta["val"], n.meta["partc"]) for n in eight.graph.nodes]
    traced_graph = eight.meta["partc"]
    a, b = run(one, cluster, batch_size=8), run(eight, cluster, batch_size=8)
    assert b.one_sample_seconds > 0 and a.one_sample_seconds == 0
    # priced at one sample in place: the traced batch's annotations are back, the same objects
    assert eight.meta["partc"] is traced_graph
    assert all(n.meta["val"] is value and n.meta["partc"] is info for n, value, info in traced)
    assert len(a.candidates) == len(b.candidates)
    for x, y in zip(a.candidates, b.candidates):
        assert x.label == y.label
        assert x.predicted_step_time == pytest.approx(y.predicted_step_time, rel=1e-9)
        assert x.memory.total == pytest.approx(y.memory.total, rel=1e-9)


def test_interleaved_local_search_against_the_exact_cuts():
    """The local search used for interleaved schedules (where CBC does not close the stage
    ILP in seconds), against the DP on one stage per rank (uneven layers, transfers) and
    against the ILP on small interleaved chains shaped like a transformer (a light
    embedding, equal blocks, a heavy LM head): equal there."""
    layers = tuple(LayerCost(f"l{j}", 1.0 + (j % 5) * 0.3 + (2.5 if j == 19 else 0.0), 1.0, 1.0, 0.2 + (j % 3) * 0.1) for j in range(20))
    for stages, m in ((2, 4), (4, 8), (5, 16)):
        problem = StageProblem(layers, stages=stages, microbatches=m, link_latency=(0.01,) * (stages - 1), link_bandwidth=(4.0,) * (stages - 1))
        ours = evaluate_partition(problem, _interleaved_cut(problem, frozenset(), None))
        assert ours.step_time <= exact_chain_partition(problem).step_time * 1.02
    for n, head, ranks, v, m in ((14, 4.5, 2, 2, 8), (18, 4.5, 3, 2, 6)):
        chain = (LayerCost("emb", 0.1, 1, 1, 0.3),) + tuple(LayerCost(f"b{j}", 1.0, 1, 1, 0.3) for j in range(n - 2)) + (LayerCost("head", head, 1, 1, 0),)
        p = ranks * v
        problem = StageProblem(chain, stages=p, microbatches=m, schedule="interleaved", virtual_stages=v, link_latency=(0.01,) * (p - 1), link_bandwidth=(3.0,) * (p - 1), time_limit=20)
        ilp = solve_stages(problem)
        assert ilp.status == "optimal"
        ours = evaluate_partition(problem, _interleaved_cut(problem, frozenset(), None))
        assert ours.step_time == pytest.approx(ilp.step_time, rel=1e-9)


def test_polish_screen_keeps_every_cut_that_can_move():
    """_polish prices exactly only the cuts its numpy screen keeps: on random chains and cuts
    (equal layers too, whose many equal steps tie on the rounded score; uneven stage speeds)
    every cut from the first screened on with a position that the exact rule takes over the
    current score is kept."""
    import random

    import numpy as np

    rng = random.Random(7)
    moves = skipped = 0
    for _ in range(60):
        L, ranks, v = rng.randint(6, 40), rng.randint(2, 5), rng.choice([2, 3])
        p = ranks * v
        if p > L:
            continue
        equal = rng.random() < 0.5
        layers = tuple(LayerCost(f"l{j}", 1.0 if equal else rng.uniform(0.1, 3.0), 1.0, 1.0, 1.0 if equal else rng.uniform(0, 2)) for j in range(L))
        speeds = tuple(rng.choice([1.0, 0.5, 2.0]) for _ in range(ranks)) * v if rng.random() < 0.3 else ()
        problem = StageProblem(layers, stages=p, microbatches=2 * ranks, schedule="interleaved", virtual_stages=v, stage_speed=speeds, link_latency=(0.01,) * (p - 1), link_bandwidth=(4.0,) * (p - 1))
        costs = _CutCosts(problem)
        allowed = [rng.random() < 0.9 for _ in range(L)]
        starts = [0] + sorted(rng.sample(range(1, L), p - 1))
        ends = starts[1:] + [L]
        stage = [costs.stage_time(i, a, b - 1) for i, (a, b) in enumerate(zip(starts, ends))]
        rank_times = [sum(stage[i] for i in range(r, p, ranks)) for r in range(ranks)]
        m, d = problem.microbatches, costs.divisor
        slowest = max(rank_times)
        best = (round(m * slowest + (sum(rank_times) - slowest) / d, 12), sum(t * t for t in rank_times))
        first = rng.choice([1, rng.randint(1, p - 1)])
        kept = costs.movable_cuts(starts, stage, rank_times, best, np.array(allowed), first)
        assert all(first <= k < p for k in kept)
        for k in range(first, p):
            a, b = (k - 1) % ranks, k % ranks
            others = [t for r, t in enumerate(rank_times) if r not in (a, b)]
            nxt = starts[k + 1] if k + 1 < p else L
            movable = False
            for cut in range(starts[k - 1] + 1, nxt):
                if cut == starts[k] or not allowed[cut - 1]:
                    continue
                ra = rank_times[a] - stage[k - 1] + costs.stage_time(k - 1, starts[k - 1], cut - 1)
                rb = rank_times[b] - stage[k] + costs.stage_time(k, cut, nxt - 1)
                top = max(max(others, default=0.0), ra, rb)
                value = (round(m * top + (sum(others) + ra + rb - top) / d, 12), sum(t * t for t in others) + ra * ra + rb * rb)
                movable |= (value[0], value[1] * (1 + 1e-12)) < best
            if movable:
                assert k in kept, (starts, k)
            moves += movable
            skipped += k not in kept
    assert moves > 10 and skipped > 100  # both outcomes were exercised


def test_bisection_from_shared_stages_cuts_as_filling_every_stage(monkeypatch):
    """_smallest_cap starts each greedy fill after the stages that the fills at its two
    brackets share (a stage's end grows with the cap); filling every stage anew at every
    cap, as the bisection did before, gives the same cuts on random chains (interleaved
    and lightest cuts; uneven layers, speeds and links, forbidden cuts, budgets)."""
    import random

    import partc.passes.search as search_pass

    def refill_every_stage(fill, guess, hi):
        placed, best = fill(guess, ())
        if not placed:
            guess = hi
            placed, best = fill(hi, ())
            if not placed:
                return None
        lo, hi = 0.0, guess
        for _ in range(60):
            if hi - lo <= 1e-4 * hi:
                break
            mid = (lo + hi) / 2
            placed, found = fill(mid, ())
            if placed:
                hi, best = mid, found
            else:
                lo = mid
        return best

    rng = random.Random(3)
    compared = 0
    for _ in range(120):
        L, ranks, v = rng.randint(4, 40), rng.randint(2, 5), rng.choice([2, 3, 4])
        p = ranks * v
        if p > L:
            continue
        layers = tuple(LayerCost(f"l{j}", rng.choice([1.0, rng.uniform(0.1, 3.0)]), rng.uniform(0, 10), rng.uniform(0, 5), rng.choice([0.0, 1.0, rng.uniform(0, 4)])) for j in range(L))
        links = {"link_latency": tuple(rng.uniform(0, 0.1) for _ in range(p - 1)), "link_bandwidth": tuple(rng.uniform(1, 10) for _ in range(p - 1))} if rng.random() < 0.6 else {}
        speeds = tuple(rng.choice([1.0, 0.5]) for _ in range(ranks)) * v if rng.random() < 0.3 else ()
        problem = StageProblem(layers, stages=p, microbatches=2 * ranks, schedule=rng.choice(["interleaved", "zero_bubble"]), virtual_stages=v, stage_speed=speeds, **links)
        forbidden = frozenset(rng.sample(range(L - 1), rng.randint(0, (L - p) // 2))) if rng.random() < 0.4 else frozenset()
        budget = rng.uniform(0.4, 1.3) * sum(l.param_bytes + 2 * ranks * l.activation_bytes for l in layers) / ranks if rng.random() < 0.5 else None
        ours = (_interleaved_cut(problem, forbidden, budget), search_pass._lightest_cut(problem, forbidden))
        with monkeypatch.context() as patched:
            patched.setattr(search_pass, "_smallest_cap", refill_every_stage)
            assert ours == (_interleaved_cut(problem, forbidden, budget), search_pass._lightest_cut(problem, forbidden))
        compared += ours[0] is not None
    assert compared > 40


def test_model_flops_utilization(small):
    cluster = Cluster.preset("h100", nodes=1, devices_per_node=4)
    flops = sum(n.meta["partc"].fwd_flops + n.meta["partc"].bwd_flops for n in small.graph.nodes)
    assert model_flops_utilization(1.0, small, cluster, BF16) == pytest.approx(flops / (4 * 989e12))
    assert model_flops_utilization(1.0, small, cluster, BF16, batch_size=32) == pytest.approx(32 * flops / (4 * 989e12))
    result = run(small, cluster)
    assert 0 < model_flops_utilization(result.best.predicted_step_time, small, cluster, BF16, batch_size=32) < 0.8


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_loss_taken_over_the_global_batch_is_priced_as_compile_runs_it(microbatches):
    """With the loss traced in, a class-index "mean" over a split batch: when loss_fn takes
    it, partc.compile runs the user's module block by block with loss_fn alone rewritten,
    priced as a summed loss is; when the model takes it itself, compile runs the captured
    graph (passes/global_mean.py), which FSDP2 shards as one unit: no overlap of the
    gathers, priced as such. (One replica and one microbatch split nothing.)"""
    import torch.nn.functional as F

    from partc.passes.capture import attach_loss

    config = GPTConfig(vocab_size=8192, block_size=512, n_layer=4, n_head=16, d_model=2048)

    class LossInForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(config)

        def forward(self, idx, labels):
            return F.cross_entropy(self.gpt(idx).flatten(0, 1), labels.flatten())

    def traced(reduction: str | None):
        with torch.device("meta"):
            model = GPT(config) if reduction else LossInForward()
            idx = torch.zeros(1, 512, dtype=torch.long)
        inputs = (idx,) if reduction else (idx, idx)
        if reduction:
            loss = lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)  # noqa: E731
        else:
            loss = lambda output, targets: output  # noqa: E731
        return annotate(propagate(attach_loss(capture(model, inputs), loss), (*inputs, idx)))

    cluster = Cluster.preset("h100", nodes=1, devices_per_node=2)
    options = dict(pinned={"dp": 2}, microbatch_options=(microbatches,), zero_options=(3,), recompute_options=(False,))
    mean, summed, in_forward = (run(traced(r), cluster, **options).best for r in ("mean", "sum", None))
    assert mean.breakdown.compute == pytest.approx(summed.breakdown.compute, rel=1e-3)
    assert mean.breakdown.dp_sync_exposed == pytest.approx(summed.breakdown.dp_sync_exposed, rel=1e-3)
    # dp = 2 splits the batch in two even with one microbatch: always one unit for the model's mean
    assert in_forward.breakdown.compute == pytest.approx(summed.breakdown.compute, rel=1e-3)
    assert in_forward.breakdown.dp_sync_exposed > summed.breakdown.dp_sync_exposed * 1.2
