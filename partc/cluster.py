"""What the planner knows about the machines: devices, nodes, and the links between them.

A :class:`Cluster` is a list of nodes; each node holds ``devices`` identical devices
(:class:`DeviceSpec`) joined by an intra-node link (NVLink), and nodes are joined by one
inter-node link (InfiniBand). Nodes may hold different device kinds (a heterogeneous
cluster). Ranks are numbered node by node, as torchrun numbers them.

Links follow the alpha-beta model: sending S bytes costs ``latency + S / bandwidth``,
with ``bandwidth`` the unidirectional bytes/s one device can push.

Presets carry datasheet numbers (dense, no sparsity) and a default matmul efficiency;
``partc calibrate`` replaces them with measured ones and writes the same JSON schema.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

import torch

from partc.errors import ClusterError

SCHEMA_VERSION = 1
GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Link:
    """An alpha-beta link: ``latency`` seconds per message, ``bandwidth`` bytes/s."""

    latency: float  # alpha, seconds
    bandwidth: float  # 1/beta, bytes per second per device, one direction

    def __post_init__(self):
        _require(self.latency >= 0 and math.isfinite(self.latency), f"link latency must be >= 0 s, got {self.latency}")
        _require(self.bandwidth > 0 and math.isfinite(self.bandwidth), f"link bandwidth must be > 0 B/s, got {self.bandwidth}")

    @property
    def seconds_per_byte(self) -> float:
        return 1.0 / self.bandwidth


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator kind."""

    name: str
    peak_flops: Mapping[str, float]  # torch dtype name ("bfloat16") -> dense FLOP/s
    memory: float  # bytes usable by one process
    memory_bandwidth: float  # bytes per second
    matmul_efficiency: float = 0.75  # fraction of peak_flops large matmuls reach
    # Measured by ``partc calibrate`` (the defaults price as before: no overhead, every
    # matmul-like kernel at the matmul rate): seconds one eager kernel costs at least
    # (dispatch and launch); fused attention's FLOP/s over the matmul rate, by head
    # dimension ("64": 0.5); a matmul's with a dimension not a multiple of 16 bytes.
    kernel_overhead: float = 0.0
    attention_efficiency: Mapping[str, float] = field(default_factory=dict)
    misaligned_matmul_efficiency: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "peak_flops", dict(sorted(self.peak_flops.items())))
        _require(bool(self.peak_flops), f"device {self.name!r}: peak_flops needs at least one dtype")
        for dtype, flops in self.peak_flops.items():
            _require(isinstance(getattr(torch, dtype, None), torch.dtype), f"device {self.name!r}: {dtype!r} is not a torch dtype name")
            _require(flops > 0, f"device {self.name!r}: peak FLOP/s for {dtype} must be > 0, got {flops}")
        _require(self.memory > 0, f"device {self.name!r}: memory must be > 0 bytes, got {self.memory}")
        _require(self.memory_bandwidth > 0, f"device {self.name!r}: memory bandwidth must be > 0, got {self.memory_bandwidth}")
        _require(0 < self.matmul_efficiency <= 1, f"device {self.name!r}: matmul_efficiency must be in (0, 1], got {self.matmul_efficiency}")
        _require(0 < self.misaligned_matmul_efficiency <= 1, f"device {self.name!r}: misaligned_matmul_efficiency must be in (0, 1], got {self.misaligned_matmul_efficiency}")
        _require(self.kernel_overhead >= 0, f"device {self.name!r}: kernel_overhead must be >= 0 s, got {self.kernel_overhead}")
        for head_dim, ratio in self.attention_efficiency.items():
            _require(str(head_dim).isdigit() and ratio > 0, f"device {self.name!r}: attention_efficiency maps head dims to ratios > 0, got {head_dim!r}: {ratio!r}")
        object.__setattr__(self, "attention_efficiency", {str(d): float(r) for d, r in sorted(self.attention_efficiency.items(), key=lambda kv: int(kv[0]))})

    def __hash__(self) -> int:  # peak_flops is a dict; hash its items
        return hash((self.name, tuple(self.peak_flops.items()), self.memory, self.memory_bandwidth, self.matmul_efficiency, self.kernel_overhead, tuple(self.attention_efficiency.items()), self.misaligned_matmul_efficiency))

    def flops(self, dtype: torch.dtype | str) -> float:
        """Achievable FLOP/s for matmuls in ``dtype`` (peak x efficiency)."""
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if name not in self.peak_flops:
            # Integer and bool ops run on the vector units; price them as fp32.
            name = "float32" if "float32" in self.peak_flops else next(iter(self.peak_flops))
        return self.peak_flops[name] * self.matmul_efficiency


