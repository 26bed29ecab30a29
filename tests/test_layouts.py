"""Layouts, the sharding rules on small shapes, and resharding prices (no devices)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from partc import PartcError
from partc.cluster import Cluster
from partc.cost_model import CostModel
from partc.errors import UnsupportedOpError
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.layouts import (
    P,
    R,
    ArgRewrite,
    Partial,
    Replicate,
    Shard,
    Strategy,
    adjoint,
    grad_layout,
    local_shard,
    op_rule,
    reshard_cost,
    tensor_inputs,
    transition,
    view_output_layout,
)
from partc.passes.propagate import propagate


def traced(module: nn.Module, *inputs, frontend: str = "auto"):
    return annotate(propagate(capture(module, inputs, frontend=frontend), inputs))


def node_named(gm, prefix: str):
    found = [n for n in gm.graph.nodes if n.name == prefix]
    assert found, f"no node {prefix}: {[n.name for n in gm.graph.nodes]}"
    return found[0]


def strategies(gm, name: str, tp: int) -> dict[str, list[Strategy]]:
    by_name: dict[str, list[Strategy]] = {}
    for s in op_rule(node_named(gm, name), tp).strategies:
        by_name.setdefault(s.name, []).append(s)
    return by_name


class Fn(nn.Module):
    """A module running ``fn(self, *inputs)``; forward has fixed arity (fx cannot trace *args)."""

    def __init__(self, fn, **children):
        super().__init__()
        self.fn = fn
        for k, v in children.items():
            setattr(self, k, v)


class Fn1(Fn):
    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    def forward(self, x, y):
        return self.fn(self, x, y)


class Fn3(Fn):
    def forward(self, x, y, z):
        return self.fn(self, x, y, z)


# -- the vocabulary ---------------------------------------------------------------------------
def test_layouts_print_short_and_are_frozen():
    assert (str(Shard(0)), str(R), str(P)) == ("S(0)", "R", "P")
    assert repr(Shard(2)) == "S(2)" and Shard.of(-1, 3) == Shard(2)
    assert Replicate() == R and Partial() == P and Shard(1) != Shard(2)
    with pytest.raises(ValueError):
        Shard(-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Shard(0).dim = 1
    s = Strategy("column", (R, Shard(0), Shard(0)), (Shard(2),), compute_factor=0.5)
    assert str(s) == "column(R, S(0), S(0) -> S(2))"
    assert {Shard(0), Shard(0), R, P} == {Shard(0), R, P}  # hashable


def test_gradient_layouts_are_the_adjoints():
    column = Strategy("column", (R, Shard(0), Shard(0)), (Shard(2),))
    replicate = Strategy("replicate", (R,), (R,))
    assert grad_layout(R, column) == P  # identity forward, all-reduce backward
    assert grad_layout(R, replicate) == R
    assert grad_layout(Shard(1), column) == Shard(1)
    assert grad_layout(P, replicate) == R
    assert (adjoint(Shard(3)), adjoint(R), adjoint(P)) == (Shard(3), R, R)


# -- rules ---------------------------------------------------------------------------------------
def test_linear_rules():
    gm = traced(Fn1(lambda m, x: m.lin(x), lin=nn.Linear(16, 32)), torch.randn(2, 8, 16))
    by = strategies(gm, "linear", tp=2)
    (column,) = by["column"]
    assert column.inputs == (R, Shard(0), Shard(0)) and column.outputs == (Shard(2),)
    assert column.compute_factor == 0.5
    (row,) = by["row"]
    assert row.inputs == (Shard(2), Shard(1), P) and row.outputs == (P,)
    assert sorted(str(s.output) for s in by["batch_parallel"]) == ["S(0)", "S(1)"]
    assert by["replicate"][0].inputs == (R, R, R) and by["replicate"][0].compute_factor == 1.0
    # input order follows the torch-level signature, F.linear(input, weight, bias)
    assert [r.path for r in tensor_inputs(node_named(gm, "linear"))] == [(0,), (1,), (2,)]


def test_a_dimension_that_does_not_divide_excludes_the_layout():
    gm = traced(Fn1(lambda m, x: m.lin(x), lin=nn.Linear(30, 36)), torch.randn(3, 8, 30))
    by = strategies(gm, "linear", tp=4)
    assert "row" not in by  # 30 in-features
    assert by["column"][0].outputs == (Shard(2),)  # 36 out-features divide
    assert [s.output for s in by["batch_parallel"]] == [Shard(1)]  # batch of 3 does not
    by8 = strategies(gm, "linear", tp=8)
    assert "column" not in by8 and "row" not in by8
    for rule_strategies in by8.values():
        for s in rule_strategies:
            for layout, shape in zip(s.inputs + s.outputs, [(3, 8, 30), (36, 30), (36,), (3, 8, 36)]):
                assert not isinstance(layout, Shard) or shape[layout.dim] % 8 == 0


def test_embedding_rules_both_argument_orders():
    emb = nn.Embedding(64, 16)
    idx = torch.randint(0, 64, (2, 8))
    for frontend in ("fx", "export"):
        gm = traced(Fn1(lambda m, i: m.emb(i), emb=emb), idx, frontend=frontend)
        rule = op_rule(node_named(gm, "embedding"), 4)
        by = {s.name: s for s in rule.strategies}
        weight = [i for i, r in enumerate(rule.inputs) if r.node.op == "get_attr"][0]
        assert by["vocab_parallel"].inputs[weight] == Shard(0) and by["vocab_parallel"].outputs == (P,)
        assert by["hidden_parallel"].inputs[weight] == Shard(1) and by["hidden_parallel"].outputs == (Shard(2),)


def test_attention_head_parallel_needs_heads_and_kv_groups_to_divide():
    def attn(m, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    gm = traced(Fn3(attn), q, k, k)
    assert strategies(gm, "scaled_dot_product_attention", 2)["head_parallel"][0].outputs == (Shard(1),)
    assert strategies(gm, "scaled_dot_product_attention", 4)["head_parallel"][0].inputs == (Shard(1),) * 3
    assert "head_parallel" not in strategies(gm, "scaled_dot_product_attention", 8)

    def gqa(m, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    kv = torch.randn(2, 2, 8, 16)  # 4 query heads, 2 k/v heads
    gm = traced(Fn3(gqa), q, kv, kv)
    assert "head_parallel" in strategies(gm, "scaled_dot_product_attention", 2)
    assert "head_parallel" not in strategies(gm, "scaled_dot_product_attention", 4)  # 2 kv heads


def test_norms_follow_unnormalised_dims_and_softmax_reductions_skip_the_reduced_dim():
    gm = traced(Fn1(lambda m, x: m.ln(x), ln=nn.LayerNorm(16)), torch.randn(2, 8, 16))
    by = strategies(gm, "layer_norm", 2)
    assert by["sequence_parallel"][0].inputs == (Shard(1), R, R) and by["sequence_parallel"][0].outputs == (Shard(1),)
    assert by["batch_parallel"][0].outputs == (Shard(0),)
    assert all(s.output != Shard(2) for group in by.values() for s in group)

    gm = traced(Fn1(lambda m, x: (x.softmax(-1), x.sum(-1), x.mean(-1))), torch.randn(2, 8, 16))
    assert sorted(str(s.output) for s in strategies(gm, "softmax", 2)["follow"]) == ["S(0)", "S(1)"]
    total = strategies(gm, "sum_1", 2)
    assert total["partial_sum"][0].inputs == (Shard(2),) and total["partial_sum"][0].outputs == (P,)
    assert strategies(gm, "mean", 2)["partial_mean"][0].local_scale == 0.5


def test_elementwise_broadcasting_and_partial_flow():
    def fn(m, x, y, b):
        return torch.nn.functional.gelu(x + y) * b, x + 1.0

    gm = traced(Fn3(fn), torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(16))
    add = strategies(gm, "add", 2)
    assert add["partial"][0].inputs == (P, P)
    follow = {s.output: s.inputs for s in strategies(gm, "mul", 2)["follow"]}
    assert follow[Shard(2)] == (Shard(2), Shard(0)) and follow[Shard(1)] == (Shard(1), R)
    assert {s.inputs for s in strategies(gm, "mul", 2)["partial"]} == {(P, R), (R, P)}
    assert "partial" not in strategies(gm, "gelu", 2)  # not linear
    assert "partial" not in strategies(gm, "add_1", 2)  # P + 1.0 would add 1.0 tp times


def test_vocab_parallel_cross_entropy_reduces_two_small_vectors():
    logits, targets = torch.randn(32, 64), torch.randint(0, 64, (32,))
    gm = traced(Fn2(lambda m, x, t: F.cross_entropy(x, t)), logits, targets)
    (vocab,) = strategies(gm, "cross_entropy", 4)["vocab_parallel"]
    assert vocab.inputs == (Shard(1), R) and vocab.outputs == (R,)
    assert [(c.collective, c.nbytes) for c in vocab.comm] == [("all_reduce", 32 * 4), ("all_reduce", 2 * 32 * 4)]
    batch = strategies(gm, "cross_entropy", 4)["batch_parallel"][0]
    assert batch.outputs == (P,) and batch.local_scale == 1.0  # divided by the global count instead


def loss_strategies(fn, x, t, tp: int = 4, **children) -> dict[str, list[Strategy]]:
    gm = traced(Fn2(fn, **children), x, t)
    (loss,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith(("cross_entropy", "nll_loss", "mse_loss"))]
    return strategies(gm, loss.name, tp)


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_batch_parallel_class_loss_mean_all_reduces_the_kept_targets_normaliser():
    """torch's "mean" over class indices divides by the count (or class-weight sum) of the
    kept targets of the WHOLE batch: the strategy carries that scalar's all-reduce, and no
    1/tp scale (exact only when every rank keeps as many targets with equal weights)."""
    logits, labels = torch.randn(32, 7), torch.randint(0, 7, (32,))
    weights = nn.Parameter(torch.rand(7), requires_grad=False)
    normaliser = ("all_reduce", 8, "forward")
    for fn in (
        lambda m, x, t: F.cross_entropy(x, t),
        lambda m, x, t: F.cross_entropy(x, t, weight=m.w, ignore_index=3, label_smoothing=0.1),
        lambda m, x, t: F.nll_loss(x.log_softmax(-1), t, m.w),
    ):
        (batch,) = loss_strategies(fn, logits, labels, w=weights)["batch_parallel"]
        assert batch.inputs[:2] == (Shard(0), Shard(0)) and batch.outputs == (P,)
        assert [(c.collective, c.nbytes, c.phase) for c in batch.comm] == [normaliser] and batch.local_scale == 1.0
    # "sum" and "none" need no normaliser; neither do probability targets (torch divides by the rows)
    (summed,) = loss_strategies(lambda m, x, t: F.cross_entropy(x, t, reduction="sum"), logits, labels)["batch_parallel"]
    assert summed.comm == () and summed.local_scale == 1.0 and summed.outputs == (P,)
    (rows,) = loss_strategies(lambda m, x, t: F.cross_entropy(x, t, reduction="none"), logits, labels)["batch_parallel"]
    assert rows.comm == () and rows.outputs == (Shard(0),)
    (soft,) = loss_strategies(lambda m, x, t: F.cross_entropy(x, t), logits, torch.rand(32, 7).softmax(-1))["batch_parallel"]
    assert soft.comm == () and soft.local_scale == 0.25
    # the deprecated flags decide the reduction as torch lets them: size_average=False is a sum
    (legacy,) = loss_strategies(lambda m, x, t: F.cross_entropy(x, t, size_average=False), logits, labels)["batch_parallel"]
    assert legacy.comm == () and legacy.local_scale == 1.0


def test_class_loss_mean_with_trained_weights_and_weighted_mse_are_not_batch_parallel():
    """Where no exact lowering exists the strategy is not offered: with label smoothing torch
    differentiates the normaliser through a weight that requires grad; a weighted mse's
    "mean" divides by the weights' sum, and its weights would need sharding too."""
    logits, labels = torch.randn(32, 7), torch.randint(0, 7, (32,))
    trained = nn.Parameter(torch.rand(7))
    smoothed = loss_strategies(lambda m, x, t: F.cross_entropy(x, t, weight=m.w, label_smoothing=0.1), logits, labels, w=trained)
    assert "batch_parallel" not in smoothed and "replicate" in smoothed
    assert "batch_parallel" in loss_strategies(lambda m, x, t: F.cross_entropy(x, t, weight=m.w, reduction="sum"), logits, labels, w=trained)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    weighted = loss_strategies(lambda m, a, b: F.mse_loss(a, b, weight=torch.ones_like(a)), x, y)
    assert set(weighted) == {"replicate"}
    plain = loss_strategies(lambda m, a, b: F.mse_loss(a, b), x, y)
    assert plain["batch_parallel"][0].local_scale == 0.25 and plain["batch_parallel"][0].comm == ()


