"""The plan report: one self-contained HTML page (no network, no scripts) describing a plan.

Sections: the plan at a glance; the layers coloured by pipeline stage; per-stage time and
memory bars against the device budget; the schedule's timeline per pipeline rank; the
collectives the plan inserts; the tensor-parallel layout of every parameter.

    partc plan gpt2 --cluster h100x2 --mesh pp=2 --report plan.html

The timeline is simulated from the predicted stage times: each microbatch's forward takes
a third of the stage time and its backward two thirds (backward ~ 2x forward), and every
operation starts as soon as its rank is free and its input has arrived (GPipe: all
forwards first; 1F1B: at most ``p - i`` forwards in flight on stage ``i``; interleaved
schedules are drawn as 1F1B over their stages, one row per rank).
"""

from __future__ import annotations

import html
import os

from partc.cluster import write_atomic
from partc.plan import GiB, Plan, StagePlan

_STAGE_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]


def write_report(plan: Plan, path: str | os.PathLike) -> str:
    """Write the report to ``path`` (atomically) and return the HTML."""
    page = render_report(plan)
    write_atomic(path, page)
    return page


def render_report(plan: Plan) -> str:
    sections = [
        _glance(plan),
        _section("Layers by stage", _layer_strip(plan)),
        _section("Stages: time and memory", _stage_bars(plan)),
        _section("Schedule timeline", _timeline(plan)),
        _section("Collectives inserted", _collectives(plan)),
    ]
    if plan.tensor_parallel:
        sections.append(_section("Tensor-parallel layouts", _layouts(plan)))
    style = (
        "body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222}"
        "h1{font-size:22px}h2{font-size:17px;margin-top:28px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}td.name{text-align:left}.note{color:#666;font-size:12px}"
    )
    title = f"partc plan: {html.escape(plan.model)}"
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head><body><h1>{title}</h1>{"".join(sections)}</body></html>\n'


def _section(title: str, body: str) -> str:
    return f'<section><h2>{html.escape(title)}</h2>{body}</section>'


def _glance(plan: Plan) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    fit = "fits" if plan.fits else f"does NOT fit (over by {(plan.memory.total - plan.memory_limit) / GiB:.2f} GiB)"
    rows = [
        ("cluster", plan.cluster.describe()),
        ("mesh", mesh),
        ("global batch", str(plan.batch_size)),
        ("compute dtype", plan.compute_dtype),
        ("predicted step time", f"{plan.predicted_step_time * 1e3:,.2f} ms"),
        ("peak memory per device", f"{plan.memory.total / GiB:,.2f} GiB of {plan.memory_limit / GiB:,.2f} GiB: {fit}"),
        ("captured with", plan.frontend),
    ]
    if len(plan.stages) > 1:
        rows.append(("pipeline", f"{len(plan.stages)} stages, {plan.schedule}, {plan.microbatches} microbatches, bubble {plan.bubble_fraction:.1%}"))
    return _table(["", ""], [[html.escape(a), html.escape(b)] for a, b in rows], name_columns=(0, 1))


def _layer_strip(plan: Plan) -> str:
    stage_of = plan.stage_of_layer()
    width = 900
    total = sum(l.forward_time + l.backward_time for l in plan.layers) or 1.0
    x, boxes = 0.0, []
    for layer, stage in zip(plan.layers, stage_of):
        w = max(width * (layer.forward_time + layer.backward_time) / total, 2.0)
        colour = _STAGE_COLOURS[stage % len(_STAGE_COLOURS)]
        tip = f"{layer.name}: stage {stage}, {(layer.forward_time + layer.backward_time) * 1e3:.3f} ms, {layer.param_numel:,} parameters"
        boxes.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="36" fill="{colour}" stroke="#fff"><title>{html.escape(tip)}</title></rect>')
        x += w
    legend = " ".join(
        f'<span style="color:{_STAGE_COLOURS[s.index % len(_STAGE_COLOURS)]}">&#9632;</span> stage {s.index} (rank {s.rank}): {html.escape(_span(s))}'
        for s in plan.stages
    )
    svg = f'<svg width="{x:.0f}" height="40" role="img" aria-label="layers by stage">{"".join(boxes)}</svg>'
    return f'{svg}<p class="note">Each box is a layer, as wide as its predicted time; hover for details.</p><p>{legend}</p>'


def _stage_bars(plan: Plan) -> str:
    longest = max(s.predicted_time for s in plan.stages) or 1.0
    rows = []
    for s in plan.stages:
        time_bar = _bar(s.predicted_time / longest, _STAGE_COLOURS[s.index % len(_STAGE_COLOURS)])
        memory_bar = _bar(min(s.peak_memory / plan.memory_limit, 1.0), "#e15759" if s.peak_memory > plan.memory_limit else "#59a14f")
        rows.append(
            [str(s.index), str(s.rank), html.escape(_span(s)), f"{s.predicted_time * 1e3:,.3f} ms {time_bar}", f"{s.peak_memory / GiB:,.2f} GiB {memory_bar}"]
        )
    note = f'<p class="note">Memory bars are against the device budget of {plan.memory_limit / GiB:,.2f} GiB.</p>'
    return _table(["stage", "rank", "layers", "time per microbatch", "peak memory"], rows, name_columns=(2,)) + note


