"""Parity worker, launched by torchrun from tests/test_parity_*.py (not collected by pytest).

Every rank builds the same model (same seed), compiles it with partc for the case given,
and runs 3 AdamW steps beside a single-device reference copy; it checks, rank by rank:
the loss of every step, every gradient this rank holds (by original parameter name), and
every parameter after the steps (fp32, rtol 1e-5, atol 1e-6); and that the union of the
ranks' state-dict keys is the model's. Any mismatch exits non-zero with the details.

Loss cases (tests/test_loss_mean_parity.py): ``"padded_targets": true`` pads the targets
with ``-100`` unevenly (:func:`pad_unevenly`: the first rows most, the first two entirely),
so microbatches and replicas keep different numbers of targets and torch's "mean" over
the kept targets is not the average of their means. ``"tagger-weighted"`` is a token
classifier whose forward computes a cross entropy with class weights from its labels
(an input); its loss_fn returns that output. ``"global_count_loss": true`` is the recipe
for an untraced loss: ``loss_reduction="sum"`` with a loss_fn that sums and divides by
the caller's count of kept targets in the whole batch. ``"runs_user_model": true``: the
replica must run the user's module (FSDP2 units per block) with loss_fn rewritten to
divide by the global normaliser (:func:`runs_user_model`). ``"loss_strategy"`` names how the
tensor-parallel plan must run the loss (the case fails on any other).

    torchrun --nproc-per-node 2 tests/distributed/parity_worker.py \
        --cases '[{"model": "gpt", "mesh": {"pp": 2}, "schedule": "1f1b", "microbatches": 4}]'
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import GPT, GPTConfig, Llama
from partc.models.llama import llama_tiny
from partc.passes.ir import OpKind, node_info

BATCH, SEQ, VOCAB = 8, 16, 128
IGNORE_INDEX = -100  # F.cross_entropy's default: the HF convention for padded labels
# Positions padded at the end of each of the BATCH rows: in 4 microbatches of 2 rows the
# first keeps no target at all, the others 11, 24 and 31; in 2 replicas, 11 and 55.
PADDING_PER_ROW = (16, 16, 12, 9, 5, 3, 1, 0)
from harness import ATOL, LR, RTOL, case_cluster, serve, train_and_compare  # noqa: E402, F401 (LR: checkpoint_worker's)
from tp_worker import CLASSES, Tagger  # noqa: E402


class SkipNet(nn.Module):
    """An MLP whose input embedding is added back just before the head: a skip
    connection that spans every stage between."""

    def __init__(self, width: int = 32, depth: int = 6):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, idx):
        x0 = self.embed(idx)
        h = x0
        for block in self.blocks:
            h = block(h)
        return self.head(h + x0)


def build(name: str) -> nn.Module:
    # bias=False: the key projection's bias has an analytically zero gradient (softmax
    # ignores a constant added to every score), so its computed gradient is rounding
    # noise, which AdamW normalises into full-size steps that differ run to run.
    gpt = dict(vocab_size=VOCAB, block_size=32, n_layer=4, n_head=4, d_model=32, dropout=0.0, bias=False)
    if name == "gpt":
        return GPT(GPTConfig(**gpt, tie_weights=False))
    if name == "gpt-tied":
        return GPT(GPTConfig(**gpt, tie_weights=True))
    if name == "llama":  # grouped-query attention (4 heads, 2 KV heads), 6 blocks
        return Llama(dataclasses.replace(llama_tiny(), n_layer=6))
    if name == "skip":
        return SkipNet()
    if name == "tagger-weighted":  # forward(idx, labels) -> cross entropy with class weights
        return Tagger(class_weights=True)
    raise SystemExit(f"unknown model {name}")


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def loss_is_output(output, targets):
    """loss_fn of a model whose forward returns its loss."""
    return output


def pad_unevenly(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with the last PADDING_PER_ROW[r] positions of row r set to IGNORE_INDEX."""
    labels = labels.clone()
    for row, padding in enumerate(PADDING_PER_ROW):
        labels[row, labels.shape[1] - padding :] = IGNORE_INDEX
    return labels


