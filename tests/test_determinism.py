"""One plan everywhere: Plan.hash is the same in every re-plan, process and PYTHONHASHSEED,
and survives the JSON every other rank re-plans from."""

import os
import subprocess
import sys

import torch

import partc
from partc.models import build

# A plan that holds every kind of decision: a searched schedule and microbatches, pipeline
# stages, a tensor-parallel sharding plan.
_PLAN = """
import torch, partc
from partc.models import build
torch.manual_seed(0)
model, inputs = build("gpt-tiny", batch_size=8)
plan = partc.plan(model, partc.Cluster.preset("cpu", devices_per_node=4), inputs, mesh={"tp": 2, "pp": 2})
print(plan.hash)
"""


def _plan() -> partc.Plan:
    model, inputs = build("gpt-tiny", batch_size=8)
    return partc.plan(model, partc.Cluster.preset("cpu", devices_per_node=4), inputs, mesh={"tp": 2, "pp": 2})


def test_plan_hash_is_identical_across_20_replans():
    first = _plan()
    assert first.sharding is not None and len(first.stages) > 1 and first.search is not None
    hashes = {first.hash}
    for _ in range(19):
        torch.manual_seed(len(hashes))  # other weights: the hash never reads them
        hashes.add(_plan().hash)
    assert hashes == {first.hash}
    assert len(first.hash) == 64 and int(first.hash, 16) >= 0


def test_plan_hash_survives_json_and_ignores_wall_times():
    plan = _plan()
    again = partc.Plan.from_json(plan.to_json())
    assert again.hash == plan.hash
    slower = partc.Plan.from_dict(
        plan.to_dict()
        | {"pass_times": {"capture": 99.0}, "search": {**plan.search, "seconds": 99.0, "explain": "other text"}}
    )
    assert slower.hash == plan.hash


def test_plan_hash_changes_with_what_runs():
    import dataclasses

    plan = _plan()
    assert dataclasses.replace(plan, microbatches=plan.microbatches * 2).hash != plan.hash
    assert dataclasses.replace(plan, schedule="gpipe").hash != plan.hash
    strategies = dict(plan.sharding.strategies)
    name = next(n for n, s in strategies.items() if s.name != "replicate")
    other = dataclasses.replace(plan.sharding, strategies={**strategies, name: dataclasses.replace(strategies[name], name="replicate")})
    assert dataclasses.replace(plan, sharding=other).hash != plan.hash


def test_plan_hash_is_identical_across_pythonhashseed():
    expected = _plan().hash
    runs = [
        subprocess.Popen([sys.executable, "-c", _PLAN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"})
        for seed in ("0", "1", "12345")
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == expected
