"""The built-in model zoo: shapes, parameter counts, capture by fx and torch.export."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from partc.errors import PartcError
from partc.models import MODELS, build, config, names, num_params
from partc.models.gpt import GPT, gpt3_shaped
from partc.models.hf_style import HFStyleModel
from partc.models.llama import Llama, llama_tiny

TINY = ["gpt-tiny", "llama-tiny", "hf-tiny"]


class LeaflessTracer(fx.Tracer):
    """Traces into every module (nn.Linear included), as partc's capture pass does."""

    def is_leaf_module(self, m, qualname):
        return False


def leafless_trace(model: torch.nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, LeaflessTracer().trace(model))


def logits_of(out):
    return out["logits"] if isinstance(out, dict) else out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- registry ---------------------------------------------------------------------------


def test_registry_names():
    expected = [
        "gpt2", "gpt2-medium", "gpt3-1.3b", "gpt3-2.6b", "gpt3-6.7b", "gpt3-175b", "gpt-tiny",
        "llama-tiny", "llama-1b", "llama-7b", "llama-70b", "hf-tiny",
        "resnet-tiny", "resnet50", "encdec-tiny", "t5-base-shaped",
        "hf-gpt2", "hf-llama", "hf-bert", "dlrm-tiny", "dlrm-criteo", "moe-tiny", "moe-8x1b",
    ]  # fmt: skip
    assert names() == expected
    assert set(MODELS) == set(expected)
    assert all(isinstance(d, str) and d for d in MODELS.values())
    with pytest.raises(TypeError):
        MODELS["mine"] = "read-only"  # type: ignore[index]


def test_unknown_name_lists_known_names():
    with pytest.raises(PartcError) as info:
        build("gpt5")
    msg = str(info.value)
    assert "gpt5" in msg
    for name in names():
        assert name in msg


def test_bad_seq_len_and_batch_size():
    with pytest.raises(PartcError, match="seq_len"):
        build("gpt-tiny", seq_len=33)
    with pytest.raises(PartcError, match="batch_size"):
        build("gpt-tiny", batch_size=0)


@pytest.mark.parametrize("name", TINY)
def test_build_inputs(name):
    model, (idx,) = build(name, batch_size=3)
    cfg = config(name)
    max_len = getattr(cfg, "block_size", None) or getattr(cfg, "max_seq_len", None) or cfg.max_position_embeddings
    assert idx.shape == (3, max_len) and idx.dtype == torch.long
    assert 0 <= idx.min() and idx.max() < cfg.vocab_size
    assert next(model.parameters()).device.type == "cpu"
    _, (short,) = build(name, batch_size=1, seq_len=5)
    assert short.shape == (1, 5)


def test_build_big_model_on_meta_quickly():
    start = time.perf_counter()
    model, (idx,) = build("gpt3-175b")
    assert time.perf_counter() - start < 5.0
    assert idx.device.type == "meta" and idx.shape == (8, 2048)
    assert all(p.is_meta for p in model.parameters())
    assert num_params(model) > 170e9


def test_build_explicit_device():
    model, (idx,) = build("gpt-tiny", device="meta")
    assert idx.is_meta and all(p.is_meta for p in model.parameters())


# ---- forward shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shape(name):
    model, (idx,) = build(name, batch_size=2, seq_len=16)
    logits = logits_of(model(idx))
    assert logits.shape == (2, 16, config(name).vocab_size)
    assert torch.isfinite(logits).all()


def test_gpt_is_causal():
    """Changing a later token must not change earlier logits."""
    model, (idx,) = build("gpt-tiny", batch_size=1, seq_len=10)
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % config("gpt-tiny").vocab_size
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


# ---- tied weights -----------------------------------------------------------------------


