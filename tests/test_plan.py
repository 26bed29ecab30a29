"""partc.plan: the data-parallel estimate by hand, the summary, JSON, DOT and bad input;
the full plan in JSON (sharding included) and replan."""

import dataclasses
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
    # AdamW (torch's foreach step): 20 fp32 accesses = 80 bytes per parameter at 1e15 B/s.
    assert plan.optimizer_time == pytest.approx((1024 * 1024 + 1024) * 80 / 1e15, rel=1e-9)
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
        ({"mesh": {"dp": 3}}, partc.PartcError, "does not divide the cluster"),
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


# -- the full plan in JSON, and replan -----------------------------------------------------------
def _tiny_gpt(batch_size: int = 4, n_layer: int = 2):
    from partc.models import GPT
    from partc.models.gpt import gpt_tiny

    model = GPT(dataclasses.replace(gpt_tiny(), n_layer=n_layer))
    return model, torch.randint(0, 128, (batch_size, 32))


def _tp_plan():
    model, tokens = _tiny_gpt()
    return model, tokens, partc.plan(model, Cluster.preset("cpu", devices_per_node=2), tokens, mesh={"tp": 2})


def test_sharding_plan_round_trips_through_plain_json():
    import json

    from partc.passes.sharding import ShardingPlan

    from partc.models import GPT, GPTConfig

    with torch.device("meta"):  # wide enough for Megatron's layouts on H100 links
        model = GPT(GPTConfig(vocab_size=50304, block_size=256, n_layer=1, n_head=32, d_model=4096, bias=False))
    tokens = torch.zeros(1, 256, dtype=torch.long)
    plan = partc.plan(model, Cluster.preset("h100", devices_per_node=2), tokens, mesh={"tp": 2}, mixed_precision="bf16")
    sharding = plan.sharding
    assert plan.tensor_parallel["parameters"]["blocks.0.attn.qkv.weight"] == "S(0)"
    assert sharding.parameters["blocks.0.attn.qkv.weight"].blocks == 3  # fused QKV sliced per block
    assert sharding.reshards and sharding.view_rewrites  # collectives, and 32 heads -> 16 per rank
    text = json.dumps(sharding.to_dict(), allow_nan=False)  # strict JSON: no pickle, no Infinity
    again = ShardingPlan.from_dict(json.loads(text))
    assert again == sharding
    assert again.to_dict() == sharding.to_dict()
    assert dict(again.strategies) == dict(sharding.strategies) and again.reshards == sharding.reshards
    assert again.collectives_per_step() == sharding.collectives_per_step()
    # The plan's JSON carries it, and the codegen reads the restored one like the original.
    restored = partc.Plan.from_json(plan.to_json())
    assert restored.sharding == sharding


def test_new_layout_kinds_serialize_without_special_cases(monkeypatch):
    """A layout kind added to passes/layouts.py (say, expert parallel) needs no serializer code."""
    import json

    from partc.passes import layouts
    from partc.passes.sharding import ShardingPlan

    @dataclasses.dataclass(frozen=True)
    class ExpertShard:  # noqa: B903
        dim: int
        experts: tuple[int, ...]

    monkeypatch.setattr(layouts, "ExpertShard", ExpertShard, raising=False)
    _, _, plan = _tp_plan()
    name = next(iter(plan.sharding.strategies))
    strategy = dataclasses.replace(plan.sharding.strategies[name], outputs=(ExpertShard(0, (0, 1)),))
    sharding = dataclasses.replace(plan.sharding, strategies={**plan.sharding.strategies, name: strategy}, memory_limit=float("inf"))
    again = ShardingPlan.from_dict(json.loads(json.dumps(sharding.to_dict(), allow_nan=False)))
    assert again.strategies[name].outputs == (ExpertShard(0, (0, 1)),) and again.memory_limit == float("inf")
    # A class that is not a partc record is never instantiated from a file.
    data = sharding.to_dict()
    data["strategies"][name]["outputs"] = [{"$type": "Popen", "args": "rm -rf /"}]
    with pytest.raises(ValueError, match="unknown record type 'Popen'"):
        ShardingPlan.from_dict(data)
    plan_data = json.loads(plan.to_json())
    plan_data["sharding"] = data
    with pytest.raises(partc.PlanMismatchError, match="sharding plan cannot be read: .*Popen"):
        partc.Plan.from_dict(plan_data)


def test_older_plan_versions_are_refused_with_the_reason():
    _, _, plan = _tp_plan()
    old = plan.to_dict() | {"version": 1}
    with pytest.raises(partc.PlanMismatchError, match="version 1 .*older plans hold no sharding plan"):
        partc.Plan.from_dict(old)


