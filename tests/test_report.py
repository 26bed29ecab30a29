"""The HTML plan report: content, the timeline simulation, and rendering in headless Chromium."""

import os
import shutil
import subprocess

import pytest

import partc
from partc.models import build
from partc.report import pipeline_timeline, write_report


def _pipeline_plan():
    model, (idx,) = build("gpt-tiny", batch_size=8)
    return partc.plan(model, partc.Cluster.preset("cpu", devices_per_node=2), idx, mesh={"pp": 2}, microbatches=4)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_timeline_of_equal_stages_takes_m_plus_p_minus_1_stage_times(schedule):
    p, m, t = 4, 6, 3.0
    ops = pipeline_timeline([t] * p, m, schedule)
    for stage_ops in ops:
        assert len(stage_ops) == 2 * m
        ends = sorted((start, stop) for _, _, start, stop in stage_ops)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(ends, ends[1:]))  # one op at a time per stage
    assert max(op[3] for stage in ops for op in stage) == pytest.approx((m + p - 1) * t)


def test_timeline_respects_dependencies():
    ops = pipeline_timeline([1.0, 2.0, 1.5], 4, "1f1b")
    end = {(i, kind, k): stop for i, stage in enumerate(ops) for kind, k, _, stop in stage}
    start = {(i, kind, k): s for i, stage in enumerate(ops) for kind, k, s, _ in stage}
    for k in range(4):
        assert start[(1, "F", k)] >= end[(0, "F", k)] and start[(2, "F", k)] >= end[(1, "F", k)]
        assert start[(1, "B", k)] >= end[(2, "B", k)] and start[(0, "B", k)] >= end[(1, "B", k)]
    in_flight = max(sum(1 for kind, k2, s, _ in ops[0] if kind == "F" and s <= t) - sum(1 for kind, k2, s, e in ops[0] if kind == "B" and e <= t) for _, _, t, _ in ops[0])
    assert in_flight <= 3  # 1F1B: stage 0 of 3 keeps at most 3 microbatches in flight


def test_report_has_every_section(tmp_path):
    plan = _pipeline_plan()
    page = write_report(plan, tmp_path / "plan.html")
    assert (tmp_path / "plan.html").read_text() == page
    for text in ("Layers by stage", "Stages: time and memory", "Schedule timeline", "Collectives inserted", "pipeline boundary 0 -&gt; 1", "forward of microbatch 3"):
        assert text in page
    assert "http" not in page.replace('charset="utf-8"', "")  # self-contained: nothing to fetch


def test_cli_writes_the_report(tmp_path, capsys):
    from partc.cli import main

    path = tmp_path / "report.html"
    assert main(["plan", "gpt-tiny", "--cluster", "cpu:1x2", "--mesh", "pp=2", "--report", str(path)]) == 0
    assert "Schedule timeline" in path.read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("PARTC_REQUIRE_CHROMIUM"):
            pytest.fail("Chromium is required here (PARTC_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("Chromium is not installed; .ci/run installs it and sets PARTC_REQUIRE_CHROMIUM")
    path = tmp_path / "plan.html"
    write_report(_pipeline_plan(), path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'aria-label="schedule timeline"' in dom.stdout and "<rect" in dom.stdout  # parsed into a DOM with the SVG
    shot = tmp_path / "plan.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,900", path.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000  # a real, non-blank page
