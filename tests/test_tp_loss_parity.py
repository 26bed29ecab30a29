"""Numerical parity of a batch-parallel loss against the single-device model, as real
processes on gloo (tests/distributed/tp_worker.py, 2 and 4 ranks: tp = world).

torch's "mean" of ``cross_entropy`` / ``nll_loss`` with class-index targets divides by the
number of kept targets (those not ``ignore_index``), or by the sum of their class weights;
label smoothing's term is divided by the same. Each case is a token classifier with
HF-style padded labels, more padding in the first half of the batch than in the second,
so every rank keeps a different number of targets (tp_worker.padded_labels); the planner
runs its loss batch-parallel (checked: the case fails on any other strategy). Every rank
checks the loss, every gradient and every parameter after 3 AdamW steps against the
single-device model, and the collectives run against the plan's (the normaliser's
all-reduce included). Cases: padding only, class weights, class weights with label
smoothing, ``nll_loss`` with class weights and ``ignore_index=0``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import case_key, run_parity
from tp_worker import LOSS_MODELS

WORKER = Path(__file__).parent / "distributed" / "tp_worker.py"
WORLDS = (2, 4)
# "fsdp": devices slow against their links, so the planner shards the loss over the samples.
CASES = [{"model": model, "cluster": "fsdp", "loss": "batch_parallel"} for model in LOSS_MODELS]


@pytest.fixture(scope="module")
def verdicts():
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"tp{w}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["model"])
def test_batch_parallel_loss_parity(world, case, verdicts):
    if world not in verdicts:
        verdicts[world] = run_parity(CASES, world, timeout=300, worker=WORKER)
    ranks = verdicts[world].get(case_key(case), [])
    assert len(ranks) == world, f"only {len(ranks)} of {world} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