def test_an_operator_without_a_rule_is_replicated_only():
    gm = traced(Fn1(lambda m, x: torch.logcumsumexp(x, 1)), torch.randn(2, 8))
    rule = op_rule(node_named(gm, "logcumsumexp"), 2)
    assert not rule.supported
    assert [s.name for s in rule.strategies] == ["replicate"]


def test_split_along_the_sharded_dim_needs_a_blocked_linear():
    def fn(m, x):
        q, k, v = m.qkv(x).chunk(3, dim=-1)
        return q + k + v

    gm = traced(Fn1(fn, qkv=nn.Linear(8, 24)), torch.randn(2, 4, 8))
    (blocked,) = strategies(gm, "chunk", 2)["split_sharded"]
    assert blocked.blocks == 3 and blocked.inputs == (Shard(2),) and blocked.outputs == (Shard(2),) * 3
    gm = traced(Fn1(lambda m, x: sum(x.chunk(2, dim=-1))), torch.randn(2, 4, 8))
    assert "split_sharded" not in strategies(gm, "chunk", 2)  # no weight rows to lay out in blocks


def test_local_shard_of_a_blocked_weight_takes_a_slice_of_each_block():
    full = torch.arange(12.0).reshape(6, 2)  # q rows 0-1, k rows 2-3, v rows 4-5
    assert local_shard(full, Shard(0), 0, 2, blocks=3)[:, 0].tolist() == [0.0, 4.0, 8.0]
    assert local_shard(full, Shard(0), 1, 2)[:, 0].tolist() == [6.0, 8.0, 10.0]
    assert local_shard(full, Shard(1), 1, 2).shape == (6, 1)
    assert torch.equal(local_shard(full, P, 0, 2), full) and not local_shard(full, P, 1, 2).any()
    assert local_shard(full, R, 1, 2) is full


