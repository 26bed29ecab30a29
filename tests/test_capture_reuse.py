"""Capture traces each kind of repeated block once and copies its nodes for the others
(passes/capture.py, ``_RepeatedBlocks``): the graph, every node's metadata and the plan
must be exactly what tracing every block gives, and blocks that are not provably identical
(another width, another branch flag, a hook, a block that changes itself while traced, a
module shared between blocks) must be traced."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import partc
from partc import Cluster
from partc.models import GPT, build, gpt3_shaped
from partc.passes import capture as capture_pass
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.ir import node_info
from partc.passes.propagate import propagate


@pytest.fixture
def copied_blocks(monkeypatch) -> list[str]:
    """The qualified names of the block calls capture copied instead of tracing, in order."""
    copied: list[str] = []
    replay = capture_pass._RepeatedBlocks.replay

    def spy(self, record, call, *args):
        copied.append(call.prefix)
        return replay(self, record, call, *args)

    monkeypatch.setattr(capture_pass._RepeatedBlocks, "replay", spy)
    return copied


def _graph_facts(gm) -> tuple:
    """Everything a captured graph is: per node its name, op, target, args, kwargs, type and
    every metadata key (nn_module_stack as ordered items), plus the generated code."""
    nodes = []
    for node in gm.graph.nodes:
        meta = {key: list(value.items()) if key == "nn_module_stack" else value for key, value in node.meta.items() if key not in ("val", "tensor_meta")}
        nodes.append((node.name, node.op, str(node.target), str(node.args), str(node.kwargs), node.type, meta))
    return tuple(nodes), gm.code, tuple(sorted(name for name, _ in gm.named_parameters())), tuple(sorted(name for name, _ in gm.named_buffers()))


def _assert_same_capture(model, inputs, reset=lambda: None) -> None:
    """``reset`` restores a model that tracing changes, before each capture."""
    reset()
    with_reuse = capture(model, inputs)
    reset()
    without = capture(model, inputs, reuse_blocks=False)
    facts, expected = _graph_facts(with_reuse), _graph_facts(without)
    for got, want in zip(facts[0], expected[0]):
        assert got == want
    assert facts == expected
    assert with_reuse.meta["partc"] == without.meta["partc"]
    # what annotate derives from the metadata: module, layer, source line of every node
    for gm in (with_reuse, without):
        propagate(gm, inputs)
        annotate(gm)
    infos = [(n.name, node_info(n)) for n in with_reuse.graph.nodes]
    assert infos == [(n.name, node_info(n)) for n in without.graph.nodes]
    assert with_reuse.meta["partc"] == without.meta["partc"]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "hf-tiny", "resnet-tiny", "encdec-tiny", "moe-tiny", "dlrm-tiny"])
def test_zoo_graphs_equal(name, copied_blocks):
    model, inputs = build(name)
    _assert_same_capture(model, inputs)
    if name in ("gpt-tiny", "llama-tiny"):
        assert copied_blocks, "the repeated blocks were traced, not copied"


def test_gpt3_shaped_24_layers(copied_blocks):
    with torch.device("meta"):
        model = GPT(gpt3_shaped(24))
        idx = torch.zeros(1, 2048, dtype=torch.long)
    _assert_same_capture(model, (idx,))
    assert copied_blocks == [f"blocks.{i}" for i in range(1, 24)]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_plan_hash_equal(name, monkeypatch, copied_blocks):
    cluster = Cluster.preset("cpu", devices_per_node=2)

    def planned(reuse_blocks: bool):
        tracer = capture_pass._TraceThroughModules
        monkeypatch.setattr(capture_pass, "_TraceThroughModules", lambda: tracer(reuse_blocks=reuse_blocks))
        model, inputs = build(name, batch_size=8)
        result = partc.plan(model, cluster, inputs)
        monkeypatch.setattr(capture_pass, "_TraceThroughModules", tracer)
        return result

    without = planned(False)
    assert not copied_blocks
    with_reuse = planned(True)
    assert copied_blocks
    assert with_reuse.hash == without.hash
    assert with_reuse.predicted_step_time == pytest.approx(without.predicted_step_time, rel=1e-12)
    assert [node_info(n) for n in with_reuse.graph.graph.nodes] == [node_info(n) for n in without.graph.graph.nodes]


# -- blocks that are not identical --------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32, gated: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.gated = gated
        self.calls = 0

    def forward(self, x, scale=1.0):
        h = self.up(self.norm(x))
        h = F.gelu(h) * torch.sigmoid(h) if self.gated else F.gelu(h)  # a branch on a flag
        return x + self.down(h) * scale


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module], scales: list[float] | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.scales = scales or [1.0] * len(blocks)

    def forward(self, x):
        for block, scale in zip(self.blocks, self.scales):
            x = block(x, scale)
        return x


def _x():
    return torch.randn(2, 4, 16)


def test_identical_blocks_are_copied(copied_blocks):
    _assert_same_capture(Stack([Block() for _ in range(4)]), (_x(),))
    assert copied_blocks == ["blocks.1", "blocks.2", "blocks.3"]


def test_another_width_and_another_branch_are_traced(copied_blocks):
    blocks = [Block(), Block(), Block(hidden=48), Block(gated=True), Block()]
    _assert_same_capture(Stack(blocks), (_x(),))
    assert copied_blocks == ["blocks.1", "blocks.4"]  # blocks.2 and blocks.3 are kinds of their own


def test_another_argument_value_is_traced(copied_blocks):
    _assert_same_capture(Stack([Block() for _ in range(4)], scales=[1.0, 0.5, 1.0, 0.5]), (_x(),))
    assert copied_blocks == ["blocks.2", "blocks.3"]  # each from the first call with its scale


def test_hooked_block_is_traced(copied_blocks):
    model = Stack([Block() for _ in range(3)])
    model.blocks[1].register_forward_pre_hook(lambda module, args: (args[0] * 2, *args[1:]))
    _assert_same_capture(model, (_x(),))
    assert copied_blocks == ["blocks.2"]


def test_global_forward_hook_turns_reuse_off_and_registration_hook_does_not(copied_blocks):
    """A global forward hook runs around every call, which a copy would skip: every block is
    traced. A global buffer registration hook (torch 2.11's export leaves one behind) runs
    only when a buffer is registered, which tracing these blocks does not: they are copied."""
    from torch.nn.modules import module as module_globals

    model = Stack([Block() for _ in range(3)])
    handle = module_globals.register_module_forward_hook(lambda module, args, output: None)
    try:
        _assert_same_capture(model, (_x(),))
    finally:
        handle.remove()
    assert copied_blocks == []
    handle = module_globals.register_module_buffer_registration_hook(lambda module, name, buffer: None)
    try:
        _assert_same_capture(model, (_x(),))
    finally:
        handle.remove()
    assert copied_blocks == ["blocks.1", "blocks.2"]


class LazyBufferBlock(Block):
    def forward(self, x, scale=1.0):
        if not hasattr(self, "seen"):
            self.register_buffer("seen", torch.ones(1))  # registered while traced: a copy would not
        return super().forward(x, scale) * self.seen


def test_block_that_registers_a_buffer_while_traced_is_traced(copied_blocks):
    model = Stack([LazyBufferBlock() for _ in range(3)])

    def reset():
        for block in model.blocks:
            block._buffers.pop("seen", None)

    _assert_same_capture(model, (_x(),), reset)
    assert copied_blocks == []


class CountingBlock(Block):
    def forward(self, x, scale=1.0):
        self.calls += 1  # tracing changes the block: a copy would not
        return super().forward(x, scale) if self.calls < 2 else x


def test_block_that_changes_itself_is_traced(copied_blocks):
    model = Stack([CountingBlock() for _ in range(3)])

    def reset():
        for block in model.blocks:
            block.calls = 0

    _assert_same_capture(model, (_x(),), reset)
    assert copied_blocks == []


class ClassCountingBlock(Block):
    traced = 0  # a class-level counter, read by forward

    def forward(self, x, scale=1.0):
        type(self).traced += 1
        return super().forward(x, scale) if type(self).traced % 2 else x


def test_block_that_changes_its_class_is_traced(copied_blocks):
    model = Stack([ClassCountingBlock() for _ in range(4)])

    def reset():
        ClassCountingBlock.traced = 0

    _assert_same_capture(model, (_x(),), reset)
    assert copied_blocks == []


def test_shared_block_is_traced(copied_blocks):
    shared = Block()
    _assert_same_capture(Stack([shared, shared, Block()]), (_x(),))
    assert "blocks.1" not in copied_blocks


class Nested(nn.Module):
    """A block holding a list of blocks: the inner ones are copied while the first outer one
    is traced, and the outer copies hold copies of copies."""

    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, x, scale=1.0):
        for block in self.inner:
            x = block(x, scale)
        return torch.tanh(x)


def test_nested_blocks(copied_blocks):
    _assert_same_capture(Stack([Nested() for _ in range(3)]), (_x(),))
    assert copied_blocks == ["blocks.0.inner.1", "blocks.1", "blocks.2"]
