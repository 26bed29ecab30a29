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


def test_accumulated_microbatches_take_the_step_of_one_pass():
    """The hand-written ddp-acc<M> / fsdp2-acc<M> layouts: M slices, each loss scaled by 1/M,
    leave the gradients of one pass over the rank's whole batch (the baseline is fair only
    if it trains the same step)."""
    import torch

    import layouts
    from partc.models import training_case

    def gradients(microbatches: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        case = training_case("gpt-tiny", batch_size=8, seq_len=16, device="cpu")
        held = []
        step = layouts._accumulating(case.model, case.inputs[0], case.targets, microbatches, held.append)
        step()
        assert held == [True] * (microbatches - 1) + [False]  # gradients held back until the last slice
        return {name: p.grad.clone() for name, p in case.model.named_parameters()}

    one_pass = gradients(1)
    for microbatches in (2, 4):
        for name, grad in gradients(microbatches).items():
            torch.testing.assert_close(grad, one_pass[name], rtol=1e-5, atol=1e-6, msg=name)
