"""The mixture-of-experts GPT and expert parallelism.

* Routing: top-2 with a fixed capacity per sequence and expert, first choices before
  second ones; a dropped choice adds nothing. Checked against a token-by-token loop.
* The einsum rule: one strategy per index letter (S of the letter, or P when summed out).
* The sharding ILP: with fast links it shards the experts and the batch and moves tokens
  with all-to-alls (GShard's layout), priced by the cost model's all-to-all; with slower
  links it shards the experts from replicated tokens and all-reduces the combine.
* Parity of the expert-parallel plan with the single-device model: ranks as threads, and
  as processes on gloo (slow).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from parity import case_key, run_parity
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.layouts import P, R, Shard, op_rule
from partc.passes.propagate import propagate
from partc.passes.sharding import plan_sharding
from test_dlrm import WORKER, W, one_thread  # noqa: F401  (the worker; torch on one thread while ranks are threads)

from partc.cost_model import CostModel
from partc.models import training_case
from partc.models.moe import MoEConfig, MoELayer


def small_layer(capacity_factor: float) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(vocab_size=8, block_size=6, n_layer=1, n_head=1, d_model=4, n_expert=3, expert_hidden=5, capacity_factor=capacity_factor)
    layer = MoELayer(config)
    torch.nn.init.normal_(layer.w_in)
    torch.nn.init.normal_(layer.w_out)
    return layer


def loop_reference(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The layer token by token: per sequence, each expert takes the first C choices in the
    order (every first choice by token, then every second choice ...). Returns the output
    and how many choices were dropped."""
    probs = layer.router(x).softmax(-1)
    gate, expert = probs.topk(layer.top_k, dim=-1)
    gate = gate / gate.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    dropped = 0
    for b in range(x.size(0)):
        taken = [0] * layer.n_expert
        for k in range(layer.top_k):
            for t in range(x.size(1)):
                e = int(expert[b, t, k])
                if taken[e] >= layer.capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                hidden = F.gelu(x[b, t] @ layer.w_in[e], approximate="tanh")
                y[b, t] += gate[b, t, k] * (hidden @ layer.w_out[e])
    return y, dropped


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0], ids=["dropping", "roomy"])
def test_routing_matches_a_token_by_token_loop(capacity_factor):
    layer = small_layer(capacity_factor)
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(1))
    want, dropped = loop_reference(layer, x)
    torch.testing.assert_close(layer(x), want)
    dispatch, combine = layer.routing(x)
    assert dispatch.sum((1, 3)).le(layer.capacity).all()  # per sequence and expert: at most C tokens
    assert dispatch.sum((2, 3)).le(layer.top_k).all()  # a token reaches at most k experts
    assert torch.equal((combine > 0).to(dispatch.dtype), dispatch)
    assert int(dispatch.sum()) == x.size(0) * x.size(1) * layer.top_k - dropped
    assert (dropped > 0) == (capacity_factor < 1)  # capacity 2 of 6 tokens x 2 choices / 3 experts drops


def test_einsum_rule_has_one_strategy_per_letter():
    layer = small_layer(1.0)
    x = torch.randn(2, 6, 4)
    gm = capture(layer, (x,))
    propagate(gm, (x,))
    dispatch_einsum = next(n for n in gm.graph.nodes if n.target is torch.functional.einsum or str(n.target).endswith("einsum"))
    strategies = {str(s) for s in op_rule(dispatch_einsum, 2).strategies}
    assert dispatch_einsum.args[0] == "btec,btd->ebcd"
    # b: the batch (token groups) -> buffers sharded on their dim 1; e: experts from
    # replicated tokens; t: summed out -> P. (dims of size 3 and 5 do not divide by 2)
    assert f"follow({Shard(0)}, {Shard(0)} -> {Shard(1)})" in strategies
    assert f"contraction({Shard(1)}, {Shard(1)} -> {P})" in strategies
    assert f"partial({P}, {R} -> {P})" in strategies and f"replicate({R}, {R} -> {R})" in strategies


def test_registry_entries():
    case = training_case("moe-tiny", batch_size=2, seq_len=8)
    loss = case.loss_fn(case.model(*case.inputs), case.targets)
    assert torch.isfinite(loss)
    big = training_case("moe-8x1b", batch_size=1, seq_len=16)
    assert next(big.model.parameters()).device.type == "meta"
    assert big.model.blocks[0].moe.w_in.shape == (8, 2048, 8192)


def plan_moe(cluster_args: tuple[float, float, float]):
    model, inputs, _, _ = W.build("moe")
    gm = annotate(propagate(capture(model, inputs), inputs))
    cost_model = CostModel(W.favourable_cluster(*cluster_args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_sharding(gm, cost_model, tp=2), cost_model


def test_fast_links_give_expert_parallelism_with_all_to_all():
    plan, cost_model = plan_moe((1e9, 1e-9, 1e12))
    assert not plan.unsupported  # routing (topk, one_hot, cumsum) and the einsums all have rules
    assert W.layout_failures("moe", plan) == []
    experts = [s for n, s in plan.strategies.items() if n.startswith("einsum")]
    # dispatch on the batch, experts on their own rank, combine back on the batch
    assert [str(s) for s in experts[:4]] == [
        "follow(S(0), S(0) -> S(1))", "follow(S(0), S(0) -> S(0))", "follow(S(0), S(0) -> S(0))", "follow(S(0), S(1) -> S(0))"
    ]
    buffers = [r for r in plan.reshards if r.forward == "all_to_all" and r.src == Shard(1) and r.dst == Shard(0)]
    assert len(buffers) == 2  # one dispatch per layer (the combine's is the symmetric S(0) -> S(1))
    for r in plan.reshards:
        if r.forward == "all_to_all":  # priced by the cost model's all-to-all of each rank's share
            assert r.forward_time == pytest.approx(cost_model.all_to_all(r.nbytes / 2, plan.ranks))


def test_slower_links_shard_experts_from_replicated_tokens():
    plan, _ = plan_moe((1e11, 1e-6, 1e10))
    assert {str(p.layout) for n, p in plan.parameters.items() if n.endswith(("w_in", "w_out"))} == {"S(0)"}
    dispatch = plan.strategies["einsum"]
    assert str(dispatch) == "follow(S(2), R -> S(0))"  # each rank fills its experts' buffers
    assert str(plan.strategies["einsum_3"]) == "contraction(S(2), S(0) -> P)"  # combine: partial sums
    assert "all_to_all" not in plan.collectives_per_step()["forward"]


def test_expert_parallel_plan_matches_the_single_device_model():
    failures, plan = W.simulate("moe", 2)
    assert not failures, failures[:10]
    assert plan.collectives_per_step()["forward"]["all_to_all"] >= 4  # dispatch and combine, 2 layers


@pytest.mark.slow
def test_moe_parity_on_gloo():
    case = {"model": "moe"}
    verdicts = run_parity([case], nproc=2, timeout=300, worker=WORKER)
    ranks = verdicts.get(case_key(case), [])
    assert len(ranks) == 2, f"only {len(ranks)} of 2 ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
