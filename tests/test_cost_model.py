"""The cost model's formulas against numbers worked out by hand.

The toy cluster uses round numbers so each expected value can be checked on paper:
2 nodes x 4 devices; intra link alpha = 1 us, 10 GB/s (beta = 1e-10 s/B); inter link
alpha = 10 us, 1 GB/s (beta = 1e-9 s/B). Ranks 0-3 live on node 0, ranks 4-7 on node 1.
"""

import numpy as np
import pytest
import torch

from partc.cluster import Cluster, DeviceSpec, Link, NodeSpec
from partc.cost_model import (
    CostModel,
    MemoryBreakdown,
    bubble_fraction,
    optimizer_step_bytes,
    pipeline_step_time,
    roofline,
    training_memory,
)
from partc.errors import ClusterError, PartcError

S = 8e6  # bytes; 8e6 * 1e-10 = 8e-4 s intra, 8e6 * 1e-9 = 8e-3 s inter

TOY_DEVICE = DeviceSpec(
    name="toy",
    peak_flops={"float32": 1e12, "bfloat16": 4e12},
    memory=1e10,
    memory_bandwidth=1e11,
    matmul_efficiency=0.5,
)


@pytest.fixture
def model() -> CostModel:
    node = NodeSpec(device=TOY_DEVICE, devices=4, intra_link=Link(latency=1e-6, bandwidth=1e10))
    return CostModel(Cluster(nodes=(node, node), inter_link=Link(latency=1e-5, bandwidth=1e9), name="toy"))


# -- compute ----------------------------------------------------------------------------------
def test_compute_bound_roofline(model):
    # 1e12 FLOP / (1e12 x 0.5) = 2 s beats 1e9 B / 1e11 B/s = 0.01 s
    assert model.compute_time(1e12, 1e9, torch.float32, TOY_DEVICE) == pytest.approx(2.0)


def test_memory_bound_roofline(model):
    # 1e9 FLOP / (4e12 x 0.5) = 5e-4 s loses to 1e10 B / 1e11 B/s = 0.1 s
    assert model.compute_time(1e9, 1e10, torch.bfloat16, TOY_DEVICE) == pytest.approx(0.1)


# -- collectives inside one node ------------------------------------------------------------
def test_all_reduce_intra_node(model):
    # 2*3*1e-6 + 2*3/4 * 8e-4 = 6e-6 + 1.2e-3
    assert model.all_reduce(S, range(4)) == pytest.approx(1.206e-3)


def test_all_reduce_two_ranks_intra_node(model):
    # 2*1*1e-6 + 2*1/2 * 8e-4
    assert model.all_reduce(S, [0, 1]) == pytest.approx(8.02e-4)


def test_all_gather_intra_node(model):
    # 3*1e-6 + 3/4 * 8e-4 = 3e-6 + 6e-4
    assert model.all_gather(S, range(4)) == pytest.approx(6.03e-4)


def test_reduce_scatter_intra_node(model):
    assert model.reduce_scatter(S, range(4)) == pytest.approx(6.03e-4)


def test_all_to_all_intra_node(model):
    assert model.all_to_all(S, range(4)) == pytest.approx(6.03e-4)


def test_intra_node_group_on_second_node_uses_its_link(model):
    assert model.all_reduce(S, range(4, 8)) == pytest.approx(1.206e-3)


