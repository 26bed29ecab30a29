"""Capture and propagate passes: the graph a model becomes, and the shapes on it."""

from __future__ import annotations

import collections
import resource

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import partc
import partc.models
from partc.passes.annotate import annotate
from partc.passes.capture import attach_loss, capture, traced_loss
from partc.passes.ir import OpKind, graph_info, node_info, op_kind
from partc.passes.propagate import propagate
from partc.passes.stages import PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS

COMPUTE_KINDS = (OpKind.LINEAR, OpKind.MATMUL, OpKind.ATTENTION, OpKind.EMBEDDING, OpKind.LAYER_NORM, OpKind.SOFTMAX)


def _build(name: str, **kwargs):
    torch.manual_seed(0)
    return partc.models.build(name, **{"batch_size": 2, "seq_len": 16, **kwargs})


def _pipeline(model, inputs, frontend="auto"):
    gm = capture(model, inputs, frontend=frontend)
    propagate(gm, inputs)
    annotate(gm)
    return gm


def _state_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} | {
        name for name, _ in model.named_buffers(remove_duplicate=False)
    }


def _fetch(gm: torch.fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


# -- the fx frontend --------------------------------------------------------------------------
def test_fx_path_on_gpt_tiny_traces_through_modules_and_reproduces_the_model():
    model, (idx,) = _build("gpt-tiny")
    gm = capture(model, (idx,))

    assert graph_info(gm).frontend == "fx.symbolic_trace"
    assert graph_info(gm).fallback_reason is None
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert targets and set(targets) <= _state_names(model)
    # The graph module holds the model's own tensors, not copies.
    assert _fetch(gm, "blocks.0.attn.qkv.weight") is model.blocks[0].attn.qkv.weight
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["idx"]
    torch.testing.assert_close(gm(idx), model(idx))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_graph_with_the_loss_attached_runs_and_prints_the_loss(frontend):
    """The fx frontend's module generates its code when first run or read (planning only
    reads nodes): attaching the loss afterwards must still be in that code."""
    model, (idx,) = _build("gpt-tiny")
    targets = idx.roll(-1, dims=1)  # token ids: valid class indices
    gm = attach_loss(capture(model, (idx,), frontend=frontend), lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten()))
    assert "cross_entropy" in gm.code
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(gm(idx, targets), expected)


