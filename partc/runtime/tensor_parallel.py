"""Running a tensor-parallel module: every rank of the group sees the whole batch.

The module comes from :func:`partc.passes.tp_codegen.emit_tensor_parallel`: its parameters
are this rank's slices and its code calls the collectives explicitly; its output (and the
loss, when traced into the graph) is whole and identical on every rank, and the gradients
it leaves are final. So the step is the single-device step: forward, loss, backward.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class TensorParallelRunner:
    def __init__(self, module: torch.nn.Module, *, loss_fn: Callable | None, device: torch.device):
        """loss_fn: applied to the output; None when the module's graph ends in the loss."""
        self.module = module.to(device)
        self.loss_fn = loss_fn
        self.loss_in_graph = loss_fn is None
        self.device = device

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.module(*(x.to(self.device) for x in inputs))

    def step(self, inputs: Sequence[torch.Tensor], targets: Any) -> torch.Tensor:
        targets = targets.to(self.device)
        if self.loss_in_graph:
            loss = self.module(*(x.to(self.device) for x in inputs), targets)
        else:
            loss = self.loss_fn(self.forward(*inputs), targets)
        loss.backward()
        return loss.detach()
