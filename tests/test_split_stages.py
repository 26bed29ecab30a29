"""The split-stages pass and compile() outside torchrun, in one process."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import build
from partc.passes.annotate import annotate
from partc.passes.capture import attach_loss, capture
from partc.passes.ir import graph_info
from partc.passes.propagate import propagate
from partc.passes.split_stages import split_stages
from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS

# torch < 2.13 cannot send the targets (no gradient) across a pipeline cut, so partc
# refuses to pipeline a model compiled with example_targets there.
NEEDS_TARGETS_ACROSS_A_CUT = pytest.mark.skipif(PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS, reason="torch < 2.13: pipelining cannot send targets across a cut")


def _loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _annotated(name: str, batch: int = 4):
    torch.manual_seed(0)
    model, (idx,) = build(name, batch_size=batch)
    return model, idx, annotate(propagate(capture(model, (idx,)), (idx,)))


def _run(stages, *inputs):
    values = inputs
    for stage in stages:
        out = stage.module(*values)
        values = out if isinstance(out, tuple) and stage is not stages[-1] else (out,)
    return values[0]


def test_stages_compose_to_the_model_and_keep_names():
    model, idx, gm = _annotated("gpt-tiny")
    names = [l.name for l in graph_info(gm).layers]  # <root> wte wpe drop blocks.0 blocks.1 ln_f lm_head
    stage_of_layer = [0, 0, 0, 0, 1, 1, 2, 2]
    stages = split_stages(gm, stage_of_layer, (idx,), persistent_names=set(model.state_dict()))
    torch.testing.assert_close(_run(stages, idx), model(idx))
    assert [s.layers for s in stages] == [tuple(names[:4]), ("blocks.0", "blocks.1"), ("ln_f", "lm_head")]
    # The tied embedding / LM head weight is held by the first and last stage, once each.
    assert [s.shared for s in stages] == [("wte.weight",), (), ("wte.weight",)]
    keys = [set(s.module.state_dict()) for s in stages]
    assert set().union(*keys) == set(model.state_dict()) - {"lm_head.weight"}  # the alias of wte.weight
    assert "wte.weight" in keys[2] and "blocks.0.ln_1.weight" in keys[1]
    # Stage 1 receives exactly the hidden state; its Python sizes are constants.
    assert len(stages[1].inputs) == 1 and stages[1].input_specs[0].shape == (4, 32, 64)
    assert stages[1].input_grads == (True,)


def test_skip_connection_is_relayed_through_middle_stages():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            return self.c(torch.relu(self.b(h))) + h

    model, x = Skip(), torch.randn(4, 8)
    gm = annotate(propagate(capture(model, (x,)), (x,)))
    stages = split_stages(gm, [0, 1, 2], (x,))
    torch.testing.assert_close(_run(stages, x), model(x))
    assert stages[0].outputs == ("linear",)  # h
    assert stages[1].outputs == ("linear", "relu")  # h relayed, in graph order, beside b's output


def test_loss_in_graph_routes_targets_to_the_last_stage():
    model, idx, _ = _annotated("gpt-tiny")
    targets = torch.randint(0, 128, idx.shape)
    gm = annotate(propagate(attach_loss(capture(model, (idx,)), _loss), (idx, targets)))
    assert graph_info(gm).loss_in_graph
    stages = split_stages(gm, [0, 0, 0, 0, 1, 1, 1, 1], (idx, targets))
    assert stages[0].inputs == ("idx", "targets")
    assert "targets" in stages[1].inputs  # carried from stage 0 to the loss
    torch.testing.assert_close(_run(stages, idx, targets), _loss(model(idx), targets))


def test_bad_stage_assignment_is_refused():
    model, idx, gm = _annotated("gpt-tiny")
    with pytest.raises(partc.PartcError, match="non-decreasing"):
        split_stages(gm, [0, 1, 0, 1, 1, 1, 1, 1], (idx,))


@pytest.mark.parametrize("loss_in_graph", [False, pytest.param(True, marks=NEEDS_TARGETS_ACROSS_A_CUT)])
def test_compile_outside_torchrun_equals_single_device(loss_in_graph):
    model, idx, _ = _annotated("gpt-tiny", batch=8)
    reference = copy.deepcopy(model)
    targets = torch.randint(0, 128, idx.shape)
    extra = {"example_targets": targets} if loss_in_graph else {}
    pm = partc.compile(model, partc.Cluster.preset("cpu", devices_per_node=2), idx, loss_fn=_loss, mesh={"pp": 2}, microbatches=4, **extra)
    assert pm.plan.mesh["pp"] == 2 and len(pm.plan.stages) == 2
    loss = pm.step(idx, targets)
    expected = _loss(reference(idx), targets)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in pm.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)
    assert set(pm.state_dict()) == set(reference.state_dict())
    if loss_in_graph:
        with pytest.raises(partc.PartcError, match="graph ends in the loss"):
            pm(idx)
    else:
        torch.testing.assert_close(pm(idx), reference(idx))


@NEEDS_TARGETS_ACROSS_A_CUT
def test_gpt2_pipeline_with_loss_is_balanced():
    """Issue #3: GPT-2 124M at p=2 with embedding, LM head and loss counted."""
    model, (idx,) = build("gpt2", batch_size=8, device="meta")
    targets = torch.zeros_like(idx)
    plan = partc.plan(
        model, partc.Cluster.preset("h100", devices_per_node=2), idx, loss_fn=_loss, example_targets=targets,
        mesh={"pp": 2}, microbatches=8, mixed_precision="bf16",
    )
    times = [s.predicted_time for s in plan.stages]
    equal = [s.predicted_time for s in plan.equal_split_stages]
    loss_node = list(plan.graph.graph.nodes)[-2]
    assert graph_info(plan.graph).loss_in_graph and loss_node.meta["partc"].name == "cross_entropy"
    assert plan.layers[loss_node.meta["partc"].layer].name == "lm_head"  # the loss joins the head's layer
    assert max(times) / (sum(times) / 2) <= 1.05
    assert max(equal) / (sum(equal) / 2) > 1.2
