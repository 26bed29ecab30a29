"""partc.plan: the data-parallel estimate by hand, the summary, JSON, DOT and bad input."""

import pickle

import pytest
import torch
import torch.nn as nn

import partc
from partc import Cluster, DeviceSpec, Link, NodeSpec
from partc.models import build

MiB = 2**20


def _round_cluster(devices: int = 2) -> Cluster:
    """Round numbers: 1 TFLOP/s fp32 at full efficiency, memory bandwidth high enough
    that every op is compute-bound, a 1 GB/s link with no latency."""
    device = DeviceSpec("round", {"float32": 1e12}, memory=1e9, memory_bandwidth=1e15, matmul_efficiency=1.0)
    return Cluster(nodes=(NodeSpec(device, devices, Link(0.0, 1e9)),), inter_link=Link(0.0, 1e9))


def test_data_parallel_step_time_by_hand():
    model = nn.Linear(1024, 1024)
    plan = partc.plan(model, _round_cluster(2), torch.randn(64, 1024), mesh={"dp": 2})
    # Each of 2 replicas runs 32 rows: forward 2*32*1024*1024 + 32*1024 (bias) FLOPs at 1e12/s.
    # Memory terms: 2*64*1024*4 + (1024*1024 + 1024)*4 bytes / 1e15 B/s: negligible
    # next to compute but part of the roofline max() -- compute dominates.
    forward = (2 * 32 * 1024 * 1024 + 32 * 1024) / 1e12
    backward = 2 * forward
    assert plan.compute_time == pytest.approx(forward + backward, rel=1e-9)
    # Gradients: 1024*1024 + 1024 fp32 values; ring all-reduce over 2 ranks moves
    # 2*(2-1)/2 * S bytes at 1 GB/s. All of it fits in DDP's last 25 MiB bucket, so all
    # of it is exposed.
    grad_bytes = (1024 * 1024 + 1024) * 4
    assert plan.exposed_communication_time == pytest.approx(grad_bytes / 1e9, rel=1e-9)
    # AdamW: 28 bytes per parameter at 1e15 B/s.
    assert plan.optimizer_time == pytest.approx((1024 * 1024 + 1024) * 28 / 1e15, rel=1e-9)
    assert plan.predicted_step_time == pytest.approx(forward + backward + grad_bytes / 1e9 + plan.optimizer_time, rel=1e-9)
    # fp32 AdamW: 16 bytes per parameter; activations: the input (64 x 1024 fp32) split over 2.
    assert plan.memory.parameters + plan.memory.gradients + plan.memory.optimizer_state == (1024 * 1024 + 1024) * 16
    assert plan.memory.activations == 32 * 1024 * 4
    assert plan.mesh == {"pp": 1, "dp": 2, "tp": 1}


def test_plan_gpt_tiny_summary_json_and_dot(tmp_path):
    model, inputs = build("gpt-tiny", batch_size=4)
    plan = partc.plan(model, Cluster.preset("cpu", devices_per_node=2), inputs, mesh={"dp": 2})
    assert plan.graph is not None and plan.frontend == "fx.symbolic_trace"
    assert plan.predicted_step_time == pytest.approx(plan.compute_time + plan.exposed_communication_time + plan.optimizer_time)
    assert set(plan.pass_times) == {"capture", "propagate", "annotate", "estimate"}
    assert [l.name for l in plan.layers if l.name.startswith("blocks")] == ["blocks.0", "blocks.1"]

    text = plan.summary()
    assert "blocks.0 .. blocks.1 (x2)" in text and "Predicted step time" in text and ": fits" in text
    expanded = plan.summary(expand=True)
    assert "(x2)" not in expanded and "\n    5  blocks.1 " in expanded

    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = partc.Plan.from_json(path)
    assert again == plan  # the graph is not compared (and not saved)
    assert again.graph is None
    with pytest.raises(partc.PlanMismatchError, match="holds no graph"):
        again.to_dot()

    dot = plan.to_dot()
    assert dot.startswith("digraph partc {") and dot.count("subgraph cluster_") == len(plan.layers)
    assert '"linear" -> ' in dot


def test_from_json_refuses_pickle_and_foreign_files(tmp_path):
    model, inputs = build("gpt-tiny", batch_size=2)
    plan = partc.plan(model, Cluster.preset("cpu", devices_per_node=2), inputs)
    pickled = tmp_path / "plan.pkl"
    pickled.write_bytes(pickle.dumps(plan.to_dict()))
    with pytest.raises(partc.PlanMismatchError, match="pickle"):
        partc.Plan.from_json(pickled)
    foreign = tmp_path / "other.json"
    foreign.write_text('{"hello": 1}')
    with pytest.raises(partc.PlanMismatchError, match="format"):
        partc.Plan.from_json(foreign)
    old = plan.to_dict() | {"version": 0}
    with pytest.raises(partc.PlanMismatchError, match="version 0"):
        partc.Plan.from_json(__import__("json").dumps(old))


