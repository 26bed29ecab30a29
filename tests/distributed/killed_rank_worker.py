"""Torchrun worker for the catalogue's "rank killed mid-step" entry (not collected by pytest).

Two ranks run a compiled 2-stage pipeline on gloo with a short process-group timeout.
The first step completes; in the second, rank 1 dies (``os._exit``) as soon as one of its
modules runs forward, while rank 0 is sending it microbatches. Rank 0 must then fail on its
own, with an error, within the timeout: it writes what it caught and how long after the
start of that step to ``REPORT_DIR/survivor.json`` and exits non-zero.

    torchrun --nproc-per-node 2 tests/distributed/killed_rank_worker.py --report-dir DIR --timeout 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import partc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--timeout", type=float, required=True, help="process-group timeout, seconds")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 16), torch.randn(8, 16)
    pm = partc.compile(Net(), partc.Cluster.preset("cpu", devices_per_node=2), inputs, loss_fn=F.mse_loss, mesh={"pp": 2}, microbatches=4)
    pm.step(inputs, targets)  # a whole step first: the pipeline works

    def die(module, args):
        os._exit(17)

    if rank == 1:
        nn.modules.module.register_module_forward_pre_hook(die)
    started = time.monotonic()
    try:
        pm.step(inputs, targets)
    except Exception as e:
        with open(os.path.join(args.report_dir, "survivor.json"), "w") as report:
            json.dump({"rank": rank, "error": f"{type(e).__name__}: {e}"[:2000], "seconds": time.monotonic() - started}, report)
        raise
    return 0  # reached only if the step finished although rank 1 died


if __name__ == "__main__":
    sys.exit(main())
