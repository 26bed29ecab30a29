"""Mixed precision at run time: the precision the plan priced is the precision that runs.

A plan made with ``mixed_precision="bf16"`` prices matmuls in bf16 with fp32 master
weights; the runtime then runs every forward (and the loss) under
``torch.autocast(device, torch.bfloat16)``: matmuls and convolutions in bf16, softmax,
normalisations and losses in fp32 as autocast's op lists decide; parameters, gradients
and optimizer state stay fp32. Backward follows the dtypes forward recorded.

Pipeline stages send what the plan recorded: a stage's outputs are cast back to the
dtypes of the trace (``StageModule.output_specs``) at the end of the stage, so torch's
pipeline stages receive (and, before torch 2.13, validate) the shapes and dtypes they were
given up front; the last stage's logits too, which the loss would take to fp32 anyway. (A bf16 boundary
would halve the transfer; not done yet.)

fp16 needs loss scaling, which would reach into the user's optimizer step; it is refused
at run time (the planner can still price it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.fx as fx

from partc.errors import ErrorContext, PartcError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(options: dict) -> torch.dtype | None:
    """The autocast dtype of a plan's options (``plan.options``), None without mixed precision."""
    name = options.get("mixed_precision")
    if name is None:
        return None
    dtype = _DTYPES.get(name)
    if dtype is not torch.bfloat16:
        raise PartcError(
            f"mixed_precision={name!r} cannot run yet: fp16 needs loss scaling (torch.amp.GradScaler) around your optimizer step",
            ErrorContext(pass_name="runtime", fix='use mixed_precision="bf16", or plan with fp16 and run the model in your own loop'),
        )
    return dtype


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` in ``dtype``; nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def cast_outputs_to_trace(stage_module: fx.GraphModule, dtypes: list[torch.dtype]) -> None:
    """Rewrite a stage so that it returns its tensors in ``dtypes`` (the trace's), in order
    of its flattened outputs; a tensor autocast left in another dtype is cast at the end."""
    graph = stage_module.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = iter(dtypes)

    def cast(node: fx.Node) -> fx.Node:
        dtype = next(values, None)
        if dtype is None or not dtype.is_floating_point:
            return node
        with graph.inserting_before(output):
            return graph.call_method("to", (node, dtype))

    output.args = (fx.node.map_arg(output.args[0], cast),)
    graph.lint()
    stage_module.recompile()
