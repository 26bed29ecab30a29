"""The example scripts run as documented (in one process, and the training example under torchrun)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_gpt_runs_a_pipeline_plan_in_one_process():
    out = _run(str(EXAMPLES / "train_gpt.py"), "--mesh", "pp=2", "--steps", "3", "--layers", "2")
    steps = re.findall(r"^step +(\d+)  loss (\d+\.\d+)", out, flags=re.M)
    assert [s for s, _ in steps] == ["0", "1", "2"]
    assert "Pipeline: 2 stages on 2 ranks" in out


def test_plan_gpt_searches_a_plan_that_fits_for_a_meta_model():
    out = _run(str(EXAMPLES / "plan_gpt.py"), "--layers", "4", "--nodes", "1")
    assert "blocks.0 .. blocks.3 (x4)" in out and "Predicted step time" in out
    # 7.9B parameters with AdamW state do not fit one 80 GB GPU: plain data parallelism loses.
    assert ": fits" in out and "Chosen by the search" in out and "why not chosen" in out


def test_plan_large_plans_llama_70b_on_64_h100s_from_meta():
    out = _run(str(EXAMPLES / "plan_large.py"))
    assert "llama-70b: 69." in out and "on the meta device" in out  # ~70B parameters, none allocated
    assert "8 node(s) x 8 H100" in out and "world size 64" in out
    assert ": fits" in out and "Chosen by the search" in out and "why not chosen" in out
    assert "layers.0 .. layers." in out  # the 80 identical blocks folded in the summary
    assert re.search(r"plan hash [0-9a-f]{16}; planned in \d+\.\d s", out)


@pytest.mark.slow
def test_train_gpt_under_torchrun_on_a_3d_mesh():
    """The README's torchrun walkthrough: 8 processes as pp=2 x dp=2 x tp=2 on gloo."""
    from parity import free_port

    out = _run("-m", "torch.distributed.run", "--nproc-per-node", "8", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(EXAMPLES / "train_gpt.py"), "--mesh", "pp=2,dp=2,tp=2", "--schedule", "1f1b", "--microbatches", "2", "--steps", "4", "--layers", "2")
    losses = [float(loss) for loss in re.findall(r"^step +\d+  loss (\d+\.\d+)", out, flags=re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0]  # rank 0 prints each step; the loss falls
    assert "pp=2" in out and "tp=2" in out