@pytest.mark.parametrize("collective", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_single_rank_collectives_are_free(model, collective):
    assert getattr(model, collective)(S, [5]) == 0.0


def test_rank_outside_cluster_is_rejected(model):
    with pytest.raises(ClusterError, match="rank 8"):
        model.all_reduce(S, [0, 8])


# -- hierarchical collectives across nodes --------------------------------------------------
def test_hierarchical_all_reduce_across_two_nodes(model):
    # g=4, k=2: reduce-scatter intra 6.03e-4
    #   + all-reduce inter of S/4=2e6 over 2 nodes: 2*1e-5 + 1 * 2e6*1e-9 = 2.02e-3
    #   + all-gather intra 6.03e-4
    assert model.all_reduce(S, range(8)) == pytest.approx(3.226e-3)


def test_hierarchical_all_reduce_two_ranks_per_node(model):
    # g=2: intra (1e-6 + 1/2*8e-4) = 4.01e-4 twice; inter of 4e6: 2e-5 + 4e-3 = 4.02e-3
    assert model.all_reduce(S, [0, 1, 4, 5]) == pytest.approx(4.822e-3)


def test_hierarchical_all_gather_across_two_nodes(model):
    # inter all-gather of S/4=2e6 over 2: 1e-5 + 1/2*2e-3 = 1.01e-3; intra 6.03e-4
    assert model.all_gather(S, range(8)) == pytest.approx(1.613e-3)


def test_hierarchical_reduce_scatter_across_two_nodes(model):
    # intra 6.03e-4 then inter of 2e6 over 2: 1.01e-3
    assert model.reduce_scatter(S, range(8)) == pytest.approx(1.613e-3)


def test_one_rank_per_node_pays_only_the_inter_link(model):
    # g=1: intra parts free; inter all-reduce over 2: 2e-5 + 1 * 8e-3
    assert model.all_reduce(S, [0, 4]) == pytest.approx(8.02e-3)
    assert model.all_gather(S, [0, 4]) == pytest.approx(4.01e-3)


def test_all_to_all_across_nodes_is_flat_on_inter_link(model):
    # 7*1e-5 + 7/8 * 8e-3 = 7e-5 + 7e-3
    assert model.all_to_all(S, range(8)) == pytest.approx(7.07e-3)


def test_uneven_group_falls_back_to_flat_inter_ring(model):
    ranks = [0, 1, 2, 4]  # three ranks on node 0, one on node 1
    # all-reduce: 6*1e-5 + 6/4 * 8e-3 = 6e-5 + 1.2e-2
    assert model.all_reduce(S, ranks) == pytest.approx(1.206e-2)
    # all-gather / reduce-scatter: 3*1e-5 + 3/4 * 8e-3 = 3e-5 + 6e-3
    assert model.all_gather(S, ranks) == pytest.approx(6.03e-3)
    assert model.reduce_scatter(S, ranks) == pytest.approx(6.03e-3)


# -- point to point ---------------------------------------------------------------------------
def test_p2p_same_node(model):
    # 1e-6 + 8e-4
    assert model.p2p(S, 0, 1) == pytest.approx(8.01e-4)


def test_p2p_across_nodes(model):
    # 1e-5 + 8e-3
    assert model.p2p(S, 3, 4) == pytest.approx(8.01e-3)


def test_p2p_to_self_is_free(model):
    assert model.p2p(S, 2, 2) == 0.0


def test_exposed_communication():
    assert CostModel.exposed(3.0, 1.0) == 2.0
    assert CostModel.exposed(1.0, 3.0) == 0.0


# -- heterogeneous cluster ------------------------------------------------------------------
@pytest.fixture
def mixed() -> CostModel:
    # H100 node (NVLink 450 GB/s) then A100 node (300 GB/s); inter link = the slower IB, 25 GB/s.
    return CostModel(Cluster.combine(Cluster.preset("h100", 1, 8), Cluster.preset("a100", 1, 8)))


def test_heterogeneous_intra_node_collectives_use_each_nodes_link(mixed):
    # S=9e8, n=8, alpha=5e-6: 2*7*5e-6 + 14/8 * 9e8 / bandwidth
    assert mixed.all_reduce(9e8, range(8)) == pytest.approx(7e-5 + 1.75 * 2e-3)  # H100: 3.57e-3
    assert mixed.all_reduce(9e8, range(8, 16)) == pytest.approx(7e-5 + 1.75 * 3e-3)  # A100: 5.32e-3


def test_heterogeneous_hierarchical_all_reduce_uses_slowest_intra_link(mixed):
    # g=8 on the A100 link: 7*5e-6 + 7/8 * 9e8/3e11 = 3.5e-5 + 2.625e-3 = 2.66e-3 (twice)
    # inter of 9e8/8 = 1.125e8 over 2 nodes: 2*1e-5 + 1.125e8/2.5e10 = 4.52e-3
    assert mixed.all_reduce(9e8, range(16)) == pytest.approx(9.84e-3)


# -- memory -----------------------------------------------------------------------------------
def test_fp32_adamw_costs_16_bytes_per_param():
    memory = training_memory(1000, torch.float32, 0.0)
    assert memory == MemoryBreakdown(parameters=4000, gradients=4000, optimizer_state=8000, activations=0)
    assert memory.total == 16000


def test_mixed_precision_adds_fp32_master_copy():
    # bf16 weights 2 B + bf16 grads 2 B + moments 8 B + master 4 B = 16 B/param
    memory = training_memory(1000, torch.bfloat16, 500.0, mixed_precision=True)
    assert memory == MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=12000, activations=500)
    assert memory.total == 16500


