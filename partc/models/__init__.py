"""Built-in models: GPT-2/GPT-3 shapes, a Llama-style model, an HF-style model.

Use :func:`build` to get a model and example inputs by name::

    model, (idx,) = build("gpt-tiny", batch_size=2)
    logits = model(idx)

and :func:`training_case` for everything a training step needs (model, inputs, targets
and the loss function the model family trains with)::

    case = training_case("gpt-tiny", batch_size=2)
    loss = case.loss_fn(case.model(*case.inputs), case.targets)

:data:`MODELS` maps each name to a one-line description; :func:`names` lists them.

Adding a model: one :class:`_Entry` in ``_ENTRIES``. Token models need only a config with
``vocab_size`` and a maximum-length field; other inputs (images, dense and sparse
features, two sequences) give ``make_batch(config, batch_size, seq_len)`` returning
``(inputs, targets)``, and ``loss_fn(outputs, targets)`` if next-token cross entropy is
not the model's loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import torch
import torch.nn as nn

from partc.errors import PartcError
from partc.models import cnn, dlrm, encdec, gpt, hf, hf_style, llama, moe
from partc.models.gpt import GPT, GPTConfig, gpt3_shaped
from partc.models.hf_style import HFStyleConfig, HFStyleModel
from partc.models.llama import Llama, LlamaConfig

__all__ = [
    "GPT",
    "GPTConfig",
    "HFStyleConfig",
    "HFStyleModel",
    "Llama",
    "LlamaConfig",
    "MODELS",
    "META_THRESHOLD",
    "TrainingCase",
    "build",
    "config",
    "gpt3_shaped",
    "names",
    "num_params",
    "training_case",
    "language_model_loss",
]

# Models above this many parameters are built on the meta device unless a device is
# given: 2B fp32 parameters are 8 GB, more than a laptop or CI runner should allocate.
META_THRESHOLD = 2_000_000_000


def language_model_loss(logits: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: ``targets`` are the inputs shifted by one.
    Accepts a logits tensor, or a dict / HF ``ModelOutput`` holding ``"logits"``."""
    if not isinstance(logits, (torch.Tensor, torch.fx.Proxy)):  # a Proxy: traced into the graph (attach_loss)
        logits = logits["logits"]
    return nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def token_batch(cfg: Any, batch_size: int, seq_len: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random token ids ``[batch_size, seq_len]`` and their next-token targets."""
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), dtype=torch.long)
    return (tokens[:, :-1].contiguous(),), tokens[:, 1:].contiguous()


@dataclass(frozen=True)
class _Entry:
    description: str
    make_config: Callable[[], Any]
    model_cls: Callable[[Any], nn.Module]  # config -> model
    max_len_field: str | None  # the config field holding the maximum sequence length (None: no sequence)
    make_batch: Callable[[Any, int, int], tuple[tuple[Any, ...], Any]] = token_batch  # (config, batch, seq) -> (inputs, targets)
    loss_fn: Callable[[Any, Any], torch.Tensor] = language_model_loss


@dataclass(frozen=True)
class TrainingCase:
    """What one training step of a built-in model needs."""

    name: str
    model: nn.Module
    inputs: tuple[Any, ...]  # positional inputs of model.forward, the global batch
    targets: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]  # loss_fn(model(*inputs), targets) -> scalar, mean over the batch


_ENTRIES = MappingProxyType(
    {
        "gpt2": _Entry("GPT-2 small, 124M parameters", gpt.gpt2, GPT, "block_size"),
        "gpt2-medium": _Entry("GPT-2 medium, 350M parameters", gpt.gpt2_medium, GPT, "block_size"),
        "gpt3-1.3b": _Entry("GPT-3 XL, 1.3B parameters", gpt.gpt3_1_3b, GPT, "block_size"),
        "gpt3-2.6b": _Entry("GPT-3 2.7B, 2.6B parameters", gpt.gpt3_2_6b, GPT, "block_size"),
        "gpt3-6.7b": _Entry("GPT-3 6.7B", gpt.gpt3_6_7b, GPT, "block_size"),
        "gpt3-175b": _Entry("GPT-3 175B (96 layers, d_model 12288)", gpt.gpt3_175b, GPT, "block_size"),
        "gpt-tiny": _Entry("tiny GPT for tests (2 layers, d_model 64)", gpt.gpt_tiny, GPT, "block_size"),
        "llama-tiny": _Entry("tiny Llama for tests (GQA 4/2 heads, d_model 64)", llama.llama_tiny, Llama, "max_seq_len"),
        "llama-1b": _Entry("Llama 1B-class (16 layers, GQA 32/8 heads)", llama.llama_1b, Llama, "max_seq_len"),
        "llama-7b": _Entry("Llama 7B (32 layers, MHA)", llama.llama_7b, Llama, "max_seq_len"),
        "llama-70b": _Entry("Llama 70B (80 layers, GQA 64/8 heads)", llama.llama_70b, Llama, "max_seq_len"),
        "hf-tiny": _Entry(
            "tiny HuggingFace-style LM: fx symbolic tracing fails, torch.export works",
            hf_style.hf_tiny,
            HFStyleModel,
            "max_position_embeddings",
        ),
        # Images and class labels; BatchNorm statistics per microbatch (contract: partc/models/cnn.py).
        "resnet-tiny": _Entry(
            "tiny ResNet for tests (4 residual blocks, BatchNorm, 3x16x16 images)", cnn.resnet_tiny, cnn.ResNet, None, cnn.image_batch, cnn.classification_loss
        ),
        "resnet50": _Entry(
            "ResNet-50 (bottleneck blocks 3-4-6-3, 25.6M parameters, 224x224 images)", cnn.resnet50, cnn.ResNet, None, cnn.image_batch, cnn.classification_loss
        ),
        # Two inputs (source and target tokens); cross-attention to the encoder's output.
        "encdec-tiny": _Entry(
            "tiny encoder-decoder transformer for tests (2 + 2 layers, cross-attention, two inputs)",
            encdec.encdec_tiny,
            encdec.EncoderDecoder,
            "max_seq_len",
            encdec.translation_batch,
        ),
        "t5-base-shaped": _Entry(
            "encoder-decoder with T5-base's sizes (12 + 12 layers, d_model 768), 273M parameters",
            encdec.t5_base_shaped,
            encdec.EncoderDecoder,
            "max_seq_len",
            encdec.translation_batch,
        ),
        # Real HuggingFace transformers models from tiny configs (transformers imported on build).
        "hf-gpt2": _Entry("HuggingFace GPT2LMHeadModel, tiny config (needs transformers)", hf.gpt2_config, hf.gpt2_lm, "n_positions", loss_fn=hf.logits_loss),
        "hf-llama": _Entry(
            "HuggingFace LlamaForCausalLM, tiny config (needs transformers)", hf.llama_config, hf.llama_lm, "max_position_embeddings", loss_fn=hf.logits_loss
        ),
        "hf-bert": _Entry(
            "HuggingFace BertForMaskedLM, tiny config (needs transformers)",
            hf.bert_config,
            hf.bert_mlm,
            "max_position_embeddings",
            make_batch=hf.masked_lm_batch,
            loss_fn=hf.logits_loss,
        ),
        # Recommendation (dense features + sparse ids -> click logit; partc/models/dlrm.py).
        "dlrm-tiny": _Entry(
            "tiny DLRM for tests (4 embedding bags of 24..4096 rows, D 16)", dlrm.dlrm_tiny, dlrm.DLRM, None, dlrm.click_batch, dlrm.click_loss
        ),
        "dlrm-criteo": _Entry(
            "DLRM on Criteo Terabyte-sized tables (26 tables, D 128, 24B parameters; planning only)",
            dlrm.dlrm_criteo,
            dlrm.DLRM,
            None,
            dlrm.click_batch,
            dlrm.click_loss,
        ),
        # Mixture of experts (top-2 routing, fixed capacity per sequence; partc/models/moe.py).
        "moe-tiny": _Entry("tiny top-2 mixture-of-experts GPT for tests (4 experts, d_model 32)", moe.moe_tiny, moe.MoEGPT, "block_size"),
        "moe-8x1b": _Entry("top-2 mixture-of-experts GPT, 8 experts, 24 layers, d_model 2048 (planning)", moe.moe_8x1b, moe.MoEGPT, "block_size"),
    }
)

# The public, read-only registry: name -> description.
MODELS = MappingProxyType({name: entry.description for name, entry in _ENTRIES.items()})


def names() -> list[str]:
    """The built-in model names, in registry order."""
    return list(MODELS)


def _entry(name: str) -> _Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise PartcError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def config(name: str) -> Any:
    """The config (a frozen dataclass) of a built-in model."""
    return _entry(name).make_config()


def num_params(model: nn.Module) -> int:
    """Parameter count, counting a tied (shared) Parameter once; works on meta."""
    return sum(p.numel() for p in model.parameters())


def build(
    name: str,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, tuple[Any, ...]]:
    """A built-in model and example inputs (for token models ``(token_ids,)``, a LongTensor
    [batch_size, seq_len]) on the model's device.

    ``seq_len`` defaults to the model's maximum sequence length. ``device=None`` builds
    on ``"meta"`` (no memory, no init cost) for models over 2B parameters and on
    ``"cpu"`` otherwise. Initialisation uses the global RNG; seed it for
    reproducibility.
    """
    case = training_case(name, batch_size=batch_size, seq_len=seq_len, device=device)
    return case.model, case.inputs


def training_case(
    name: str,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | torch.device | None = None,
) -> TrainingCase:
    """A built-in model with a global batch of inputs and targets, and its loss function
    (arguments as for :func:`build`)."""
    entry = _entry(name)
    cfg = entry.make_config()
    if entry.max_len_field is not None:
        max_len = getattr(cfg, entry.max_len_field)
        if seq_len is None:
            seq_len = max_len
        if not 0 < seq_len <= max_len:
            raise PartcError(f"seq_len must be in [1, {max_len}] for {name!r}, got {seq_len}")
    if batch_size < 1:
        raise PartcError(f"batch_size must be >= 1, got {batch_size}")

    model = None
    if device is None:
        # Counting on meta is exact (tied weights included) and allocates nothing;
        # a model that stays on meta is reused rather than built twice.
        with torch.device("meta"):
            model = entry.model_cls(cfg)
        if num_params(model) > META_THRESHOLD:
            device = "meta"
        else:
            device, model = "cpu", None
    device = torch.device(device)

    with torch.device(device):
        if model is None:
            model = entry.model_cls(cfg)
        inputs, targets = entry.make_batch(cfg, batch_size, seq_len)
    return TrainingCase(name=name, model=model, inputs=tuple(inputs), targets=targets, loss_fn=entry.loss_fn)
