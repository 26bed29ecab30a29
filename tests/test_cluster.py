"""partc.cluster: presets, JSON, parsing, validation, heterogeneous clusters, links."""

import json

import pytest
import torch

from partc.cluster import GB, PRESETS, SCHEMA_VERSION, Cluster, DeviceSpec, Link, NodeSpec
from partc.errors import ClusterError, PartcError


# -- presets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["h100", "h200", "a100", "cpu"])
def test_preset_world_size_and_rank_to_node(kind):
    cluster = Cluster.preset(kind, nodes=2, devices_per_node=4)
    assert cluster.world_size == 8
    assert cluster.num_nodes == 2
    assert cluster.devices_per_node == 4
    # torchrun numbering: node by node
    assert [cluster.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_preset_defaults_to_one_node_of_eight():
    cluster = Cluster.preset("h100")
    assert (cluster.num_nodes, cluster.world_size) == (1, 8)


def test_preset_carries_datasheet_numbers():
    h200 = Cluster.preset("h200").device(0)
    assert h200.memory == 139 * 2**30  # what torch reports for an H200's total memory
    assert h200.flops(torch.bfloat16) == pytest.approx(989e12 * 0.8)


def test_flops_falls_back_to_fp32_for_dtypes_without_a_rate():
    cpu = Cluster.preset("cpu").device(0)
    assert cpu.flops(torch.int64) == pytest.approx(1e11 * 0.5)
    assert cpu.flops("float32") == cpu.flops(torch.float32)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ClusterError, match=r"unknown cluster preset 'tpu'; known presets: a100, cpu, h100, h200"):
        Cluster.preset("tpu")


@pytest.mark.parametrize("nodes", [0, -1])
def test_preset_rejects_bad_node_count(nodes):
    with pytest.raises(ClusterError, match=f"nodes must be an integer >= 1, got {nodes}"):
        Cluster.preset("h100", nodes=nodes)


def test_rank_outside_cluster_raises():
    with pytest.raises(ClusterError, match="rank 16 is outside this cluster of 16 devices"):
        Cluster.preset("h100", 2, 8).node_of(16)


def test_cluster_errors_are_partc_errors():
    assert issubclass(ClusterError, PartcError)


# -- JSON -------------------------------------------------------------------------------------
def test_json_round_trip_through_a_file(tmp_path):
    cluster = Cluster.preset("h200", nodes=2, devices_per_node=8)
    path = tmp_path / "cluster.json"
    text = cluster.to_json(path)
    assert path.read_text() == text
    assert json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert Cluster.from_json(path) == cluster
    assert Cluster.from_json(str(path)) == cluster


def test_json_round_trip_from_a_string():
    cluster = Cluster.preset("cpu", nodes=3, devices_per_node=2)
    assert Cluster.from_json(cluster.to_json()) == cluster


def test_json_round_trip_heterogeneous():
    cluster = Cluster.combine(Cluster.preset("h100", 1, 8), Cluster.preset("a100", 2, 4))
    again = Cluster.from_json(cluster.to_json())
    assert again == cluster
    assert [again.device(r).name for r in (0, 8, 15)] == ["H100-SXM-80GB", "A100-SXM-80GB", "A100-SXM-80GB"]


def test_schema_version_mismatch_names_the_version():
    data = Cluster.preset("h100").to_dict()
    data["schema_version"] = 99
    with pytest.raises(ClusterError, match=rf"schema_version 99; this partc reads version {SCHEMA_VERSION}"):
        Cluster.from_dict(data)


def test_missing_field_in_json_raises():
    data = Cluster.preset("h100").to_dict()
    del data["inter_link"]
    with pytest.raises(ClusterError, match="missing or has a wrong field"):
        Cluster.from_dict(data)


def test_invalid_json_text_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ClusterError, match="not valid JSON"):
        Cluster.from_json(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ClusterError, match="cannot read cluster file"):
        Cluster.from_json(tmp_path / "absent.json")


def test_json_that_is_not_an_object_raises_cluster_error(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ClusterError):
        Cluster.from_json(path)


