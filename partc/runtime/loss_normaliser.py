"""The normaliser of a loss taken over the whole global batch, set before each step.

A ``cross_entropy`` / ``nll_loss`` "mean" over class indices divides its sum by the
number of kept targets (or their class-weight sum) of the whole batch. When the step runs
in pieces (microbatches, data-parallel replicas), :mod:`partc.passes.global_mean` rewrites
the module that computes the loss to sum and divide by its buffer
:data:`NORMALISER_BUFFER`, and gives the runner a :class:`GlobalLossNormaliser`. Before
each step the runner calls :meth:`~GlobalLossNormaliser.set_batch` with the global batch
(every rank receives it whole): the buffer becomes the sum, over the pieces, of the
pass's counter graph (the nodes computing the loss's target, weight and ignore_index,
then :func:`partc.runtime.collectives.kept_target_normaliser`). No communication.

The counter reads the buffers it needs (class weights, a label map) from the module that
holds the loss at the time of the step, under their own names: that module's tensors are
the ones moved to the device, loaded by ``load_state_dict`` or a checkpoint, not the
compile-time copies.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from partc.errors import ErrorContext, PartcError
from partc.runtime.mesh import is_dtensor
from partc.runtime.pipeline import split_microbatches

NORMALISER_BUFFER = "global_loss_normaliser"  # a non-persistent float64 buffer of the loss's module
PASS_NAME = "global_mean"


class GlobalLossNormaliser:
    """Sets ``holder``'s :data:`NORMALISER_BUFFER` to the global batch's normaliser."""

    def __init__(self, counter: fx.GraphModule, pieces: int, holder: nn.Module, state: nn.Module | None = None):
        """counter: one piece's graph inputs (the graph's order: inputs, then targets) -> its
        normaliser. pieces: microbatches times replicas. holder: the rewritten module that
        divides by the buffer and holds, under the same names, the state the counter reads;
        when holder is loss_fn alone, ``state`` (the user's model) holds what the counter
        reads from the model, and holder what loss_fn itself holds (its lifted constants)."""
        self.counter, self.pieces, self.holder = counter, pieces, holder
        self.state = holder if state is None else state
        self.state_names = [str(n.target) for n in counter.graph.nodes if n.op in ("get_attr", "call_module")]
        placeholders = [n for n in counter.graph.nodes if n.op == "placeholder"]
        self.used_inputs = [i for i, n in enumerate(placeholders) if n.users]  # the others are not read
        for name in self.state_names:
            self._holder_state(name)  # a clear error at compile time, not at the first step

    def _holder_state(self, name: str) -> Any:
        value = None
        for owner in dict.fromkeys((self.state, self.holder)):  # the model's tensors, then loss_fn's own
            try:
                value = operator.attrgetter(name)(owner)
                break
            except AttributeError:
                continue
        if value is None or is_dtensor(value):
            raise PartcError(
                f"the loss's targets or class weights are computed from {name!r}, which the module computing the loss"
                f" ({type(self.state).__name__}) {'shards' if value is not None else 'does not hold'}: partc cannot count the global batch's kept targets",
                ErrorContext(
                    pass_name=PASS_NAME,
                    fix="register class weights and label tables as buffers used by the loss, or trace no loss and divide a summed loss yourself (loss_reduction='sum')",
                ),
            )
        return value

    def set_batch(self, graph_inputs: Sequence[Any]) -> None:
        """Set the normaliser to the whole global batch's, from its inputs (and targets) in
        the graph's order."""
        buffer = self.holder.get_buffer(NORMALISER_BUFFER)
        for name in self.state_names:  # the holder's tensors now (moved, loaded), not compile time's
            *path, attribute = name.split(".")
            setattr(self.counter.get_submodule(".".join(path)), attribute, self._holder_state(name))
        pieces = []
        for i, x in enumerate(graph_inputs):
            if i in self.used_inputs and isinstance(x, torch.Tensor):
                x = x.to(buffer.device).clone()  # the counter may write into its inputs (labels[mask] = -100)
            pieces.append(split_microbatches(x, self.pieces, what="the global batch"))
        try:
            with torch.no_grad():
                total = sum(self.counter(*(chunks[k] for chunks in pieces)) for k in range(self.pieces))
        except Exception as e:  # noqa: BLE001 (the user's tensor code, run on the whole batch)
            raise PartcError(
                f"counting the global batch's kept targets failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                ErrorContext(
                    pass_name=PASS_NAME,
                    fix="pass a global batch shaped like example_inputs and example_targets, or trace no loss and divide a summed loss yourself (loss_reduction='sum')",
                ),
            ) from e
        buffer.copy_(total)
