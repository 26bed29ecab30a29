"""Annotate pass: FLOPs, bytes, parameters, saved activations and layers, against hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import partc.models
from partc.errors import PartcError
from partc.passes.annotate import annotate
from partc.passes.capture import capture
from partc.passes.ir import OpKind, graph_info, node_info
from partc.passes.propagate import propagate

F32 = 4  # bytes per float32 element


def _pipeline(model, *inputs, frontend="auto"):
    gm = capture(model, inputs, frontend=frontend)
    propagate(gm, inputs)
    annotate(gm)
    return gm


def _nodes(gm, kind: OpKind):
    return [n for n in gm.graph.nodes if node_info(n).op == kind]


def _one(gm, kind: OpKind):
    (node,) = _nodes(gm, kind)
    return node


def _attr(gm, target: str):
    (node,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
    return node


def _total(gm, field: str) -> int:
    return sum(getattr(node_info(n), field) for n in gm.graph.nodes)


# -- one linear layer ---------------------------------------------------------------------------
class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_linear_costs(frontend):
    gm = _pipeline(_OneLinear(), torch.randn(4, 16), frontend=frontend)
    linear = node_info(_one(gm, OpKind.LINEAR))

    assert linear.shape == (4, 32)
    assert linear.fwd_flops == 4224  # 2*4*16*32 (multiply-adds) + 4*32 (bias) = 4096 + 128
    assert linear.bwd_flops == 8448  # 2 * 4224
    assert linear.bytes_moved == 2944  # (x 4*16 + W 32*16 + b 32 + out 4*32) * 4 = 736 * 4
    assert linear.requires_grad
    assert linear.activation_bytes == 0  # its output is saved by nobody
    assert linear.module == "fc" and linear.module_type == "Linear"

    weight = node_info(_attr(gm, "fc.weight"))
    assert weight.param_bytes == 2048  # 32*16*4
    assert weight.param_numel == 512  # 32*16
    bias = node_info(_attr(gm, "fc.bias"))
    assert (bias.param_bytes, bias.param_numel) == (128, 32)  # 32*4, 32
    # The input is saved for the weight gradient (dW = dy^T x): 4*16*4 bytes.
    assert node_info(_one(gm, OpKind.INPUT)).activation_bytes == 256
    assert _total(gm, "activation_bytes") == 256
    assert graph_info(gm).input_specs[0].shape == (4, 16)


# -- parameters ---------------------------------------------------------------------------------
class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tied_weight_is_counted_once(frontend):
    gm = _pipeline(_TiedLM(), torch.randint(0, 10, (2, 5)), frontend=frontend)
    assert _total(gm, "param_bytes") == 320  # 10*8*4 once, not 640
    assert _total(gm, "param_numel") == 80  # 10*8
    by_layer = {layer.name: layer.param_bytes for layer in graph_info(gm).layers}
    assert by_layer == {"emb": 320, "head": 0}  # on the layer of its first user


class _Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_frozen_model_has_no_backward_and_saves_nothing():
    model = _Frozen().requires_grad_(False)
    gm = _pipeline(model, torch.randn(4, 16))
    for n in gm.graph.nodes:
        info = node_info(n)
        assert not info.requires_grad, n.name
        assert info.bwd_flops == 0, n.name
        assert info.activation_bytes == 0, n.name
        assert info.param_numel == 0, n.name  # only trainable elements count
    # fc1 2*4*16*32 + 4*32 = 4224, relu 4*32 = 128, fc2 2*4*32*4 + 4*4 = 1040
    assert _total(gm, "fwd_flops") == 4224 + 128 + 1040
    assert _total(gm, "param_bytes") == 2704  # (32*16 + 32 + 4*32 + 4) * 4: frozen weights still take memory


def test_partly_frozen_model():
    model = _Frozen()
    model.fc1.requires_grad_(False)
    gm = _pipeline(model, torch.randn(4, 16))
    fc1, fc2 = _nodes(gm, OpKind.LINEAR)
    relu = next(n for n in gm.graph.nodes if node_info(n).name == "relu")
    assert node_info(fc1).bwd_flops == 0 and node_info(relu).bwd_flops == 0
    assert node_info(fc2).bwd_flops == 2 * 1040  # fwd 2*4*32*4 + 4*4 = 1040
    # Only fc2's weight gradient needs anything: its input, the relu output (4*32*4 bytes).
    # relu saves nothing (it does not require grad), and the input x is not needed.
    assert node_info(relu).activation_bytes == 512
    assert _total(gm, "activation_bytes") == 512
    assert _total(gm, "param_numel") == 32 * 4 + 4  # only fc2's


# -- activations --------------------------------------------------------------------------------
class _QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.k = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x) + self.k(x) + self.v(x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_input_shared_by_three_projections_is_saved_once(frontend):
    gm = _pipeline(_QKV(), torch.randn(4, 16), frontend=frontend)
    # Autograd saves x for each projection's weight gradient, but it is one tensor: 4*16*4.
    # The adds save nothing, and the projection outputs are not saved by anyone.
    assert len(_nodes(gm, OpKind.LINEAR)) == 3
    assert node_info(_one(gm, OpKind.INPUT)).activation_bytes == 256
    assert _total(gm, "activation_bytes") == 256  # not 3 * 256


class _SavedThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, a):
        x = self.fc(a)
        y = x.view(4, 4, 8)
        return F.gelu(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_tensor_saved_through_a_view_is_charged_to_its_storage_owner(frontend):
    gm = _pipeline(_SavedThroughView(), torch.randn(4, 16), frontend=frontend)
    linear = node_info(_one(gm, OpKind.LINEAR))
    (view,) = _nodes(gm, OpKind.VIEW)
    gelu = next(n for n in gm.graph.nodes if node_info(n).name == "gelu")
    # gelu saves its input y, a view of x: the 4*32*4 bytes belong to the linear node.
    assert linear.activation_bytes == 512
    assert node_info(view).activation_bytes == 0
    assert node_info(view).bytes_moved == 0 and node_info(view).fwd_flops == 0
    assert node_info(gelu).activation_bytes == 0
    assert _total(gm, "activation_bytes") == 512 + 256  # + the input a (4*16*4) saved by fc


class _SavedThroughCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(16, 16)
        self.head = nn.Linear(128, 4)

    def forward(self, a):  # a: [2, 8, 16]
        h = self.pre(a)
        g = F.gelu(h)  # saves h
        r = h.transpose(1, 2).reshape(2, 128)  # not contiguous: reshape copies
        return self.head(r), g  # head saves r, a tensor of its own


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_reshape_that_copies_owns_its_storage(frontend):
    gm = _pipeline(_SavedThroughCopy(), torch.randn(2, 8, 16), frontend=frontend)
    pre, head = _nodes(gm, OpKind.LINEAR)
    reshape = next(n for n in gm.graph.nodes if node_info(n).name == "reshape")
    assert node_info(pre).activation_bytes == 1024  # h, 2*8*16*4, saved by gelu
    assert node_info(reshape).activation_bytes == 1024  # r, 2*128*4, a copy saved by head
    assert node_info(_one(gm, OpKind.INPUT)).activation_bytes == 1024  # a, 2*8*16*4, saved by pre
    assert _total(gm, "activation_bytes") == 3072


# -- attention ----------------------------------------------------------------------------------
class _SDPA(nn.Module):
    def __init__(self, causal: bool, project: bool):
        super().__init__()
        self.causal = causal
        self.wq = nn.Linear(16, 16) if project else None

    def forward(self, q, k, v):
        if self.wq is not None:
            q = self.wq(q)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


QKV_SHAPE = (2, 4, 8, 16)  # [B, H, T, head_dim]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("causal, flops", [(False, 32768), (True, 16384)])
def test_attention_flops(frontend, causal, flops):
    # 2 * B*H * L * S * (E + Ev) = 2 * 2*4 * 8 * 8 * (16 + 16) = 32768; causal halves it.
    q, k, v = (torch.randn(*QKV_SHAPE) for _ in range(3))
    gm = _pipeline(_SDPA(causal, project=False), q, k, v, frontend=frontend)
    attention = node_info(_one(gm, OpKind.ATTENTION))
    assert attention.fwd_flops == flops
    assert attention.bwd_flops == 0  # nothing trainable upstream
    assert attention.activation_bytes == 0


def test_attention_backward_and_saved_tensors():
    q, k, v = (torch.randn(*QKV_SHAPE) for _ in range(3))
    gm = _pipeline(_SDPA(causal=False, project=True), q, k, v)
    attention = node_info(_one(gm, OpKind.ATTENTION))
    assert attention.bwd_flops == 81920  # 2.5 * 32768: the backward recomputes the scores
    # Saves q, k, v and its output, plus an fp32 log-sum-exp per query row.
    # output 2*4*8*16*4 = 4096 and lse 2*4*8*4 = 256 on this node.
    assert attention.activation_bytes == 4096 + 256
    assert node_info(_one(gm, OpKind.LINEAR)).activation_bytes == 4096  # wq(q), saved by SDPA
    # k, v (inputs, saved by SDPA) and q (saved by wq for its weight gradient): 4096 each.
    assert [node_info(n).activation_bytes for n in _nodes(gm, OpKind.INPUT)] == [4096, 4096, 4096]


# -- layers -------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    def forward(self, x):
        h = x
        for lin in self.layers:
            h = F.gelu(lin(h))
        return x + h


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # no work in the root before blocks.0, so no "<root>" layer
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_layers(frontend):
    gm = _pipeline(_Stack(), torch.randn(4, 8), frontend=frontend)
    layers = graph_info(gm).layers
    # The first index wins: blocks.0.layers.1 belongs to "blocks.0", not "blocks.0.layers.1".
    assert [layer.name for layer in layers] == ["blocks.0", "blocks.1", "blocks.2", "head"]
    assert [layer.index for layer in layers] == [0, 1, 2, 3]
    assert layers[0].signature == layers[1].signature == layers[2].signature
    assert layers[3].signature != layers[0].signature

    # Parameters (and the input) belong to the layer of their first user.
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner = n.target.rsplit(".", 3)[0] if n.target.startswith("blocks.") else "head"
            assert layers[node_info(n).layer].name == owner, n.target
    assert node_info(_one(gm, OpKind.INPUT)).layer == 0
    assert node_info(_one(gm, OpKind.OUTPUT)).layer == 3

    # Each layer's totals are the sums over its nodes.
    for layer in layers:
        members = [n for n in gm.graph.nodes if node_info(n).layer == layer.index]
        assert tuple(n.name for n in members) == layer.nodes
        for field in ("fwd_flops", "bwd_flops", "bytes_moved", "param_bytes", "param_numel", "activation_bytes"):
            assert getattr(layer, field) == sum(getattr(node_info(n), field) for n in members), (layer.name, field)

    # A block: two Linear(8, 8) on [4, 8] (2*4*8*8 + 4*8 = 544 each), two gelus and the
    # residual add (4*8 = 32 each): 2*544 + 3*32 = 1184. The head: 2*4*8*3 + 4*3 = 204.
    assert [layer.fwd_flops for layer in layers] == [1184, 1184, 1184, 204]
    assert [layer.param_bytes for layer in layers] == [576, 576, 576, 108]  # 2*(64+8)*4, (24+3)*4
    # Saved, 128 bytes (4*8*4) each: both linear outputs (by the gelus), the first gelu
    # output (by the second linear), the residual sum (by the next layer's first linear);
    # blocks.0 also holds the model input (saved by its first linear). The head saves nothing.
    assert [layer.activation_bytes for layer in layers] == [640, 512, 512, 0]
    # blocks.0 hands its hidden state, [4, 8] fp32 = 128 bytes, to blocks.1.
    assert [layer.output_bytes for layer in layers] == [128, 128, 128, 0]


# -- GPT-2 small, against the analytic counts -----------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    model, (idx,) = partc.models.build("gpt2", batch_size=1, seq_len=1024, device="meta")
    return _pipeline(model, idx)


def test_gpt2_parameters_layers_and_flops(gpt2):
    assert _total(gpt2, "param_numel") == 124_439_808
    layers = graph_info(gpt2).layers
    blocks = [layer for layer in layers if layer.name.startswith("blocks.")]
    assert [layer.name for layer in blocks] == [f"blocks.{i}" for i in range(12)]
    assert len({layer.signature for layer in blocks}) == 1
    assert layers[-1].name == "lm_head" and layers[-1].signature != blocks[0].signature

    # d = 768, V = 50257, L = 12, B = 1, T = 1024, H = 12, hd = 64.
    # Matmul parameters: per block qkv 3d^2 + proj d^2 + fc 4d^2 + mlp proj 4d^2 = 12 d^2,
    # and the tied head V*d:
    #   N = 12 * 12 * 768**2 + 50257 * 768 = 84_934_656 + 38_597_376 = 123_532_032
    #   2 * N * B*T = 2 * 123_532_032 * 1024 = 252_993_601_536
    # Causal attention per block: 2 (QK^T and PV) * 2 * B*H*T*T*hd / 2
    #   = 2 * 2 * 12 * 1024 * 1024 * 64 / 2 = 1_610_612_736; x 12 = 19_327_352_832
    # Total: 272_320_954_368 (norms, biases, GELU and adds add ~0.1%).
    analytic = 272_320_954_368
    assert 12 * 12 * 768**2 + 50257 * 768 == 123_532_032
    assert 2 * 123_532_032 * 1024 + 12 * (2 * 2 * 12 * 1024 * 1024 * 64 // 2) == analytic
    total = _total(gpt2, "fwd_flops")
    assert analytic <= total <= 1.02 * analytic
    attention = sum(node_info(n).fwd_flops for n in _nodes(gpt2, OpKind.ATTENTION))
    assert attention == 19_327_352_832
    assert _total(gpt2, "bwd_flops") > 2 * analytic  # everything upstream is trainable


def test_gpt2_block_activation_bytes(gpt2):
    """One block's saved activations, fp32, B=1, T=1024, dropout 0, fused attention.

    In units of U = B*T*d*4 bytes = 1024*768*4 = 3_145_728, by annotate.py's rules:

      ln_1 input (the block's input)        1  charged to the previous layer, which owns it;
                                               this block's own output is charged here
                                               instead (saved by the next ln_1 or ln_f): 1
      qkv input (ln_1 output)               1
      q, k, v (views of the qkv output)     3  one [T, 3d] tensor, saved by SDPA
      attention output                      1  saved by SDPA itself; the kernel lays it out as
                                               [B, T, H, hd], so transpose + reshape is a
                                               view and proj's input is the same storage
      ln_2 input (x + attn)                 1
      fc input (ln_2 output)                1
      gelu input (fc output, [T, 4d])       4
      mlp proj input (gelu output)          4
                                           --
                                           16 U
    Saved nothing: proj outputs (dropout p=0 keeps no mask, add is linear), the dropouts.
    Extras: two layer norms' fp32 mean and rstd (2 * 2*4*T = 16_384 bytes) and SDPA's fp32
    log-sum-exp (B*H*T*4 = 49_152 bytes).

    Megatron's count (Korthikanti et al. 2022) without the s^2 terms is 34*s*b*h bytes in
    fp16, i.e. 17 tensors of s*b*h elements, of which the two 1-byte dropout masks make 1;
    without dropout that is the same 16 tensors (its "attention over values" output is the
    projection input, saved once, as here).
    """
    U = 1024 * 768 * 4
    layers = {layer.name: layer for layer in graph_info(gpt2).layers}
    block = layers["blocks.5"]
    assert block.activation_bytes == 16 * U + 2 * (2 * 4 * 1024) + 12 * 1024 * 4  # = 50_397_184
    assert 14 * U <= block.activation_bytes <= 20 * U
    assert {layers[f"blocks.{i}"].activation_bytes for i in range(12)} == {block.activation_bytes}
    assert block.output_bytes == U  # the residual stream handed to blocks.6


def test_reuse_from_a_graph_that_gm_is_no_copy_of_is_refused():
    gm = _pipeline(_OneLinear(), torch.randn(2, 16))
    other = _pipeline(nn.Sequential(nn.Linear(16, 8), nn.ReLU()), torch.randn(2, 16))
    with pytest.raises(PartcError, match="copy") as error:
        annotate(gm, reuse_from=other)
    assert error.value.context.fix == "annotate the graph without reuse_from"



def test_node_infos_are_what_their_constructor_makes(gpt2):
    """annotate fills each NodeInfo's fields at once (ir.make_node_info): equal to the
    dataclass's own construction, still frozen, and refused with a field missing."""
    import dataclasses

    from partc.passes.ir import NodeInfo, make_node_info

    infos = [node_info(n) for n in gpt2.graph.nodes]
    for info in infos:
        fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(NodeInfo)}
        assert type(info) is NodeInfo and info == NodeInfo(**fields) and hash(info) == hash(NodeInfo(**fields))
    with pytest.raises(dataclasses.FrozenInstanceError):
        infos[0].fwd_flops = 1
    fields.pop("source")
    with pytest.raises(TypeError, match="source"):
        make_node_info(**fields)