def test_fingerprint_is_stable_and_shape_sensitive():
    cluster = Cluster.preset("cpu", devices_per_node=2)

    def fingerprint(batch_size: int) -> str:
        model, inputs = build("gpt-tiny", batch_size=batch_size)  # fresh weights each time
        return partc.plan(model, cluster, inputs).fingerprint

    a, b, c = fingerprint(2), fingerprint(2), fingerprint(4)
    assert a == b  # weights differ, structure does not
    assert a != c  # the input shape changed


def test_memory_limit_marks_plan_that_does_not_fit():
    model, inputs = build("gpt-tiny", batch_size=2)
    plan = partc.plan(model, Cluster.preset("cpu", devices_per_node=2), inputs, memory_limit=1 * MiB, mesh={"dp": 2})
    assert not plan.fits
    assert "DOES NOT FIT (over by" in plan.summary()


def test_mixed_precision_prices_bf16_and_master_weights():
    model = nn.Linear(256, 256)
    fp32 = partc.plan(model, Cluster.preset("h100", devices_per_node=2), torch.randn(8, 256))
    bf16 = partc.plan(model, Cluster.preset("h100", devices_per_node=2), torch.randn(8, 256), mixed_precision="bf16")
    numel = 256 * 256 + 256
    assert bf16.compute_dtype == "bfloat16" and fp32.compute_dtype == "float32"
    # bf16 weights and grads (2 + 2 B) + fp32 master (4 B) + AdamW moments (8 B) = 16 B/param
    assert bf16.memory.parameters + bf16.memory.gradients + bf16.memory.optimizer_state == numel * 16
    assert bf16.memory.optimizer_state == numel * 12


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mesh": {"pp": 2, "dp": 1}, "microbatches": 3}, partc.PartcError, "does not split into 3 microbatches"),
        ({"mesh": {"pp": 2}, "schedule": "gpipe", "virtual_stages": 2}, partc.PartcError, "gpipe and 1f1b run 1 stage per rank"),
        ({"mesh": {"pp": 2}, "schedule": "chaotic"}, partc.PartcError, "unknown schedule 'chaotic'"),
        ({"mesh": {"xp": 2}}, partc.PartcError, "unknown mesh dimension"),
        ({"mesh": {"dp": 3}}, partc.PartcError, "does not use the cluster"),
        ({"mixed_precision": "fp8"}, partc.PartcError, "unknown mixed_precision"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        partc.plan(nn.Linear(4, 4), Cluster.preset("cpu", devices_per_node=2), torch.randn(2, 4), **kwargs)


def test_batch_not_divisible_by_replicas():
    with pytest.raises(partc.InfeasiblePlanError, match="global batch of 3 does not split over 2"):
        partc.plan(nn.Linear(4, 4), Cluster.preset("cpu", devices_per_node=2), torch.randn(3, 4), mesh={"dp": 2})


def test_tensor_parallel_plan_reports_layouts_and_stays_inside_a_node(tmp_path):
    from partc.models import GPT, GPTConfig

    with torch.device("meta"):  # wide enough that sharding beats replication on H100 links
        model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=2, n_head=32, d_model=4096, bias=False))
    tokens = torch.zeros(1, 1024, dtype=torch.long)
    plan = partc.plan(model, Cluster.preset("h100", devices_per_node=4), tokens, mesh={"tp": 4}, mixed_precision="bf16")
    assert plan.mesh == {"pp": 1, "dp": 1, "tp": 4} and plan.sharding is not None
    layouts = plan.tensor_parallel["parameters"]
    assert layouts["blocks.0.attn.qkv.weight"] == "S(0)" and layouts["blocks.0.attn.proj.weight"] == "S(1)"  # Megatron
    assert plan.predicted_step_time == pytest.approx(plan.sharding.compute_time + plan.sharding.communication_time)
    assert "Tensor parallel over 4 devices" in plan.summary()
    source = plan.source(1)  # readable per-rank code: rank 1's slices and the collectives
    assert "rank 1 of 4" in source and "[12288, 4096] -> [3072, 4096]" in source
    assert source.count("copy_to_tp(") >= 2 and source.count("reduce_from_tp(") >= 4  # Megatron f and g, per block
    assert partc.Plan.from_json(plan.to_json()) == plan
    with pytest.raises(partc.PartcError, match="would cross nodes"):
        partc.plan(model, Cluster.preset("h100", nodes=2, devices_per_node=2), tokens, mesh={"tp": 4})


def test_default_plan_is_searched_and_explained():
    model, (idx,) = build("gpt2", batch_size=8, device="meta")
    plan = partc.plan(model, Cluster.preset("h100", devices_per_node=8), idx, mixed_precision="bf16")
    assert plan.search is not None and plan.search["searched"] > 1
    parts = plan.search["breakdown"]
    assert plan.predicted_step_time == pytest.approx(sum(parts.values()))
    assert "why not chosen" in plan.explain() and "Chosen by the search" in plan.summary()
    assert partc.Plan.from_json(plan.to_json()).explain() == plan.explain()


def test_cluster_must_be_a_cluster():
    with pytest.raises(partc.PartcError, match="must be a partc.Cluster"):
        partc.plan(nn.Linear(4, 4), "h100", torch.randn(2, 4))
