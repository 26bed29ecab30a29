"""Launch the parity worker under torchrun and collect its per-case, per-rank verdicts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS

WORKER = Path(__file__).parent / "distributed" / "parity_worker.py"


def refused_here(case: dict) -> str | None:
    """Why partc refuses ``case`` by design on this torch, with a PartcError that says so;
    None when it runs. Before torch 2.13, pipelining cannot send a tensor that needs no
    gradient across a cut: no zero_bubble schedule, no pipeline with the loss (and so the
    targets) traced into the graph."""
    if not PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS:
        return None
    if case.get("schedule") == "zero_bubble":
        return "the zero_bubble schedule needs torch >= 2.13"
    if case.get("loss_in_graph") and case.get("mesh", {}).get("pp", 1) > 1:
        return "a pipeline with the loss traced into the graph (targets cross a cut) needs torch >= 2.13"
    return None


def skip_if_refused(case: dict) -> None:
    reason = refused_here(case)
    if reason is not None:
        pytest.skip(f"refused on torch < 2.13 by design: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_parity(cases: list[dict], nproc: int, timeout: float = 600, worker: Path = WORKER, nnodes: int = 1) -> dict[str, list[dict]]:
    """Run every case in one torchrun launch of ``worker`` on ``nproc`` processes in all;
    return {case key: [one verdict per rank]}. ``nnodes > 1`` starts that many torchrun
    agents on 127.0.0.1 (``--nnodes``/``--node-rank``), each with ``nproc / nnodes`` processes,
    as a multi-node job would be started on each machine. Cases this torch refuses by design
    (:func:`refused_here`) are left out: their tests skip (:func:`skip_if_refused`)."""
    cases = [case for case in cases if refused_here(case) is None]  # a refused case would end the launch
    port = free_port()
    with tempfile.TemporaryDirectory() as reports:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        agents = [
            subprocess.Popen(
                [
                    sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node),
                    "--nproc-per-node", str(nproc // nnodes), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    str(worker), "--cases", json.dumps(cases), "--report-dir", reports,
                ],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )
            for node in range(nnodes)
        ]
        try:
            outputs = [agent.communicate(timeout=timeout) for agent in agents]
        finally:
            for agent in agents:
                agent.kill()
        lines = [line for path in sorted(Path(reports).glob("*.jsonl")) for line in path.read_text().splitlines()]
    verdicts: dict[str, list[dict]] = {}
    for line in lines:
        verdict = json.loads(line)
        verdicts.setdefault(case_key(verdict["case"]), []).append(verdict)
    if not verdicts:
        codes = [agent.returncode for agent in agents]
        raise RuntimeError(f"{worker.name} reported nothing (exit {codes}):\n{outputs[0][1][-4000:]}")
    return verdicts


def case_key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)
