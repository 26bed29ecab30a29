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


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"pp": 2}, {"dp": 2}], ids=["pp2", "dp2"])
def test_checkpoint_loads_into_single_device_model_and_reproduces_next_loss(tmp_path, mesh):
    from checkpoint_worker import batches
    from parity_worker import build, loss_fn

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(WORKER), "--mesh", json.dumps(mesh), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = build("gpt-tied")
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoint"))
    model.load_state_dict(state)
    inputs, targets = batches()[2]
    expected = json.loads((tmp_path / "next_loss.json").read_text())["loss"]
    assert loss_fn(model(inputs), targets).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
