"""The propagate pass rebuilds repeated blocks from the first of their kind (passes/propagate.py,
"Repeated blocks"): every value, every NodeInfo and the plan must be what running every
operator gives."""

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc.models import GPT, gpt3_shaped
from partc.passes import propagate as propagate_pass
from partc.passes.annotate import annotate
from partc.passes.capture import attach_loss, capture
from partc.passes.ir import graph_info, node_info
from partc.passes.propagate import fake_values, propagate


def _loss(logits, targets):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _gpt3_graph(layers: int, batch: int) -> tuple[fx.GraphModule, tuple]:
    with torch.device("meta"):
        model = GPT(gpt3_shaped(layers))
        idx = torch.zeros(batch, 2048, dtype=torch.long)
        targets = torch.zeros(batch, 2048, dtype=torch.long)
    return attach_loss(capture(model, (idx,)), _loss), (idx, targets)


def _metadata(values: dict[fx.Node, object]) -> list:
    """Per node: its value with every tensor as (shape, dtype, stride, storage offset,
    storage size, device, which storage, which object), storages and objects numbered in
    first-seen order, so two propagations compare equal exactly when they alias alike."""
    storages: dict[int, int] = {}
    objects: dict[int, int] = {}

    def describe(value):
        if isinstance(value, torch.Tensor):
            storage = storages.setdefault(value.untyped_storage()._cdata, len(storages))
            obj = objects.setdefault(id(value), len(objects))
            return (tuple(value.shape), value.dtype, value.stride(), value.storage_offset(), value.untyped_storage().nbytes(), value.device, storage, obj)
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(describe(v) for v in value))
        return (type(value).__name__, repr(value))

    return [(node.name, describe(value)) for node, value in values.items()]


def test_gpt3_shaped_24_layers_same_values_and_node_infos():
    gm, inputs = _gpt3_graph(24, batch=2)
    real = fake_values(gm, inputs, memoize=False)
    rebuilt = fake_values(gm, inputs, memoize=True)
    assert list(real) == list(rebuilt) == list(gm.graph.nodes)
    assert _metadata(rebuilt) == _metadata(real)
    # views share their base's storage; blocks do not share storage with each other
    first, second = (gm.graph.find_nodes(op="call_method", target="transpose")[k] for k in (0, 4))
    assert torch._C._is_alias_of(rebuilt[first], rebuilt[first.args[0]])
    assert not torch._C._is_alias_of(rebuilt[first], rebuilt[second])

    annotate(propagate(gm, inputs, memoize=False))
    expected = {n.name: node_info(n) for n in gm.graph.nodes}
    layers = gm.meta["partc"].layers
    annotate(propagate(gm, inputs, memoize=True))
    assert {n.name: node_info(n) for n in gm.graph.nodes} == expected
    assert gm.meta["partc"].layers == layers


def test_gpt3_shaped_24_layers_rebuilds_every_block_but_the_first():
    gm, inputs = _gpt3_graph(24, batch=1)
    assert _run(gm, inputs).rebuilt_blocks == 23


def test_gpt3_shaped_24_layers_same_plan(monkeypatch):
    with torch.device("meta"):
        model = GPT(gpt3_shaped(24))
        idx = torch.zeros(16, 2048, dtype=torch.long)
        targets = torch.zeros(16, 2048, dtype=torch.long)
    cluster = partc.Cluster.preset("h100", nodes=2, devices_per_node=8)
    options = dict(loss_fn=_loss, example_targets=targets, mixed_precision="bf16", cache=False)
    memoized = partc.plan(model, cluster, (idx,), **options)
    monkeypatch.setattr(propagate_pass, "_repeatable_blocks", lambda gm: {})  # every operator runs
    every_operator = partc.plan(model, cluster, (idx,), **options)
    assert memoized.hash == every_operator.hash
    assert memoized.search is not None
    timeless = {"seconds", "explain"}  # wall times, and the text that prints them
    assert {k: v for k, v in memoized.search.items() if k not in timeless} == {k: v for k, v in every_operator.search.items() if k not in timeless}