def _bar(fraction: float, colour: str) -> str:
    return f'<svg width="160" height="10"><rect width="160" height="10" fill="#eee"/><rect width="{160 * max(fraction, 0.0):.1f}" height="10" fill="{colour}"/></svg>'


def pipeline_timeline(stage_times: list[float], microbatches: int, schedule: str) -> list[list[tuple[str, int, float, float]]]:
    """Per stage, the (kind "F"/"B", microbatch, start, end) operations of one step."""
    p = len(stage_times)
    forward = [t / 3 for t in stage_times]
    backward = [2 * t / 3 for t in stage_times]
    f_end = [[0.0] * microbatches for _ in range(p)]
    b_end = [[0.0] * microbatches for _ in range(p)]
    ops: list[list[tuple[str, int, float, float]]] = [[] for _ in range(p)]
    orders = []
    for i in range(p):
        warmup = microbatches if schedule == "gpipe" else min(p - i, microbatches)
        order = [("F", k) for k in range(warmup)]
        next_f = warmup
        for k in range(microbatches):
            order.append(("B", k))
            if next_f < microbatches:
                order.append(("F", next_f))
                next_f += 1
        orders.append(order)
    # Operations depend on the previous stage's forward / next stage's backward; iterate
    # until every start time is settled (the dependency graph is acyclic).
    position = [0] * p
    free = [0.0] * p
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for i in range(p):
            while position[i] < len(orders[i]):
                kind, k = orders[i][position[i]]
                if kind == "F":
                    ready = 0.0 if i == 0 else (f_end[i - 1][k] if any(op[:2] == ("F", k) for op in ops[i - 1]) else None)
                else:
                    ready = f_end[i][k] if i == p - 1 else (b_end[i + 1][k] if any(op[:2] == ("B", k) for op in ops[i + 1]) else None)
                if ready is None:
                    break
                start = max(free[i], ready)
                end = start + (forward[i] if kind == "F" else backward[i])
                (f_end if kind == "F" else b_end)[i][k] = end
                ops[i].append((kind, k, start, end))
                free[i] = end
                position[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline timeline did not converge")
    return ops


def _timeline(plan: Plan) -> str:
    if len(plan.stages) == 1:
        return "<p>No pipeline: every device runs the whole model on its share of the batch.</p>"
    ops = pipeline_timeline([s.predicted_time for s in plan.stages], plan.microbatches, plan.schedule)
    end = max(op[3] for stage in ops for op in stage) or 1.0
    scale, row = 900 / end, 22
    rects = []
    for s, stage_ops in zip(plan.stages, ops):
        colour = _STAGE_COLOURS[s.index % len(_STAGE_COLOURS)]
        y = s.index * row
        rects.append(f'<text x="0" y="{y + 15}" font-size="11">stage {s.index} (rank {s.rank})</text>')
        for kind, k, start, stop in stage_ops:
            opacity = "1.0" if kind == "F" else "0.55"
            label = f"{'forward' if kind == 'F' else 'backward'} of microbatch {k}: {start * 1e3:.3f}-{stop * 1e3:.3f} ms"
            rects.append(
                f'<rect x="{110 + start * scale:.1f}" y="{y + 2}" width="{max((stop - start) * scale, 1):.1f}" height="{row - 4}" '
                f'fill="{colour}" fill-opacity="{opacity}" stroke="#fff"><title>{html.escape(label)}</title></rect>'
            )
    height = len(plan.stages) * row + 4
    note = (
        f'<p class="note">{html.escape(plan.schedule)}, {plan.microbatches} microbatches; solid: forward, light: backward; '
        f"simulated from the predicted stage times ({end * 1e3:,.2f} ms for the pipeline part of the step).</p>"
    )
    return f'<svg width="1020" height="{height}" role="img" aria-label="schedule timeline">{"".join(rects)}</svg>{note}'


def _collectives(plan: Plan) -> str:
    rows = []
    if plan.mesh.get("dp", 1) > 1:
        rows.append(["data parallel", "all_reduce of every gradient (DDP buckets, overlapped with backward)", f"{plan.exposed_communication_time * 1e3:,.3f} ms exposed"])
    for s in plan.stages[:-1]:
        rows.append([html.escape(f"pipeline boundary {s.index} -> {s.index + 1}"), "send/recv of activations forward, gradients backward", f"{plan.microbatches} x 2 per step"])
    if plan.tensor_parallel:
        for phase, counts in plan.tensor_parallel["collectives_per_step"].items():
            for name, count in counts.items():
                rows.append([f"tensor parallel ({phase})", html.escape(name), str(count)])
    if not rows:
        return "<p>None: the plan runs on one device.</p>"
    return _table(["where", "collective", "per step"], rows, name_columns=(0, 1))


def _layouts(plan: Plan) -> str:
    rows = [[html.escape(name), html.escape(layout)] for name, layout in plan.tensor_parallel["parameters"].items()]
    return _table(["parameter", "layout"], rows, name_columns=(0, 1)) + '<p class="note">S(d): sharded on dim d; R: replicated.</p>'


def _span(stage: StagePlan) -> str:
    first, last = stage.layers[0], stage.layers[-1]
    return first if first == last else f"{first} .. {last} ({len(stage.layers)} layers)"


def _table(header: list[str], rows: list[list[str]], name_columns: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="name">{cell}</td>' if i in name_columns else f"<td>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"
