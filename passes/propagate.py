"""Propagate pass: shapes and dtypes of every node, from fake tensors.

An ``fx.Interpreter`` runs the captured graph under ``FakeTensorMode``: every parameter,
buffer and input is replaced by a fake tensor of the same shape, dtype and strides on the
CPU, so no weight is read and nothing the size of the model is allocated. A model built
under ``torch.device("meta")`` plans exactly like a real one. Each node's result is
written to ``node.meta["val"]`` (the convention torch.export uses); nothing else changes.

Tied parameters stay tied: one fake per distinct tensor object.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from partc.errors import TraceError
from partc.passes.ir import error_context


_ASSERT_METADATA = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
_ASSERT_METADATA = getattr(_ASSERT_METADATA, "default", None)


class _FakePropagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm)
        self.mode = mode
        self._fake_of: dict[int, torch.Tensor] = {}
        self.values: dict[fx.Node, Any] = {}

    def fake(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        key = id(value)
        if key not in self._fake_of:
            with self.mode:
                self._fake_of[key] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
        return self._fake_of[key]

    def get_attr(self, target, args, kwargs):
        return self.fake(super().get_attr(target, args, kwargs))

    def run_node(self, node: fx.Node) -> Any:
        if node.target is _ASSERT_METADATA:
            # export's checks pin the device it traced on (meta for a meta model); every
            # fake here lives on the CPU, and the dtype/shape facts are already in the graph.
            self.values[node] = None
            return None
        try:
            result = super().run_node(node)
        except Exception as e:  # noqa: BLE001 - re-raised with the node that failed
            raise TraceError(
                f"shape propagation failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                error_context(
                    node,
                    "propagate",
                    fix="check that example_inputs have the shapes and dtypes forward() expects; "
                    "operators whose output shape depends on tensor values (nonzero, .item()) are not supported yet",
                ),
            ) from e
        self.values[node] = result
        return result


def fake_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    """Every node's value (fake tensors, or Python values such as sizes) for these inputs."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    interpreter = _FakePropagator(gm, mode)
    fake_inputs = [interpreter.fake(x) for x in example_inputs]
    with mode, torch.no_grad():
        interpreter.run(*fake_inputs)
    return interpreter.values


def propagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Write ``node.meta["val"]`` (a fake tensor, or a tuple of them) on every node of ``gm``."""
    for node, value in fake_values(gm, example_inputs).items():
        node.meta["val"] = value
    return gm
