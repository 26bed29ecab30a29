"""Tensor-parallel parity worker, launched by torchrun from tests/test_tp_parity.py and
tests/test_tp_loss_parity.py (not collected by pytest). tests/test_tp_codegen.py imports
its model and plan builders.

Every rank builds the same model (same seed), captures and plans it (each rank plans on
its own; the ranks compare plans first), emits its tensor-parallel module and trains it
for 3 AdamW steps beside a single-device reference copy on the same global batch (every
tensor-parallel rank reads the whole batch). Rank by rank it checks: the plan is the
Megatron layout (not replication), the whole output of every step, the gradient of every
parameter it holds against the reference gradient sliced by the parameter's slice rule,
every parameter after the steps (fp32, rtol 1e-5, atol 1e-6), the collectives run per
step against ``plan.collectives_per_step()``, and the state-dict keys against the model's.
A case with a ``"loss"`` key (the token classifiers of tests/test_tp_loss_parity.py, whose
padded labels leave the ranks unequal numbers of targets) checks that its loss runs as
that strategy instead of checking the Megatron layout.

    torchrun --nproc-per-node 2 tests/distributed/tp_worker.py --cases '[{"model": "gpt"}]' --report-dir /tmp/r
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from partc.cluster import Cluster, DeviceSpec, Link, NodeSpec
from partc.cost_model import CostModel
from partc.models import GPT, GPTConfig, Llama, LlamaConfig
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.ir import OpKind, node_info
from partc.passes.propagate import propagate
from partc.passes.sharding import ShardingPlan, plan_sharding

RTOL, ATOL = 1e-5, 1e-6
# Adam moves an element by lr * g / (|g| + eps). Tensor parallelism reorders floating-point
# sums (row-parallel partial sums), so a gradient element near zero carries ~1e-9 of
# absolute rounding noise, which that ratio amplifies by up to lr / (4 eps): at the default
# eps (1e-8) and lr 1e-4 that is 2.5e3, measured as 3.3e-6 on one weight of GPT-tied at tp=2
# whose gradient is -4e-9 (the gradients themselves agree to 1e-9). eps = 1e-6 brings the
# amplification to 25; a wrong gradient still moves parameters by ~lr = 1e-4, a hundred times
# ATOL. Gradients are compared directly every step.
LR, EPS = 1e-4, 1e-6
STEPS = 3
BATCH, SEQ, VOCAB, WIDTH = 8, 16, 128, 64
MODELS = ("mlp", "gpt", "gpt-tied", "llama", "gpt-loss")
from harness import serve  # noqa: E402

# Token classifiers whose loss runs batch-parallel (see Tagger): torch's "mean" over kept,
# weighted targets when the ranks keep different numbers of them.
LOSS_MODELS = ("tagger-padded", "tagger-weighted", "tagger-smoothed", "tagger-nll")
CLASSES = 7  # no tp divides it: the loss cannot run vocabulary-parallel


# Clusters the cases plan on: (FLOP/s and bytes/s of a device, link latency, link bandwidth).
# "megatron" gives each model the Megatron layout; slower devices make the solver shard
# more: weights gathered before batch-parallel linears as in FSDP, all-to-alls, sequence
# parallelism whose linears keep only the shard of their gathered input for backward.
CLUSTERS = {"megatron": (1e11, 1e-6, 1e10), "sequence-parallel": (1e10, 1e-9, 1e10), "fsdp": (1e9, 1e-9, 1e12)}


def favourable_cluster(flops: float = 1e11, latency: float = 1e-6, bandwidth: float = 1e10) -> Cluster:
    """Devices slow against their links (by default 100 GFLOP/s, links of 10 GB/s and 1 us):
    at the tiny test sizes this makes tensor parallelism pay, as it does for full-size
    models on H100s (where these models would stay replicated). Slower devices or faster
    links make the planner shard more (weights gathered as in FSDP, sequence parallelism)."""
    device = DeviceSpec("slow-test-device", {"float32": flops}, 16 * 2**30, flops, 1.0)
    link = Link(latency, bandwidth)
    return Cluster(nodes=(NodeSpec(device, 8, link),), inter_link=link, name="tp-test")


class MLP(nn.Module):
    """Two Megatron MLP blocks (with biases: a column bias is sharded, a row bias is added once)."""

    def __init__(self, width: int = WIDTH, hidden: int = 4 * WIDTH):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.fc3, self.fc4 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return x + self.fc4(F.gelu(self.fc3(x)))


class WithLoss(nn.Module):
    """A model whose forward returns the loss: the cross entropy is in the graph, so the
    planner can run it vocabulary-parallel on sharded logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        logits = self.model(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


class Tagger(nn.Module):
    """A token classifier whose forward returns its loss from HF-style labels, where the
    ignored label marks padding: the loss is a "mean" over the kept targets only (weighted
    by ``class_weights``, with ``label_smoothing``, or as ``nll_loss`` of log-probabilities)."""

    def __init__(self, *, class_weights: bool = False, label_smoothing: float = 0.0, nll: bool = False, ignore_index: int = -100):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, CLASSES)
        self.register_buffer("class_weights", torch.linspace(0.5, 2.0, CLASSES) if class_weights else None)
        self.label_smoothing, self.nll, self.ignore_index = label_smoothing, nll, ignore_index

    def forward(self, idx, labels):
        logits = self.fc2(F.gelu(self.fc1(self.embed(idx))))
        logits, labels = logits.view(-1, CLASSES), labels.view(-1)
        if self.nll:
            return F.nll_loss(F.log_softmax(logits, -1), labels, weight=self.class_weights, ignore_index=self.ignore_index)
        return F.cross_entropy(logits, labels, weight=self.class_weights, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)