@pytest.mark.parametrize(
    "stage, expected",
    [
        (0, MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=12000, activations=0)),
        (1, MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=3000, activations=0)),
        (2, MemoryBreakdown(parameters=2000, gradients=500, optimizer_state=3000, activations=0)),
        (3, MemoryBreakdown(parameters=500, gradients=500, optimizer_state=3000, activations=0)),
    ],
)
def test_zero_stages_shard_over_dp(stage, expected):
    assert training_memory(1000, torch.bfloat16, 0.0, mixed_precision=True, zero_stage=stage, dp=4) == expected


@pytest.mark.parametrize(
    "stage, accumulates, gathered, expected",
    [
        # gradient accumulation: FSDP2 sums the microbatches' gradients unsharded
        (2, True, False, MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=3000, activations=0)),
        (3, True, False, MemoryBreakdown(parameters=500, gradients=2000, optimizer_state=3000, activations=0)),
        # a pipeline stage stays gathered from its first backward to the step's end (or one FSDP2 unit)
        (3, True, True, MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=3000, activations=0)),
        (1, True, True, MemoryBreakdown(parameters=2000, gradients=2000, optimizer_state=3000, activations=0)),
        # one FSDP2 unit without accumulation: gathered whole, gradients reduce-scattered
        (3, False, True, MemoryBreakdown(parameters=2000, gradients=500, optimizer_state=3000, activations=0)),
    ],
)
def test_zero_shards_only_what_fsdp2_holds_sharded(stage, accumulates, gathered, expected):
    memory = training_memory(1000, torch.bfloat16, 0.0, mixed_precision=True, zero_stage=stage, dp=4, accumulates=accumulates, gathered=gathered)
    assert memory == expected


def test_sgd_keeps_no_optimizer_state():
    assert training_memory(1000, torch.float32, 0.0, optimizer="sgd").total == 8000


def test_inference_holds_only_weights_and_activations():
    memory = training_memory(1000, torch.float32, 100.0, training=False, mixed_precision=True, transient_bytes=50.0)
    assert memory == MemoryBreakdown(parameters=4000, gradients=0, optimizer_state=0, activations=100, transient=50)
    assert memory.total == 4150


def test_memory_breakdowns_add_fieldwise():
    a = MemoryBreakdown(1, 2, 3, 4, 5)
    b = MemoryBreakdown(10, 20, 30, 40)
    assert a + b == MemoryBreakdown(11, 22, 33, 44, 5)
    assert sum([a, b]) == a + b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero_stage": 4}, r"zero_stage must be one of 0, 1, 2, 3, got 4"),
        ({"zero_stage": -1}, r"zero_stage .* got -1"),
        ({"dp": 0}, r"dp must be an integer >= 1, got 0"),
        ({"optimizer": "lamb"}, r"unknown optimizer 'lamb'; accepted: adam, adamw, sgd"),
    ],
)
def test_bad_memory_arguments_raise(kwargs, message):
    with pytest.raises(PartcError, match=message):
        training_memory(1000, torch.float32, 0.0, **kwargs)


