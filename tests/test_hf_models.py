"""Real HuggingFace transformers models (GPT-2, Llama, BERT from tiny configs): capture
through torch.export, plans on a 2-device cluster, and their ModelOutput reaching loss_fn.

Fast, in one process. Their distributed parity (pp=2 and tp=2 on gloo) is in the zoo
matrix: tests/zoo_matrix.py rows "hf-gpt2", "hf-llama", "hf-bert", run by tests/test_zoo.py.
"""

from __future__ import annotations

import copy
import operator
import sys

import pytest
import torch
import torch.nn as nn

import partc
from partc.errors import PartcError, TraceError
from partc.models import MODELS, num_params, training_case
from partc.passes.capture import capture
from partc.passes.recompute import checkpoint_layers
from partc.passes.split_stages import split_stages
from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS
from harness import case_cluster  # tests/distributed (on pytest's pythonpath)

HF_MODELS = ("hf-gpt2", "hf-llama", "hf-bert")
BATCH, SEQ = 4, 16


def test_registry_lists_them_without_transformers(monkeypatch):
    """The names list without transformers; building one says how to install it."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    assert all(name in MODELS for name in HF_MODELS)
    with pytest.raises(PartcError, match="pip install transformers"):
        training_case("hf-gpt2", batch_size=2, seq_len=8)


transformers = pytest.importorskip("transformers")  # the rest need it (the "test" extra installs it)


@pytest.fixture(scope="module")
def cases():
    result = {}
    for name in HF_MODELS:
        torch.manual_seed(0)
        result[name] = training_case(name, batch_size=BATCH, seq_len=SEQ, device="cpu")
    return result


@pytest.fixture(scope="module")
def cluster():
    """2 devices slow against their links, so that tensor parallelism pays at these sizes
    (the zoo's "tp-test" cluster)."""
    return case_cluster("tp-test", 2)


@pytest.fixture(scope="module")
def plans(cases, cluster):
    """Each model planned on the 2 devices: replicated, as a pipeline, tensor parallel."""
    return {(name, kind): partc.plan(case.model, cluster, case.inputs, mesh={kind: 2}) for name, case in cases.items() for kind in ("dp", "pp", "tp")}


@pytest.mark.parametrize("name", HF_MODELS)
def test_config_is_tiny_and_deterministic(name, cases):
    case = cases[name]
    cfg = case.model.config
    assert cfg.use_cache is False
    assert getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)) == 2
    dropouts = {key: value for key, value in cfg.to_dict().items() if ("drop" in key) and isinstance(value, float)}
    assert dropouts and not any(dropouts.values()), dropouts
    assert not any(m.p for m in case.model.modules() if isinstance(m, nn.Dropout))
    assert num_params(case.model) < 200_000
    torch.manual_seed(0)
    again = training_case(name, batch_size=BATCH, seq_len=SEQ, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(case.model.state_dict().values(), again.model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(case.inputs, again.inputs)) and torch.equal(case.targets, again.targets)


@pytest.mark.parametrize("name", HF_MODELS)
def test_capture_falls_back_to_export_and_keeps_model_output(name, cases):
    case = cases[name]
    gm = capture(case.model, case.inputs)
    info = gm.meta["partc"]
    assert info.frontend == "torch.export"
    assert info.fallback_reason and ":" in info.fallback_reason  # "<ExceptionType>: <message>" of symbolic tracing
    with pytest.raises(TraceError, match="symbolic tracing"):
        capture(case.model, case.inputs, frontend="fx")
    # One flat graph of operators: export's no_grad region (rotary tables) is inlined.
    assert not any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in gm.graph.nodes)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in gm.children())
    # Parameters keep their names; a tied weight is read once, under its first name. Other
    # reads are tensors the forward makes from constants, which export lifts (torch 2.11
    # lifts a 0-d mask constant of the CPU models, torch 2.13 none).
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    model_names = [n for n, _ in case.model.named_parameters(remove_duplicate=False)] + [n for n, _ in case.model.named_buffers(remove_duplicate=False)]
    lifted = set(names) - set(model_names)
    assert all(n.rsplit(".", 1)[-1].startswith("lifted_tensor_") and operator.attrgetter(n)(gm).dim() == 0 for n in lifted), lifted
    assert len({id(operator.attrgetter(n)(gm)) for n in names}) == len(names)
    if name != "hf-llama":  # GPT-2 and BERT tie the LM head to the word embeddings
        assert case.model.get_output_embeddings().weight is case.model.get_input_embeddings().weight
        assert sum(operator.attrgetter(n)(gm) is case.model.get_input_embeddings().weight for n in names) == 1
    # The graph returns what the model returns: a ModelOutput with the same logits.
    got, want = gm(*case.inputs), case.model(*case.inputs)
    assert type(got) is type(want) and isinstance(got, transformers.utils.ModelOutput)
    assert list(got.keys()) == ["logits"]
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert got[0] is got.logits and got["logits"] is got.logits


