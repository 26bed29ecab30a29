"""Numerical parity of compiled plans against the single-device model, as real processes on gloo.

Each world size runs all its cases in one torchrun launch (tests/distributed/
parity_worker.py); every rank checks the loss of 3 AdamW steps, every gradient it holds
(by original name) and every parameter after the steps, fp32, rtol 1e-5 / atol 1e-6,
and that the ranks' state-dict keys together are the model's.
"""

from __future__ import annotations

import pytest

from parity import case_key, run_parity

MODELS = ("gpt", "gpt-tied", "llama", "skip")  # tied embedding/LM head; GQA; a skip across stages
PIPELINE_SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 2))


def _cases(world: int) -> list[dict]:
    cases = [
        {"model": model, "mesh": {"pp": world}, "schedule": schedule, "virtual_stages": virtual, "microbatches": microbatches}
        for model in MODELS
        for (schedule, virtual), microbatches in zip(PIPELINE_SCHEDULES, (4, 8, 4, 8) if world == 2 else (8, 4, 4, 8))
    ]
    # The loss traced into the graph: the targets enter at stage 0 and are routed to the last.
    cases += [
        {"model": "gpt-tied", "mesh": {"pp": world}, "schedule": "1f1b", "microbatches": 4, "loss_in_graph": True},
        {"model": "llama", "mesh": {"pp": world}, "schedule": "interleaved", "virtual_stages": 2, "microbatches": 4, "loss_in_graph": True},
    ]
    cases += [{"model": model, "mesh": {"dp": world}} for model in ("gpt-tied", "llama")]
    # Tensor parallel through partc.compile (the codegen's own matrix is tests/test_tp_parity.py).
    cases += [
        {"model": "gpt", "mesh": {"tp": world}, "cluster": "tp-test"},
        {"model": "gpt-tied", "mesh": {"tp": world}, "cluster": "tp-test", "loss_in_graph": True},
    ]
    if world == 4:  # two kinds at once on a 2-D mesh
        cases += [
            {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "data_parallel": "ddp"},
            {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "data_parallel": "fsdp"},
            {"model": "llama", "mesh": {"pp": 2, "tp": 2}, "cluster": TP_PAYS, "schedule": "1f1b", "microbatches": 2},
            {"model": "gpt-tied", "mesh": {"pp": 2, "dp": 2}, "schedule": "1f1b", "microbatches": 2, "data_parallel": "fsdp"},
            {"model": "gpt-tied", "mesh": {"pp": 2, "dp": 2}, "schedule": "interleaved", "virtual_stages": 2, "microbatches": 2, "data_parallel": "ddp"},
        ]
    return cases


# Devices slow enough (10 GFLOP/s) that the search's sharding, priced at one sample, shards.
TP_PAYS = "tp-test:1e10"
# The 3-D case: dp=2, tp=2, pp=2 on 8 processes, on DDP and on FSDP2 over "dp".
HYBRID_CASES = [
    {"model": "gpt-tied", "mesh": {"pp": 2, "dp": 2, "tp": 2}, "cluster": TP_PAYS, "schedule": "1f1b", "microbatches": 2, "data_parallel": "ddp"},
    {"model": "gpt-tied", "mesh": {"pp": 2, "dp": 2, "tp": 2}, "cluster": TP_PAYS, "schedule": "1f1b", "microbatches": 2, "data_parallel": "fsdp"},
]
CASES = {world: _cases(world) for world in (2, 4)} | {8: HYBRID_CASES}


@pytest.fixture(scope="module")
def verdicts():
    return {}


def _verdict(verdicts: dict, world: int, case: dict) -> list[dict]:
    if world not in verdicts:
        verdicts[world] = run_parity(CASES[world], nproc=world)
    return verdicts[world].get(case_key(case), [])


@pytest.mark.slow
@pytest.mark.parametrize("world, case", [(w, c) for w in CASES for c in CASES[w]], ids=lambda v: v if isinstance(v, int) else "-".join(f"{k}={v}" for k, v in v.items()))
def test_parity(world, case, verdicts):
    ranks = _verdict(verdicts, world, case)
    assert len(ranks) == world, f"only {len(ranks)} of {world} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