def global_count_loss(targets: torch.Tensor):
    """The recipe for a loss partc does not trace: the sum over this piece of the batch
    divided by the number of kept targets in the whole batch (``loss_reduction="sum"``)."""
    kept = (targets != IGNORE_INDEX).sum()

    def summed_over_global_count(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum") / kept

    return summed_over_global_count


def weighted_loss_module() -> Callable:
    """A loss_fn that calls an ``nn.CrossEntropyLoss`` holding class weights (a closure over
    a module partc does not hold: the weights are read when compile traces it)."""
    weights = torch.rand(VOCAB, generator=torch.Generator().manual_seed(2)) + 0.5
    criterion = nn.CrossEntropyLoss(weight=weights, ignore_index=IGNORE_INDEX)

    def weighted(logits, targets):
        return criterion(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return weighted


def run_case(case: dict) -> list[str]:
    """Compile one case, train it beside the reference, return what differed."""
    if "other_ranks_model" in case:
        return ranks_disagree(case)
    torch.manual_seed(0)
    model = build(case["model"])
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, CLASSES if isinstance(model, Tagger) else VOCAB, (BATCH, SEQ), generator=generator)
    if case.get("padded_targets"):
        targets = pad_unevenly(targets)
    case_loss = loss_fn
    model_inputs = (inputs,)
    if isinstance(model, Tagger):  # its forward reads the labels and returns the loss
        case_loss, model_inputs = loss_is_output, (inputs, targets)

    options = {key: case[key] for key in ("mesh", "microbatches", "schedule", "virtual_stages", "recompute", "zero_stage", "mixed_precision", "data_parallel", "gradient_compression", "frontend") if key in case}
    if case.get("loss_in_graph"):
        options["example_targets"] = targets
    if case.get("weighted_loss_module"):
        case_loss = weighted_loss_module()
    if case.get("global_count_loss"):
        case_loss, options["loss_reduction"] = global_count_loss(targets), "sum"
    cluster = case_cluster(case.get("cluster"), dist.get_world_size(), case.get("nodes", 1))
    pm = partc.compile(model, cluster, model_inputs, loss_fn=case_loss, **options)
    held = [str(n.target) for n in pm.plan.graph.graph.nodes if n.op == "get_attr" and operator.attrgetter(str(n.target))(pm.plan.graph).device.type != "meta"]
    if held:  # the plan's graph kept the unsharded model alive beside FSDP2's shards / the stage and tp modules
        return [f"the plan's graph still holds the model's tensors: {held[:3]}"]
    if case.get("nodes", 1) > 1 and pm.rank_mesh.tp > 1:
        # torchrun's node of every rank in this tensor-parallel group: all the same one
        nodes: list = [None] * pm.rank_mesh.tp
        dist.all_gather_object(nodes, os.environ["GROUP_RANK"], group=pm.rank_mesh.group("tp"))
        if len(set(nodes)) != 1:
            return [f"the tensor-parallel group spans torchrun nodes {sorted(set(nodes))}"]
    if case["mesh"].get("tp", 1) > 1 and not any(str(p.layout) != "R" for p in pm.plan.sharding.parameters.values()):
        return ["the tensor-parallel plan shards nothing: the case would test nothing"]
    if "loss_strategy" in case:
        losses = {n.name: pm.plan.sharding.strategies[n.name].name for n in pm.plan.graph.graph.nodes if n.op == "call_function" and node_info(n).op == OpKind.LOSS}
        if not losses or set(losses.values()) != {case["loss_strategy"]}:
            return [f"the loss runs as {losses}; the case is about {case['loss_strategy']}"]
    if case.get("runs_user_model"):
        failures = runs_user_model(pm, model, sharded=case.get("data_parallel") == "fsdp")
        if failures:
            return failures
    if "gradient_compression" in case:
        return compressed_gradients(pm, reference, inputs, targets, case["gradient_compression"])
    if case.get("mixed_precision") == "bf16":
        # the reference runs the same autocast on the whole batch; bf16 rounding differs with
        # the microbatch shapes and the order of sums, hence bf16-sized tolerances. That the
        # step did run in bf16: every module this rank runs is entered under bf16 autocast.
        # (The first loss is a poor witness: on these tiny models bf16 moves it by ~6e-6
        # relative on CPU but ~1e-6 on H200s, where fp32 runs agree to ~1e-7.)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"  # where partc runs (see run_case)
        entered: list[tuple[bool, torch.dtype]] = []

        def record(module, args):
            entered.append((torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)))

        hooks = [m.register_forward_pre_hook(record) for m in pm._modules]
        comparison = train_and_compare(pm, reference, (inputs,), targets, loss_fn, reference_step=bf16_whole_batch_step, tolerance=(2e-2, 2e-3))
        for hook in hooks:
            hook.remove()
        ran_bf16 = [] if entered and all(on and dtype == torch.bfloat16 for on, dtype in entered) else [f"not every forward ran under bf16 autocast: {sorted(set(entered), key=str)}"]
        return comparison.failures + ran_bf16
    return train_and_compare(pm, reference, model_inputs, targets, case_loss, steps=case.get("steps", 3)).failures