def test_replan_attaches_graph_and_sharding_without_solving():
    from partc.planner import replan

    cluster = Cluster.preset("cpu", devices_per_node=2)
    _, _, plan = _tp_plan()
    model, inputs = _tiny_gpt()  # another process: fresh weights, same structure
    again = replan(model, inputs, plan.to_json(), cluster=cluster, mesh={"tp": 2})
    assert set(again.pass_times) == {"capture", "propagate", "annotate", "replan"}  # no search, no ILP
    assert again.graph is not None and again.graph is not plan.graph and again.sharding == plan.sharding
    assert again.hash == plan.hash and dataclasses.replace(again, pass_times=plan.pass_times) == plan
    assert again.source(rank=1) == plan.source(rank=1)  # ready for codegen


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"batch_size": 8}, r"inputs: the plan was made for inputs int64\[4, 32\], these are int64\[8, 32\]"),
        ({"n_layer": 3}, "graph: the graph's structure"),
        ({"cluster": Cluster.preset("cpu", nodes=2, devices_per_node=1)}, "cluster: the plan is for 1 node"),
        ({"options": {"mixed_precision": "bf16"}}, "options: mixed_precision was None when planned, now 'bfloat16'"),
        ({"versions": {"torch": "1.0.0"}}, "versions: the plan was made with torch 1.0.0"),
    ],
)
def test_replan_refuses_a_stale_or_foreign_plan(change, reason):
    import json

    from partc.planner import replan

    _, _, plan = _tp_plan()
    data = json.loads(plan.to_json())
    if "versions" in change:
        data["versions"].update(change["versions"])
    model, inputs = _tiny_gpt(change.get("batch_size", 4), change.get("n_layer", 2))
    cluster = change.get("cluster", Cluster.preset("cpu", devices_per_node=2))
    with pytest.raises(partc.PlanMismatchError, match=reason) as error:
        replan(model, inputs, json.dumps(data), cluster=cluster, mesh={"tp": 2}, **change.get("options", {}))
    assert "plan this model again" in str(error.value)


def test_replan_names_parameters_that_changed():
    from partc.planner import replan

    model, inputs, plan = _tp_plan()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie: one more parameter
    with pytest.raises(partc.PlanMismatchError, match="parameters: parameter names, shapes or dtypes differ"):
        replan(model, inputs, plan, mesh={"tp": 2})


@pytest.mark.parametrize("mesh", [{"dp": 2}, {"pp": 2}, {"tp": 2}, None], ids=["dp", "pp", "tp", "searched"])
def test_cheap_stack_traces_change_no_plan(mesh, monkeypatch):
    """Capture formats only the user's frames instead of fx's whole symbolized stack
    (planning-time work): every plan, and every node's source line, is what it was."""
    from partc.passes import capture as capture_pass
    from partc.passes.ir import node_info

    cluster = Cluster.preset("cpu", devices_per_node=2)

    def planned(fx_stack_traces: bool):
        tracer = capture_pass._TraceThroughModules
        monkeypatch.setattr(capture_pass, "_TraceThroughModules", lambda: tracer(fx_stack_traces))
        model, tokens = _tiny_gpt(batch_size=8)
        result = partc.plan(model, cluster, tokens, mesh=mesh)
        monkeypatch.undo()
        return result

    before, after = planned(True), planned(False)
    assert after.mesh == before.mesh and after.stages == before.stages and after.schedule == before.schedule
    assert after.predicted_step_time == pytest.approx(before.predicted_step_time, rel=1e-9)
    assert after.hash == before.hash
    sources = [node_info(n).source for n in after.graph.graph.nodes]
    assert sources == [node_info(n).source for n in before.graph.graph.nodes]
    assert any(s and "gpt.py" in s for s in sources)


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"pp": 2}, {"dp": 2}, {"pp": 2, "tp": 2}], ids=["tp", "pp", "dp", "pp-tp"])
def test_a_mesh_pinned_on_part_of_the_cluster_is_searched_around(mesh):
    """Pinning fewer devices than the cluster has ({"tp": 2} on 8) pins those degrees and
    searches the rest (issue #5: the user can pin any choice), not a refusal."""
    model, tokens = _tiny_gpt(batch_size=8)
    cluster = Cluster.preset("cpu", devices_per_node=8)
    plan = partc.plan(model, cluster, tokens, mesh=mesh)
    assert all(plan.mesh[k] == v for k, v in mesh.items())
    assert plan.mesh["pp"] * plan.mesh["dp"] * plan.mesh["tp"] == 8
    assert plan.search is not None and plan.search["searched"] > 1
    assert "why not chosen" in plan.explain()
    with pytest.raises(partc.PartcError, match="does not divide"):
        partc.plan(model, cluster, tokens, mesh={"tp": 3})


@pytest.mark.parametrize("mesh", [{"dp": 2}, {"tp": 2}], ids=["dp", "tp"])
def test_microbatches_without_a_pipeline_are_honoured(mesh):
    """Gradient accumulation pinned beside one kind of parallelism: the plan runs the
    microbatches asked for (the direct dp / tp plans have none: the search prices them)."""
    model, tokens = _tiny_gpt(batch_size=8)
    plan = partc.plan(model, Cluster.preset("cpu", devices_per_node=2), tokens, mesh=mesh, microbatches=2)
    assert plan.microbatches == 2 and plan.mesh == {"pp": 1, "dp": mesh.get("dp", 1), "tp": mesh.get("tp", 1)}
