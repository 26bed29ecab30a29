"""The plan: what partc decided, what it predicts, and how to look at it.

A :class:`Plan` is plain data (mesh, per-layer predictions, memory, the cluster, the
tensor-parallel :class:`~partc.passes.sharding.ShardingPlan`) plus, when it was just
computed or re-attached by :func:`partc.planner.replan`, the annotated graph it was
computed from. It is saved as versioned JSON, never pickle, and read back with
:meth:`Plan.from_json`, which refuses anything that is not a partc plan of a version it
understands. The graph is not saved: :func:`~partc.planner.replan` captures the model again
and checks it against the plan's :attr:`Plan.identity`.

One plan everywhere: :attr:`Plan.hash` is a sha256 over the canonical JSON of what decides
what runs (:meth:`Plan.decisions`: the graph's identity, cluster, mesh, stages, schedule,
microbatches, sharding, recomputation and ZeRO, options, partc and torch versions), never
wall times, so every rank of a run and every re-plan of the same model gives the same hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx

from partc.cluster import Cluster, write_atomic
from partc.cost_model import MemoryBreakdown
from partc.errors import PlanMismatchError
from partc.passes.estimate import LayerEstimate
from partc.passes.ir import OpKind, graph_info, node_info
from partc.passes.plain_data import PlainDataError, to_plain
from partc.passes.sharding import ShardingPlan

PLAN_FORMAT = "partc.plan"
# 2: the ShardingPlan, the graph's identity (graph / parameters / inputs), versions and options.
PLAN_VERSION = 2
GiB = 2**30


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: which layers it runs, where, and what it costs."""

    index: int
    rank: int  # the pipeline rank that runs it
    first_layer: int  # index of its first layer
    last_layer: int  # index of its last layer (inclusive)
    layers: tuple[str, ...]  # layer names
    predicted_time: float  # seconds of forward + backward per microbatch, boundary transfers included
    peak_memory: float  # bytes per device: parameters, gradients, optimizer state, in-flight activations