def test_no_grad_region_stays_without_gradient():
    """An inlined no_grad region gets its outputs detached: no gradient reaches what it read."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                y = self.inner(x)
            return self.outer(y) + y

    model, x = Net(), torch.randn(2, 4)
    gm = capture(model, (x,), frontend="export")
    assert any(n.target is torch.ops.aten.detach.default for n in gm.graph.nodes)
    gm(x).sum().backward()
    assert model.inner.weight.grad is None and model.outer.weight.grad is not None


def test_autocast_region_is_refused_with_its_fix():
    class Autocast(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.linear(x)
            return y.float()

    with pytest.raises(TraceError, match="wrap_with_autocast") as info:
        capture(Autocast(), (torch.randn(2, 4),), frontend="export")
    assert "remove torch.autocast" in info.value.context.fix and "wrap_with_autocast" in info.value.context.node
    assert info.value.context.source and "self.linear(x)" in info.value.context.source  # the user's line


@pytest.mark.parametrize("name", HF_MODELS)
def test_plans_on_two_devices(name, cases, plans):
    model = cases[name].model
    dp, pp, tp = plans[name, "dp"], plans[name, "pp"], plans[name, "tp"]
    for plan in (dp, pp, tp):
        assert plan.frontend == "torch.export" and plan.fallback_reason
        assert plan.fits and 0 < plan.predicted_step_time < 1.0  # a 0.1M-parameter model steps in well under a second
    # Every parameter is counted once (GPT-2's and BERT's tied embedding / LM head included).
    layers = pp.graph.meta["partc"].layers
    assert sum(layer.param_numel for layer in layers) == num_params(model)
    # Forward FLOPs: at least 2 per weight of every matmul per token (the LM head's vocab x
    # hidden weight included, also where it is the tied embedding), plus attention.
    tokens = BATCH * SEQ
    lookup_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lm_head = model.get_output_embeddings().weight
    matmul_weights = sum(p.numel() for p in model.parameters() if p.dim() == 2 and (id(p) not in lookup_tables or p is lm_head))
    fwd = sum(layer.fwd_flops for layer in layers)
    assert 2 * tokens * matmul_weights <= fwd <= 2 * 2 * tokens * matmul_weights
    # The pipeline: two stages, each with one of the two transformer blocks, each holding
    # less than the whole model. On torch < 2.13 no cut may send a tensor without gradient
    # (the attention mask goes from the embeddings to every block), so both blocks share
    # the first stage and the head is the second.
    assert pp.mesh.get("pp") == 2 and len(pp.stages) == 2
    blocks = [[layer for layer in stage.layers if layer.rsplit(".", 1)[-1].isdigit()] for stage in pp.stages]
    assert [len(b) for b in blocks] == ([2, 0] if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else [1, 1]), [stage.layers for stage in pp.stages]
    assert all(stage.peak_memory < dp.memory.total for stage in pp.stages)
    # Tensor parallel: the blocks' linears are sharded, so each device holds fewer parameter bytes.
    layouts = tp.tensor_parallel["parameters"]
    sharded = [n for n, layout in layouts.items() if layout != "R"]
    assert any(".0." in n for n in sharded) and any(".1." in n for n in sharded), layouts
    assert tp.memory.parameters < dp.memory.parameters


@pytest.mark.parametrize("name", HF_MODELS)
def test_model_output_reaches_loss_fn_in_a_pipeline(name, cases, cluster):
    """Outside torchrun compile runs the stages in this process: the last stage hands
    loss_fn the ModelOutput (``outputs.logits``), also with the loss traced into the graph."""
    case = cases[name]
    seen: list[type] = []

    def loss_fn(outputs, targets):
        seen.append(type(outputs))
        return case.loss_fn(outputs, targets)

    outputs = case.model(*case.inputs)
    want = case.loss_fn(outputs, case.targets)
    pm = partc.compile(copy.deepcopy(case.model), cluster, case.inputs, loss_fn=loss_fn, mesh={"pp": 2}, microbatches=2)
    torch.testing.assert_close(pm.step(case.inputs, case.targets), want.detach())
    assert seen and all(t is type(outputs) for t in seen)

    # The loss traced into the graph (it reads outputs.logits while tracing). torch < 2.13
    # cannot pipeline it (the targets would cross the cut): there it runs over 2
    # data-parallel replicas of 2 microbatches, in this process as well.
    mesh = {"dp": 2} if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else {"pp": 2}
    traced = partc.compile(copy.deepcopy(case.model), cluster, case.inputs, loss_fn=case.loss_fn, mesh=mesh, microbatches=2, example_targets=case.targets)
    torch.testing.assert_close(traced.step(case.inputs, case.targets), want.detach())


def test_model_output_survives_recompute(cases, plans):
    """The per-layer checkpointing rewrite (passes/recompute.py) keeps the output type."""
    case = cases["hf-llama"]
    plan = plans["hf-llama", "dp"]
    stage = split_stages(plan.graph, [0] * len(plan.layers), case.inputs)[0]
    checkpoint_layers(stage.module)
    assert any(name.startswith("recompute_layer_") for name, _ in stage.module.named_children())
    got, want = stage.module(*case.inputs), case.model(*case.inputs)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)


def test_no_stage_sends_a_view(cases, plans):
    """GPT-2's body ends in a slice (``hidden[:, -n:]``); a cut right after it sends a copy,
    since torch's zero-bubble schedules detach stage outputs in place (refused for views)."""
    case, plan = cases["hf-gpt2"], plans["hf-gpt2", "pp"]
    names = [layer.name for layer in plan.graph.meta["partc"].layers]
    assert names[-1] == "lm_head"
    stage_of_layer = [0] * (len(names) - 1) + [1]  # cut just before the LM head
    stages = split_stages(plan.graph, stage_of_layer, case.inputs)
    sent = stages[0].module(*case.inputs)
    assert sent and not any(t._is_view() for t in sent)
    torch.testing.assert_close(stages[1].module(*sent).logits, case.model(*case.inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", HF_MODELS)
def test_meta_model_plans_like_the_real_one(name, cluster, plans):
    """Built on the meta device (no weights), a model plans as the real one: export writes
    the meta device into the graph (Llama's rotary table .to(device)), and shape propagation
    keeps every fake on the CPU. (The fingerprints differ: the graph names the device it was
    traced on.) Exactly, but for export lifting a constant the CPU forward makes (torch 2.11:
    a 0-d mask value, copied by one more node, 8 bytes; torch 2.13 lifts none)."""
    meta = training_case(name, batch_size=BATCH, seq_len=SEQ, device="meta")
    plan = partc.plan(meta.model, cluster, meta.inputs, mesh={"pp": 2})
    real = plans[name, "pp"]
    lifted = [n for n in real.graph.graph.nodes if n.op == "get_attr" and n.target.rsplit(".", 1)[-1].startswith("lifted_tensor_")]
    if not lifted:
        assert plan.predicted_step_time == real.predicted_step_time and plan.memory == real.memory
    else:
        assert all(n.meta["val"].dim() == 0 for n in lifted)
        assert plan.predicted_step_time == pytest.approx(real.predicted_step_time, rel=1e-6)
        assert plan.memory.total == pytest.approx(real.memory.total, rel=1e-6)
