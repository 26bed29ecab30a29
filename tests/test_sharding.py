"""The sharding ILP on synthetic costs: expected choices on GPT and Llama blocks, budgets,
slow links, indivisible dims, view rewrites, repeated-block reuse, solver status.

Models are built on the meta device (nothing allocated): Llama-7B-width blocks (d_model
4096, 32 heads; Llama with 8 k/v heads), batch 1, 3 layers so that a middle block has
blocks on both sides. The cost model is the h100 preset with bf16 compute: at this width
tensor parallelism pays for itself, and at these sequence lengths (GPT 1024, Llama 128)
plain Megatron is the fastest layout; sequence parallelism saves memory for a few percent
of step time, so a tight budget turns it on.
"""

from __future__ import annotations

import math
import re

import pulp
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from partc.cluster import Cluster, Link, NodeSpec, PRESETS
from partc.cost_model import CostModel
from partc.errors import InfeasiblePlanError, PartcError, SolverError
from partc.models import GPT, GPTConfig, Llama, LlamaConfig
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.ir import graph_info, node_info
from partc.passes.layouts import R, Shard
from partc.passes.propagate import propagate
from partc.passes import sharding
from partc.passes.sharding import COLLECTIVE_CALL_PENALTY, ShardingPlan, plan_sharding, solver_status

BF16 = torch.bfloat16


def captured(model: nn.Module, *inputs: torch.Tensor):
    return annotate(propagate(capture(model, inputs), inputs))


def gpt(n_layer=3, seq=1024, n_head=32, d_model=4096, vocab=50304):
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=n_layer, n_head=n_head, d_model=d_model))
        idx = torch.randint(0, vocab, (1, seq))
    return captured(model, idx)


def llama(n_layer=3, seq=128):
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=32000, max_seq_len=seq, n_layer=n_layer, n_head=32, n_kv_head=8, d_model=4096, ffn_hidden=11008))
        idx = torch.randint(0, 32000, (1, seq))
    return captured(model, idx)


@pytest.fixture(scope="module")
def models():
    return {"gpt": gpt(), "llama": llama()}


@pytest.fixture(scope="module")
def h100():
    return CostModel(Cluster.preset("h100"))


def block_nodes(gm, layer: str) -> set[str]:
    (found,) = [l for l in graph_info(gm).layers if l.name == layer]
    return set(found.nodes)


def by_module(gm, plan: ShardingPlan, module: str, op: str = "linear") -> str:
    """The strategy name of the ``op`` node called in ``module``."""
    (name,) = [n.name for n in gm.graph.nodes if node_info(n).module == module and node_info(n).name == op]
    return plan.strategies[name].name


MIDDLE = {"gpt": "blocks.1", "llama": "layers.1"}
COLUMN = {"gpt": ["attn.qkv", "mlp.fc"], "llama": ["attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"]}
ROW = {"gpt": ["attn.proj", "mlp.proj"], "llama": ["attention.wo", "feed_forward.w2"]}