@dataclass(frozen=True)
class NodeSpec:
    """One host: ``devices`` identical devices joined by ``intra_link``."""

    device: DeviceSpec
    devices: int
    intra_link: Link

    def __post_init__(self):
        _require(isinstance(self.devices, int) and self.devices >= 1, f"a node needs >= 1 device, got {self.devices!r}")


@dataclass(frozen=True)
class Cluster:
    """Nodes of devices and the links between them. Build with :meth:`preset`."""

    nodes: tuple[NodeSpec, ...]
    inter_link: Link  # between any two nodes
    name: str = ""
    _node_of_rank: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        _require(len(self.nodes) >= 1, "a cluster needs at least one node")
        owners = tuple(i for i, node in enumerate(self.nodes) for _ in range(node.devices))
        object.__setattr__(self, "_node_of_rank", owners)

    # -- construction -------------------------------------------------------------------
    @staticmethod
    def preset(kind: str, nodes: int = 1, devices_per_node: int = 8) -> "Cluster":
        """A homogeneous cluster of a known kind: ``h100``, ``h200``, ``a100`` or ``cpu``."""
        if kind not in PRESETS:
            raise ClusterError(f"unknown cluster preset {kind!r}; known presets: {', '.join(sorted(PRESETS))}")
        _require(isinstance(nodes, int) and nodes >= 1, f"nodes must be an integer >= 1, got {nodes!r}")
        device, intra, inter = PRESETS[kind]
        node = NodeSpec(device=device, devices=devices_per_node, intra_link=intra)
        return Cluster(nodes=(node,) * nodes, inter_link=inter, name=f"{nodes}x{devices_per_node} {kind}")

    @staticmethod
    def combine(*clusters: "Cluster", inter_link: Link | None = None) -> "Cluster":
        """Join clusters into one (e.g. H100 nodes beside A100 nodes); ranks keep the order given.

        The inter-node link defaults to the slowest of the parts'."""
        _require(len(clusters) >= 1, "combine() needs at least one cluster")
        link = inter_link or min((c.inter_link for c in clusters), key=lambda l: l.bandwidth)
        nodes = tuple(n for c in clusters for n in c.nodes)
        return Cluster(nodes=nodes, inter_link=link, name=" + ".join(c.name for c in clusters))

    @staticmethod
    def parse(spec: str) -> "Cluster":
        """A cluster from a CLI string: a JSON file, ``h100``, ``h100x8`` or ``h100:2x8``."""
        if os.path.exists(spec) or spec.endswith(".json"):
            return Cluster.from_json(spec)
        match = re.fullmatch(r"([a-z]+?\d*?)(?::(\d+)x(\d+)|x(\d+))?", spec)  # lazy: "cpux2" is cpu x 2
        if not match or match.group(1) not in PRESETS:
            raise ClusterError(
                f"cannot read cluster {spec!r}: give a JSON file written by `partc calibrate`, "
                f"or a preset {sorted(PRESETS)} as KIND, KINDxGPUS or KIND:NODESxGPUS (e.g. h100:2x8)"
            )
        kind, nodes, per_node, single = match.groups()
        if single:
            return Cluster.preset(kind, nodes=1, devices_per_node=int(single))
        return Cluster.preset(kind, nodes=int(nodes or 1), devices_per_node=int(per_node or 8))

    # -- queries ------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self._node_of_rank)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def is_homogeneous(self) -> bool:
        return len({(n.device, n.devices, n.intra_link) for n in self.nodes}) == 1

    @property
    def devices_per_node(self) -> int:
        counts = {n.devices for n in self.nodes}
        if len(counts) != 1:
            raise ClusterError(f"nodes hold different device counts {sorted(counts)}; ask a node for its own count")
        return counts.pop()

    def node_of(self, rank: int) -> int:
        self._check_rank(rank)
        return self._node_of_rank[rank]

    def device(self, rank: int) -> DeviceSpec:
        return self.nodes[self.node_of(rank)].device

    def slowest_device(self, ranks: Iterable[int] | None = None) -> DeviceSpec:
        """The device with the least bf16-or-best-available FLOP/s among ``ranks`` (all by default)."""
        ranks = range(self.world_size) if ranks is None else ranks
        return min((self.device(r) for r in ranks), key=lambda d: max(d.peak_flops.values()) * d.matmul_efficiency)

    def spans_nodes(self, ranks: Iterable[int]) -> bool:
        return len({self.node_of(r) for r in ranks}) > 1

    def link(self, ranks: Iterable[int]) -> Link:
        """The bottleneck link a collective over ``ranks`` runs on."""
        node_ids = {self.node_of(r) for r in ranks}
        if len(node_ids) > 1:
            return self.inter_link
        return self.nodes[node_ids.pop()].intra_link

    def intra_link(self, ranks: Iterable[int]) -> Link:
        """The slowest intra-node link among the nodes ``ranks`` touch."""
        return min((self.nodes[i].intra_link for i in {self.node_of(r) for r in ranks}), key=lambda l: l.bandwidth)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ClusterError(f"rank {rank} is outside this cluster of {self.world_size} devices")

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "inter_link": asdict(self.inter_link),
            "nodes": [
                {"device": {**asdict(n.device), "peak_flops": dict(n.device.peak_flops), "attention_efficiency": dict(n.device.attention_efficiency)}, "devices": n.devices, "intra_link": asdict(n.intra_link)}
                for n in self.nodes
            ],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The cluster as JSON; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_atomic(path, text)
        return text

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Cluster":
        if not isinstance(data, Mapping):
            raise ClusterError(f"cluster JSON must be an object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ClusterError(f"cluster JSON has schema_version {version!r}; this partc reads version {SCHEMA_VERSION}")
        try:
            nodes = tuple(
                NodeSpec(device=DeviceSpec(**n["device"]), devices=n["devices"], intra_link=Link(**n["intra_link"]))
                for n in data["nodes"]
            )
            return Cluster(nodes=nodes, inter_link=Link(**data["inter_link"]), name=data.get("name", ""))
        except (KeyError, TypeError) as e:
            raise ClusterError(f"cluster JSON is missing or has a wrong field: {e}") from e

    @staticmethod
    def from_json(path_or_text: str | os.PathLike) -> "Cluster":
        """A cluster from a JSON file (or a JSON string)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            try:
                with open(path_or_text) as f:
                    text = f.read()
            except OSError as e:
                raise ClusterError(f"cannot read cluster file {path_or_text}: {e.strerror}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ClusterError(f"cluster file is not valid JSON: {e}") from e
        return Cluster.from_dict(data)

    def with_device(self, device: DeviceSpec) -> "Cluster":
        """The same topology with every node's device replaced (used by calibration)."""
        return replace(self, nodes=tuple(replace(n, device=device) for n in self.nodes))

    def describe(self) -> str:
        groups: list[tuple[DeviceSpec, int, int]] = []
        for n in self.nodes:
            if groups and groups[-1][0] == n.device and groups[-1][2] == n.devices:
                groups[-1] = (n.device, groups[-1][1] + 1, n.devices)
            else:
                groups.append((n.device, 1, n.devices))
        parts = [f"{count} node(s) x {per} {dev.name} ({dev.memory / 2**30:.0f} GiB)" for dev, count, per in groups]
        return f"{' + '.join(parts)}; world size {self.world_size}"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ClusterError(message)


def _gpu(name: str, bf16: float, fp32: float, memory: float, bandwidth: float, efficiency: float) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        peak_flops={"bfloat16": bf16, "float16": bf16, "float32": fp32},
        memory=memory,
        memory_bandwidth=bandwidth,
        matmul_efficiency=efficiency,
    )