def padded_labels(generator: torch.Generator, ignore_index: int) -> torch.Tensor:
    """(BATCH, SEQ) labels whose sequences end in padding (``ignore_index``): 12 of 16
    positions in the first half of the batch, 2 in the second, so the tensor-parallel ranks,
    each holding a slice of the samples, keep different numbers of targets (at tp=4: 8, 8,
    28, 28)."""
    labels = torch.randint(1, CLASSES, (BATCH, SEQ), generator=generator)  # 0 is the nll case's ignored class
    labels[: BATCH // 2, SEQ - 12 :] = ignore_index
    labels[BATCH // 2 :, SEQ - 2 :] = ignore_index
    return labels


TAGGERS = {
    "tagger-padded": {},
    "tagger-weighted": {"class_weights": True},
    "tagger-smoothed": {"class_weights": True, "label_smoothing": 0.1},
    "tagger-nll": {"class_weights": True, "nll": True, "ignore_index": 0},
}


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(name: str):
    """(model, inputs, targets, loss_fn); loss_fn None: the model's output is the loss."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    # bias=False for GPT: the key projection's bias has an analytically zero gradient,
    # rounding noise that AdamW normalises into full-size steps differing run to run.
    gpt = dict(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, d_model=WIDTH, dropout=0.0, bias=False)
    if name == "mlp":
        model = MLP()
        x = torch.randn(BATCH, SEQ, WIDTH, generator=generator)
        return model, (x,), torch.randn(BATCH, SEQ, WIDTH, generator=generator), F.mse_loss
    if name in ("gpt", "gpt-tied"):
        model = GPT(GPTConfig(**gpt, tie_weights=name == "gpt-tied"))
    elif name == "llama":  # grouped-query attention: 8 query heads, 4 k/v heads (tp=4: one each)
        model = Llama(LlamaConfig(vocab_size=VOCAB, max_seq_len=32, n_layer=2, n_head=8, n_kv_head=4, d_model=WIDTH, ffn_hidden=2 * WIDTH))
    elif name in TAGGERS:
        model = Tagger(**TAGGERS[name])
        idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        return model, (idx, padded_labels(generator, model.ignore_index)), None, None
    elif name == "gpt-loss":  # a larger vocabulary: vocabulary-parallel embedding and cross entropy
        model = WithLoss(GPT(GPTConfig(**{**gpt, "vocab_size": 1024}, tie_weights=True)))
        vocab = 1024
        idx = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
        targets = torch.randint(0, vocab, (BATCH, SEQ), generator=generator)
        return model, (idx, targets), None, None
    else:
        raise SystemExit(f"unknown model {name}")
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return model, (idx,), torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator), lm_loss


def make_plan(model: nn.Module, inputs, tp: int, cluster: Cluster | None = None, **options) -> tuple:
    """Capture, propagate, annotate and plan ``model`` for ``tp`` ranks (on the favourable cluster)."""
    gm = annotate(propagate(capture(model, inputs), inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # operators without a rule are replicated (named in the plan)
        plan = plan_sharding(gm, CostModel(cluster or favourable_cluster()), tp=tp, **options)
    return gm, plan


# The Megatron layout each model must get: module suffix -> strategy of its linear.
_COLUMN, _ROW = "column", "row"
EXPECTED = {
    "mlp": {"fc1": _COLUMN, "fc2": _ROW, "fc3": _COLUMN, "fc4": _ROW},
    "gpt": {"attn.qkv": _COLUMN, "attn.proj": _ROW, "mlp.fc": _COLUMN, "mlp.proj": _ROW},
    "llama": {
        "attention.wq": _COLUMN, "attention.wk": _COLUMN, "attention.wv": _COLUMN, "attention.wo": _ROW,
        "feed_forward.w1": _COLUMN, "feed_forward.w3": _COLUMN, "feed_forward.w2": _ROW,
    },
}
EXPECTED["gpt-tied"] = EXPECTED["gpt-loss"] = EXPECTED["gpt"]


def layout_failures(name: str, gm, plan: ShardingPlan) -> list[str]:
    """Where the plan is not the Megatron layout the model should get."""
    failures = []
    seen = 0
    for n in gm.graph.nodes:
        info = node_info(n)
        s = plan.strategies.get(n.name)
        if s is None:
            continue
        if info.name == "linear":
            for suffix, want in EXPECTED[name].items():
                if info.module.endswith(suffix):
                    seen += 1
                    if s.name != want:
                        failures.append(f"{info.module}: {s.name}, expected {want}")
        if info.name == "scaled_dot_product_attention" and s.name != "head_parallel":
            failures.append(f"{info.module} attention: {s.name}, expected head_parallel")
        if name == "gpt-loss" and info.name in ("cross_entropy",) and s.name != "vocab_parallel":
            failures.append(f"cross entropy: {s.name}, expected vocab_parallel")
        if name == "gpt-loss" and info.module.endswith("wte") and info.name == "embedding" and s.name != "vocab_parallel":
            failures.append(f"token embedding: {s.name}, expected vocab_parallel")
    if not seen:
        failures.append("no linear layer of the model was found in the plan")
    return failures


def loss_strategy_failures(gm, plan: ShardingPlan, want: str) -> list[str]:
    """Where a loss of the graph does not run as strategy ``want``."""
    losses = [n for n in gm.graph.nodes if node_info(n).op == OpKind.LOSS]
    found = [f"{n.name}: {plan.strategies[n.name]}, expected {want}" for n in losses if plan.strategies[n.name].name != want]
    return found if losses else ["no loss in the graph"]


def plan_digest(plan: ShardingPlan) -> str:
    text = json.dumps([sorted((k, str(v)) for k, v in plan.strategies.items()), [str(r) for r in plan.reshards]])
    return hashlib.sha256(text.encode()).hexdigest()


def compare(what: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    if got.shape != want.shape:
        failures.append(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        failures.append(f"{what}: max abs diff {(got - want).abs().max().item():.3e}")


def run_case(case: dict) -> list[str]:
    from partc.passes.tp_codegen import emit_tensor_parallel

    tp, rank = dist.get_world_size(), dist.get_rank()
    model, inputs, targets, loss_fn = build(case["model"])
    reference = copy.deepcopy(model)
    cluster = case.get("cluster", "megatron")
    gm, plan = make_plan(model, inputs, tp, cluster=favourable_cluster(*CLUSTERS[cluster]))
    if "loss" in case:
        failures = loss_strategy_failures(gm, plan, case["loss"])
    elif cluster == "megatron":
        failures = layout_failures(case["model"], gm, plan)
    else:  # not the Megatron layout, but collectives of every kind (see CLUSTERS)
        kinds = {c for phase in plan.collectives_per_step().values() for c in phase}
        failures = [] if {"all_gather", "reduce_scatter"} <= kinds else [f"a plan without sharded weights or activations: {kinds}"]

    digests: list = [None] * tp
    dist.all_gather_object(digests, plan_digest(plan))
    if len(set(digests)) != 1:
        return failures + [f"ranks planned differently: {digests}"]

    tpm = emit_tensor_parallel(gm, plan, rank=rank, tp=tp, group=dist.group.WORLD, state_dict=model.state_dict(keep_vars=True))
    module = tpm.module
    if sorted(module.state_dict()) != sorted(model.state_dict()):
        failures.append(f"state-dict keys {sorted(module.state_dict())} != {sorted(model.state_dict())}")

    reference_params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR, eps=EPS)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, eps=EPS)
    expected_collectives = plan.collectives_per_step()
    for step in range(STEPS):
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        tpm.counter.reset()
        out = module(*inputs)
        loss = out if loss_fn is None else loss_fn(out, targets)
        loss.backward()
        reference_out = reference(*inputs)
        reference_loss = reference_out if loss_fn is None else loss_fn(reference_out, targets)
        reference_loss.backward()
        compare(f"step {step} output", out.detach(), reference_out.detach(), failures)
        compare(f"step {step} loss", loss.detach(), reference_loss.detach(), failures)
        if tpm.counter.per_step() != expected_collectives:
            failures.append(f"step {step} collectives {tpm.counter.per_step()}, the plan predicts {expected_collectives}")
        for name, p in module.named_parameters():
            if p.grad is None:
                failures.append(f"step {step} grad {name}: missing")
            else:
                compare(f"step {step} grad {name}", p.grad, tpm.local(name, reference_params[name].grad), failures)
        optimizer.step()
        reference_optimizer.step()
    for name, p in module.named_parameters():
        compare(f"param {name} after {STEPS} steps", p.detach(), tpm.local(name, reference_params[name].detach()), failures)
    return failures


def main() -> int:
    models = ", ".join(MODELS + LOSS_MODELS)
    cases_help = f'a JSON list of cases: {{"model": one of {models}, "cluster"?: one of {", ".join(CLUSTERS)}, "loss"?: the strategy the loss must get}}'
    return serve(run_case, cases_help=cases_help, backend="gloo")


if __name__ == "__main__":
    sys.exit(main())
