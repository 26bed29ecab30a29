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
from partc.passes.ir import EXPORT_FRONTEND, FX_FRONTEND
from partc.passes.layouts import class_index_mean, class_loss_arguments, holds_class_indices
from partc.passes.propagate import propagate
from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS

CPU2 = partc.Cluster.preset("cpu", devices_per_node=2)
PADDING_PER_ROW = (16, 16, 12, 9, 5, 3, 1, 0)  # sixteenths of a row: in 4 microbatches the first keeps no target
# A step in 4 (or 2) pieces, run one after another in this process: a 2-stage pipeline's
# microbatches. torch < 2.13 cannot pipeline these models (their targets or labels would
# cross the cut; partc refuses), so there the pieces are 2 data-parallel replicas'
# microbatches, over which the loss is the global batch's mean the same way (one stage).
FOUR_PIECES = dict(mesh={"dp": 2}, microbatches=2) if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else dict(mesh={"pp": 2}, microbatches=4)
TWO_PIECES = dict(mesh={"dp": 2}, microbatches=1) if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else dict(mesh={"pp": 2}, microbatches=2)


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


SECOND_PADDING_PER_ROW = (0, 1, 2, 3, 6, 12, 16, 16)  # the last microbatch keeps no target; fewer padded in all


def repadded(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``targets`` padded otherwise (the last rows most, fewer positions in all): a second
    step whose normaliser differs from the first's in every microbatch and in total."""
    targets = targets.clone()
    for row, padding in enumerate(SECOND_PADDING_PER_ROW):
        targets[row, targets.shape[1] - padding * targets.shape[1] // 16 :] = ignore_index
    return targets


def _steps_match_the_whole_batch(pm, model, batches, loss_fn, targets_are_inputs=False):
    """Step ``pm`` and a reference copy of ``model`` on each (inputs, targets) of
    ``batches``; the losses and gradients must be the reference's."""
    for inputs, targets in batches:
        for p in (*pm.parameters(), *model.parameters()):
            p.grad = None
        expected = loss_fn(model(*inputs), targets)
        expected.backward()
        loss = pm.step(inputs, targets)
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
        grads = dict(model.named_parameters())
        for name, p in pm.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [_gpt_case, _tagger_case], ids=["shifted-targets", "weighted-nll"])
def test_microbatched_pipeline_gives_the_global_batch_mean(case):
    model, inputs, targets, loss_fn = case()
    reference = copy.deepcopy(model)
    # The case can tell the two apart (the first microbatch keeps no target: its mean is nan).
    naive = _microbatch_means(copy.deepcopy(model), inputs, targets, loss_fn, 4)
    assert not torch.allclose(naive, loss_fn(model(*inputs), targets).detach(), rtol=1e-5, atol=1e-6)

    pm = partc.compile(model, CPU2, inputs, loss_fn=loss_fn, example_targets=targets, **FOUR_PIECES)
    assert "divide_by_global_normaliser" in pm._runner.stages[-1].module.code
    # The normaliser is set again each step: the second step pads other rows (the last
    # microbatch keeps no target now), so a stale normaliser gives another loss.
    ignore_index = 0 if case is _tagger_case else -100
    second = repadded(targets.masked_fill(targets == ignore_index, 1), ignore_index)
    second_inputs = (inputs[0], second) if case is _tagger_case else inputs
    _steps_match_the_whole_batch(pm, reference, [(inputs, targets), (second_inputs, second)], loss_fn)
    assert set(pm.state_dict()) == set(reference.state_dict())  # the normaliser is not state


class TaggerLoss(nn.Module):
    """A token classifier whose forward returns a class-weighted cross entropy, written in
    one of the ways ``kind`` names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed, self.head = nn.Embedding(64, 16), nn.Linear(16, 5)
        self.register_buffer("class_weights", torch.linspace(0.5, 2.0, 5))

    def forward(self, idx, labels):
        logits = self.head(torch.tanh(self.embed(idx)))
        flat, labels = logits.reshape(-1, 5), labels.reshape(-1)
        if self.kind == "module":  # created in forward: torch.export captures aten.cross_entropy_loss
            return nn.CrossEntropyLoss(weight=self.class_weights)(flat, labels)
        if self.kind == "nll_3d":  # aten.nll_loss_nd under torch.export
            return F.nll_loss(F.log_softmax(logits, -1).transpose(1, 2), labels.view(idx.shape), weight=self.class_weights)
        loss = F.cross_entropy(flat, labels, weight=self.class_weights, label_smoothing=0.1)
        if self.kind == "wrapped":  # scalar wrappers commute with the division by the normaliser
            return (loss.float() * 3.0 / 2).to(torch.float32)
        if self.kind == "random":  # BERT-style: score a random 30% of the positions
            keep = torch.rand(labels.shape) < 0.3
            return F.cross_entropy(flat, labels.masked_fill(~keep, -100))
        if self.kind == "in_place":  # labels written in place before the loss reads them
            labels = labels.clone()
            labels.masked_fill_(labels == 3, -100)
            return F.cross_entropy(flat, labels, weight=self.class_weights)
        if self.kind == "in_place_index":  # torch.export: aten.index_put_
            labels = labels.clone()
            labels[labels == 3] = -100
            return F.cross_entropy(flat, labels, weight=self.class_weights)
        return loss


def _tagger_batch():
    torch.manual_seed(0)
    return torch.randint(0, 64, (8, 16)), padded(torch.randint(0, 5, (8, 16)))


@pytest.mark.parametrize(
    "kind, frontend",
    [("module", "export"), ("nll_3d", "export"), ("wrapped", "fx"), ("wrapped", "export"), ("in_place", "fx"), ("in_place_index", "export"), ("plain", "fx")],
)
def test_class_loss_of_every_frontend_and_wrapper_is_the_global_mean(kind, frontend):
    idx, labels = _tagger_batch()
    model = TaggerLoss(kind)
    reference = copy.deepcopy(model)
    naive = _microbatch_means(copy.deepcopy(model), (idx, labels), labels, output_is_loss, 4)
    assert not torch.allclose(naive, model(idx, labels).detach(), rtol=1e-5, atol=1e-6)  # the case tells them apart
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the per-piece mean
        pm = partc.compile(model, CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, **FOUR_PIECES, frontend=frontend)
    assert pm.plan.frontend == {"fx": FX_FRONTEND, "export": EXPORT_FRONTEND}[frontend]
    assert "divide_by_global_normaliser" in pm._runner.stages[-1].module.code
    _steps_match_the_whole_batch(pm, reference, [((idx, labels), labels), ((idx, repadded(labels)), repadded(labels))], output_is_loss)


def test_all_padded_batch_gives_nan_loss_and_zero_gradients_as_torch():
    idx, labels = _tagger_batch()
    labels = torch.full_like(labels, -100)
    model = TaggerLoss("plain")
    pm = partc.compile(copy.deepcopy(model), CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, **FOUR_PIECES)
    assert pm._runner.normaliser is not None
    _steps_match_the_whole_batch(pm, model, [((idx, labels), labels)], output_is_loss)
    assert all(torch.count_nonzero(p.grad) == 0 for p in pm.parameters())


def test_class_weights_are_read_from_the_module_that_holds_them_at_step_time():
    """After the loss's module moved its buffers (``.to(device)`` makes new tensors) and
    loaded new class weights, the normaliser uses the loaded ones."""
    idx, labels = _tagger_batch()
    model = TaggerLoss("plain")
    pm = partc.compile(copy.deepcopy(model), CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, **FOUR_PIECES)
    holder = pm._runner.stages[-1].module
    holder.class_weights = holder.class_weights.clone()  # what .to(device) does to a buffer (before compile returns)
    new_weights = torch.tensor([5.0, 0.1, 0.1, 0.1, 3.0])
    holder.class_weights.copy_(new_weights)  # what load_state_dict or a DCP load does then
    model.class_weights.copy_(new_weights)
    _steps_match_the_whole_batch(pm, model, [((idx, labels), labels)], output_is_loss)


def test_random_targets_keep_the_per_piece_mean_and_leave_the_generator_alone():
    """A random mask in forward cannot be counted ahead of the step (the count would draw
    another one): partc warns, naming the node and line, and runs each microbatch's mean as
    before, drawing exactly what the microbatches draw."""
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 64, (8, 16)), torch.randint(0, 5, (8, 16))
    model = TaggerLoss("random")
    with pytest.warns(UserWarning, match=r"drawn at random \(rand.*test_global_mean.py:\d+.*mask the labels in the data pipeline.*loss_reduction='sum'"):
        pm = partc.compile(copy.deepcopy(model), CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, **FOUR_PIECES)
    assert pm._runner.normaliser is None
    torch.manual_seed(7)
    per_piece = _microbatch_means(model, (idx, labels), labels, output_is_loss, 4)
    torch.manual_seed(7)
    torch.testing.assert_close(pm.step((idx, labels), labels), per_piece, rtol=1e-5, atol=1e-6)


def test_model_returning_its_loss_without_example_targets_warns():
    idx, labels = _tagger_batch()
    with pytest.warns(UserWarning, match="without example_targets.*pass example_targets"):
        pm = partc.compile(TaggerLoss("plain"), CPU2, (idx, labels), loss_fn=output_is_loss, **FOUR_PIECES)
    assert pm._runner.normaliser is None


def test_class_weights_computed_from_parameters_are_refused():
    torch.manual_seed(0)
    idx, labels = torch.randint(0, 64, (8, 16)), torch.randint(0, 5, (8, 16))
    with pytest.raises(partc.PartcError, match="depend on a trainable parameter"):
        partc.compile(WeightedTagger(trainable_weights=True), CPU2, (idx, labels), loss_fn=output_is_loss, example_targets=labels, **TWO_PIECES)


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


def test_a_target_of_unknown_dtype_is_not_taken_for_class_indices():
    gm = _graph(shifted_loss, torch.randint(0, 128, (4, 32)))
    loss = next(n for n in gm.graph.nodes if class_index_mean(n) is not None)
    target = class_loss_arguments(loss)["target"]
    target.meta.pop("val", None)
    target.meta.pop("partc", None)
    assert not holds_class_indices(target)
    assert global_mean_loss(gm, pieces=2) is None


def test_the_counter_reads_the_models_tensors_and_loss_fns_own():
    """When the user's model runs and loss_fn alone divides by the normaliser, the counter
    may read a tensor of the model (a label map the model returns) and one loss_fn holds (its
    lifted class weights): each is found where it lives (the model was the only place looked
    at, then only loss_fn's module; each refused the other's tensor)."""
    from partc.runtime.loss_normaliser import NORMALISER_BUFFER, GlobalLossNormaliser

    model, loss_module = nn.Module(), nn.Module()
    model.register_buffer("remap", torch.arange(5).flip(0))
    loss_module.register_buffer("loss_fn_constant0", torch.linspace(0.5, 1.5, 5), persistent=False)
    loss_module.register_buffer(NORMALISER_BUFFER, torch.zeros((), dtype=torch.float64), persistent=False)
    graph = torch.fx.Graph()
    targets = graph.placeholder("targets")
    remap, weights = graph.get_attr("remap"), graph.get_attr("loss_fn_constant0")
    classes = graph.call_function(torch.Tensor.__getitem__, (remap, targets))
    graph.output(graph.call_function(torch.Tensor.sum, (graph.call_function(torch.Tensor.__getitem__, (weights, classes)),)))
    root = nn.Module()
    root.remap, root.loss_fn_constant0 = model.remap, loss_module.loss_fn_constant0
    counter = torch.fx.GraphModule(root, graph)
    normaliser = GlobalLossNormaliser(counter, 2, loss_module, state=model)
    targets = torch.tensor([[0, 1], [2, 4]])
    normaliser.set_batch([targets])
    expected = loss_module.loss_fn_constant0[model.remap[targets]].sum()
    torch.testing.assert_close(getattr(loss_module, NORMALISER_BUFFER), expected.double())
