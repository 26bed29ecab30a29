"""Data parallelism on DistributedDataParallel: each rank runs the model on its slice.

The global batch is split along dim 0 over the ranks in order. DDP averages gradients;
with ``loss_reduction="mean"`` that is exactly the gradient of the mean loss over the
global batch, and the returned loss is the mean of the ranks' losses. With ``"sum"`` the
local loss is scaled by the world size before backward, so the averaged gradients equal
the gradient of the summed loss, and the returned loss is the sum.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from partc.runtime.pipeline import split_microbatches


class DataParallelRunner:
    def __init__(self, model: nn.Module, *, loss_fn: Callable, loss_reduction: str, device: torch.device):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.loss_fn, self.reduction, self.device = loss_fn, loss_reduction, device
        model.to(device)
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def _local(self, value: Any) -> Any:
        return split_microbatches(value, self.size, what="the data-parallel batch")[self.rank].to(self.device) if isinstance(value, torch.Tensor) else value

    def forward(self, *inputs: torch.Tensor) -> Any:
        """The full output: every rank's slice, gathered in rank order."""
        local = self.ddp.module(*(self._local(x) for x in inputs))
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local.contiguous())
        return torch.cat(pieces)

    def step(self, inputs: Sequence[torch.Tensor], targets: Any) -> torch.Tensor:
        loss = self.loss_fn(self.ddp(*(self._local(x) for x in inputs)), self._local(targets))
        (loss * self.size if self.reduction == "sum" else loss).backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total / self.size if self.reduction == "mean" else total