class _Shifted(nn.Module):
    """Blocks of one structure whose inputs have the same shape: the second reads a view
    at an offset (other strides and storage), so it must run; the third is like the first."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        y = self.blocks[0](x)  # x: [4, 8, 8]
        wide = torch.cat([y, y[:, :4]], dim=1)  # [4, 12, 8]
        z = self.blocks[1](wide[:, 4:])  # [4, 8, 8] at offset 32, strides (96, 8, 1)
        return self.blocks[2](z.relu()).transpose(1, 2).contiguous()


def _run(gm: fx.GraphModule, inputs: tuple) -> propagate_pass._FakePropagator:
    mode = propagate_pass.FakeTensorMode(allow_non_fake_inputs=False)
    interpreter = propagate_pass._FakePropagator(gm, mode, memoize=True)
    with mode, torch.no_grad():
        interpreter.run(*[interpreter.fake(x) for x in inputs])
    return interpreter


def test_blocks_whose_inputs_differ_run_their_operators():
    x = torch.randn(4, 8, 8)
    gm = capture(_Shifted(), (x,))
    interpreter = _run(gm, (x,))
    assert interpreter.rebuilt_blocks == 1  # blocks.2, from blocks.0
    assert _metadata(interpreter.values) == _metadata(fake_values(gm, (x,), memoize=False))


class _Heads(nn.Module):
    """Views of its input (a value from outside the block) and of its own results."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        heads = x.view(2, 3, 4, 4).transpose(1, 2)  # views of the input
        first, second = self.norm(x).chunk(2, dim=-1)  # views of a result of the block
        return x + torch.cat([second, first], dim=-1) + heads.transpose(1, 2).reshape(2, 3, 16)


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Heads() for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_views_of_values_from_outside_and_inside_share_storage():
    x = torch.randn(2, 3, 16)
    gm = capture(_Stack(), (x,))
    interpreter = _run(gm, (x,))
    assert interpreter.rebuilt_blocks == 3
    assert _metadata(interpreter.values) == _metadata(fake_values(gm, (x,), memoize=False))
    views = gm.graph.find_nodes(op="call_method", target="transpose")
    assert len(views) == 8
    for view in views[::2]:  # x.view(...).transpose(1, 2) shares the block input's storage
        source = view.args[0].args[0]
        assert torch._C._is_alias_of(interpreter.values[view], interpreter.values[source])


def test_blocks_are_worked_out_once_per_graph_and_again_when_a_node_changes():
    """Again when a node's op, target or arguments change; not for a module stack, which
    only groups nodes into blocks: the old grouping replays exactly."""
    x = torch.randn(2, 3, 16)
    gm = capture(_Stack(), (x,))
    blocks = propagate_pass._repeatable_blocks(gm)
    assert blocks and propagate_pass._repeatable_blocks(gm) is blocks  # propagated again: the same description
    first, last = gm.graph.find_nodes(op="call_method", target="view")[0], gm.graph.find_nodes(op="call_method", target="view")[-1]
    assert blocks[last].structure == blocks[first].structure
    last.args = (*last.args[:-1], float(last.args[-1]))  # equal arguments (4 == 4.0), not the same: described again
    changed = propagate_pass._repeatable_blocks(gm)
    assert changed is not blocks and changed[last].structure != changed[first].structure
    gm = capture(_Stack(), (x,))
    blocks = propagate_pass._repeatable_blocks(gm)
    gm.graph.find_nodes(op="call_method", target="view")[-1].meta["nn_module_stack"] = {}  # outside every block now: kept
    assert propagate_pass._repeatable_blocks(gm) is blocks
    interpreter = _run(gm, (x,))
    assert interpreter.rebuilt_blocks > 0
    assert _metadata(interpreter.values) == _metadata(fake_values(gm, (x,), memoize=False))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_small_gpt_both_frontends(frontend):
    from partc.models import build

    model, inputs = build("gpt-tiny", batch_size=2)
    gm = capture(model, inputs, frontend=frontend)
    real, rebuilt = fake_values(gm, inputs, memoize=False), fake_values(gm, inputs, memoize=True)
    assert _metadata(rebuilt) == _metadata(real)
    annotate(propagate(gm, inputs, memoize=False))
    expected = [dataclasses.astuple(node_info(n)) for n in gm.graph.nodes]
    annotate(propagate(gm, inputs, memoize=True))
    assert [dataclasses.astuple(node_info(n)) for n in gm.graph.nodes] == expected


# -- the search's batch-1 graph: a copy propagated and annotated again, reusing what it can ----------
def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """gm's nodes copied under another GraphModule (as the search's batch-1 graph is)."""
    graph = fx.Graph()
    value, _ = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value)
    copied = fx.GraphModule(gm, graph)
    copied.meta["partc"] = gm.meta["partc"]
    return copied


