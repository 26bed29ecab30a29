"""State dicts that stand for the whole model, whatever the plan: what
``torch.distributed.checkpoint`` (DCP) saves and loads.

A rank of a plan holds pieces: a pipeline stage's tensors, a tensor-parallel slice, an
FSDP2 shard over "dp". :func:`whole_tensor_state` describes each of this rank's tensors
as the WHOLE tensor of the single-device model, under its original name, so that DCP
writes one checkpoint that the single-device model, or any other plan on any number of
ranks, loads:

* replicated tensors are plain tensors (DCP writes one copy);
* FSDP2 shards are DTensors over "dp", as FSDP2 made them;
* a tensor-parallel slice ``S(d)`` is a DTensor sharded on dim ``d`` over "tp", sharing the
  parameter's storage (loading writes straight into the parameter);
* what one DTensor placement cannot describe is gathered whole on the ranks that hold
  it: a fused projection cut in blocks (GPT's qkv: each rank has a slice of q, of k and
  of v), and a tensor-parallel slice that FSDP2 shards again over "dp". Gathering costs
  memory and time for large models; a strided placement would avoid it (not done yet);
* a table owned by one tensor-parallel rank (table-wise embedding sharding) is saved by
  its owner only.

:func:`load_whole_tensor_state` puts such a state dict, filled by ``dcp.load``, back into
this rank's tensors (slicing the whole tensors where this rank holds a piece).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

from partc.passes.layouts import Owned, Replicate, Shard, local_shard
from partc.runtime.collectives import _assemble
from partc.runtime.mesh import RankMesh, is_dtensor


def whole_tensor_state(state: Mapping[str, torch.Tensor], layouts: Mapping[str, Any], mesh: RankMesh | None) -> dict[str, torch.Tensor]:
    """``state``: this rank's tensors by original name. ``layouts``: the plan's
    ParameterSharding by name (empty without tensor parallelism)."""
    result: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        sharding = layouts.get(name)
        if sharding is None or isinstance(sharding.layout, Replicate) or mesh is None or mesh.tp == 1:
            result[name] = tensor
            continue
        local = tensor.full_tensor() if is_dtensor(tensor) else tensor  # FSDP2 over dp: the tp slice
        if isinstance(sharding.layout, Owned):
            if sharding.layout.rank == mesh.tp_index:
                result[name] = local
            continue
        if not isinstance(sharding.layout, Shard):
            raise NotImplementedError(f"{name}: no checkpoint rule for layout {sharding.layout}")
        if sharding.blocks == 1 and not is_dtensor(tensor):
            result[name] = _dtensor(local, mesh, sharding)
        else:
            pieces = [torch.empty_like(local) for _ in range(mesh.tp)]
            dist.all_gather(pieces, local.contiguous(), group=mesh.group("tp"))
            result[name] = _assemble(pieces, sharding.layout.dim, sharding.blocks)
    return result


def load_whole_tensor_state(targets: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], layouts: Mapping[str, Any], mesh: RankMesh | None) -> None:
    """Copy ``loaded`` (whole tensors, as :func:`whole_tensor_state` described them) into
    this rank's ``targets``. Entries ``loaded`` lacks are left alone (an owned table
    another rank saves)."""
    with torch.no_grad():
        for name, target in targets.items():
            if name not in loaded:
                continue
            value = loaded[name]
            if is_dtensor(value) and is_dtensor(target) and value.placements == target.placements:
                target.to_local().copy_(value.to_local())  # FSDP2 shard into the same shard
                continue
            whole = value.full_tensor() if is_dtensor(value) else value
            sharding = layouts.get(name)
            if sharding is not None and mesh is not None and mesh.tp > 1:
                whole = local_shard(whole, sharding.layout, mesh.tp_index, mesh.tp, sharding.blocks)
            if is_dtensor(target):  # FSDP2: this rank's chunk along dim 0 of the "dp" group
                target.to_local().copy_(whole.chunk(mesh.dp, dim=0)[mesh.dp_index])
            else:
                target.copy_(whole)


def _dtensor(local: torch.Tensor, mesh: RankMesh, sharding: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor import Shard as ShardPlacement

    shape = torch.Size(sharding.global_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh.submesh("tp"), [ShardPlacement(sharding.layout.dim)], run_check=False, shape=shape, stride=stride)
