"""A loss "mean" over padded targets is the mean over the whole global batch, whatever the
microbatches and replicas: gloo parity against the single-device model, as real processes
(tests/distributed/parity_worker.py; one torchrun launch per world size).

torch's ``reduction="mean"`` of ``cross_entropy`` / ``nll_loss`` over class indices divides
the summed loss by the batch's normaliser: the number of targets that are not
``ignore_index``, or the sum of their class weights. Averaging the means of microbatches
or replicas that keep different numbers of targets is not that mean. The targets here are
padded unevenly (parity_worker.pad_unevenly: the first microbatch of 4 keeps no target at
all), so every case fails unless partc divides by the whole batch's normaliser:
a traced loss (``loss_in_graph``: compile's ``example_targets``) over DDP, FSDP2, a 1F1B
pipeline, gradient accumulation, tensor parallelism with data parallelism, and a model
that computes a class-weighted cross entropy itself (also captured by torch.export, whose
graph holds ``aten.cross_entropy_loss``); a loss_fn calling an ``nn.CrossEntropyLoss`` with
class weights (``weighted_loss_module``: its weights lifted into the graph); and the documented recipe for an
untraced loss (``global_count_loss``: ``loss_reduction="sum"``, divided by the caller's
global count). Each checks the loss, every gradient, and the parameters after 3 AdamW
steps on every rank.
"""

from __future__ import annotations

import pytest

from parity import case_key, run_parity, skip_if_refused

TRACED = {"loss_in_graph": True, "padded_targets": True}
TP_PAYS = "tp-test:1e10"  # devices slow enough that tensor parallelism shards (test_parity.TP_PAYS); slower still, the loss too
CASES = {
    2: [
        # the user's module with loss_fn alone rewritten (FSDP2: a unit per block)
        {"model": "gpt", "mesh": {"dp": 2}, "data_parallel": "ddp", "runs_user_model": True, **TRACED},
        {"model": "gpt", "mesh": {"dp": 2}, "data_parallel": "fsdp", "runs_user_model": True, **TRACED},
        {"model": "gpt", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 0, "runs_user_model": True, **TRACED},  # ReplicaRunner's accumulation
        {"model": "gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4, **TRACED},
        {"model": "tagger-weighted", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 0, **TRACED},
        # torch.export's aten.cross_entropy_loss, in FSDP2's replicas and in a pipeline's last stage
        {"model": "tagger-weighted", "mesh": {"dp": 2}, "data_parallel": "fsdp", "frontend": "export", **TRACED},
        {"model": "tagger-weighted", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4, "frontend": "export", **TRACED},
        # loss_fn calling an nn.CrossEntropyLoss with class weights: its weights lifted into the graph
        {"model": "gpt", "mesh": {"dp": 2}, "data_parallel": "fsdp", "runs_user_model": True, "weighted_loss_module": True, **TRACED},
        {"model": "gpt", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 0, "weighted_loss_module": True, **TRACED},
        {"model": "gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4, "weighted_loss_module": True, **TRACED},
        {"model": "gpt", "mesh": {"dp": 2}, "microbatches": 2, "zero_stage": 0, "padded_targets": True, "global_count_loss": True},
        {"model": "gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4, "padded_targets": True, "global_count_loss": True},
    ],
    4: [
        # dp x tp with each lowering of the loss under tensor parallelism (the worker checks which)
        {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "data_parallel": "ddp", "loss_strategy": "replicate", **TRACED},
        {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": "tp-test:1e9", "microbatches": 2, "zero_stage": 0, "loss_strategy": "vocab_parallel", **TRACED},
        {"model": "tagger-weighted", "mesh": {"dp": 2, "tp": 2}, "cluster": "tp-test:1e8", "microbatches": 2, "zero_stage": 0, "loss_strategy": "batch_parallel", **TRACED},
        {"model": "gpt", "mesh": {"pp": 2, "dp": 2}, "schedule": "1f1b", "microbatches": 2, "data_parallel": "fsdp", **TRACED},
        {"model": "gpt", "mesh": {"dp": 2, "tp": 2}, "cluster": TP_PAYS, "data_parallel": "ddp", "weighted_loss_module": True, **TRACED},
    ],
}


@pytest.fixture(scope="module")
def verdicts():
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("world, case", [(w, c) for w in CASES for c in CASES[w]], ids=lambda v: v if isinstance(v, int) else "-".join(f"{k}={v}" for k, v in v.items()))
def test_mean_over_the_global_batch(world, case, verdicts):
    skip_if_refused(case)
    if world not in verdicts:
        verdicts[world] = run_parity(CASES[world], nproc=world, timeout=400)
    ranks = verdicts[world].get(case_key(case), [])
    assert len(ranks) == world, f"only {len(ranks)} of {world} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
