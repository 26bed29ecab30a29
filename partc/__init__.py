"""partc: an automatic hybrid-parallelism compiler for PyTorch."""

from partc.cluster import Cluster, DeviceSpec, Link, NodeSpec
from partc.errors import (
    ClusterError,
    InfeasiblePlanError,
    PartcError,
    PlanMismatchError,
    SolverError,
    TraceError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

from partc.plan import Plan  # noqa: E402  (after the light imports above)
from partc.planner import plan  # noqa: E402
from partc.compiler import ParallelModule, compile  # noqa: E402

__all__ = [
    "Cluster",
    "ClusterError",
    "DeviceSpec",
    "InfeasiblePlanError",
    "Link",
    "NodeSpec",
    "ParallelModule",
    "PartcError",
    "Plan",
    "PlanMismatchError",
    "SolverError",
    "TraceError",
    "UnsupportedOpError",
    "compile",
    "plan",
]