class _FlatCriterion(nn.Module):
    """A loss module in the usual style: it holds an nn.CrossEntropyLoss with class weights."""

    def __init__(self, classes: int):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, classes), ignore_index=0)

    def forward(self, logits, targets):
        return self.criterion(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_loss_module_with_class_weights_is_traced_with_its_weights(frontend):
    """loss_fn=nn.CrossEntropyLoss(...) (or a module holding one) was refused ('module is not
    installed as a submodule'); its weights become a buffer of the graph, outside the state
    dict, and the graph's loss is the module's."""
    model, (idx,) = _build("gpt-tiny")
    targets = idx.roll(-1, dims=1)
    criterion = _FlatCriterion(model.config.vocab_size)
    gm = attach_loss(capture(model, (idx,), frontend=frontend), criterion)
    assert dict(gm.named_buffers())["loss_fn_constant0"].equal(criterion.criterion.weight)
    assert "loss_fn_constant0" not in gm.state_dict()
    torch.testing.assert_close(gm(idx, targets), criterion(model(idx), targets))
    alone = traced_loss(gm)  # the loss alone (compile's replicas of the user's model) holds the weights too
    torch.testing.assert_close(alone(model(idx), targets), criterion(model(idx), targets))


class _HoldsAnUnreadBuffer(nn.Module):
    """A model with a buffer its forward never reads, named like a lifted loss constant."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)
        self.register_buffer("loss_fn_constant0", torch.full((3,), 7.0))

    def forward(self, idx):
        return self.head(self.emb(idx))


def test_lifted_loss_constants_are_named_apart_from_the_models_state():
    """The buffer is not in the captured graph (forward never reads it) but is in the model's
    state dict: the class weights must not take its name (a pipeline then saved them under
    it, and loading the model's checkpoint failed on the shapes). torch's pipelining before
    2.13 cannot send the targets across a cut, so there the module is data-parallel."""
    model, idx, labels = _HoldsAnUnreadBuffer(), torch.randint(0, 16, (8, 4)), torch.randint(0, 16, (8, 4))
    criterion = nn.CrossEntropyLoss(weight=torch.linspace(0.5, 2.0, 16))
    mesh = {"dp": 2} if PIPELINE_NEEDS_GRADIENTS_ACROSS_CUTS else {"pp": 2}
    pm = partc.compile(model, partc.Cluster.preset("cpu", devices_per_node=2), (idx,), loss_fn=lambda o, y: criterion(o.flatten(0, 1), y.flatten()), example_targets=labels, mesh=mesh, microbatches=2)
    lifted = [name for name, _ in pm.plan.graph.named_buffers() if name.startswith("loss_fn_constant")]
    assert lifted == ["loss_fn_constant1"]
    pm.load_state_dict(model.state_dict())


def test_a_loss_with_a_learnable_weight_is_refused_with_the_fix():
    model, (idx,) = _build("gpt-tiny")
    scale = nn.Parameter(torch.ones(()))
    with pytest.raises(partc.TraceError, match="learnable") as error:
        attach_loss(capture(model, (idx,)), lambda logits, t: scale * F.cross_entropy(logits.flatten(0, 1), t.flatten()))
    assert "a module of the model" in str(error.value)


class _TakesTargets(nn.Module):
    """A model whose forward has an argument named like attach_loss's placeholder."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, idx, targets):
        return self.head(self.emb(idx)) + (targets > 0).unsqueeze(-1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_loss_targets_take_a_free_name_beside_a_models_targets_argument(frontend):
    """attach_loss's targets input must not collide with an input the model already has
    (the generated code had 'duplicate argument targets', a SyntaxError)."""
    model, idx, labels = _TakesTargets(), torch.randint(0, 16, (4, 6)), torch.randint(0, 16, (4, 6))
    mask = torch.randint(0, 2, (4, 6))
    loss_fn = lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten())  # noqa: E731
    gm = attach_loss(capture(model, (idx, mask), frontend=frontend), loss_fn)
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(names) == 3 and len(set(names)) == 3 and names[-1].endswith("targets")
    torch.testing.assert_close(gm(idx, mask, labels), loss_fn(model(idx, mask), labels))


# -- the torch.export fallback ------------------------------------------------------------------
def test_hf_tiny_falls_back_to_torch_export():
    model, (idx,) = _build("hf-tiny")
    gm = capture(model, (idx,))

    info = graph_info(gm)
    assert info.frontend == "torch.export"
    assert "control flow" in info.fallback_reason
    # Only the user's input is a placeholder; every parameter is a get_attr under its own name.
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids"]
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(attrs) == len(set(attrs))
    assert set(attrs) == {name for name, _ in model.named_parameters()}
    for target in attrs:
        assert _fetch(gm, target) is model.get_parameter(target)
    torch.testing.assert_close(gm(idx), model(idx))  # the same {"logits": ...} structure as the model


def test_fx_only_on_hf_tiny_raises_trace_error_naming_the_source_line():
    model, (idx,) = _build("hf-tiny")
    with pytest.raises(partc.TraceError) as info:
        capture(model, (idx,), frontend="fx")
    error = info.value
    message = str(error)
    assert "torch.fx symbolic tracing" in message
    assert "hf_style.py:" in message
    assert "if input_ids.shape[1] > self.config.max_position_embeddings" in message
    assert "\n  fix:" in message
    assert "\n  module: <root module>" in message  # the check sits in the root's forward
    assert error.context.pass_name == "capture"
    assert error.context.module == ""
    assert error.context.source.startswith("hf_style.py:")


# -- errors the user can cause ------------------------------------------------------------------
class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return x


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = nn.ModuleDict({"gate": _DataDependent()})

    def forward(self, x):
        return self.inner["gate"](self.pre(x))


@pytest.mark.parametrize("frontend", ["auto", "fx", "export"])
def test_data_dependent_control_flow_is_blamed_on_the_child_module(frontend):
    with pytest.raises(partc.TraceError) as info:
        capture(_Parent(), (torch.randn(2, 4),), frontend=frontend)
    message = str(info.value)
    assert "if x.sum() > 0" in message
    assert "test_capture.py:" in message
    assert "\n  fix:" in message
    assert info.value.context.module == "inner.gate"
    assert "\n  module: inner.gate" in message


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.lin(x)
        if mask is not None:
            y = y * mask
        return y


def test_optional_argument_left_at_default_is_traced_with_the_default_branch():
    torch.manual_seed(0)
    model, x = _OptionalMask(), torch.randn(2, 4)
    gm = capture(model, (x,))
    assert graph_info(gm).frontend == "fx.symbolic_trace"
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not [n for n in gm.graph.nodes if op_kind(n) == OpKind.ELEMENTWISE]  # no `y * mask`
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("frontend", ["auto", "fx"])
def test_too_many_example_inputs_is_a_trace_error(frontend):
    model, x = _OptionalMask(), torch.randn(2, 4)
    with pytest.raises(partc.TraceError, match=r"forward\(x, mask\) cannot take the 3 example input\(s\) given"):
        capture(model, (x, x, x), frontend=frontend)  # forward(x, mask=None) takes 2


def test_unknown_frontend_is_a_trace_error():
    with pytest.raises(partc.TraceError, match="unknown frontend"):
        capture(_OptionalMask(), (torch.randn(2, 4),), frontend="jit")


# -- tied weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tied_weight_is_read_by_exactly_one_get_attr(frontend):
    model, (idx,) = _build("gpt-tiny")
    assert model.lm_head.weight is model.wte.weight
    gm = _pipeline(model, (idx,), frontend)

    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and _fetch(gm, n.target) is model.wte.weight]
    assert len(readers) == 1
    (reader,) = readers
    assert reader.target == "wte.weight"  # its first name, whichever frontend
    # Both the embedding and the LM head read it through that one node.
    assert sorted(node_info(u).op.value for u in reader.users) == ["embedding", "linear"]
    # So its bytes (128 * 64 * 4 = 32768) sit in the embedding's layer, once.
    layers = graph_info(gm).layers
    assert node_info(reader).param_bytes == 128 * 64 * 4
    assert layers[node_info(reader).layer].name == "wte"
    # No get_attr is dead weight.
    assert all(n.users for n in gm.graph.nodes if n.op == "get_attr")


# -- the two frontends agree --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_fx_and_export_frontends_agree(name):
    model, (idx,) = _build(name)
    fx_gm = _pipeline(model, (idx,), "fx")
    ex_gm = _pipeline(model, (idx,), "export")
    assert graph_info(fx_gm).frontend == "fx.symbolic_trace"
    assert graph_info(ex_gm).frontend == "torch.export"

    def compute_kinds(gm):
        return collections.Counter(k for k in (node_info(n).op for n in gm.graph.nodes) if k in COMPUTE_KINDS)

    def flops(gm):
        return sum(node_info(n).fwd_flops for n in gm.graph.nodes if node_info(n).op in (OpKind.LINEAR, OpKind.ATTENTION))

    def numel(gm):
        return sum(node_info(n).param_numel for n in gm.graph.nodes)

    assert compute_kinds(fx_gm) == compute_kinds(ex_gm)
    assert compute_kinds(fx_gm)[OpKind.ATTENTION] == 2  # 2 layers, one fused SDPA each
    assert flops(fx_gm) > 0
    assert abs(flops(fx_gm) - flops(ex_gm)) <= 0.01 * flops(fx_gm)
    assert numel(fx_gm) == numel(ex_gm) == partc.models.num_params(model)
    torch.testing.assert_close(ex_gm(idx), fx_gm(idx))


# -- propagate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt-tiny", "hf-tiny"])
def test_propagate_writes_fake_tensors_on_every_node(name):
    model, (idx,) = _build(name)
    gm = capture(model, (idx,))
    propagate(gm, (idx,))

    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or op_kind(n) == OpKind.SHAPE:
            continue  # SHAPE nodes carry Python values: ints, dtypes, devices
        val = n.meta["val"]
        if isinstance(val, (tuple, list)):
            assert val and all(isinstance(v, FakeTensor) for v in val), n.format_node()
        else:
            assert isinstance(val, FakeTensor), n.format_node()
    eager = model(idx)
    eager = eager["logits"] if isinstance(eager, dict) else eager
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    value = output.meta["val"]
    value = value["logits"] if isinstance(value, dict) else value  # hf-tiny returns {"logits": ...}, as the model does
    assert tuple(value.shape) == tuple(eager.shape) == (2, 16, 128)


def test_llama_70b_on_meta_is_planned_without_allocating_weights():
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model, (idx,) = partc.models.build("llama-70b", batch_size=1, seq_len=128, device="meta")
    assert idx.device.type == "meta"
    gm = _pipeline(model, (idx,))
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    assert _fetch(gm, "output.weight") is model.output.weight
    assert {t.device.type for t in gm.parameters()} == {"meta"}

    total = sum(node_info(n).param_numel for n in gm.graph.nodes)
    expected = partc.models.num_params(model)
    assert 68.5e9 < expected < 69.5e9
    assert abs(total - expected) <= 0.01 * expected
    # 69e9 fp32 weights are 276 GB; the whole pipeline stays under 2 GiB.
    assert rss_growth < 2 * 1024**3
    assert [layer.name for layer in graph_info(gm).layers].count("layers.79") == 1


class _Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(x)


def test_shape_error_is_reported_by_propagate_with_the_node():
    x = torch.randn(2, 5)  # Linear(8, 4) needs [..., 8]
    gm = capture(_Proj(), (x,))
    with pytest.raises(partc.TraceError) as info:
        propagate(gm, (x,))
    message = str(info.value)
    assert "shape propagation failed" in message
    assert "\n  pass:   propagate" in message
    assert "%linear" in info.value.context.node
    assert info.value.context.module == "proj"
    assert "\n  fix:" in message


def test_python_keyword_submodule_name_is_refused_with_the_fix():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("class", torch.nn.Linear(4, 4))

        def forward(self, x):
            return getattr(self, "class")(x)

    with pytest.raises(partc.TraceError, match=r"named 'class': 'class' is a Python keyword(.|\n)*fix: +rename 'class' \(e\.g\. 'class_'\)"):
        capture(Net(), (torch.randn(2, 4),))


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
def test_python_keyword_tensor_name_is_refused(kind):
    """A parameter or buffer named with a keyword, inside a submodule: its full name is given."""
    inner = torch.nn.Linear(4, 4)
    if kind == "parameter":
        inner.register_parameter("import", torch.nn.Parameter(torch.ones(4)))
    else:
        inner.register_buffer("import", torch.ones(4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = inner

        def forward(self, x):
            return self.proj(x) * getattr(self.proj, "import")

    with pytest.raises(partc.TraceError, match=r"named 'proj\.import': 'import' is a Python keyword"):
        capture(Net(), (torch.randn(2, 4),))


@pytest.mark.parametrize("structured", [False, True])
def test_traced_loss_is_loss_fn_alone_on_the_models_output(structured):
    """The loss attach_loss appends, traced on its own (compile applies it to the user's
    model's output in a replica): the same value as loss_fn, on a plain or a structured output."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 3)

        def forward(self, x):
            logits = self.proj(x)
            return {"logits": logits, "aux": (logits.sum(), None)} if structured else logits

    def loss_fn(output, targets):
        logits = output["logits"] if structured else output
        return F.cross_entropy(logits, targets) + (output["aux"][0] * 0.5 if structured else 0.0)

    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(5, 4), torch.tensor([0, 2, 1, -100, 2])
    loss = traced_loss(attach_loss(capture(model, (x,)), loss_fn))
    assert loss is not None and not list(loss.parameters())
    torch.testing.assert_close(loss(model(x), y), loss_fn(model(x), y), rtol=0, atol=0)
    assert traced_loss(capture(model, (x,))) is None  # no loss appended