# -- expected choices ----------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_megatron_layout_by_default(models, h100, name, tp):
    gm = models[name]
    plan = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16)
    assert plan.status == "optimal"
    block = MIDDLE[name]
    for module in COLUMN[name]:
        assert by_module(gm, plan, f"{block}.{module}") == "column", module
    for module in ROW[name]:
        assert by_module(gm, plan, f"{block}.{module}") == "row", module
    assert by_module(gm, plan, f"{block}.attn" if name == "gpt" else f"{block}.attention", "scaled_dot_product_attention") == "head_parallel"
    # two all-reduces per block forward (after the row-parallel linears), two backward
    # (the column-parallel inputs: identity forward, all-reduce backward)
    assert plan.collectives_per_step(block_nodes(gm, block)) == {"forward": {"all_reduce": 2}, "backward": {"all_reduce": 2}}
    # parameters: column weights shard rows, row weights shard columns, names as in state_dict
    params = plan.parameters
    first = COLUMN[name][0]
    assert params[f"{block}.{first}.weight"].layout == Shard(0)
    assert params[f"{block}.{ROW[name][0]}.weight"].layout == Shard(1)
    assert params[f"{block}.{ROW[name][0]}.weight"].local_shape == (4096, 4096 // tp)
    if name == "gpt":  # the fused QKV weight is laid out in q, k, v blocks
        assert params[f"{block}.attn.qkv.weight"].blocks == 3 and params[f"{block}.attn.qkv.bias"].blocks == 3
        assert params["wte.weight"].layout == Shard(0)  # tied with the column-parallel LM head: vocab-parallel
        assert plan.strategies["embedding"].name == "vocab_parallel"


def test_gpt_view_rewrites_are_recorded(models, h100):
    gm = models["gpt"]
    plan = plan_sharding(gm, h100, tp=2, compute_dtype=BF16)
    rewrites = {(r.node, r.path): (r.old, r.new) for r in plan.view_rewrites}
    # q.view(B, T, self.n_head, self.head_dim): 32 heads -> 16 per rank
    assert rewrites[("view", (3,))] == (32, 16)
    assert rewrites[("view_1", (3,))] == (32, 16) and rewrites[("view_2", (3,))] == (32, 16)
    # y.reshape(B, T, n_head * head_dim): 4096 -> 2048
    assert rewrites[("reshape", (3,))] == (4096, 2048)
    assert all(r.divisor == 2 for r in plan.view_rewrites)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_tight_budget_shards_more(models, h100, name, tp):
    gm = models[name]
    default = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16)
    with pytest.raises(InfeasiblePlanError) as info:
        plan_sharding(gm, h100, tp=tp, compute_dtype=BF16, memory_limit=0.0)
    least = info.value.required_bytes
    budget = least + 0.1 * (default.memory.total - least)
    tight = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16, memory_limit=budget)
    assert tight.memory.total <= budget < default.memory.total
    assert tight.step_time >= default.step_time  # memory is bought with time
    block = block_nodes(gm, MIDDLE[name])
    # activations of the residual stream, [batch, sequence, d_model]
    stream = [n.name for n in gm.graph.nodes if n.name in block and (node_info(n).shape or ())[-1:] == (4096,) and len(node_info(n).shape) == 3]

    def sequence_sharded(plan):
        return [n for n in stream if plan.strategies[n].outputs[:1] == (Shard(1),)]

    assert not sequence_sharded(default)
    assert sequence_sharded(tight), "no sequence-parallel node under a tight budget"
    forward = tight.collectives_per_step(block)["forward"]
    assert forward.get("reduce_scatter") == 2 and "all_reduce" not in forward  # Megatron-SP
    embedding = "wte.weight" if name == "gpt" else "tok_embeddings.weight"
    assert isinstance(tight.parameters[embedding].layout, Shard)
    norms = {tight.strategies[n].name for n in block if n.startswith(("layer_norm", "mean"))}  # Llama's RMSNorm: mean(x^2)
    assert norms == ({"sequence_parallel"} if name == "gpt" else {"follow"})
    assert all(tight.strategies[n].outputs[0] == Shard(1) for n in block if n.startswith(("layer_norm", "mean")))


def test_slow_link_keeps_replication(models):
    device = PRESETS["h100"][0]
    slow = Link(latency=1e-3, bandwidth=1e8)  # 100 MB/s
    cluster = Cluster(nodes=(NodeSpec(device=device, devices=8, intra_link=slow),), inter_link=slow, name="slow")
    gm = models["gpt"]
    plan = plan_sharding(gm, CostModel(cluster), tp=4, compute_dtype=BF16)
    linears = {n: s.name for n, s in plan.strategies.items() if n.startswith("linear")}
    assert set(linears.values()) == {"replicate"}
    assert all(p.layout == R for p in plan.parameters.values())
    assert plan.collectives_per_step() == {"forward": {}, "backward": {}}
    assert plan.communication_time == 0.0


def test_indivisible_heads_exclude_head_parallel(h100):
    gm = gpt(n_layer=1, seq=256, n_head=12, d_model=768, vocab=50304)
    plan = plan_sharding(gm, h100, tp=8)
    assert plan.strategies["scaled_dot_product_attention"].name != "head_parallel"
    # the head view refuses S(2): 12 heads over 8 ranks, and says so in the plan
    assert any("12" in reason and "S(2)" in reason for reason in plan.refused_views["view"])
    assert plan.strategies["view"].inputs[0] != Shard(2)
    # at tp=4 the same model shards heads
    assert plan_sharding(gm, h100, tp=4).strategies["scaled_dot_product_attention"].name in ("head_parallel", "replicate")