def runs_user_model(pm: partc.ParallelModule, model: nn.Module, sharded: bool) -> list[str]:
    """The replica runs the user's own module (FSDP2: one unit per planned block and the
    root) and a traced loss_fn rewritten to divide by the global batch's normaliser."""
    from partc.passes.capture import TracedLoss
    from partc.runtime import collectives

    failures = []
    if len(pm._modules) != 1 or pm._modules[0] is not model:
        failures.append(f"the replica runs {[type(m).__name__ for m in pm._modules]}, not the user's {type(model).__name__}")
    if sharded:
        try:
            from torch.distributed.fsdp import FSDPModule  # torch >= 2.6
        except ImportError:
            from torch.distributed._composable.fsdp import FSDPModule
        blocks = {layer.name for layer in pm.plan.layers}
        units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        if units[:1] != [""] or len(units) < 3 or not set(units[1:]) <= blocks:
            failures.append(f"FSDP2 units {units}: not the root and a unit per planned block ({sorted(blocks)})")
    loss = pm._runner.loss_fn
    divides = isinstance(loss, TracedLoss) and any(n.target is collectives.divide_by_global_normaliser for n in loss.traced.graph.nodes)
    if not divides or pm._runner.reduction != "sum":
        failures.append(f"the replica's loss {loss!r} (reduction {pm._runner.reduction}) does not divide a sum by the global batch's normaliser")
    return failures


def bf16_whole_batch_step(reference: nn.Module, inputs: tuple, targets, loss_fn) -> torch.Tensor:
    device = inputs[0].device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = loss_fn(reference(*inputs), targets)
    loss.backward()
    return loss.detach()


def ranks_disagree(case: dict) -> list[str]:
    """Rank 0 compiles ``model``, the others ``other_ranks_model``: every rank must raise
    PlanMismatchError naming the ranks that differ (none may hang waiting for the others)."""
    model = build(case["model"] if dist.get_rank() == 0 else case["other_ranks_model"])
    inputs = torch.zeros(BATCH, SEQ, dtype=torch.long)
    try:
        partc.compile(model, case_cluster(None, dist.get_world_size()), (inputs,), loss_fn=loss_fn, mesh=case["mesh"])
    except partc.PlanMismatchError as e:
        expected = "ranks disagree on the plan"
        return [] if expected in str(e) and "rank 1: error: PlanMismatchError" in str(e) else [f"unexpected message: {e}"]
    return ["compile() accepted ranks that built different models"]


def compressed_gradients(pm: partc.ParallelModule, reference: nn.Module, inputs, targets, kind: str) -> list[str]:
    """DDP's compression hooks change the gradients, so exact parity cannot hold; what must:
    the loss (computed before any communication) equals the reference's, and the averaged
    gradients differ from the exact ones by about what the compression loses: bf16/fp16
    rounding (relative 1e-2), nothing for PowerSGD's first 2 uncompressed steps, then a
    rank-1 approximation (not equal, same sign of the inner product)."""
    failures = []
    reference_grads = []
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reference.to(device)
    inputs, targets = inputs.to(device), targets.to(device)
    for step in range(3):
        for p in [*pm.parameters(), *reference.parameters()]:
            p.grad = None
        loss = pm.step((inputs,), targets)
        reference_loss = loss_fn(reference(inputs), targets)
        reference_loss.backward()
        if not torch.allclose(loss, reference_loss.detach(), rtol=RTOL, atol=ATOL):
            failures.append(f"step {step} loss {loss.item()} != {reference_loss.item()}")
        want = dict(reference.named_parameters())
        got = torch.cat([p.grad.flatten() for name, p in pm.named_parameters()])
        exact = torch.cat([want[name].grad.flatten() for name, _ in pm.named_parameters()])
        reference_grads.append(exact)
        error = ((got - exact).norm() / exact.norm()).item()
        if kind in ("bf16", "fp16") or step < 2:
            bound = {"bf16": 1e-2, "fp16": 1e-3}.get(kind, 1e-6)
            if error > bound:
                failures.append(f"step {step}: gradients off by {error:.2e} relative (expected <= {bound:g} for {kind})")
            if kind in ("bf16", "fp16") and error == 0.0:
                failures.append(f"step {step}: gradients exactly equal: the {kind} hook did not run")
        elif error < 1e-6 or torch.dot(got, exact) <= 0:
            failures.append(f"step {step}: PowerSGD gradients off by {error:.2e} relative: not a low-rank approximation")
    return failures


def main() -> int:
    return serve(run_case, cases_help="a JSON list of cases: {model, mesh, microbatches?, schedule?, virtual_stages?, loss_in_graph?, cluster?, padded_targets?, global_count_loss?, weighted_loss_module?, loss_strategy?, frontend?}")


if __name__ == "__main__":
    sys.exit(main())
