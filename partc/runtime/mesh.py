"""This rank's place in the plan's 3-D mesh: pipeline x data x tensor parallel.

Ranks are laid out as Megatron-LM does, tensor parallel innermost::

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so the ``tp`` ranks of a group are consecutive (inside one node, where the fast link is,
as long as ``tp`` divides the devices per node, which the search requires) and the
pipeline dimension, which sends the least, crosses nodes first. The mesh is a
``torch.distributed.device_mesh.DeviceMesh`` with dimensions ``("pp", "dp", "tp")``; its
row-major order is exactly the formula above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from partc.errors import ErrorContext, PlanMismatchError


@dataclass(frozen=True)
class RankMesh:
    """The degrees, this rank's coordinates and the process group of each dimension."""

    pp: int
    dp: int
    tp: int
    pp_index: int
    dp_index: int
    tp_index: int
    device_mesh: Any  # DeviceMesh ("pp", "dp", "tp"), or None in a single process

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def group(self, dim: str) -> Any:
        """The process group of this rank along ``dim`` ("pp", "dp" or "tp")."""
        return self.device_mesh.get_group(dim)

    def submesh(self, dim: str) -> Any:
        """The 1-D DeviceMesh along ``dim`` (what ``fully_shard`` takes)."""
        return self.device_mesh[dim]

    def global_rank(self, pp_index: int, dp_index: int, tp_index: int) -> int:
        return (pp_index * self.dp + dp_index) * self.tp + tp_index

    def lines_along_pp(self) -> list[tuple[int, int]]:
        """Every (dp_index, tp_index): one pipeline of ranks each, in a fixed order."""
        return [(d, t) for d in range(self.dp) for t in range(self.tp)]


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a DTensor (FSDP2 shards parameters, gradients and checkpoints as them)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 kept it private
        from torch.distributed._tensor import DTensor
    return isinstance(x, DTensor)


def coordinates(rank: int, pp: int, dp: int, tp: int) -> tuple[int, int, int]:
    """(pp_index, dp_index, tp_index) of a global rank in the Megatron order."""
    return rank // (dp * tp), (rank // tp) % dp, rank % tp


def build_rank_mesh(pp: int, dp: int, tp: int, device_type: str) -> RankMesh:
    """The mesh of the current process group (every rank calls this, in the same order)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world != pp * dp * tp:
        raise PlanMismatchError(
            f"the plan needs {pp * dp * tp} ranks (pp={pp} x dp={dp} x tp={tp}) but the process group has {world}",
            ErrorContext(pass_name="runtime", fix=f"launch {pp * dp * tp} processes (torchrun --nnodes/--nproc-per-node), or plan for {world}"),
        )
    device_mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
    return RankMesh(pp, dp, tp, *coordinates(dist.get_rank(), pp, dp, tp), device_mesh)


def local_mesh(pp: int, dp: int, tp: int) -> RankMesh:
    """The mesh of one process that runs every stage itself (outside torchrun)."""
    return RankMesh(pp, dp, tp, 0, 0, 0, None)