def test_gpt_tied_weights_share_one_parameter():
    model, _ = build("gpt-tiny")
    assert model.lm_head.weight is model.wte.weight
    names_ = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names_ and "lm_head.weight" not in names_
    untied = GPT(dataclasses.replace(config("gpt-tiny"), tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight
    vocab, d = config("gpt-tiny").vocab_size, config("gpt-tiny").d_model
    assert num_params(untied) == num_params(model) + vocab * d


# ---- parameter counts (built on meta: no allocation) ------------------------------------


def meta_params(name: str) -> int:
    model_cls = {"gpt": GPT, "lla": Llama}[name[:3]]
    with torch.device("meta"):
        return num_params(model_cls(config(name)))


def test_gpt2_param_count():
    assert meta_params("gpt2") == 124_439_808  # the published GPT-2 small count (tied head)


def test_gpt2_medium_param_count():
    assert meta_params("gpt2-medium") == 354_823_168


def test_llama_7b_param_count():
    assert meta_params("llama-7b") == 6_738_415_616  # LLaMA / Llama-2 7B


def test_gpt3_param_counts():
    # Brown et al. quote rounded sizes; ours include embeddings and a tied head.
    for name, billions in [("gpt3-1.3b", 1.3), ("gpt3-2.6b", 2.7), ("gpt3-6.7b", 6.7), ("gpt3-175b", 175.0)]:
        assert meta_params(name) == pytest.approx(billions * 1e9, rel=0.03), name


def test_llama_70b_param_count():
    assert meta_params("llama-70b") == pytest.approx(68.98e9, rel=0.001)


def test_gpt3_shaped_scales_with_layers():
    with torch.device("meta"):
        one, two = GPT(gpt3_shaped(1)), GPT(gpt3_shaped(2))
    d = 12288
    assert num_params(two) - num_params(one) == 12 * d * d + 13 * d  # one block


# ---- capture: torch.fx (leaf-less) and torch.export ---------------------------------------


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_leafless_fx_trace_matches_eager(name):
    model, (idx,) = build(name, batch_size=2, seq_len=12)
    model.eval()
    gm = leafless_trace(model)
    ops = {n.op for n in gm.graph.nodes}
    assert "call_module" not in ops  # traced into nn.Linear etc.
    assert F.linear in {n.target for n in gm.graph.nodes}
    assert torch.allclose(gm(idx), model(idx), atol=1e-6)
    # Shapes are proxies, not constants: the graph runs at another sequence length.
    assert torch.allclose(gm(idx[:, :5]), model(idx[:, :5]), atol=1e-6)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_export_matches_eager(name):
    model, (idx,) = build(name, batch_size=2, seq_len=8)
    ep = torch.export.export(model, (idx,), strict=False)
    assert torch.allclose(ep.module()(idx), model(idx), atol=1e-6)


def test_hf_style_fx_fails_but_export_works():
    model, (idx,) = build("hf-tiny", batch_size=2, seq_len=8)
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(model)
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        LeaflessTracer().trace(model)
    ep = torch.export.export(model, (idx,), strict=False)
    out = ep.module()(idx)
    assert set(out) == {"logits"}
    assert torch.allclose(out["logits"], model(idx)["logits"], atol=1e-6)


def test_hf_style_branches():
    model, (idx,) = build("hf-tiny", batch_size=2, seq_len=8)
    assert isinstance(model, HFStyleModel)
    full = model(idx)["logits"]
    # An all-ones mask is the same as no mask; return_dict=False gives a tuple.
    assert torch.allclose(model(idx, attention_mask=torch.ones_like(idx))["logits"], full, atol=1e-6)
    assert torch.equal(model(idx, return_dict=False)[0], full)
    # Left padding: rows with every key masked stay finite; real rows ignore the pads.
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    padded = model(idx, attention_mask=mask)["logits"]
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[1], full[1], atol=1e-6)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


# ---- Llama details ----------------------------------------------------------------------


def test_llama_gqa_equals_repeated_kv_heads():
    """GQA with 2 k/v heads == MHA whose k/v heads are the GQA heads, each repeated
    n_rep times in a row (query head h reads k/v head h // n_rep)."""
    cfg = llama_tiny()
    assert cfg.n_kv_head < cfg.n_head
    gqa = Llama(cfg).eval()
    mha = Llama(dataclasses.replace(cfg, n_kv_head=cfg.n_head)).eval()
    n_rep, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            state[key] = w.view(cfg.n_kv_head, hd, cfg.d_model).repeat_interleave(n_rep, 0).reshape(-1, cfg.d_model)
    mha.load_state_dict(state)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.allclose(gqa(idx), mha(idx), atol=1e-5)


def test_llama_meta_then_materialise():
    """Built on meta, moved with to_empty() and re-initialised: rope tables are right."""
    cfg = llama_tiny()
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device="cpu")
    model.init_weights()
    fresh = Llama(cfg)
    assert torch.equal(model.rope_cos, fresh.rope_cos) and torch.equal(model.rope_sin, fresh.rope_sin)
    assert "rope_cos" not in model.state_dict()  # derived, not saved
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 8)))).all()


def test_llama_rope_is_relative():
    """Rotary scores depend only on the position difference."""
    from partc.models.llama import apply_rope, rope_tables

    cos, sin = rope_tables(16, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        qi = apply_rope(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert torch.allclose(score(0, 0), (q * k).sum(), atol=1e-6)
