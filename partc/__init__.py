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