def _annotated_gpt_tiny(frontend: str):
    from partc.models import build

    model, (idx,) = build("gpt-tiny", batch_size=4)
    gm = capture(model, (idx,), frontend=frontend)
    return annotate(propagate(gm, (idx,))), idx


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_reuse_from_gives_the_values_of_a_fresh_propagation_with_the_parameters_fakes(frontend):
    gm, idx = _annotated_gpt_tiny(frontend)
    one = _copy(gm)
    reused = fake_values(one, (idx[:1],), reuse_from=gm)
    assert _metadata(reused) == _metadata(fake_values(one, (idx[:1],)))
    pairs = [(a, b) for a, b in zip(gm.graph.nodes, one.graph.nodes) if a.op == "get_attr"]
    assert pairs and all(reused[b] is a.meta["val"] for a, b in pairs)
    logits = next(n for n in reversed(one.graph.nodes) if n.op == "output").args[0]
    assert reused[logits].shape[0] == 1 and gm.graph.find_nodes(op="output")[0].args[0].meta["val"].shape[0] == 4


def test_reuse_from_skips_a_fake_that_no_longer_describes_its_parameter():
    x = torch.randn(2, 3, 16)
    gm = propagate(capture(_Stack(), (x,)), (x,))
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr")
    with weight.meta["val"].fake_mode:
        weight.meta["val"] = stale = torch.empty(5)  # a fake, of another shape than the tensor
    one = _copy(gm)
    reused = fake_values(one, (x,), reuse_from=gm)
    assert reused[next(n for n in one.graph.nodes if n.op == "get_attr")] is not stale
    assert _metadata(reused) == _metadata(fake_values(one, (x,)))