# -- validation -------------------------------------------------------------------------------
def _device(**changes) -> DeviceSpec:
    fields = dict(name="toy", peak_flops={"float32": 1e12}, memory=1e9, memory_bandwidth=1e11, matmul_efficiency=0.5)
    return DeviceSpec(**{**fields, **changes})


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Link(latency=1e-6, bandwidth=-1.0), r"link bandwidth must be > 0 B/s, got -1.0"),
        (lambda: Link(latency=-1e-6, bandwidth=1e9), r"link latency must be >= 0 s"),
        (lambda: Link(latency=float("nan"), bandwidth=1e9), r"link latency"),
        (lambda: _device(memory=0), r"memory must be > 0 bytes, got 0"),
        (lambda: _device(memory_bandwidth=0), r"memory bandwidth must be > 0"),
        (lambda: _device(matmul_efficiency=1.5), r"matmul_efficiency must be in \(0, 1\], got 1.5"),
        (lambda: _device(matmul_efficiency=0), r"matmul_efficiency must be in \(0, 1\]"),
        (lambda: _device(peak_flops={"float99": 1e12}), r"'float99' is not a torch dtype name"),
        (lambda: _device(peak_flops={"float32": 0}), r"peak FLOP/s for float32 must be > 0"),
        (lambda: _device(peak_flops={}), r"peak_flops needs at least one dtype"),
        (lambda: NodeSpec(device=_device(), devices=0, intra_link=Link(0, 1e9)), r"a node needs >= 1 device, got 0"),
        (lambda: Cluster(nodes=(), inter_link=Link(0, 1e9)), r"a cluster needs at least one node"),
    ],
)
def test_invalid_numbers_raise(build, message):
    with pytest.raises(ClusterError, match=message):
        build()


def test_invalid_numbers_in_json_raise():
    data = Cluster.preset("h100").to_dict()
    data["nodes"][0]["device"]["peak_flops"]["bfloat17"] = 1e15
    with pytest.raises(ClusterError, match="'bfloat17' is not a torch dtype name"):
        Cluster.from_dict(data)


# -- parse ------------------------------------------------------------------------------------
def test_parse_bare_preset():
    assert Cluster.parse("h100") == Cluster.preset("h100", nodes=1, devices_per_node=8)


def test_parse_kind_x_gpus():
    cluster = Cluster.parse("h100x4")
    assert (cluster.num_nodes, cluster.world_size) == (1, 4)
    assert Cluster.parse("cpux2") == Cluster.preset("cpu", nodes=1, devices_per_node=2)  # a preset name without digits


def test_parse_nodes_x_gpus():
    cluster = Cluster.parse("h200:2x8")
    assert (cluster.num_nodes, cluster.devices_per_node, cluster.world_size) == (2, 8, 16)
    assert cluster.device(15).name == "H200-SXM-141GB"


def test_parse_json_file(tmp_path):
    cluster = Cluster.preset("a100", 2, 4)
    path = tmp_path / "measured.json"
    cluster.to_json(path)
    assert Cluster.parse(str(path)) == cluster


@pytest.mark.parametrize("spec", ["tpu:2x8", "h100:2", "H100", "h100:ax8", ""])
def test_parse_bad_string_says_what_is_accepted(spec):
    with pytest.raises(ClusterError, match=r"cannot read cluster .*KIND:NODESxGPUS"):
        Cluster.parse(spec)


# -- heterogeneous clusters -------------------------------------------------------------------
@pytest.fixture
def mixed() -> Cluster:
    return Cluster.combine(Cluster.preset("h100", 1, 8), Cluster.preset("a100", 2, 4))


def test_combine_world_size_and_devices_per_node(mixed):
    assert mixed.world_size == 16
    assert mixed.num_nodes == 3
    assert [mixed.node_of(r) for r in (0, 7, 8, 11, 12, 15)] == [0, 0, 1, 1, 2, 2]
    assert mixed.device(7).name == "H100-SXM-80GB"
    assert mixed.device(8).name == "A100-SXM-80GB"
    assert mixed.slowest_device().name == "A100-SXM-80GB"


def test_combine_uses_slowest_inter_link(mixed):
    assert mixed.inter_link == PRESETS["a100"][2]


def test_devices_per_node_rejects_mixed_counts(mixed):
    with pytest.raises(ClusterError, match=r"nodes hold different device counts \[4, 8\]"):
        mixed.devices_per_node


def test_is_homogeneous():
    assert Cluster.preset("h100", 2, 8).is_homogeneous
    assert not Cluster.combine(Cluster.preset("h100", 1, 8), Cluster.preset("a100", 1, 8)).is_homogeneous


# -- links ------------------------------------------------------------------------------------
def test_link_within_a_node_is_the_intra_link():
    cluster = Cluster.preset("h100", 2, 8)
    assert cluster.link([0, 7]) == PRESETS["h100"][1]
    assert cluster.link([8, 9, 15]) == PRESETS["h100"][1]
    assert not cluster.spans_nodes([8, 15])


def test_link_across_nodes_is_the_inter_link():
    cluster = Cluster.preset("h100", 2, 8)
    assert cluster.link([7, 8]) == PRESETS["h100"][2]
    assert cluster.spans_nodes([7, 8])


def test_intra_link_is_the_slowest_among_nodes_touched():
    cluster = Cluster.combine(Cluster.preset("h100", 1, 8), Cluster.preset("a100", 1, 8))
    assert cluster.intra_link([0, 1]).bandwidth == 450 * GB
    assert cluster.intra_link([0, 8]).bandwidth == 300 * GB