# -- pipelines --------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_step_time(schedule):
    # sum 6 + (4-1) * max 3
    assert pipeline_step_time([1.0, 2.0, 3.0], 4, schedule) == pytest.approx(15.0)


def test_interleaved_divides_fill_and_drain_by_virtual_stages():
    # 4 * 3 + (6 - 3) / 2
    assert pipeline_step_time([1.0, 2.0, 3.0], 4, "interleaved", virtual_stages=2) == pytest.approx(13.5)
    assert pipeline_step_time([1.0, 2.0, 3.0], 4, "interleaved") == pytest.approx(15.0)


def test_bubble_fraction():
    assert bubble_fraction(4, 8) == pytest.approx(0.375)  # 3/8
    assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(0.1875)  # 3/16
    assert bubble_fraction(1, 8) == 0.0


def test_step_time_and_bubble_fraction_agree_for_balanced_stages():
    p, m, v, t = 4, 8, 2, 0.5
    ideal = m * t
    step = pipeline_step_time([t] * p, m, "interleaved", virtual_stages=v)
    assert (step - ideal) / ideal == pytest.approx(bubble_fraction(p, m, v))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([1.0], 4), {"schedule": "zigzag"}, r"unknown pipeline schedule 'zigzag'; accepted: gpipe, 1f1b, interleaved"),
        (([1.0], 0), {}, r"microbatches must be >= 1, got 0"),
        (([], 4), {}, r"a pipeline needs >= 1 stage, got 0"),
        (([1.0], 4), {"schedule": "interleaved", "virtual_stages": 0}, r"virtual_stages must be >= 1, got 0"),
        (([1.0], 4), {"schedule": "1f1b", "virtual_stages": 2}, r"virtual_stages=2 needs 'interleaved'"),
        (([1.0, -1.0], 4), {}, r"stage times must be >= 0"),
    ],
)
def test_bad_pipeline_arguments_raise(args, kwargs, message):
    with pytest.raises(PartcError, match=message):
        pipeline_step_time(*args, **kwargs)


def test_bad_bubble_arguments_raise():
    with pytest.raises(PartcError, match=r"microbatches must be >= 1, got 0"):
        bubble_fraction(2, 0)


# -- kernel terms from the calibration ---------------------------------------------------------
def _toy_with(**terms) -> DeviceSpec:
    return DeviceSpec(name="toy", peak_flops={"float32": 1e12, "bfloat16": 4e12}, memory=1e10, memory_bandwidth=1e11, matmul_efficiency=0.5, **terms)


def test_kernel_overhead_floors_a_short_kernel(model):
    device = _toy_with(kernel_overhead=1e-5)
    # 1e6 FLOP / 5e11 = 2e-6 s and 1e3 B / 1e11 = 1e-8 s: the 10 us launch floor wins
    assert model.compute_time(1e6, 1e3, torch.float32, device) == pytest.approx(1e-5)
    # a long kernel is not touched by it; a node that does nothing costs nothing
    assert model.compute_time(1e12, 0, torch.float32, device) == pytest.approx(2.0)
    assert model.compute_time(0, 0, torch.float32, device) == 0.0


def test_efficiency_scales_the_matmul_rate(model):
    # 1e12 FLOP at 1e12 x 0.5 (device) x 0.25 (kernel) = 8 s
    assert model.compute_time(1e12, 0, torch.float32, TOY_DEVICE, efficiency=0.25) == pytest.approx(8.0)


