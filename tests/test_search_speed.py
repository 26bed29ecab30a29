"""Planning speed-ups return exactly the plans they replace (issue #5).

Building a sharding plan prices each repeated layer's nodes and each conversion once
(passes/sharding.py, PRICE_REPEATS_ONCE). With the flag off it prices every node and use
again and adds MemoryBreakdowns node by node, as before the speed-up. The GPT-3-shaped
models of bench/search_plan.py (12 and 96 layers, 8 x 8 H100, global batch 512) must give
the same SearchResult (best, candidates with their sharding plans and stage cuts,
rejections; wall times aside) and the same ShardingPlan at every tensor-parallel degree,
down to the last bit of every float.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from partc.passes import sharding
from partc.passes.search import _at_one_sample, search
from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS

from partc.cluster import Cluster
from partc.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import search_plan

_WALL_TIMES = {"seconds", "sharding_seconds", "one_sample_seconds", "solve_seconds", "plan_seconds"}


def canonical(obj):
    """``obj`` as nested tuples that compare equal only when every field is equal, floats
    by their exact bits (float.hex), wall-clock fields left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__name__,) + tuple(
            (f.name, None if f.name in _WALL_TIMES else canonical(getattr(obj, f.name))) for f in dataclasses.fields(obj)
        )
    if isinstance(obj, (dict, types.MappingProxyType)):
        return ("dict",) + tuple(sorted((repr(k), canonical(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(canonical(x) for x in obj)
    if isinstance(obj, (set, frozenset)):
        return ("set",) + tuple(sorted(repr(canonical(x)) for x in obj))
    if isinstance(obj, float):
        return float.hex(obj)
    if isinstance(obj, (int, str, type(None), enum.Enum, torch.dtype)):
        return obj
    raise TypeError(f"canonical() does not know {type(obj).__name__}")


def test_canonical_tells_the_last_bit_and_ignores_wall_times():
    @dataclasses.dataclass
    class Timed:
        value: float
        seconds: float

    assert canonical(Timed(0.1 + 0.2, 1.0)) == canonical(Timed(0.1 + 0.2, 9.0))
    assert canonical(Timed(0.1 + 0.2, 1.0)) != canonical(Timed(0.3, 1.0))


def bench_graph(layers: int, batch: int = 512) -> torch.fx.GraphModule:
    """bench/search_plan.py's annotated model and loss. On torch < 2.13 the model alone:
    its targets would cross every pipeline cut, which torch's pipelining cannot send
    there, and without pipelines no layout of the 96-layer model fits (nor would the
    comparison cover stage cuts)."""
    return search_plan.annotated(layers, batch, with_loss=not PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS)[0]


@pytest.mark.parametrize("layers", [12, 96])
def test_bench_models_plan_the_same_with_repeats_priced_once(layers, monkeypatch):
    cluster = Cluster.preset("h100", nodes=8, devices_per_node=8)
    gm = bench_graph(layers)

    def plans():
        result = search(gm, cluster, CostModel(cluster), batch_size=512, compute_dtype=search_plan.BF16)
        with _at_one_sample(gm):
            by_tp = {
                tp: sharding.plan_sharding(gm, CostModel(cluster), tp=tp, memory_limit=math.inf, compute_dtype=search_plan.BF16)
                for tp in (2, 4, 8)
            }
        return result, by_tp

    result, by_tp = plans()
    monkeypatch.setattr(sharding, "PRICE_REPEATS_ONCE", False)
    reference, reference_by_tp = plans()

    assert any(c.sharding is not None for c in result.candidates)  # the candidates carry sharding plans
    assert all(plan.reused_layers == layers - 1 for plan in by_tp.values())  # repeated blocks were found
    assert canonical(result) == canonical(reference)
    for tp in by_tp:
        assert canonical(by_tp[tp]) == canonical(reference_by_tp[tp]), f"tp={tp}"
