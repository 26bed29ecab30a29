"""The GPU benchmark harness (bench/gpu/run.py) end to end on CPU: gloo, 2 processes, gpt-tiny.

It checks that every layout trains and is timed, that partc's plan and the cost model's
predictions are recorded next to the measurements, and that the report renders, so GPU
minutes are not spent on harness bugs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_layout(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "gpu" / "run.py"), "--smoke", "--models", "gpt-tiny", "--out", str(tmp_path)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    layouts = summary["models"]["gpt-tiny"]["layouts"]
    assert set(layouts) == {"partc", "partc-tp", "ddp", "fsdp2", "tp", "pp-m4", "pp-m8"}
    for name, result in layouts.items():
        assert result["status"] == "ok", (name, result.get("error"), result.get("traceback"))
        assert len(result["step_times"]) == 2 and all(t > 0 for t in result["step_times"])
        assert result["prediction"]["step_time"] > 0, (name, result["prediction"])
    assert layouts["partc"]["detail"]["mesh"]["dp"] * layouts["partc"]["detail"]["mesh"]["pp"] * layouts["partc"]["detail"]["mesh"]["tp"] == 2
    assert layouts["pp-m4"]["detail"]["split"] == [[0, 1], [1, 2]]
    report = (tmp_path / "report.md").read_text()
    assert "| pp-m4 |" in report and "Spearman" in report and "Codegen overhead" in report
    assert (tmp_path / "throughput.svg").read_text().startswith("<svg")