# -- views ---------------------------------------------------------------------------------------
class Heads(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T = x.size(0), x.size(1)
        h = self.proj(x).view(B, T, self.heads, x.size(2) // self.heads).transpose(1, 2)
        return h.transpose(1, 2).reshape(B, T, -1)


class Mixer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.mixer = Heads(width, heads)

    def forward(self, x):
        return self.mixer(x)


def test_hard_coded_head_count_is_rewritten():
    gm = traced(Mixer(32, 4), torch.randn(2, 8, 32))
    view = node_named(gm, "view")
    layout, rewrites = view_output_layout(view, Shard(2), 2)
    assert layout == Shard(2)
    assert rewrites == (ArgRewrite(path=(3,), old=4, new=2, divisor=2),)
    # the batch dim arrives as a traced size(): it is divided at run time
    assert view_output_layout(view, Shard(0), 2)[1] == (ArgRewrite((1,), None, None, 2),)
    # permutations move the shard, a -1 needs no rewrite
    assert view_output_layout(node_named(gm, "transpose"), Shard(2), 2) == (Shard(1), ())
    assert view_output_layout(node_named(gm, "reshape"), Shard(2), 2) == (Shard(2), ())


def test_export_graphs_rewrite_inside_the_shape_list():
    gm = traced(Mixer(32, 4), torch.randn(2, 8, 32), frontend="export")
    view = [n for n in gm.graph.nodes if n.name.startswith("view")][0]
    layout, rewrites = view_output_layout(view, Shard(2), 2)
    assert layout == Shard(2) and rewrites == (ArgRewrite((1, 2), 4, 2, 2),)


def test_view_that_cannot_be_rewritten_is_refused_naming_node_module_and_source():
    gm = traced(Mixer(32, 2), torch.randn(2, 8, 32))  # 2 heads of 16: tp=4 cannot split the heads
    view = node_named(gm, "view")
    with pytest.raises(UnsupportedOpError) as info:
        view_output_layout(view, Shard(2), 4)
    message = str(info.value)
    assert isinstance(info.value, PartcError)
    assert "node:" in message and "view" in message
    assert "module: mixer" in message
    assert "test_layouts.py" in message and "h = self.proj(x).view(B, T, self.heads" in message
    assert "pass:   sharding" in message
    # an inner dim of a merged group is refused too
    with pytest.raises(UnsupportedOpError, match="inner part"):
        view_output_layout(node_named(gm, "reshape"), Shard(3), 2)
    # the rule records the refusal and keeps the other layouts
    rule = op_rule(view, 4)
    assert any("S(2)" in r for r in rule.refused)
    assert Shard(2) not in {s.inputs[0] for s in rule.strategies}


# -- resharding ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cost_model():
    return CostModel(Cluster.preset("h100"))


def test_reshard_collective_choice_and_price(cost_model):
    ranks, n = [0, 1, 2, 3], 2**24
    assert reshard_cost(Shard(1), R, n, cost_model, ranks) == (cost_model.all_gather(n, ranks), "all_gather")
    assert reshard_cost(P, R, n, cost_model, ranks) == (cost_model.all_reduce(n, ranks), "all_reduce")
    assert reshard_cost(P, Shard(1), n, cost_model, ranks) == (cost_model.reduce_scatter(n, ranks), "reduce_scatter")
    assert reshard_cost(Shard(1), Shard(2), n, cost_model, ranks) == (cost_model.all_to_all(n / 4, ranks), "all_to_all")
    for free in [(R, Shard(0)), (R, P), (Shard(0), P), (R, R), (P, P), (Shard(1), Shard(1))]:
        assert reshard_cost(*free, n, cost_model, ranks) == (0.0, None)
    assert [transition(R, Shard(0)), transition(R, P), transition(Shard(0), P), transition(R, R)] == ["slice", "partial", "pad", None]
    # Megatron sequence parallelism: reduce-scatter + all-gather price like the all-reduce
    sp = reshard_cost(P, Shard(1), n, cost_model, ranks)[0] + reshard_cost(Shard(1), R, n, cost_model, ranks)[0]
    assert sp == pytest.approx(reshard_cost(P, R, n, cost_model, ranks)[0])
    # one rank: nothing to do
    assert reshard_cost(P, R, n, cost_model, [0]) == (0.0, "all_reduce")
    # a group across nodes pays the slower link
    two_nodes = CostModel(Cluster.preset("h100", nodes=2, devices_per_node=2))
    assert reshard_cost(P, R, n, two_nodes, [0, 2])[0] > reshard_cost(P, R, n, two_nodes, [0, 1])[0]


def test_the_sharding_plan_prices_the_normaliser_all_reduce_of_a_batch_parallel_mean():
    """The ILP sees the loss's own all-reduce: the plan counts it among the step's
    collectives and its forward communication time is that all-reduce plus the output's."""
    from partc.cluster import DeviceSpec, Link, NodeSpec
    from partc.passes.sharding import plan_sharding

    slow = DeviceSpec("slow", {"float32": 1e6}, 2**34, 1e6, 1.0)  # loss compute dominates: shard it
    link = Link(1e-6, 1e10)
    cost = CostModel(Cluster(nodes=(NodeSpec(slow, 4, link),), inter_link=link, name="slow"))
    gm = traced(Fn2(lambda m, x, t: F.cross_entropy(x, t)), torch.randn(64, 7), torch.randint(0, 7, (64,)))
    plan = plan_sharding(gm, cost, tp=4)
    strategy = plan.strategies["cross_entropy"]
    assert strategy.name == "batch_parallel" and len(strategy.comm) == 1
    assert plan.collectives_per_step()["forward"] == {"all_reduce": 2}  # the normaliser, then the P loss -> R
    ranks = list(range(4))
    want = cost.all_reduce(8, ranks) + cost.all_reduce(4, ranks)
    assert plan.forward_communication_time == pytest.approx(want, rel=1e-9)
