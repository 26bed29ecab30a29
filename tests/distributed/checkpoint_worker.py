"""Checkpoint worker, launched by torchrun from tests/test_checkpoint.py (not collected by pytest).

Save mode: trains a plan for 2 AdamW steps, saves ``pm.state_dict()`` (original names,
whole tensors) with torch.distributed.checkpoint, then computes the next step's loss and
writes it beside the checkpoint, so that the test can load the checkpoint into the
single-device model, or into another plan (``--load``), and compare.

Load mode (``--load``): compiles the model (fresh weights) with another plan, loads the
checkpoint into it with ``dcp.load`` + ``pm.load_state_dict`` and writes the next step's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))
from harness import case_cluster  # noqa: E402
from parity_worker import BATCH, LR, SEQ, VOCAB, build, loss_fn  # noqa: E402

import partc  # noqa: E402


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator), torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)) for _ in range(3)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt-tied")
    parser.add_argument("--mesh", required=True, help='JSON, e.g. {"pp": 2}')
    parser.add_argument("--out", required=True)
    parser.add_argument("--cluster", default=None, help="a cluster kind of harness.case_cluster (tp-test:1e10 makes tensor parallelism shard)")
    parser.add_argument("--data-parallel", default=None, help="ddp or fsdp")
    parser.add_argument("--load", action="store_true", help="load the checkpoint in --out instead of training and saving")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0 if not args.load else 99)  # loading: every weight must come from the checkpoint
    model = build(args.model)
    data = batches()
    cluster = case_cluster(args.cluster, dist.get_world_size())
    options = dict(mesh=json.loads(args.mesh), data_parallel=args.data_parallel)
    if len([d for d in options["mesh"].values() if d > 1]) > 1:
        options.update(schedule="1f1b", microbatches=2)
    pm = partc.compile(model, cluster, data[0][0], loss_fn=loss_fn, **options)
    if args.load:
        state = pm.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(args.out, "checkpoint"))
        pm.load_state_dict(state)
        _write_loss(pm.step(*data[2]), os.path.join(args.out, "loaded_loss.json"))
        return _finish()
    held = list(pm.parameters())
    optimizer = torch.optim.AdamW(held, lr=LR) if held else None
    for inputs, targets in data[:2]:
        if optimizer:
            optimizer.zero_grad()
        pm.step(inputs, targets)
        if optimizer:
            optimizer.step()
    dcp.save(pm.state_dict(), checkpoint_id=os.path.join(args.out, "checkpoint"))
    _write_loss(pm.step(*data[2]), os.path.join(args.out, "next_loss.json"))
    return _finish()


def _finish() -> NoReturn:
    """Leave without the interpreter's teardown: once in ~6 loaded runs a rank aborted there
    ("terminate called without an active exception", after every result was written and
    every rank had passed the last barrier), which torchrun reports as a failed job."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_loss(loss: torch.Tensor, path: str) -> None:
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump({"loss": loss.item()}, f)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
