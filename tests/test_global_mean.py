"""The global-mean pass (passes/global_mean.py) in one process: compile() outside torchrun
runs the plan's microbatches one after another, so a traced "mean" over padded class
targets must come out as torch's mean over the whole batch, not the average of the
microbatches' means. The multi-process cases are tests/test_loss_mean_parity.py."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import build
from partc.passes.annotate import annotate
from partc.passes.capture import attach_loss, capture
from partc.passes.global_mean import global_mean_loss
from partc.passes.propagate import propagate

CPU2 = partc.Cluster.preset("cpu", devices_per_node=2)
PADDING_PER_ROW = (16, 16, 12, 9, 5, 3, 1, 0)  # sixteenths of a row: in 4 microbatches the first keeps no target


def shifted_loss(logits, targets):
    """A causal LM's loss: position t predicts token t + 1 (the graph slices the targets)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1))


def padded(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    targets = targets.clone()
    for row, padding in enumerate(PADDING_PER_ROW):
        targets[row, targets.shape[1] - padding * targets.shape[1] // 16 :] = ignore_index
    return targets


class WeightedTagger(nn.Module):
    """A token classifier whose forward returns its loss: nll_loss with class weights (a
    buffer, or a trainable parameter) and ignore_index=0."""

    def __init__(self, trainable_weights: bool = False):
        super().__init__()
        self.embed, self.head = nn.Embedding(64, 16), nn.Linear(16, 5)
        weights = torch.linspace(0.5, 2.0, 5)
        if trainable_weights:
            self.class_weights = nn.Parameter(weights)
        else:
            self.register_buffer("class_weights", weights)

    def forward(self, idx, labels):
        logits = self.head(torch.tanh(self.embed(idx)))
        return F.nll_loss(F.log_softmax(logits, -1).reshape(-1, 5), labels.reshape(-1), weight=self.class_weights, ignore_index=0)


def output_is_loss(output, targets):
    return output


def _gpt_case():
    torch.manual_seed(0)
    model, (idx,) = build("gpt-tiny", batch_size=8)
    targets = padded(torch.randint(0, 128, idx.shape))
    return model, (idx,), targets, shifted_loss


def _tagger_case():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (8, 16))
    labels = padded(torch.randint(1, 5, (8, 16)), ignore_index=0)
    return WeightedTagger(), (idx, labels), labels, output_is_loss


def _microbatch_means(model, inputs, targets, loss_fn, pieces):
    """What averaging each microbatch's own mean gives (what the runners did before)."""
    chunks = [x.chunk(pieces) for x in (*inputs, targets)]
    with torch.no_grad():
        return sum(loss_fn(model(*(c[k] for c in chunks[:-1])), chunks[-1][k]) for k in range(pieces)) / pieces


@pytest.mark.parametrize("case", [_gpt_case, _tagger_case], ids=["shifted-targets", "weighted-nll"])
def test_microbatched_pipeline_gives_the_global_batch_mean(case):
    model, inputs, targets, loss_fn = case()
    reference = copy.deepcopy(model)
    expected = loss_fn(reference(*inputs), targets)
    expected.backward()
    # The case can tell the two apart (the first microbatch keeps no target: its mean is nan).
    naive = _microbatch_means(copy.deepcopy(model), inputs, targets, loss_fn, 4)
    assert not torch.allclose(naive, expected.detach(), rtol=1e-5, atol=1e-6)

    pm = partc.compile(model, CPU2, inputs, loss_fn=loss_fn, example_targets=targets, mesh={"pp": 2}, microbatches=4)
    assert "divide_by_global_normaliser" in pm._runner.stages[-1].module.code
    for step in range(2):  # the normaliser is set again each step
        for p in pm.parameters():
            p.grad = None
        loss = pm.step(inputs, targets)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        grads = dict(reference.named_parameters())
        for name, p in pm.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)
    assert set(pm.state_dict()) == set(reference.state_dict())  # the normaliser is not state


def test_class_weights_computed_from_parameters_are_refused():
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 64, (8, 16)), torch.randint(0, 5, (8, 16))
    with pytest.raises(partc.PartcError, match="depend on a trainable parameter"):
        partc.compile(WeightedTagger(trainable_weights=True), CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, mesh={"pp": 2}, microbatches=2)


def _graph(loss_fn, targets):
    torch.manual_seed(0)
    model, (idx,) = build("gpt-tiny", batch_size=4)
    gm = attach_loss(capture(model, (idx,)), loss_fn)
    return annotate(propagate(gm, (idx, targets)))


def test_only_a_class_index_mean_returned_by_the_graph_is_taken_over_the_global_batch():
    idx_targets = torch.randint(0, 128, (4, 32))
    assert global_mean_loss(_graph(shifted_loss, idx_targets), pieces=1) is None  # one piece: its own mean is the mean
    assert global_mean_loss(_graph(shifted_loss, idx_targets), pieces=2) is not None

    def summed(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    def probabilities(logits, targets):  # "mean" over rows, equal in every microbatch
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, targets.shape[-1]))

    assert global_mean_loss(_graph(summed, idx_targets), pieces=2) is None
    assert global_mean_loss(_graph(probabilities, torch.rand(4, 32, 128)), pieces=2) is None

    def with_penalty(logits, targets):
        return shifted_loss(logits, targets) + 1e-3 * logits.pow(2).mean()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert global_mean_loss(_graph(with_penalty, idx_targets), pieces=2) is None
    assert any("inside a larger loss" in str(w.message) for w in caught)
