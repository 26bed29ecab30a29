"""Tables and a plot from ``results.json`` (what ``run.py`` writes).

    python bench/gpu/report.py OUT/results.json      # prints the markdown, writes OUT/throughput.svg
    python bench/gpu/report.py RUN1/results.json RUN2/ --out DIR   # several runs merged; a folder
                                                     # without results.json is read from its JSON lines

The tables: throughput per layout (tokens/s, model TFLOP/s per GPU, MFU against the bf16
matmul rate calibrated in the same run, peak memory, ratio to the best hand-written
layout); predicted against measured step time and memory (errors, Spearman rank
correlation, regret); and the codegen overhead (partc's tensor-parallel module against
``parallelize_module``). The plot is an SVG written by hand (no matplotlib needed).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

GiB = 2**30
PARTC_LAYOUTS = ("partc", "partc-fallback", "partc-tp")


def _ok(result: dict | None) -> bool:
    return bool(result) and result.get("status") == "ok"


def is_partc_run(layout: str) -> bool:
    """A layout whose plan partc searched: the worker records the prediction partc made."""
    return layout in ("partc", "partc-fallback") or re.fullmatch(r"partc-zero\d", layout) is not None


def _manual(layouts: dict[str, dict]) -> dict[str, dict]:
    """The hand-written layouts (every name that is not partc's: partc-zero3 too)."""
    return {name: r for name, r in layouts.items() if name not in PARTC_LAYOUTS and not name.startswith("partc-")}


def best_manual(layouts: dict[str, dict]) -> tuple[str, dict] | None:
    ran = [(name, r) for name, r in _manual(layouts).items() if _ok(r)]
    return min(ran, key=lambda item: item[1]["step_time"]) if ran else None


def partc_pick(layouts: dict[str, dict]) -> dict | None:
    """What partc ran: its chosen plan, or the fallback when that plan failed."""
    pick = layouts.get("partc")
    return pick if _ok(pick) or "partc-fallback" not in layouts else layouts["partc-fallback"]


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else None


def _describe_partc(result: dict) -> str:
    d = result.get("detail", {})
    mesh = d.get("mesh", {})
    parts = [" x ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "single device"]
    if mesh.get("pp", 1) > 1:
        parts.append(f"{d.get('schedule')} m={d.get('microbatches')}")
    if d.get("searched_best"):
        parts.append(f"search picked: {d['searched_best']}")
    if d.get("fallback_mesh"):
        parts.append(f"fallback mesh {d['fallback_mesh']}")
    for refusal in d.get("refusals", []):
        parts.append(f"refused: {refusal}")
    return "; ".join(parts)


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def throughput_table(name: str, entry: dict, ceiling: float, gpus: int) -> list[str]:
    layouts = entry["layouts"]
    best = best_manual(layouts)
    lines = [
        (
            f"#### {name}: global batch {entry['batch']} x {entry['seq']} tokens, {entry['params'] / 1e9:.2f} B parameters "
            f"({entry['flops_per_token'] / 1e9:.2f} GFLOP per token)"
        ),
        "",
        "| layout | step (ms) | tokens/s | TFLOP/s per GPU | MFU | peak memory (GiB) | vs best hand-written |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, r in layouts.items():
        if not _ok(r):
            reason = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {layout} | {r.get('status')}: {reason} | | | | | |")
            continue
        step = r["step_time"]
        tflops = entry["flops_per_step"] / step / gpus / 1e12
        memory = r.get("peak_memory")
        ratio = best[1]["step_time"] / step if best else None
        lines.append(
            f"| {layout} | {step * 1e3:.1f} | {entry['tokens_per_step'] / step:,.0f} | {tflops:.1f} | {tflops * 1e12 / ceiling:.1%} | "
            f"{_fmt(memory / GiB if memory else None, '.1f')} | {_fmt(ratio, '.3f')}x |"
        )
    for partc_layout in ("partc", "partc-fallback"):
        if partc_layout in layouts:
            lines += ["", f"{partc_layout}: {_describe_partc(layouts[partc_layout])}."]
    if best:
        lines.append(f"Best hand-written layout: {best[0]}.")
    return lines + [""]


def prediction_rows(summary: dict) -> list[dict[str, Any]]:
    rows = []
    for name, entry in summary["models"].items():
        for layout, r in entry["layouts"].items():
            p = r.get("prediction") or {}
            if not _ok(r) or "step_time" not in p:
                continue
            rows.append({
                "model": name, "layout": layout, "predicted": p["step_time"], "measured": r["step_time"],
                "predicted_memory": p.get("memory"), "measured_memory": r.get("peak_memory"), "note": p.get("note", ""),
            })
    return rows


def accuracy_table(summary: dict) -> list[str]:
    rows = prediction_rows(summary)
    lines = [
        "| model | layout | predicted (ms) | measured (ms) | error | predicted memory (GiB) | measured (GiB) | error | prediction |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    time_errors, memory_errors = [], []
    for row in rows:
        te = row["predicted"] / row["measured"] - 1
        time_errors.append(abs(te))
        me = None
        if row["predicted_memory"] and row["measured_memory"]:
            me = row["predicted_memory"] / row["measured_memory"] - 1
            memory_errors.append(abs(me))
        lines.append(
            f"| {row['model']} | {row['layout']} | {row['predicted'] * 1e3:.1f} | {row['measured'] * 1e3:.1f} | {te:+.1%} | "
            f"{_fmt(row['predicted_memory'] / GiB if row['predicted_memory'] else None, '.1f')} | "
            f"{_fmt(row['measured_memory'] / GiB if row['measured_memory'] else None, '.1f')} | {_fmt(me, '+.1%')} | {row['note']} |"
        )
    lines.append("")
    if time_errors:
        lines.append(f"Step time: mean |error| {statistics.fmean(time_errors):.1%}, max {max(time_errors):.1%} over {len(time_errors)} plans.")
    if memory_errors:
        lines.append(f"Peak memory: mean |error| {statistics.fmean(memory_errors):.1%}, max {max(memory_errors):.1%} over {len(memory_errors)} plans.")
    lines += ["", "| model | Spearman (predicted vs measured step time) | regret (partc's pick / best measured) |", "|---|---:|---:|"]
    for name, entry in summary["models"].items():
        mine = [r for r in rows if r["model"] == name]
        rho = spearman([r["predicted"] for r in mine], [r["measured"] for r in mine])
        ran = [r for r in entry["layouts"].values() if _ok(r)]
        pick = partc_pick(entry["layouts"])
        regret = pick["step_time"] / min(r["step_time"] for r in ran) if _ok(pick) else None
        lines.append(f"| {name} | {_fmt(rho, '.2f')} ({len(mine)} plans) | {_fmt(regret, '.3f')} |")
    return lines + [""]


def codegen_table(summary: dict) -> list[str]:
    lines = ["| model | partc tp (tokens/s) | parallelize_module tp (tokens/s) | ratio |", "|---|---:|---:|---:|"]
    for name, entry in summary["models"].items():
        mine, torch_tp = entry["layouts"].get("partc-tp"), entry["layouts"].get("tp")
        if mine is None:
            continue
        if _ok(mine) and _ok(torch_tp):
            tokens = entry["tokens_per_step"]
            lines.append(f"| {name} | {tokens / mine['step_time']:,.0f} | {tokens / torch_tp['step_time']:,.0f} | {torch_tp['step_time'] / mine['step_time']:.3f} |")
        else:
            lines.append(f"| {name} | {mine.get('status')} | {torch_tp.get('status') if torch_tp else '-'} | - |")
    return lines + [""]


def svg_plot(summary: dict) -> str:
    """Grouped bars: model TFLOP/s per GPU of every layout that ran, one group per model."""
    groups = []
    for name, entry in summary["models"].items():
        bars = [(layout, entry["flops_per_step"] / r["step_time"] / summary["gpus"] / 1e12) for layout, r in entry["layouts"].items() if _ok(r)]
        if bars:
            groups.append((name, bars))
    if not groups:
        return ""
    top = max(v for _, bars in groups for _, v in bars) * 1.15
    bar_w, gap, left, height, base = 22, 30, 60, 300, 330
    width = left + sum(len(bars) * bar_w + gap for _, bars in groups) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base + 120}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="16" font-size="13">Model TFLOP/s per GPU by layout ({summary["gpus"]} x {summary["device"]}, bf16)</text>',
           f'<line x1="{left}" y1="{base}" x2="{width - 10}" y2="{base}" stroke="black"/>']
    for tick in range(0, int(top) + 1, max(1, int(top / 5) // 50 * 50 or 50)):
        y = base - tick / top * height
        out.append(f'<text x="{left - 6}" y="{y + 4:.0f}" text-anchor="end">{tick}</text><line x1="{left}" y1="{y:.0f}" x2="{width - 10}" y2="{y:.0f}" stroke="#ddd"/>')
    x = left + 10
    for name, bars in groups:
        for layout, value in bars:
            h = value / top * height
            colour = "#d62728" if layout == "partc" else "#ff9896" if layout == "partc-tp" else "#1f77b4"
            out.append(f'<rect x="{x}" y="{base - h:.1f}" width="{bar_w - 4}" height="{h:.1f}" fill="{colour}"><title>{name} {layout}: {value:.1f}</title></rect>')
            out.append(f'<text x="{x + 8}" y="{base + 6}" transform="rotate(60 {x + 8} {base + 6})">{layout}</text>')
            out.append(f'<text x="{x + 9}" y="{base - h - 3:.1f}" text-anchor="middle" font-size="8">{value:.0f}</text>')
            x += bar_w
        out.append(f'<text x="{x - len(bars) * bar_w / 2:.0f}" y="{base + 100}" text-anchor="middle" font-weight="bold">{name}</text>')
        x += gap
    out.append("</svg>")
    return "\n".join(out)


def render(summary: dict, out: Path | None = None) -> str:
    ceiling, gpus = summary["ceiling_flops"], summary["gpus"]
    lines = [
        f"Machine: {gpus} x {summary['device']}, torch {summary['torch']}, Python {summary['python']}; date {summary['date']}.",
        f"Cluster: {summary['cluster_source']} ({summary['cluster'].get('name', '')}); MFU ceiling = bf16 matmul {ceiling / 1e12:.1f} TFLOP/s per device.",
        *(f"Command: `{run['command']}` ({run['date']})." for run in summary.get("runs", [summary])),
        f"{summary['warmup']} warm-up steps, median of {summary['steps']} timed steps.",
        "",
    ]
    for name, entry in summary["models"].items():
        lines += throughput_table(name, entry, ceiling, gpus)
    lines += ["#### Predicted against measured", ""] + accuracy_table(summary)
    lines += ["#### Codegen overhead", ""] + codegen_table(summary)
    text = "\n".join(lines)
    if out is not None:
        svg = svg_plot(summary)
        if svg:
            (out / "throughput.svg").write_text(svg)
        (out / "report.md").write_text(text)
    return text


def merge(summaries: list[dict]) -> dict:
    """Several runs' results as one (a later run's layout replaces an earlier one's; a later
    partc that ran drops an earlier ``partc-fallback``, which ran only because partc's pick
    had failed); the machine, date and command lines of every run are kept."""
    merged = json.loads(json.dumps(summaries[0]))
    merged["runs"] = [{k: s[k] for k in ("command", "date", "cluster_source")} for s in summaries]
    for later in summaries[1:]:
        for name, entry in later["models"].items():
            if name in merged["models"]:
                layouts = merged["models"][name]["layouts"]
                if _ok(entry["layouts"].get("partc")):
                    layouts.pop("partc-fallback", None)
                layouts.update(entry["layouts"])
            else:
                merged["models"][name] = entry
    return merged


def load_run(path: Path) -> dict:
    """A run's results: its ``results.json`` (the file, or in the folder), or, for a folder
    whose results.json did not come back, rebuilt from its per-model JSON lines and the
    header of its ``report.md`` (machine, cluster, command and date)."""
    if path.is_file():
        return json.loads(path.read_text())
    if (path / "results.json").exists():
        return json.loads((path / "results.json").read_text())
    from run import (
        model_flops_per_step,  # torch and partc: only for runs without results.json
    )

    header = (path / "report.md").read_text()
    machine = re.search(r"Machine: (\d+) x (.+?), torch (\S+), Python (\S+); date (\S+)\.", header)
    cluster = re.search(r"Cluster: (.+?) \((.*?)\); MFU ceiling = bf16 matmul ([\d.]+) TFLOP/s", header)
    command = re.search(r"Command: `(.+?)` \((\S+)\)\.", header)
    steps = re.search(r"(\d+) warm-up steps, median of (\d+) timed steps", header)
    if not (machine and cluster and command and steps):
        raise ValueError(f"{path}: no results.json, and report.md lacks the header lines to rebuild it from")
    source = cluster.group(1)
    cluster_dict = json.loads(Path(source).read_text()) if Path(source).exists() else {"name": cluster.group(2)}
    summary: dict[str, Any] = {
        "command": command.group(1), "date": command.group(2), "gpus": int(machine.group(1)), "device": machine.group(2),
        "torch": machine.group(3), "python": machine.group(4), "cluster": cluster_dict, "cluster_source": source,
        "ceiling_flops": float(cluster.group(3)) * 1e12, "warmup": int(steps.group(1)), "steps": int(steps.group(2)),
        "rebuilt_from": "JSON lines and report.md (no results.json)", "models": {},
    }
    for jsonl in sorted(path.glob("*.jsonl")):
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        results = [r for r in records if r.get("event") == "result"]
        if not results:
            continue
        first = results[0]
        entry = {"batch": first["batch"], "seq": first["seq"], **model_flops_per_step(first["model"], first["batch"], first["seq"]), "layouts": {}}
        for r in results:
            d = r.get("detail") or {}
            if r.get("status") == "ok" and "predicted_step_time" in d:
                r["prediction"] = {"step_time": d["predicted_step_time"], "memory": d["predicted_memory"], "note": "the plan partc ran"}
            entry["layouts"][r["layout"]] = r
        summary["models"][first["model"]] = entry
    return summary


def accuracy_summary(summary: dict) -> dict[str, float]:
    """Mean and max |error| of predicted step time and memory over every plan with a prediction."""
    times, memories = [], []
    for row in prediction_rows(summary):
        times.append(abs(row["predicted"] / row["measured"] - 1))
        if row["predicted_memory"] and row["measured_memory"]:
            memories.append(abs(row["predicted_memory"] / row["measured_memory"] - 1))
    return {
        "plans": len(times), "time_mean": statistics.fmean(times) if times else None, "time_max": max(times, default=None),
        "memory_mean": statistics.fmean(memories) if memories else None, "memory_max": max(memories, default=None),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="tables and a plot from run.py's results")
    parser.add_argument("runs", nargs="+", help="results.json files or run folders, earliest first")
    parser.add_argument("--out", default=None, help="folder for report.md and throughput.svg (default: the last run's)")
    args = parser.parse_args()
    paths = [Path(p) for p in args.runs]
    summaries = [load_run(p) for p in paths]
    out = Path(args.out) if args.out else (paths[-1] if paths[-1].is_dir() else paths[-1].parent)
    out.mkdir(parents=True, exist_ok=True)
    print(render(summaries[0] if len(summaries) == 1 else merge(summaries), out))
