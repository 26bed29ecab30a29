"""Numerical parity of tensor-parallel codegen against the single-device model, as real
processes on gloo.

One torchrun launch per world size (2 and 4 ranks: tp = world) runs every case
(tests/distributed/tp_worker.py): an MLP, GPT (untied and tied embedding/LM head), a
Llama-style model with grouped-query attention and a GPT whose forward returns the loss
(vocabulary-parallel embedding and cross entropy), all on the Megatron layout; and two
plans of other shapes (GPT with sequence parallelism, Llama with FSDP-like gathered
weights and all-to-alls). Each rank checks the plan's layout, the whole output, every
gradient (the reference gradient sliced by the parameter's slice rule) and every
parameter after 3 AdamW steps (fp32, rtol 1e-5, atol 1e-6), the collectives per step
against the plan's prediction, and the state-dict keys. About 40 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import case_key, run_parity

WORKER = Path(__file__).parent / "distributed" / "tp_worker.py"
MODELS = ("mlp", "gpt", "gpt-tied", "llama", "gpt-loss")  # tp_worker.MODELS
WORLDS = (2, 4)


def run_tp_parity(cases: list[dict], nproc: int) -> dict[str, list[dict]]:
    return run_parity(cases, nproc, timeout=300, worker=WORKER)


# Beside the Megatron plans, plans the solver makes for slower devices: GPT with sequence
# parallelism (reduce-scatter / all-gather, the gathered input kept as a shard for backward),
# Llama with weights gathered as in FSDP and all-to-alls between activation layouts.
OTHER_PLANS = ({"model": "gpt", "cluster": "sequence-parallel"}, {"model": "llama", "cluster": "fsdp"})
CASES = {world: [{"model": model} for model in MODELS] + list(OTHER_PLANS) for world in WORLDS}


@pytest.fixture(scope="module")
def verdicts():
    return {}


def _id(value) -> str:
    return f"tp{value}" if isinstance(value, int) else "-".join(str(v) for v in value.values())


@pytest.mark.slow
@pytest.mark.parametrize("world, case", [(w, c) for w in WORLDS for c in CASES[w]], ids=_id)
def test_tp_parity(world, case, verdicts):
    if world not in verdicts:
        verdicts[world] = run_tp_parity(CASES[world], nproc=world)
    ranks = verdicts[world].get(case_key(case), [])
    assert len(ranks) == world, f"only {len(ranks)} of {world} ranks reported"
    failures = {r["rank"]: r["failures"] for r in ranks if r["failures"]}
    assert not failures, failures
