"""An on-disk cache of plans: ``partc.plan(..., cache=DIR)`` (``partc plan --cache DIR``).

A plan is stored under a key that hashes everything the plan depends on::

    key = sha256(canonical JSON of {
        identity  graph_identity(gm): the graph's structure (layer signatures, node names),
                  parameter names, shapes, dtypes, and the input specs
        cluster   Cluster.to_dict(): devices, nodes, links
        options   planner.plan_options(): mesh, microbatches, schedule, mixed precision,
                  optimizer, memory limit, training, frontend
        versions  partc, torch and PuLP (a new solver may find another optimum)
        format    the plan and cache file versions })

so the graph must still be captured, propagated and annotated (a second or so for a
96-layer GPT-3) but a hit skips the search and every solver. The file
``DIR/<key>.json`` is the plan's JSON inside an envelope naming the format and the key;
it is written atomically (a reader sees the old file, the new one or none, never a part).

A file that cannot be used (not JSON, a pickle, another format or version, written under
another key, or a plan that does not match the model) is **treated as a miss**: planning
goes on, a :class:`PlanCacheWarning` names the file and the reason, and the fresh plan
replaces the file. A cache must never stop a run, and a bad entry must never be used;
the file is never unpickled or executed, only read as JSON.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pulp
import torch.fx as fx

from partc.cluster import Cluster, write_atomic
from partc.errors import PartcError
from partc.plan import (
    PLAN_VERSION,
    Plan,
    canonical_json,
    current_versions,
    graph_identity,
    sha256_hex,
)

__all__ = ["PlanCache", "PlanCacheWarning", "default_cache_dir"]

CACHE_FORMAT = "partc.plan-cache"
CACHE_VERSION = 1


class PlanCacheWarning(UserWarning):
    """A cache file was unusable and is treated as a miss; the message names it and why."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/partc``, or ``~/.cache/partc``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "partc"


class PlanCache:
    """Plans on disk under :meth:`key`; ``directory`` True means :func:`default_cache_dir`."""

    def __init__(self, directory: str | os.PathLike | bool):
        self.directory = default_cache_dir() if directory is True else Path(directory)

    @staticmethod
    def key(gm: fx.GraphModule, cluster: Cluster, options: dict[str, Any]) -> str:
        """The hash a plan of the annotated ``gm`` on ``cluster`` with ``options`` is stored under."""
        versions = {**current_versions(), "pulp": pulp.__version__}
        material = {
            "identity": graph_identity(gm),
            "cluster": cluster.to_dict(),
            "options": options,
            "versions": versions,
            "format": [PLAN_VERSION, CACHE_VERSION],
        }
        return sha256_hex(canonical_json(material))

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str, gm: fx.GraphModule, cluster: Cluster, options: dict[str, Any]) -> Plan | None:
        """The plan stored under ``key`` if there is a usable one; None on a miss (with a
        :class:`PlanCacheWarning` when a file was there but unusable)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            return _unusable(path, f"cannot be read ({e.strerror})")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return _unusable(path, "is binary, not JSON (a pickle?); partc never unpickles plans")
        except json.JSONDecodeError as e:
            return _unusable(path, f"is not valid JSON ({e}): corrupted or cut short")
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return _unusable(path, f'has no "format": "{CACHE_FORMAT}" field: not a partc plan cache file')
        if data.get("version") != CACHE_VERSION:
            return _unusable(path, f"is cache file version {data.get('version')!r}; this partc reads {CACHE_VERSION}")
        if data.get("key") != key:
            return _unusable(path, "was stored under another key (copied or renamed from another entry): a foreign plan")
        try:
            plan = Plan.from_dict(data.get("plan"))
        except PartcError as e:
            return _unusable(path, f"holds a plan this partc cannot use: {e.message}")
        problems = plan.mismatches(graph_identity(gm), cluster, options)
        if problems:
            return _unusable(path, "holds a plan for another model or setting: " + "; ".join(problems))
        return plan

    def save(self, key: str, plan: Plan) -> Path | None:
        """Store ``plan`` under ``key`` atomically; returns the file, or None (with a
        :class:`PlanCacheWarning`) when it cannot be written: the plan itself is fine."""
        envelope = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "plan": plan.to_dict()}
        path = self.path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(envelope, allow_nan=False))
        except OSError as e:
            warnings.warn(f"partc plan cache: cannot store the plan in {path} ({e}); it will be planned again next time", PlanCacheWarning, stacklevel=3)
            return None
        return path


def _unusable(path: Path, reason: str) -> None:
    warnings.warn(f"partc plan cache: {path} {reason}; treating it as a miss and planning again (the new plan replaces it)", PlanCacheWarning, stacklevel=4)
    return None
