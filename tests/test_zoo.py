"""The model-zoo parity matrix (tests/zoo_matrix.py), as real processes on gloo.

Every row of ``ROWS`` is a registry model under one layout; the rows of one world size run
in one torchrun launch of tests/distributed/zoo_worker.py, and each rank checks loss,
gradients, parameters and buffers after 3 AdamW steps against a single-device copy.
The fast test keeps docs/models.md (written by bench/model_table.py) listing exactly these rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import case_key, skip_if_refused
from zoo_matrix import KNOWN_FAILURES, ROWS, row_id, run_rows, world_size

TABLE = Path(__file__).parent.parent / "docs" / "models.md"


@pytest.fixture(scope="module")
def verdicts():
    return run_rows(ROWS)


def _param(row: dict):
    marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[row["xfail"]], strict=True)] if "xfail" in row else []
    return pytest.param(row, marks=marks, id=row_id(row))


@pytest.mark.slow
@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_zoo_parity(row, verdicts):
    skip_if_refused(row)
    ranks = verdicts.get(case_key(row), [])
    assert len(ranks) == world_size(row), f"only {len(ranks)} of {world_size(row)} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures


def test_table_lists_exactly_the_matrix_rows():
    """docs/models.md has one row per matrix row, in order, so the doc cannot drift from
    what CI checks (regenerate it with the command at its top)."""
    listed = [line.split("|")[1].strip().strip("`") for line in TABLE.read_text().splitlines() if line.startswith("| `")]
    assert listed == [row_id(row) for row in ROWS]
