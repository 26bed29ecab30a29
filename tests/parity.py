"""Launch the parity worker under torchrun and collect its per-case, per-rank verdicts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).parent / "distributed" / "parity_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_parity(cases: list[dict], nproc: int, timeout: float = 600, worker: Path = WORKER) -> dict[str, list[dict]]:
    """Run every case in one torchrun launch of ``worker``; return {case key: [one verdict per rank]}."""
    with tempfile.TemporaryDirectory() as reports:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            str(worker), "--cases", json.dumps(cases), "--report-dir", reports,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [line for path in sorted(Path(reports).glob("*.jsonl")) for line in path.read_text().splitlines()]
    verdicts: dict[str, list[dict]] = {}
    for line in lines:
        verdict = json.loads(line)
        verdicts.setdefault(case_key(verdict["case"]), []).append(verdict)
    if not verdicts:
        raise RuntimeError(f"{worker.name} reported nothing (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return verdicts


def case_key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)
