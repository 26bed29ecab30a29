"""The on-disk plan cache: a hit skips the search, every key component misses, writes are
atomic, and unusable files are treated as misses with a warning naming them."""

import dataclasses
import json
import os
import pickle

import pytest
import torch

import partc
from partc.models import build
from partc.plan_cache import PlanCache, PlanCacheWarning, default_cache_dir

CLUSTER = partc.Cluster.preset("cpu", devices_per_node=4)
OPTIONS = {"mesh": {"tp": 2, "pp": 2}}


def _plan(cache, batch_size=8, cluster=CLUSTER, progress=None, **options):
    model, inputs = build("gpt-tiny", batch_size=batch_size)
    return partc.plan(model, cluster, inputs, cache=cache, progress=progress, **{**OPTIONS, **options})


def _entries(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_a_hit_skips_the_search_and_says_so(tmp_path):
    first = _plan(tmp_path)
    assert "cache miss" in first.pass_times and "search" in first.pass_times and "cache store" in first.pass_times
    assert len(_entries(tmp_path)) == 1
    lines: list[str] = []
    second = _plan(tmp_path, progress=lines.append)
    assert set(second.pass_times) == {"capture", "propagate", "annotate", "cache hit"}
    assert any(line.startswith("cache hit") and "search and solvers skipped" in line and str(tmp_path) in line for line in lines)
    assert second.hash == first.hash and dataclasses.replace(second, pass_times=first.pass_times) == first
    assert second.graph is not None and second.sharding == first.sharding
    assert second.source(rank=1) == first.source(rank=1)


def test_true_means_the_user_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "partc"
    assert PlanCache(True).directory == tmp_path / "partc"


@pytest.mark.parametrize(
    "change",
    ["graph", "parameters", "inputs", "cluster", "options", "partc", "torch", "pulp"],
)
def test_every_key_component_changes_the_key(change, monkeypatch):
    from partc import plan_cache
    from partc.planner import _annotated_graph, _Passes, plan_options

    def key(model, inputs, cluster=CLUSTER, **options):
        gm = _annotated_graph(_Passes(None), model, inputs, None, None, "auto")
        defaults = dict(mesh=None, microbatches=None, schedule=None, virtual_stages=None, recompute=None, zero_stage=None, mixed_precision=None, optimizer="adamw", memory_limit=None, training=True, frontend="auto")
        return PlanCache.key(gm, cluster, plan_options(**{**defaults, **options}))

    model, inputs = build("gpt-tiny", batch_size=4)
    base = key(model, inputs)
    assert key(*build("gpt-tiny", batch_size=4)) == base  # other weights, same key
    if change == "graph":  # one more block: the structure changes
        from partc.models import GPT
        from partc.models.gpt import gpt_tiny

        other = key(GPT(gpt_tiny().__class__(**{**gpt_tiny().__dict__, "n_layer": 3})), inputs)
    elif change == "parameters":  # the same graph with a bf16 buffer-free parameter set
        other = key(model.to(torch.float64), inputs)
    elif change == "inputs":
        other = key(model, (inputs[0][:2],))
    elif change == "cluster":
        other = key(model, inputs, cluster=partc.Cluster.preset("cpu", devices_per_node=2))
    elif change == "options":
        other = key(model, inputs, mixed_precision="bf16")
    else:
        versions = {"partc": partc.__version__, "torch": torch.__version__}
        if change == "pulp":
            monkeypatch.setattr(plan_cache.pulp, "__version__", "0.0.1")
        else:
            monkeypatch.setattr(plan_cache, "current_versions", lambda: {**versions, change: "0.0.1"})
        other = key(model, inputs)
    assert other != base


def test_a_changed_option_misses_and_stores_a_second_plan(tmp_path):
    _plan(tmp_path)
    other = _plan(tmp_path, microbatches=4)
    assert "cache miss" in other.pass_times and other.microbatches == 4
    assert len(_entries(tmp_path)) == 2


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies before the rename leaves no partial file under the key."""
    import partc.cluster

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(partc.cluster.os, "replace", crash)
    with pytest.warns(PlanCacheWarning, match="cannot store the plan"):
        plan = _plan(tmp_path)
    assert plan.fits is not None  # the plan itself is returned
    assert not [name for name in _entries(tmp_path) if name.endswith(".json")]  # only the unrenamed temporary
    monkeypatch.undo()
    again = _plan(tmp_path)
    assert "cache miss" in again.pass_times
    assert "cache hit" in _plan(tmp_path).pass_times


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda path, text: path.write_text(text[: len(text) // 2]), "is not valid JSON .* corrupted or cut short"),
        (lambda path, text: path.write_bytes(pickle.dumps(json.loads(text))), "binary, not JSON .*never unpickles"),
        (lambda path, text: path.write_text(json.dumps(json.loads(text) | {"key": "0" * 64})), "stored under another key .*foreign"),
        (lambda path, text: path.write_text(json.dumps(_with_plan_version(json.loads(text), 1))), "plan version 1 is not the version"),
        (lambda path, text: path.write_text('{"format": "something else"}'), "not a partc plan cache file"),
    ],
    ids=["truncated", "pickle", "foreign", "old-version", "not-a-cache-file"],
)
def test_unusable_files_are_misses_with_a_warning_naming_them(tmp_path, damage, reason):
    _plan(tmp_path)
    (name,) = _entries(tmp_path)
    path = tmp_path / name
    damage(path, path.read_text())
    with pytest.warns(PlanCacheWarning, match=reason) as caught:
        replanned = _plan(tmp_path)
    assert str(path) in str(caught[0].message)
    assert "cache miss" in replanned.pass_times and "search" in replanned.pass_times
    assert "cache hit" in _plan(tmp_path).pass_times  # the fresh plan replaced the bad file


def _with_plan_version(envelope: dict, version: int) -> dict:
    envelope["plan"]["version"] = version
    return envelope


def test_cli_plan_cache(tmp_path, capsys):
    from partc.cli import main

    args = ["plan", "gpt-tiny", "--cluster", "cpu:1x2", "--mesh", "tp=2", "--batch", "2", "--cache", str(tmp_path)]
    assert main(args) == 0
    assert "cache miss" in capsys.readouterr().err
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().err