# Datasheet numbers (SXM parts, dense); memory is what torch reports as the device's
# total (an "80 GB" H100 shows 79.1 GiB, an H200 about 139 GiB). fp32 is the non-tensor-core rate: PyTorch does not
# use TF32 for fp32 matmuls unless asked. Efficiencies: H200 bf16 matmuls reach ~790 of
# 989 TFLOP/s when measured (see the brief); H100/A100 use the same ratio until calibrated.
# Links: NVLink bandwidth per direction (900 GB/s bidirectional -> 450 GB/s), one 400 Gb/s
# (H100/H200) or 200 Gb/s (A100) InfiniBand NIC per GPU.
PRESETS: dict[str, tuple[DeviceSpec, Link, Link]] = {
    "h100": (_gpu("H100-SXM-80GB", 989e12, 67e12, 79 * GiB, 3.35e12, 0.8), Link(5e-6, 450 * GB), Link(1e-5, 50 * GB)),
    "h200": (_gpu("H200-SXM-141GB", 989e12, 67e12, 139 * GiB, 4.8e12, 0.8), Link(5e-6, 450 * GB), Link(1e-5, 50 * GB)),
    "a100": (_gpu("A100-SXM-80GB", 312e12, 19.5e12, 79 * GiB, 2.039e12, 0.8), Link(5e-6, 300 * GB), Link(1e-5, 25 * GB)),
    # A generic CPU host: gloo over loopback inside a node, 10 GbE between nodes.
    "cpu": (
        DeviceSpec("CPU", {"float32": 1e11, "bfloat16": 5e10}, 16 * GiB, 2e10, 0.5),
        Link(5e-5, 2 * GB),
        Link(1e-4, 1.25 * GB),
    ),
}