@dataclass(frozen=True)
class Plan:
    """A parallel layout for one model on one cluster, with its predicted cost."""

    model: str  # the model's class name
    frontend: str  # how the model was captured ("fx.symbolic_trace" / "torch.export")
    fallback_reason: str | None  # why symbolic tracing was not used
    mesh: dict[str, int]  # parallel degrees, e.g. {"pp": 1, "dp": 8, "tp": 1}
    batch_size: int  # global batch of example_inputs
    compute_dtype: str  # dtype the matmuls run in
    cluster: Cluster
    layers: tuple[LayerEstimate, ...]
    predicted_step_time: float  # seconds per training step
    compute_time: float  # forward + backward
    exposed_communication_time: float  # communication not hidden behind compute
    optimizer_time: float
    memory: MemoryBreakdown  # peak bytes per device
    memory_limit: float  # bytes per device the plan must fit in
    fingerprint: str  # hash of the graph's structure, shapes and dtypes
    stages: tuple[StagePlan, ...] = ()  # pipeline stages in order (one for a plan without a pipeline)
    schedule: str = "none"  # pipeline schedule: gpipe, 1f1b, interleaved, zero_bubble (none: no pipeline)
    microbatches: int = 1  # microbatches per step, per data-parallel replica
    equal_split_stages: tuple[StagePlan, ...] = ()  # the naive equal-layer split, for comparison
    solver_status: str | None = None  # the stage solver's honest status (optimal / feasible / heuristic)
    bubble_fraction: float = 0.0  # pipeline idle time over busy time, imbalance included
    equal_split_step_time: float | None = None  # predicted step of the equal-layer split, for comparison
    tensor_parallel: dict[str, Any] | None = None  # layouts, parameter slices, collectives per step (tp plans)
    search: dict[str, Any] | None = None  # the search's choice, step breakdown and alternatives (searched plans)
    unsupported_ops: tuple[str, ...] = ()  # nodes no pass has a rule for
    pass_times: dict[str, float] = field(default_factory=dict)  # seconds per pass
    identity: dict[str, str] = field(default_factory=dict)  # graph_identity(): "graph" and "parameters" hashes, "inputs" specs
    versions: dict[str, str] = field(default_factory=dict)  # partc and torch versions that made the plan
    options: dict[str, Any] = field(default_factory=dict)  # the planning options (planner.plan_options)
    graph: fx.GraphModule | None = field(default=None, compare=False, repr=False)  # not saved in JSON (replan re-captures it)
    sharding: ShardingPlan | None = field(default=None, compare=False, repr=False)  # the tensor-parallel layouts (tp > 1)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit

    def stage_of_layer(self) -> list[int]:
        """For every layer index, the stage that runs it."""
        result = [0] * len(self.layers)
        for stage in self.stages:
            for j in range(stage.first_layer, stage.last_layer + 1):
                result[j] = stage.index
        return result

    # -- reading ------------------------------------------------------------------------
    def summary(self, *, expand: bool = False) -> str:
        """A table per layer (identical consecutive blocks folded unless ``expand``)."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = []
        for group in _fold(self.layers, expand):
            first, count = group[0], len(group)
            name = first.name if count == 1 else f"{first.name} .. {group[-1].name} (x{count})"
            rows.append(
                [
                    str(first.index) if count == 1 else f"{first.index}-{group[-1].index}",
                    name,
                    f"{first.fwd_flops / 1e9:,.1f}",
                    _count(first.param_numel),
                    f"{first.activation_bytes / 2**20:,.1f}",
                    f"{(first.forward_time + first.backward_time) * 1e3:,.3f}",
                    f"{first.memory / 2**20:,.1f}",
                ]
            )
        header = ["layer", "module", "GFLOP fwd", "params", "act MiB", "fwd+bwd ms", "mem MiB"]
        per_layer = "per layer, per device" if not expand else "per device"
        if self.tensor_parallel:
            per_layer = "per layer, before tensor-parallel sharding"
        fit = "fits" if self.fits else f"DOES NOT FIT (over by {(self.memory.total - self.memory_limit) / GiB:.2f} GiB)"
        m = self.memory
        lines = [
            f"partc plan: {self.model} on {self.cluster.describe()}",
            f"  captured with {self.frontend}" + (f" (symbolic tracing failed: {self.fallback_reason})" if self.fallback_reason else ""),
            f"  mesh {mesh}; global batch {self.batch_size}; compute in {self.compute_dtype}",
            "",
            f"Layers ({per_layer}; repeated identical blocks folded):" if not expand else f"Layers ({per_layer}):",
            _table(header, rows),
            "",
            f"Predicted step time  {self.predicted_step_time * 1e3:,.2f} ms  ("
            + self._step_parts()
            + ")",
            f"Peak memory / device {m.total / GiB:,.2f} GiB of {self.memory_limit / GiB:,.2f} GiB: {fit}",
            f"  parameters {m.parameters / GiB:,.2f}, gradients {m.gradients / GiB:,.2f}, optimizer {m.optimizer_state / GiB:,.2f},"
            f" activations {m.activations / GiB:,.2f}, transient {m.transient / GiB:,.2f} GiB",
        ]
        if len(self.stages) > 1:
            lines += ["", *self._stage_lines()]
        if self.search:
            lines += [
                "",
                f"Chosen by the search over {self.search['searched']:,} configurations in {self.search['seconds']:.2f} s: {self.search['best']}",
                "plan.explain() lists the alternatives and why each lost.",
            ]
        if self.tensor_parallel:
            tp = self.tensor_parallel
            sharded = sum(1 for layout in tp["parameters"].values() if layout != "R")
            lines += [
                "",
                f"Tensor parallel over {tp['tp']} devices (sharding solver: {tp['status']}, {tp['solve_seconds']:.2f} s):"
                f" {sharded} of {len(tp['parameters'])} parameters sharded",
                f"  collectives per step: forward {tp['collectives_per_step']['forward']}, backward {tp['collectives_per_step']['backward']}",
            ]
        if self.unsupported_ops:
            lines.append(f"Operators with no rule ({len(self.unsupported_ops)}, replicated): {', '.join(self.unsupported_ops[:10])}")
        return "\n".join(lines)

    def explain(self) -> str:
        """The best alternatives the search priced, with time, memory and why each lost."""
        if not self.search:
            return f"no search: the mesh {self.mesh} was pinned"
        return self.search["explain"]

    def _step_parts(self) -> str:
        if self.search:
            parts = self.search["breakdown"]
            return " + ".join(f"{name.replace('_', ' ')} {seconds * 1e3:,.2f}" for name, seconds in parts.items() if seconds > 0)
        if len(self.stages) > 1:
            return f"pipeline {self.compute_time * 1e3:,.2f} with transfers and fill/drain + optimizer {self.optimizer_time * 1e3:,.2f}"
        if self.tensor_parallel:
            return f"compute with the optimizer update {self.compute_time * 1e3:,.2f} + communication {self.exposed_communication_time * 1e3:,.2f}"
        return (
            f"compute {self.compute_time * 1e3:,.2f} + exposed communication {self.exposed_communication_time * 1e3:,.2f}"
            f" + optimizer {self.optimizer_time * 1e3:,.2f}"
        )

    def _stage_lines(self) -> list[str]:
        def stats(stages: tuple[StagePlan, ...]) -> tuple[float, float]:
            per_rank: dict[int, float] = {}
            for st in stages:
                per_rank[st.rank] = per_rank.get(st.rank, 0.0) + st.predicted_time
            times = list(per_rank.values())
            return max(times), max(times) / (sum(times) / len(times))

        rows = [
            [str(st.index), str(st.rank), _layer_span(st), f"{st.predicted_time * 1e3:,.3f}", f"{st.peak_memory / GiB:,.2f}"]
            for st in self.stages
        ]
        ranks = len({st.rank for st in self.stages})
        slowest, balance = stats(self.stages)
        lines = [
            f"Pipeline: {len(self.stages)} stages on {ranks} ranks, {self.schedule}, {self.microbatches} microbatches;"
            f" stage solver: {self.solver_status}",
            _table(["stage", "rank", "layers", "ms / microbatch", "peak GiB"], rows, left=(2,)),
            f"bubble {self.bubble_fraction:.1%}; slowest rank {slowest * 1e3:,.3f} ms per microbatch; max/mean {balance:.3f}",
        ]
        if self.equal_split_stages:
            lines.append(
                f"equal-layer split for comparison: step {self.equal_split_step_time * 1e3:,.2f} ms,"
                f" max/mean {stats(self.equal_split_stages)[1]:.3f}"
            )
        return lines

    def source(self, rank: int = 0) -> str:
        """The Python code rank ``rank`` runs: its tensor-parallel module (sliced parameters,
        explicit collectives), or its pipeline stages, or the captured model."""
        if self.graph is None:
            raise PlanMismatchError("this plan was read from JSON and holds no graph; plan the model again to see its code")
        world = self.cluster.world_size
        if not 0 <= rank < world:
            raise PlanMismatchError(f"rank {rank} is outside this plan's {world} ranks")
        if self.sharding is not None:
            from partc.passes.tp_codegen import emit_tensor_parallel, generated_source

            return generated_source(emit_tensor_parallel(self.graph, self.sharding, rank=rank, tp=self.mesh["tp"]))
        if len(self.stages) > 1:
            from partc.passes.split_stages import split_stages

            parts = self.microbatches * self.mesh.get("dp", 1)
            inputs = [
                torch.empty((spec.shape[0] // parts, *spec.shape[1:]), dtype=spec.dtype, device="meta") if spec.shape else torch.empty((), dtype=spec.dtype)
                for spec in graph_info(self.graph).input_specs
            ]
            stages = split_stages(self.graph, self.stage_of_layer(), inputs)
            mine = [st for st in stages if self.stages[st.index].rank == rank % self.mesh["pp"]]
            return "\n".join(
                f"# partc pipeline stage {st.index} of {len(stages)} on pipeline rank {rank % self.mesh['pp']}: layers {_layer_span(self.stages[st.index])}\n"
                f"# receives {', '.join(st.inputs)}; sends {', '.join(st.outputs)}\n{st.module.code}"
                for st in mine
            )
        return f"# partc: every data-parallel rank runs the captured model on its slice of the batch\n{self.graph.code}"

    def to_dot(self) -> str:
        """The annotated graph in Graphviz DOT, one coloured cluster per layer."""
        if self.graph is None:
            raise PlanMismatchError("this plan was read from JSON and holds no graph; plan the model again to draw it")
        return graph_to_dot(self.graph)

    # -- identity -------------------------------------------------------------------------
    def decisions(self) -> dict[str, Any]:
        """What decides what every rank runs, as plain JSON data: the model's identity, the
        cluster, the layout and the options, never wall times nor predictions. The input of
        :attr:`hash`."""
        search = self.search or {}
        decisions = to_plain(
            {
                "version": PLAN_VERSION,
                "identity": self.identity,
                "versions": self.versions,
                "options": self.options,
                "cluster": self.cluster.to_dict(),
                "mesh": self.mesh,
                "batch_size": self.batch_size,
                "compute_dtype": self.compute_dtype,
                "memory_limit": self.memory_limit,
                "stages": [[st.index, st.rank, st.first_layer, st.last_layer, list(st.layers)] for st in self.stages],
                "schedule": self.schedule,
                "microbatches": self.microbatches,
                "virtual_stages": search.get("virtual_stages"),
                "recompute": search.get("recompute", False),
                "zero_stage": search.get("zero_stage", 0),
            },
            "plan",
        )
        if self.sharding is not None:
            decisions["sharding"] = {k: v for k, v in self.sharding.to_dict().items() if k not in ShardingPlan.TIMING_FIELDS}
        return decisions

    @functools.cached_property
    def hash(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`decisions`: equal on every rank that
        runs this plan, in every process, under every ``PYTHONHASHSEED``."""
        return sha256_hex(canonical_json(self.decisions()))

    def mismatches(self, identity: dict[str, str], cluster: Cluster, options: dict[str, Any]) -> list[str]:
        """Why this plan does not belong to a model of ``identity`` planned for ``cluster``
        with ``options`` by this partc and torch; empty when it does."""
        found = []
        for part, what in (("graph", "the graph's structure (operators, shapes, node names) differs"), ("parameters", "parameter names, shapes or dtypes differ")):
            if self.identity.get(part) != identity.get(part):
                found.append(f"{part}: {what} from the model the plan was made for")
        if self.identity.get("inputs") != identity.get("inputs"):
            found.append(f"inputs: the plan was made for inputs {self.identity.get('inputs')}, these are {identity.get('inputs')}")
        if self.cluster.to_dict() != cluster.to_dict():
            found.append(f"cluster: the plan is for {self.cluster.describe()}, not {cluster.describe()}")
        now = current_versions()
        for name in sorted(set(self.versions) | set(now)):
            if self.versions.get(name) != now.get(name):
                found.append(f"versions: the plan was made with {name} {self.versions.get(name)}, this is {now.get(name)}")
        for name in sorted(set(self.options) | set(options)):
            if self.options.get(name) != options.get(name):
                found.append(f"options: {name} was {self.options.get(name)!r} when planned, now {options.get(name)!r}")
        return found

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "versions": dict(self.versions),
            "identity": dict(self.identity),
            "options": to_plain(self.options, "options"),
            "model": self.model,
            "frontend": self.frontend,
            "fallback_reason": self.fallback_reason,
            "mesh": dict(self.mesh),
            "batch_size": self.batch_size,
            "compute_dtype": self.compute_dtype,
            "cluster": self.cluster.to_dict(),
            "layers": [asdict(l) for l in self.layers],
            "predicted_step_time": self.predicted_step_time,
            "compute_time": self.compute_time,
            "exposed_communication_time": self.exposed_communication_time,
            "optimizer_time": self.optimizer_time,
            "memory": asdict(self.memory),
            "memory_limit": self.memory_limit,
            "fingerprint": self.fingerprint,
            "stages": [asdict(st) for st in self.stages],
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "equal_split_stages": [asdict(st) for st in self.equal_split_stages],
            "solver_status": self.solver_status,
            "bubble_fraction": self.bubble_fraction,
            "equal_split_step_time": self.equal_split_step_time,
            "tensor_parallel": self.tensor_parallel,
            "search": self.search,
            "unsupported_ops": list(self.unsupported_ops),
            "pass_times": dict(self.pass_times),
            "sharding": None if self.sharding is None else self.sharding.to_dict(),
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The plan as JSON text; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            write_atomic(path, text)
        return text

    @staticmethod
    def from_json(path_or_text: str | os.PathLike) -> "Plan":
        """Read a plan saved by :meth:`to_json` (a path, or the JSON text itself)."""
        raw = _read_text(path_or_text)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanMismatchError(f"not a partc plan: the file is not JSON ({e}); partc never reads pickled plans") from e
        return Plan.from_dict(data)

    @staticmethod
    def from_dict(data: Any) -> "Plan":
        """The plan :meth:`to_dict` gave; refuses anything else with the reason."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanMismatchError("not a partc plan: the JSON has no \"format\": \"partc.plan\" field")
        if data.get("version") != PLAN_VERSION:
            older = isinstance(data.get("version"), int) and data["version"] < PLAN_VERSION
            why = " (older plans hold no sharding plan and no graph identity to check a model against)" if older else ""
            raise PlanMismatchError(f"plan version {data.get('version')!r} is not the version this partc reads ({PLAN_VERSION}){why}; plan again")
        try:
            sharding = None if data["sharding"] is None else ShardingPlan.from_dict(data["sharding"])
        except PlainDataError as e:
            raise PlanMismatchError(f"the plan's sharding plan cannot be read: {e}") from e
        except KeyError as e:
            raise PlanMismatchError(f"plan JSON is missing or has a wrong field: {e}") from e
        try:
            return Plan(
                model=data["model"],
                frontend=data["frontend"],
                fallback_reason=data["fallback_reason"],
                mesh=dict(data["mesh"]),
                batch_size=data["batch_size"],
                compute_dtype=data["compute_dtype"],
                cluster=Cluster.from_dict(data["cluster"]),
                layers=tuple(LayerEstimate(**l) for l in data["layers"]),
                predicted_step_time=data["predicted_step_time"],
                compute_time=data["compute_time"],
                exposed_communication_time=data["exposed_communication_time"],
                optimizer_time=data["optimizer_time"],
                memory=MemoryBreakdown(**data["memory"]),
                memory_limit=data["memory_limit"],
                fingerprint=data["fingerprint"],
                stages=_stages(data["stages"]),
                schedule=data["schedule"],
                microbatches=data["microbatches"],
                equal_split_stages=_stages(data["equal_split_stages"]),
                solver_status=data["solver_status"],
                bubble_fraction=data["bubble_fraction"],
                equal_split_step_time=data["equal_split_step_time"],
                tensor_parallel=data["tensor_parallel"],
                search=data["search"],
                unsupported_ops=tuple(data["unsupported_ops"]),
                pass_times=dict(data["pass_times"]),
                identity=dict(data["identity"]),
                versions=dict(data["versions"]),
                options=dict(data["options"]),
                sharding=sharding,
            )
        except (KeyError, TypeError) as e:
            raise PlanMismatchError(f"plan JSON is missing or has a wrong field: {e}") from e


def _stages(items: list[dict[str, Any]]) -> tuple[StagePlan, ...]:
    return tuple(StagePlan(**{**item, "layers": tuple(item["layers"])}) for item in items)


def graph_identity(gm: fx.GraphModule) -> dict[str, str]:
    """Hashes of what a plan is bound to, by part, so a mismatch can say which differs:

    graph       every layer's name, structural signature (operators, shapes, constants,
                edges) and fx node names (a plan names nodes), the frontend, whether the
                loss is in the graph, the buffers forward mutates
    parameters  every parameter and buffer: qualified name, shape, dtype, trainable
    inputs      the input specs (shape and dtype of each example input), as text"""
    info = graph_info(gm)
    graph = [info.frontend, info.loss_in_graph, list(info.mutated_buffers)]
    graph += [[layer.name, layer.signature, list(layer.nodes)] for layer in info.layers]
    parameters = [
        [str(n.target), [str(s) for s in node_info(n).outputs], node_info(n).requires_grad] for n in gm.graph.nodes if n.op == "get_attr"
    ]
    return {
        "graph": sha256_hex(canonical_json(graph)),
        "parameters": sha256_hex(canonical_json(parameters)),
        "inputs": "; ".join(str(spec) for spec in info.input_specs),
    }


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """One hash of :func:`graph_identity` (the graph's structure, parameter shapes and
    dtypes, and input specs); weights are not read."""
    return sha256_hex(canonical_json(graph_identity(gm)))[:32]


def current_versions() -> dict[str, str]:
    """The partc and torch versions a plan records and :meth:`Plan.mismatches` checks."""
    return {"partc": _partc_version(), "torch": torch.__version__}


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, strict JSON (what hashes are taken over)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def sha256_hex(text: str) -> str:
    """sha256 of ``text`` (UTF-8) in hex."""
    return hashlib.sha256(text.encode()).hexdigest()


def graph_to_dot(gm: fx.GraphModule) -> str:
    layers = graph_info(gm).layers
    palette = ["#e8f1fb", "#fdf0e2", "#e9f7ec", "#f6e8f7", "#fbf7dd", "#e6f5f5"]
    lines = ["digraph partc {", '  rankdir=TB; node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    members: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        members.setdefault(node_info(node).layer, []).append(node)
    for index, nodes in members.items():
        layer = layers[index]
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f'    label="{_dot_escape(layer.name)} ({layer.fwd_flops / 1e9:.2f} GFLOP)"; style=filled; color="{palette[index % len(palette)]}";')
        for node in nodes:
            info = node_info(node)
            shape = " ".join(str(s) for s in info.outputs) or "-"
            label = f"{node.name}\\n{info.op.value}: {info.name}\\n{shape}"
            if info.fwd_flops:
                label += f"\\n{info.fwd_flops / 1e6:,.1f} MFLOP"
            fill = "#ffffff" if info.op not in (OpKind.OTHER,) else "#ffd6d6"
            lines.append(f'    "{node.name}" [label="{_dot_escape(label)}", fillcolor="{fill}"];')
        lines.append("  }")
    for node in gm.graph.nodes:
        for user in node.users:
            lines.append(f'  "{node.name}" -> "{user.name}";')
    lines.append("}")
    return "\n".join(lines)


def _layer_span(stage: StagePlan) -> str:
    first, last = stage.layers[0], stage.layers[-1]
    return first if first == last else f"{first} .. {last} ({len(stage.layers)})"


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


def _fold(layers: tuple[LayerEstimate, ...], expand: bool) -> list[list[LayerEstimate]]:
    groups: list[list[LayerEstimate]] = []
    for layer in layers:
        if groups and not expand and groups[-1][0].signature == layer.signature:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (1,)) -> str:
    """Columns aligned; those in ``left`` (names) left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f}{unit}"
    return str(int(n))


def _read_text(path_or_text: str | os.PathLike) -> str:
    text = os.fspath(path_or_text)
    if text.lstrip().startswith("{"):
        return text
    try:
        with open(text, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PlanMismatchError(f"cannot read plan file {text}: {e.strerror}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanMismatchError(f"not a partc plan: {text} is binary (a pickle?); partc reads JSON plans only") from e


def _partc_version() -> str:
    import partc

    return partc.__version__