def test_reuse_from_the_graph_of_another_model_shares_no_fake():
    gm, idx = _annotated_gpt_tiny("fx")
    other, _ = _annotated_gpt_tiny("fx")  # the same names and shapes, other tensors
    reused = fake_values(gm, (idx[:1],), reuse_from=other)
    fakes_there = {id(n.meta["val"]) for n in other.graph.nodes if n.op == "get_attr"}
    assert not fakes_there & {id(v) for v in reused.values()}
    assert _metadata(reused) == _metadata(fake_values(gm, (idx[:1],)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_search_batch_one_metadata_is_what_a_fresh_propagation_and_annotation_give(frontend):
    from partc.passes.search import _at_one_sample

    gm, idx = _annotated_gpt_tiny(frontend)
    traced = [(n.meta["val"], n.meta["partc"]) for n in gm.graph.nodes]
    traced_graph = gm.meta["partc"]
    fresh = annotate(propagate(_copy(gm), (idx[:1],)))
    with _at_one_sample(gm):
        assert _metadata({n: n.meta["val"] for n in gm.graph.nodes}) == _metadata({n: n.meta["val"] for n in fresh.graph.nodes})
        assert [node_info(n) for n in gm.graph.nodes] == [node_info(n) for n in fresh.graph.nodes]
        # the layers too, but for their signatures, which are made another way (the traced
        # one with the batch-1 shapes) and group the layers as fresh ones do
        assert _without_signatures(gm.meta["partc"]) == _without_signatures(fresh.meta["partc"])
        assert _signature_groups(gm.meta["partc"]) == _signature_groups(fresh.meta["partc"])
        assert gm.meta["partc"].input_specs[0].shape[0] == 1
        # the parameters' fakes are the traced graph's own
        assert all(n.meta["val"] is value for n, (value, _) in zip(gm.graph.nodes, traced) if n.op == "get_attr")
    # after the block: the traced batch's annotations again, the same objects
    assert all(n.meta["val"] is value and n.meta["partc"] is info for n, (value, info) in zip(gm.graph.nodes, traced))
    assert gm.meta["partc"] is traced_graph and gm.meta["partc"].input_specs[0].shape[0] == 4


def _without_signatures(info):
    return dataclasses.replace(info, layers=tuple(dataclasses.replace(layer, signature="") for layer in info.layers))


def _signature_groups(info) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for layer in info.layers:
        groups.setdefault(layer.signature, []).append(layer.index)
    return sorted(groups.values())


def test_search_batch_one_metadata_is_put_back_when_the_block_or_the_annotation_raises(monkeypatch):
    from partc.passes.search import _at_one_sample

    gm, idx = _annotated_gpt_tiny("fx")
    traced = [(n, dict(n.meta)) for n in gm.graph.nodes]
    traced_graph = gm.meta["partc"]

    def unchanged() -> bool:
        return gm.meta["partc"] is traced_graph and all(n.meta.keys() == meta.keys() and all(n.meta[k] is v for k, v in meta.items()) for n, meta in traced)

    with pytest.raises(RuntimeError, match="inside"):
        with _at_one_sample(gm):
            assert gm.meta["partc"].input_specs[0].shape[0] == 1
            raise RuntimeError("inside the block")
    assert unchanged()
    # annotation failing after propagation wrote every node's value at batch 1
    import partc.passes.search as search_module

    def failing_annotate(graph, reuse_from):
        assert all(n.meta["val"] is not meta["val"] for n, meta in traced if n.op == "placeholder")  # written at batch 1
        raise RuntimeError("annotate failed")

    monkeypatch.setattr(search_module, "annotate", failing_annotate)
    with pytest.raises(RuntimeError, match="annotate failed"):
        with _at_one_sample(gm):
            pass
    assert unchanged()


class _TwoReads(nn.Module):
    """blocks.0 reads the input, blocks.1 a fixed table of as many rows as the traced batch:
    alike at the traced batch, not at one sample."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.register_buffer("table", torch.ones(4, 8))

    def forward(self, x):
        t = self.table + x.new_zeros(1)  # computed in the graph (a table alone would be a constant)
        h = self.blocks[0](x)
        g = self.blocks[1](t)
        return self.blocks[2](h), g


def test_a_copys_signatures_keep_apart_layers_alike_only_at_the_traced_batch():
    x = torch.randn(4, 8)
    gm = annotate(propagate(capture(_TwoReads(), (x,)), (x,)))
    by_name = {layer.name: layer for layer in graph_info(gm).layers}
    assert by_name["blocks.0"].signature == by_name["blocks.1"].signature
    fresh = annotate(propagate(_copy(gm), (x[:1],)))
    annotate(propagate(gm, (x[:1],), reuse_from=gm), reuse_from=gm)
    by_name = {layer.name: layer for layer in graph_info(gm).layers}
    assert by_name["blocks.0"].signature != by_name["blocks.1"].signature
    assert _signature_groups(graph_info(gm)) == _signature_groups(graph_info(fresh))


def test_quick_fakes_are_the_constructors():
    """_FakeMaker makes fakes without FakeTensor's constructor once it checked that it makes
    the same tensor: on this torch it must take the quick way, and a propagation with it must
    give fakes that an operator in the mode takes, with the constructor's fields, dispatch
    keys and metadata."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode()
    maker = propagate_pass._FakeMaker(mode)
    meta = torch.empty_strided((2, 3, 4), (12, 1, 3), dtype=torch.bfloat16, device="meta")
    quick, made = maker(meta, torch.device("cpu")), FakeTensor(mode, meta, torch.device("cpu"))
    assert maker.quick is True
    assert type(quick) is FakeTensor and quick.fake_mode is mode and quick.__dict__ == made.__dict__
    assert torch._C._dispatch_keys(quick) == torch._C._dispatch_keys(made)
    assert (quick.shape, quick.stride(), quick.dtype, quick.device) == (made.shape, made.stride(), made.dtype, made.device)
    with mode:
        product = quick.transpose(1, 2) @ made
    assert isinstance(product, FakeTensor) and product.shape == (2, 4, 4) and product.device == torch.device("cpu")

    gm, inputs = _gpt3_graph(4, batch=2)
    by_quick = fake_values(gm, inputs)
    constructor_only = pytest.MonkeyPatch()
    constructor_only.setattr(propagate_pass._FakeMaker, "_check", lambda self: False)
    try:
        by_constructor = fake_values(gm, inputs)
    finally:
        constructor_only.undo()
    assert _metadata(by_quick) == _metadata(by_constructor)
    keys = [(torch._C._dispatch_keys(v), sorted(v.__dict__)) for v in by_quick.values() if isinstance(v, torch.Tensor)]
    assert keys == [(torch._C._dispatch_keys(v), sorted(v.__dict__)) for v in by_constructor.values() if isinstance(v, torch.Tensor)]


def test_fakes_come_from_the_constructor_when_the_check_fails(monkeypatch):
    from torch._subclasses import fake_tensor

    monkeypatch.setattr(fake_tensor.FakeTensorConfig, "debug", True)
    maker = propagate_pass._FakeMaker(fake_tensor.FakeTensorMode())
    fake = maker(torch.empty(2, device="meta"), torch.device("cpu"))
    assert maker.quick is False and hasattr(fake, "_debug_trace")  # the constructor's debug trace
