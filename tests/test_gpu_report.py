"""bench/gpu/report.py reading the runs it merges (no GPU: the stored H200 results)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import report

RUNS = ROOT / "bench" / "gpu" / "results" / "h200x2"


def test_a_run_without_results_json_is_rebuilt_from_its_json_lines():
    summary = report.load_run(RUNS / "after-runtime-fixes" / "r9")
    assert summary["command"].startswith("python3 bench/gpu/run.py --gpus 2 --out /root/out/r9")
    assert summary["ceiling_flops"] == 677.4e12 and (summary["warmup"], summary["steps"]) == (2, 5)
    gpt = summary["models"]["gpt2-medium"]
    assert (gpt["batch"], gpt["seq"], gpt["tokens_per_step"]) == (16, 1024, 16 * 1024)
    partc = gpt["layouts"]["partc"]
    assert abs(partc["step_time"] - 0.0721) < 1e-4 and partc["prediction"]["step_time"] == partc["detail"]["predicted_step_time"]


def test_a_later_partc_that_ran_replaces_the_fallback():
    old = report.load_run(RUNS / "results-run4.json")
    assert "partc-fallback" in old["models"]["gpt3-6.7b"]["layouts"]
    merged = report.merge([old, report.load_run(RUNS / "after-runtime-fixes" / "r10")])
    layouts = merged["models"]["gpt3-6.7b"]["layouts"]
    assert "partc-fallback" not in layouts and layouts["partc"]["status"] == "ok"
    assert [run["command"].split("--out ")[1].split()[0] for run in merged["runs"]] == ["/root/out/r4", "/root/out/r10"]
