"""The one exception family of partc.

Every error a user can cause is a :class:`PartcError`. Messages follow one shape so that
they can be read (and matched in tests) the same way everywhere::

    <what went wrong>
      pass:   capture
      node:   %gt : [num_users=1] = call_function[target=operator.gt](args = (%sum_1, 0))
      module: blocks.3.attn
      source: model.py:42  if x.sum() > 0:
      fix:    <what to change>
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErrorContext:
    """Where an error happened; every field is optional and printed when known."""

    pass_name: str | None = None
    node: str | None = None  # fx node, as node.format_node() prints it
    module: str | None = None  # qualified name of the owning nn.Module
    source: str | None = None  # "file.py:LINE  code" of the user's source
    fix: str | None = None  # what the user should change

    def lines(self) -> list[str]:
        fields = [
            ("pass", self.pass_name),
            ("node", self.node),
            ("module", self.module if self.module != "" else "<root module>"),
            ("source", self.source),
            ("fix", self.fix),
        ]
        return [f"  {key + ':':8}{value}" for key, value in fields if value is not None]


class PartcError(Exception):
    """Base class of every error partc raises on bad input or an impossible request."""

    def __init__(self, message: str, context: ErrorContext | None = None):
        self.message = message
        self.context = context or ErrorContext()
        super().__init__("\n".join([message, *self.context.lines()]))


class TraceError(PartcError):
    """Neither torch.fx nor torch.export could capture the model."""


class UnsupportedOpError(PartcError):
    """An operator the pass cannot handle correctly."""


class ClusterError(PartcError):
    """An invalid cluster description (bad numbers, unknown preset, bad JSON)."""


class InfeasiblePlanError(PartcError):
    """No plan fits the memory budget; the message says what would fit."""


class PlanMismatchError(PartcError):
    """A plan that does not belong to this model, cluster or version."""


class SolverError(PartcError):
    """The ILP solver is missing, failed, or returned no usable solution."""