class OddHeads(nn.Module):
    """Attention-like block whose view cannot follow a column-parallel projection at tp=4."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(96, 96)
        self.out = nn.Linear(96, 96)

    def forward(self, x):
        B, T = x.size(0), x.size(1)
        h = self.proj(x).view(B, T, 2, 48)  # 2 groups of 48: tp=4 cannot split the groups
        return self.out(torch.tanh(h).reshape(B, T, 96))


class WithOdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = OddHeads()

    def forward(self, x):
        return self.attn(x)


def test_non_rewritable_view_is_refused_with_node_module_and_source(h100):
    from partc.passes.layouts import view_output_layout

    gm = captured(WithOdd(), torch.randn(1, 64, 96))
    (view,) = [n for n in gm.graph.nodes if n.name == "view"]
    with pytest.raises(PartcError) as info:
        view_output_layout(view, Shard(2), 4)
    text = str(info.value)
    assert "node:" in text and "%view" in text
    assert "module: attn" in text
    assert "test_sharding.py" in text and "view(B, T, 2, 48)" in text
    # the planner excludes the layout and records why, instead of writing wrong code
    plan = plan_sharding(gm, h100, tp=4, memory_limit=math.inf)
    assert "view" in plan.refused_views
    assert plan.strategies["view"].inputs[0] != Shard(2)
    # at tp=2 the two groups split: the view is rewritten instead
    plan2 = plan_sharding(gm, h100, tp=2, memory_limit=math.inf)
    assert "view" not in plan2.refused_views


# -- reuse of repeated blocks ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [gpt, llama])
@pytest.mark.parametrize("tp", [2, 8])
def test_reuse_matches_the_full_solve(h100, build, tp):
    gm = build(n_layer=4)
    reused = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16)
    full = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16, reuse_repeated_blocks=False)
    assert reused.reused_layers == 3 and full.reused_layers == 0
    assert reused.ilp_variables < full.ilp_variables / 2
    assert reused.objective == pytest.approx(full.objective, rel=0.01)
    assert reused.step_time == pytest.approx(full.step_time, rel=0.01)
    # every block takes the representative's layout
    names = [[n for n in layer.nodes] for layer in graph_info(gm).layers if layer.name.split(".")[0] in ("blocks", "layers")]
    for other in names[1:]:
        assert [str(reused.strategies.get(n)) for n in other] == [str(reused.strategies.get(n)) for n in names[0]]


@pytest.mark.parametrize("tp", [2, 8])
def test_repeated_layers_plan_as_node_by_node(h100, monkeypatch, tp):
    """The problem and the plan handle the uses inside repeated layers once per class of
    layers (passes/sharding.py, PRICE_REPEATS_ONCE); with the flag off every use is handled
    on its own. A frozen block repeats the others' signature but not their gradients (its
    conversions are handled use by use), and a tight budget turns sequence parallelism on
    (gathers, reduce-scatters and regathers inside every block): both plans are equal to the
    last bit."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=4, n_head=32, d_model=4096))
        model.blocks[2].requires_grad_(False)
        idx = torch.randint(0, 50304, (1, 1024))
    gm = captured(model, idx)
    with pytest.raises(InfeasiblePlanError) as info:
        plan_sharding(gm, h100, tp=tp, compute_dtype=BF16, memory_limit=0.0)
    default = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16)
    budget = info.value.required_bytes + 0.1 * (default.memory.total - info.value.required_bytes)

    def plan() -> tuple[ShardingPlan, dict]:
        found = plan_sharding(gm, h100, tp=tp, compute_dtype=BF16, memory_limit=budget)
        data = found.to_dict()
        for name in ShardingPlan.TIMING_FIELDS:
            data.pop(name)
        return found, data

    by_class, data = plan()
    monkeypatch.setattr(sharding, "PRICE_REPEATS_ONCE", False)
    assert plan()[1] == data
    assert by_class.reused_layers == 3
    frozen = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith("blocks.2.")]
    assert frozen and not any(node_info(n).requires_grad for n in frozen)
    gathered = [r for r in by_class.reshards if r.regather]
    assert {r.producer for r in gathered} & block_nodes(gm, "blocks.3"), "no regather inside a repeated block"


# -- the plan as data ------------------------------------------------------------------------------
def test_plan_is_consistent_and_complete(models, h100):
    gm = models["llama"]
    plan = plan_sharding(gm, h100, tp=4, compute_dtype=BF16)
    # every tensor-valued node has a strategy
    assert {n.name for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)} <= set(plan.strategies)
    # parameter names are the model's state-dict keys
    assert set(plan.parameters) == {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    # the objective is the reported time plus the per-call tie-breaker
    calls = sum(len(r.collectives("forward")) + len(r.collectives("backward")) for r in plan.reshards)
    assert plan.objective == pytest.approx(plan.step_time + calls * COLLECTIVE_CALL_PENALTY, rel=1e-6)
    # every conversion is between the producer's and the consumer's layouts
    for r in plan.reshards:
        assert plan.strategies[r.producer].outputs[r.output_index] == r.src
        for use in r.consumers:
            assert plan.strategies[use.node].inputs[use.input_index] == r.dst
    # the collective counts add up
    counts = plan.collectives_per_step()
    assert sum(counts["forward"].values()) == sum(len(r.collectives("forward")) for r in plan.reshards)
    assert plan.summary().startswith("tensor parallel over 4 ranks")


def test_vocab_parallel_cross_entropy_avoids_gathering_logits(h100):
    class WithLoss(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx, targets):
            logits = self.model(idx)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    with torch.device("meta"):
        model = WithLoss(GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=1, n_head=32, d_model=4096)))
        idx, targets = torch.randint(0, 50304, (1, 1024)), torch.randint(0, 50304, (1, 1024))
    gm = captured(model, idx, targets)
    plan = plan_sharding(gm, h100, tp=4, compute_dtype=BF16)
    assert plan.strategies["cross_entropy"].name == "vocab_parallel"
    assert plan.collectives_per_step(["cross_entropy"])["forward"] == {"all_reduce": 2}
    assert not [r for r in plan.reshards if r.forward == "all_gather" and r.nbytes >= 1024 * 50304]
    # logits.size(-1) reads a sharded dim: the plan says how to get the global value back
    assert [(s.tensor, s.dim, s.multiplier) for s in plan.size_rewrites] == [("linear_4", 2, 4)]


