"""Checkpoint worker, launched by torchrun from tests/test_checkpoint.py (not collected by pytest).

Trains a pipeline- or data-parallel plan for 2 AdamW steps, saves ``pm.state_dict()``
(original names) with torch.distributed.checkpoint, then computes the next step's loss and
writes it beside the checkpoint, so that the test can load the checkpoint into the
single-device model and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(__file__))
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
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build(args.model)
    data = batches()
    pm = partc.compile(model, partc.Cluster.preset("cpu", devices_per_node=dist.get_world_size()), data[0][0], loss_fn=loss_fn, mesh=json.loads(args.mesh))
    held = list(pm.parameters())
    optimizer = torch.optim.AdamW(held, lr=LR) if held else None
    for inputs, targets in data[:2]:
        if optimizer:
            optimizer.zero_grad()
        pm.step(inputs, targets)
        if optimizer:
            optimizer.step()
    dcp.save(pm.state_dict(), checkpoint_id=os.path.join(args.out, "checkpoint"))
    next_loss = pm.step(*data[2])
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "next_loss.json"), "w") as f:
            json.dump({"loss": next_loss.item()}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
