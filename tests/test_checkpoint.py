"""A distributed run saved with torch.distributed.checkpoint loads into the single-device model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from parity import free_port

WORKER = Path(__file__).parent / "distributed" / "checkpoint_worker.py"
sys.path.insert(0, str(WORKER.parent))


def _run_worker(out: Path, mesh: dict, *extra: str) -> None:
    world = 1
    for degree in mesh.values():
        world *= degree
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(WORKER), "--mesh", json.dumps(mesh), "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


THREE_D = {"pp": 2, "dp": 2, "tp": 2}
TP_PAYS = ("--cluster", "tp-test:1e10")  # devices slow enough that the tensor-parallel plan shards


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh, extra",
    [({"pp": 2}, ()), ({"dp": 2}, ()), (THREE_D, TP_PAYS + ("--data-parallel", "ddp")), (THREE_D, TP_PAYS + ("--data-parallel", "fsdp"))],
    ids=["pp2", "dp2", "pp2-dp2-tp2", "pp2-dp2-tp2-fsdp"],
)
def test_checkpoint_loads_into_single_device_model_and_reproduces_next_loss(tmp_path, mesh, extra):
    from checkpoint_worker import batches
    from parity_worker import build, loss_fn

    _run_worker(tmp_path, mesh, *extra)

    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = build("gpt-tied")
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint"))
    model.load_state_dict(state)
    inputs, targets = batches()[2]
    expected = json.loads((tmp_path / "next_loss.json").read_text())["loss"]
    assert loss_fn(model(inputs), targets).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_checkpoint_of_a_3d_plan_loads_into_another_plan(tmp_path):
    """Saved from dp=2, tp=2, pp=2 (8 ranks), loaded into tp=2 on 2 ranks: the next step's loss
    is the one the 3-D run computed."""
    _run_worker(tmp_path, THREE_D, *TP_PAYS)
    _run_worker(tmp_path, {"tp": 2}, *TP_PAYS, "--load")
    expected = json.loads((tmp_path / "next_loss.json").read_text())["loss"]
    assert json.loads((tmp_path / "loaded_loss.json").read_text())["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