def test_roofline_prices_arrays_like_numbers():
    flops, moved = np.array([1e12, 1e6, 0.0]), np.array([0.0, 1e3, 1e10])
    seconds = roofline(flops, moved, np.array([1e12, 1e12, 1e12]), 1e11, 1e-5)
    assert seconds == pytest.approx([1.0, 1e-5, 0.1])
    assert roofline(1e12, 0.0, 1e12, 1e11, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("dtype", "mixed", "expected"),
    [(torch.bfloat16, False, 40), (torch.float32, False, 80), (torch.bfloat16, True, 20 * 4 + 2)],
)
def test_optimizer_step_bytes_count_torch_foreach_adamw(dtype, mixed, expected):
    # 20 element accesses in the state's dtype (bf16 moments for a bf16 model), plus the
    # compute copy under mixed precision
    assert optimizer_step_bytes("adamw", dtype, mixed) == expected


def test_optimizer_step_bytes_sgd_and_unknown():
    assert optimizer_step_bytes("sgd", torch.float32) == 0.0
    with pytest.raises(PartcError, match="unknown optimizer"):
        optimizer_step_bytes("lion", torch.float32)


def test_device_kernel_terms_round_trip_and_default(tmp_path):
    device = _toy_with(kernel_overhead=6e-6, attention_efficiency={"128": 0.54, "64": 0.43}, misaligned_matmul_efficiency=0.17)
    cluster = Cluster(nodes=(NodeSpec(device, 2, Link(1e-6, 1e10)),), inter_link=Link(1e-5, 1e9))
    loaded = Cluster.from_json(cluster.to_json())
    assert loaded == cluster and hash(loaded.nodes[0].device) == hash(device)
    assert list(loaded.nodes[0].device.attention_efficiency) == ["64", "128"]
    old = cluster.to_dict()
    for key in ("kernel_overhead", "attention_efficiency", "misaligned_matmul_efficiency"):
        del old["nodes"][0]["device"][key]  # a cluster JSON written before these were measured
    plain = Cluster.from_dict(old).nodes[0].device
    assert (plain.kernel_overhead, plain.attention_efficiency, plain.misaligned_matmul_efficiency) == (0.0, {}, 1.0)


@pytest.mark.parametrize("bad", [{"kernel_overhead": -1.0}, {"misaligned_matmul_efficiency": 0.0}, {"attention_efficiency": {"x": 0.5}}, {"attention_efficiency": {"64": 0.0}}])
def test_device_kernel_terms_are_validated(bad):
    with pytest.raises(ClusterError):
        _toy_with(**bad)


def test_kernel_efficiency_of_attention_and_misaligned_matmuls():
    """An annotated GPT with an odd vocabulary: its LM head runs at the misaligned rate,
    attention at the efficiency of the nearest measured head dimension, the rest at 1."""
    from partc.passes.estimate import kernel_efficiency
    from partc.passes.ir import OpKind, node_info

    import partc
    from partc.models import GPT
    from partc.models.gpt import GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=101, block_size=16, n_layer=1, n_head=2, d_model=32))  # head dim 16
        tokens = torch.zeros(2, 16, dtype=torch.long)
    device = _toy_with(attention_efficiency={"8": 0.3, "64": 0.6}, misaligned_matmul_efficiency=0.2)
    plan = partc.plan(model, Cluster(nodes=(NodeSpec(device, 1, Link(1e-6, 1e10)),), inter_link=Link(1e-5, 1e9)), tokens)
    seen = {}
    for n in plan.graph.graph.nodes:
        info = node_info(n)
        if info.op in (OpKind.ATTENTION, OpKind.LINEAR):
            seen[info.module or info.name] = kernel_efficiency(info, device, torch.float32)
    assert seen["lm_head"] == 0.2  # 101 outputs: not a multiple of 4 fp32 elements
    assert seen["blocks.0.attn"] == 0.3  # head dim 16: log-nearest to 8 (x2) rather than 64 (x4)
    assert seen["blocks.0.attn.qkv"] == 1.0 and seen["blocks.0.mlp.fc"] == 1.0
    plain = _toy_with()
    assert all(kernel_efficiency(node_info(n), plain, torch.float32) == 1.0 for n in plan.graph.graph.nodes if node_info(n).op == OpKind.ATTENTION)