def test_unsupported_operator_is_replicated_with_a_warning(h100):
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            return torch.logcumsumexp(self.lin(x), dim=1)

    gm = captured(Cumulative(), torch.randn(2, 16, 64))
    with pytest.warns(UserWarning, match=r"no sharding rule for logcumsumexp at node logcumsumexp"):
        plan = plan_sharding(gm, h100, tp=2)
    assert plan.unsupported == ("logcumsumexp",)
    assert plan.strategies["logcumsumexp"].name == "replicate"
    assert "without a sharding rule" in plan.summary()


# -- budgets and the solver ------------------------------------------------------------------------
def test_infeasible_budget_names_the_budget_and_the_minimum(models, h100):
    with pytest.raises(InfeasiblePlanError) as info:
        plan_sharding(models["gpt"], h100, tp=2, compute_dtype=BF16, memory_limit=2**30)
    text = str(info.value)
    assert "memory budget of 1.00 GiB" in text
    least = float(re.search(r"least memory any layout needs is ([\d.]+) GiB", text).group(1))
    assert least == pytest.approx(info.value.required_bytes / 2**30, abs=0.01) and least > 1.0
    assert "pass:   sharding" in text and "fix:" in text
    # exactly the minimum fits
    plan_sharding(models["gpt"], h100, tp=2, compute_dtype=BF16, memory_limit=info.value.required_bytes * 1.0001)


@pytest.mark.parametrize(
    "status, sol_status, word",
    [
        (pulp.LpStatusOptimal, pulp.LpSolutionOptimal, "optimal"),
        (pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible, "feasible"),  # CBC stopped at the time limit
        (pulp.LpStatusInfeasible, pulp.LpSolutionInfeasible, "infeasible"),
        (pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound, "no_solution"),
        (pulp.LpStatusUnbounded, pulp.LpSolutionUnbounded, "unbounded"),
        (pulp.LpStatusUndefined, 7, "error"),
    ],
)
def test_solver_status_mapping(status, sol_status, word):
    assert solver_status(status, sol_status) == word


def test_missing_cbc_is_a_solver_error(models, h100, monkeypatch):
    monkeypatch.setattr(pulp.PULP_CBC_CMD, "available", lambda self: False)
    monkeypatch.setattr(pulp.COIN_CMD, "available", lambda self: False)
    with pytest.raises(SolverError, match="CBC solver bundled with PuLP is not available"):
        plan_sharding(models["gpt"], h100, tp=2)


def test_time_limited_solution_is_reported_as_feasible(models, h100, monkeypatch):
    real_solve = pulp.LpProblem.solve

    def stopped_at_the_limit(self, solver=None, **kw):
        status = real_solve(self, solver, **kw)
        self.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)  # what PuLP reports then
        return status

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped_at_the_limit)
    plan = plan_sharding(models["gpt"], h100, tp=2, compute_dtype=BF16)
    assert plan.status == "feasible"

    def stopped_without_solution(self, solver=None, **kw):
        self.assignStatus(pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound)
        return pulp.LpStatusNotSolved

    monkeypatch.setattr(pulp.LpProblem, "solve", stopped_without_solution)
    with pytest.raises(SolverError, match="no usable sharding plan"):
        plan_sharding(models["gpt"], h100, tp=2, compute_dtype=BF16)


def test_bad_arguments(models, h100):
    with pytest.raises(PartcError, match="tp must be"):
        plan_sharding(models["gpt"], h100, tp=0)
    with pytest.raises(PartcError, match="ranks must list 2"):
        plan_sharding(models["gpt"], h100, tp=2, ranks=[0])
