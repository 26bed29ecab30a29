"""Numerical parity of compiled plans against the single-device model, as real processes on gloo.

Each world size runs all its cases in one torchrun launch (tests/distributed/
parity_worker.py); every rank checks the loss of 3 AdamW steps, every gradient it holds
(by original name) and every parameter after the steps, fp32, rtol 1e-5 / atol 1e-6,
and that the ranks' state-dict keys together are the model's.
"""

from __future__ import annotations

import pytest

from parity import case_key, run_parity, skip_if_refused

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
    # One plan everywhere: a rank whose model differs from rank 0's makes every rank fail, none hangs
    cases += [{"model": "gpt", "mesh": {"pp": world}, "other_ranks_model": "llama"}]
    # FSDP2 over the user's model: one unit per block, the tied embedding with the root
    cases += [{"model": model, "mesh": {"dp": world}, "data_parallel": "fsdp"} for model in ("gpt-tied", "llama")]
    # gradient accumulation without a pipeline: 2 microbatches per replica, one gradient sync (DDP, FSDP2)
    cases += [{"model": "gpt-tied", "mesh": {"dp": world}, "microbatches": 2, "zero_stage": zero} for zero in (0, 3)] if world == 2 else []
    # DDP communication hooks: close to the exact gradients, not equal (see parity_worker.compressed_gradients)
    cases += [{"model": "gpt", "mesh": {"dp": world}, "gradient_compression": kind} for kind in ("fp16", "powersgd")] if world == 2 else []  # bf16 needs NCCL
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
            # activation recomputation (each layer under torch.utils.checkpoint), with ZeRO-3 and tensor parallelism
            {"model": "llama", "mesh": {"pp": 2, "dp": 2}, "schedule": "1f1b", "microbatches": 2, "recompute": True, "zero_stage": 3},
            {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "recompute": True, "zero_stage": 0},
            # mixed precision: forward and loss under bf16 autocast, fp32 weights (bf16 tolerances)
            {"model": "gpt", "mesh": {"pp": 2, "dp": 2}, "schedule": "1f1b", "microbatches": 2, "mixed_precision": "bf16"},
            {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "mixed_precision": "bf16"},
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
    skip_if_refused(case)
    ranks = _verdict(verdicts, world, case)
    assert len(ranks) == world, f"only {len(ranks)} of {world} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures


# Two torchrun agents on 127.0.0.1 (--nnodes 2 --nproc-per-node 2), as on two machines: the
# cluster has 2 nodes of 2 devices with a slower link between them; tensor parallelism
# must sit inside a node (the worker checks its group's torchrun node ranks).
MULTI_NODE_CASES = [
    {"model": "gpt-tied", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "nodes": 2},
    {"model": "llama", "mesh": {"pp": 2, "tp": 2}, "cluster": TP_PAYS, "nodes": 2, "schedule": "1f1b", "microbatches": 2},
]


@pytest.mark.slow
def test_parity_across_two_torchrun_nodes():
    verdicts = run_parity(MULTI_NODE_CASES, nproc=4, nnodes=2)
    for case in MULTI_NODE_CASES:
        ranks = verdicts.get(case_key(case), [])
        assert len(ranks) == 4, f"{case}: only {len(ranks)} of 4 ranks reported"
        failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
        assert not failures, (case, failures)
