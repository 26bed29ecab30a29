"""What partc's cost model predicts for each layout the benchmark runs (no GPU needed).

Every prediction plans the model on the meta device, in bf16, with the loss traced into
the graph, on the cluster the benchmark ran on (normally the one ``partc calibrate``
wrote in the same run):

* ``partc``: the prediction partc made for the plan it ran (recorded by the worker);
* ``ddp``: ``partc.plan(mesh={"dp": N})``;
* ``fsdp2``: the search pinned to dp = N, ZeRO-3, no recomputation, one microbatch;
* ``ddp-acc<M>``, ``fsdp2-acc<M>``: the same with M microbatches;
* ``tp``, ``partc-tp``: ``partc.plan(mesh={"tp": N})``: partc's own layouts, which need not
  be the Megatron plan the hand-written ``tp`` runs (the report says which);
* ``pp-m<M>``: ``partc.plan(mesh={"pp": N}, schedule="1f1b", microbatches=M)``, the time
  and memory of its *equal-layer* split, the split the hand-written pipeline runs;
* ``3d-tp<T>-pp<P>-m<M>``: ``partc.plan(mesh={"tp": T, "pp": P, "dp": D}, schedule="1f1b",
  microbatches=M)`` (partc cuts the stages by its ILP; the hand-written one splits evenly).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from layouts import language_model_loss
from partc.passes.search import search
from report import is_partc_run

import partc
from partc.cost_model import CostModel
from partc.models import training_case


def _case(model: str, batch: int, seq: int):
    case = training_case(model, batch_size=batch, seq_len=seq, device="meta")
    case.model.to(torch.bfloat16)
    return case


def predict(model: str, batch: int, seq: int, cluster: partc.Cluster, layout: str, detail: dict | None = None) -> dict[str, Any]:
    """{"step_time": s, "memory": bytes, "note": str} for one layout (or {"error": ...}).
    ``partc`` needs the ``detail`` the worker recorded: its plan is planned again, pinned."""
    case = _case(model, batch, seq)
    world = cluster.world_size

    def plan(**options):
        return partc.plan(case.model, cluster, case.inputs, loss_fn=language_model_loss, example_targets=case.targets, **options)

    def plan_pipeline(**options) -> tuple[Any, str]:
        """A pipelined plan and a note; on torch < 2.13 no stage cut may carry the targets,
        so the loss-free graph is priced instead (and the note says so)."""
        try:
            return plan(**options), ""
        except partc.PartcError:
            return partc.plan(case.model, cluster, case.inputs, **options), ", loss not priced"

    try:
        if is_partc_run(layout) and detail:
            options = {"mesh": detail["mesh"], "microbatches": detail["microbatches"]}
            if detail.get("schedule") not in (None, "none"):
                options["schedule"] = detail["schedule"]
            if detail.get("zero_stage") is not None:
                options.update(zero_stage=detail["zero_stage"], recompute=bool(detail.get("recompute")))
            p = plan(**options)
            return {"step_time": p.predicted_step_time, "memory": p.memory.total, "note": "the plan partc ran, pinned"}
        match = re.fullmatch(r"(ddp|fsdp2)(?:-acc(\d+))?", layout)
        if match:
            microbatches = int(match.group(2) or 1)
            zero = 0 if match.group(1) == "ddp" else 3
            p = plan(mesh={"dp": world})
            result = search(
                p.graph, cluster, CostModel(cluster), batch_size=batch, pinned={"dp": world, "tp": 1, "pp": 1},
                zero_options=(zero,), recompute_options=(False,), microbatch_options=(microbatches,),
            )
            note = f"search pinned to dp, ZeRO-{zero}, m={microbatches}"
            return {"step_time": result.best.predicted_step_time, "memory": result.best.memory.total, "note": note}
        if layout in ("tp", "partc-tp"):
            p = plan(mesh={"tp": world})
            return {"step_time": p.predicted_step_time, "memory": p.memory.total, "note": "partc's tp layouts"}
        match = re.fullmatch(r"pp-m(\d+)", layout)
        if match:
            p, caveat = plan_pipeline(mesh={"pp": world}, schedule="1f1b", microbatches=int(match.group(1)))
            memory = max(stage.peak_memory for stage in p.equal_split_stages)
            return {"step_time": p.equal_split_step_time, "memory": memory, "note": "equal-layer split" + caveat}
        match = re.fullmatch(r"3d-tp(\d+)-pp(\d+)-m(\d+)", layout)
        if match:
            tp, pp, m = map(int, match.groups())
            p, caveat = plan_pipeline(mesh={"tp": tp, "pp": pp, "dp": world // (tp * pp)}, schedule="1f1b", microbatches=m)
            return {"step_time": p.predicted_step_time, "memory": p.memory.total, "note": "partc's stage cut (the run splits evenly)" + caveat}
    except partc.PartcError as e:
        return {"error": str(e).splitlines()[0][:300]}
    return {"error": f"no prediction for layout {layout!r}"}
