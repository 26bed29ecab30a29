"""Zoo parity worker, launched by torchrun from tests/test_zoo.py (not collected by pytest).

For each row of tests/zoo_matrix.py every rank builds the registry model with the same
seed (``partc.models.training_case``), compiles it for the row's mesh and trains it for
3 AdamW steps beside a single-device copy (tests/distributed/harness.py
``train_and_compare``: loss, gradients, parameters and buffers, fp32, rtol 1e-5 / atol 1e-6).

    torchrun --nproc-per-node 2 tests/distributed/zoo_worker.py --report-dir /tmp/r \
        --cases '[{"model": "gpt-tiny", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4}]'

Each verdict also carries the row's figures for docs/models.md: ``max_abs_error`` (the
largest difference seen, over every compared tensor) and ``params``.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/, for zoo_matrix

import partc
from harness import case_cluster, serve, train_and_compare, whole_batch_step
from partc.models import num_params, training_case
from partc.runtime.pipeline import split_microbatches
from zoo_matrix import BATCH_SIZE, SEQ_LEN

COMPILE_OPTIONS = ("mesh", "microbatches", "schedule", "virtual_stages")


def microbatch_step(replicas: int, microbatches: int):
    """The reference step for ``"reference": "microbatches"`` (the BatchNorm contract of
    partc/models/cnn.py): the global batch is cut into ``replicas`` data-parallel slices
    and each slice into ``microbatches``; every chunk runs forward and backward in order,
    its loss divided by the chunk count (gradient accumulation), and the loss is their sum.
    Buffers written in forward (running statistics) evolve per replica from the same start,
    one microbatch after another, and end as their mean over the replicas."""

    def step(reference, inputs, targets, loss_fn):
        chunks = replicas * microbatches
        input_chunks = [split_microbatches(x, chunks, what="reference inputs") for x in inputs]
        target_chunks = split_microbatches(targets, chunks, what="reference targets")
        buffers = dict(reference.named_buffers())
        start = {name: b.clone() for name, b in buffers.items()}
        ends: list[dict[str, torch.Tensor]] = []
        total = torch.zeros(())
        for replica in range(replicas):
            for name, b in buffers.items():
                b.copy_(start[name])
            for i in range(replica * microbatches, (replica + 1) * microbatches):
                loss = loss_fn(reference(*(c[i] for c in input_chunks)), target_chunks[i]) / chunks
                loss.backward()
                total = total + loss.detach()
            ends.append({name: b.clone() for name, b in buffers.items()})
        for name, b in buffers.items():
            stacked = torch.stack([end[name] for end in ends])
            b.copy_(stacked.mean(0) if b.is_floating_point() else stacked.sum(0) // replicas)
        return total

    return step


def run_case(row: dict) -> dict:
    torch.manual_seed(0)
    case = training_case(row["model"], batch_size=row.get("batch_size", BATCH_SIZE), seq_len=row.get("seq_len", SEQ_LEN), device="cpu")
    reference = copy.deepcopy(case.model)
    options = {key: row[key] for key in COMPILE_OPTIONS if key in row}
    cluster = case_cluster(row.get("cluster"), dist.get_world_size())
    pm = partc.compile(case.model, cluster, case.inputs, loss_fn=case.loss_fn, **options)
    if row["mesh"].get("tp", 1) > 1 and not any(str(p.layout) != "R" for p in pm.plan.sharding.parameters.values()):
        return {"failures": ["the tensor-parallel plan shards nothing: the row would test nothing"]}
    step = whole_batch_step
    if row.get("reference") == "microbatches":
        step = microbatch_step(row["mesh"].get("dp", 1), pm.plan.microbatches)
    # Every layout reorders some floating-point sums (data-parallel gradient averaging,
    # row-parallel partial sums, microbatch accumulation); AdamW at eps 1e-8 turns the
    # rounding of a near-zero gradient (~1e-9) into a parameter difference above ATOL
    # (measured: 4e-6 on encdec-tiny at dp=2, whose gradients all agree). At eps 1e-6 the
    # amplification is 25; a wrong gradient still moves a parameter by ~lr = 1e-4, and the
    # gradients themselves are compared every step.
    result = train_and_compare(pm, reference, case.inputs, case.targets, case.loss_fn, reference_step=step, eps=1e-6)
    return {"failures": result.failures, "max_abs_error": result.max_abs_error, "params": num_params(reference)}


def main() -> int:
    return serve(run_case, cases_help="a JSON list of rows of tests/zoo_matrix.py")


if __name__ == "__main__":
    sys.exit(main())
