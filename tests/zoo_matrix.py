"""The model-zoo parity matrix: which built-in models are checked under which layouts.

Each row names a model of the registry (:mod:`partc.models`) and the layout it is
compiled with; ``tests/test_zoo.py`` runs every row as real processes (torchrun, gloo,
CPU; ``tests/distributed/zoo_worker.py``), comparing loss, gradients, parameters and
buffers after 3 AdamW steps with a single-device copy, and ``bench/model_table.py``
turns the verdicts into docs/models.md (a fast test keeps that table's rows equal to these).

A row is a dict:

``model``
    a registry name (``partc.models.names()``)
``mesh``
    the layout, one kind of parallelism for now: ``{"pp": 2}``, ``{"dp": 2}``, ``{"tp": 2}``;
    its product is the number of ranks
``schedule``, ``microbatches``, ``virtual_stages``
    pipeline options, passed to ``partc.compile``
``batch_size``, ``seq_len``
    the global batch given to ``training_case`` (defaults :data:`BATCH_SIZE`, :data:`SEQ_LEN`)
``cluster``
    ``"tp-test"`` plans on devices slow against their links, so that tensor parallelism
    pays at test sizes (tests/distributed/harness.py ``case_cluster``); default the cpu preset
``reference``
    ``"microbatches"``: the single-device reference runs the same microbatches the plan
    runs (pipeline microbatches, data-parallel slices) with gradient accumulation, in
    order, instead of the whole batch at once; for models whose forward couples the
    samples of a batch (BatchNorm: see partc/models/cnn.py for the contract)
``xfail``
    a key of :data:`KNOWN_FAILURES`: the row fails today for that reason

Rows are appended by model family; keep them small (tiny configs, a few seconds each).
"""

from __future__ import annotations

BATCH_SIZE = 8
SEQ_LEN = 16

# Why a row is known to fail today (the runtime change each needs); test_zoo marks these
# rows xfail(strict=True), so a fix makes the test fail until the entry is removed.
KNOWN_FAILURES = {
    "dict-output-pipeline": "the pipeline runtime sends the last stage's output as a tensor; hf-tiny returns {'logits': ...}",
    "dp-buffers": "data parallel leaves each replica's BatchNorm buffers updated from its own slice; the contract needs them averaged over dp after each step",
}

ROWS: list[dict] = [
    # Token models of the registry.
    *(
        row
        for model in ("gpt-tiny", "llama-tiny", "hf-tiny")
        for row in (
            {"model": model, "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4},
            {"model": model, "mesh": {"tp": 2}, "cluster": "tp-test"},
            {"model": model, "mesh": {"dp": 2}},
        )
    ),
    # A CNN with BatchNorm (running statistics written in forward; partc/models/cnn.py states
    # the contract): the reference accumulates gradients over the plan's microbatches.
    {"model": "resnet-tiny", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4, "reference": "microbatches"},
    {"model": "resnet-tiny", "mesh": {"pp": 2}, "schedule": "gpipe", "microbatches": 2, "reference": "microbatches"},
    {"model": "resnet-tiny", "mesh": {"dp": 2}, "reference": "microbatches"},
    # An encoder-decoder (two inputs; every decoder stage receives the encoder's output).
    {"model": "encdec-tiny", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4},
    {"model": "encdec-tiny", "mesh": {"pp": 2}, "schedule": "interleaved", "virtual_stages": 2, "microbatches": 4},
    {"model": "encdec-tiny", "mesh": {"tp": 2}, "cluster": "tp-test"},
    {"model": "encdec-tiny", "mesh": {"dp": 2}},
    # Recommendation and mixture of experts at tp=2 as the ILP plans them on the test cluster
    # (the layouts made for them under a budget or on fast links: tests/test_dlrm.py, test_moe.py).
    {"model": "dlrm-tiny", "mesh": {"tp": 2}, "cluster": "tp-test"},
    {"model": "moe-tiny", "mesh": {"tp": 2}, "cluster": "tp-test"},
    # Real HuggingFace transformers models (captured by torch.export; the loss reads the
    # ModelOutput's .logits): GPT-2 and BERT tie the LM head to the embedding, Llama has
    # rotary tables computed under no_grad and grouped-query attention.
    *(
        row
        for model in ("hf-gpt2", "hf-llama", "hf-bert")
        for row in (
            {"model": model, "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4},
            {"model": model, "mesh": {"tp": 2}, "cluster": "tp-test"},
        )
    ),
    # GPT-2's body ends in a slice (a view) that a 4-stage cut sends on; zero-bubble
    # schedules detach stage outputs in place, so split_stages sends a copy.
    {"model": "hf-gpt2", "mesh": {"pp": 2}, "schedule": "zero_bubble", "virtual_stages": 2, "microbatches": 4},
]


def world_size(row: dict) -> int:
    """The number of ranks a row runs on: the product of its mesh."""
    size = 1
    for degree in row["mesh"].values():
        size *= degree
    return size


def row_id(row: dict) -> str:
    """A short, stable name for a row (pytest ids, table rows)."""
    mesh = "x".join(f"{kind}{degree}" for kind, degree in row["mesh"].items())
    extras = [f"{row[key]}" for key in ("schedule",) if key in row]
    extras += [f"mb{row['microbatches']}"] if "microbatches" in row else []
    extras += [f"v{row['virtual_stages']}"] if "virtual_stages" in row else []
    extras += [f"ref-{row['reference']}"] if "reference" in row else []
    extras += [row["cluster"]] if "cluster" in row else []
    return "-".join([row["model"], mesh, *extras])


def run_rows(rows: list[dict], timeout: float = 600) -> dict[str, list[dict]]:
    """Run ``rows`` under torchrun, one launch per world size; return {case_key(row): the
    ranks' verdicts} (each: rank, failures, max_abs_error, params). A row whose worker
    raises ends its launch, so known failures run last: they cannot hide other rows."""
    from pathlib import Path

    from parity import run_parity

    worker = Path(__file__).parent / "distributed" / "zoo_worker.py"
    verdicts: dict[str, list[dict]] = {}
    for world in sorted({world_size(row) for row in rows}):
        launch = sorted((row for row in rows if world_size(row) == world), key=lambda row: "xfail" in row)
        verdicts.update(run_parity(launch, nproc=world, timeout=timeout, worker=worker))
    return verdicts
