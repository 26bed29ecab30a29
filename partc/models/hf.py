"""Real HuggingFace ``transformers`` models, built from tiny configs (nothing downloaded).

These are the models users bring: ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and
``BertForMaskedLM`` as ``transformers`` writes them. ``torch.fx`` symbolic tracing fails
on all three (with transformers 5.23 at once: their ``forward`` is wrapped in a
``(*args, **kwargs)`` decorator, and fx raises ``ValueError: code: co_varnames is too
small`` re-creating it for the traced arguments; behind it, masks are built with Python
control flow on shapes), so partc captures them through ``torch.export``. They return
``ModelOutput`` objects, which reach the user's loss function as such (``out.logits``).

The configs are tiny (2 layers, hidden 64, 4 heads, vocabulary 128, 32 positions) and
made for exact parity tests:

* dropout is off everywhere: dropout's random masks differ between a pipeline stage and
  the single-device model, so no distributed run could match it;
* the KV cache is off (``use_cache=False``): a training step has no use for it, and a
  cache object in the outputs is not a tensor a pipeline stage can send;
* attention is ``"eager"`` (plain matmul + softmax), which every partc pass has rules
  for.

``transformers`` is optional: it is imported when a model is built, and without it the
builders raise a :class:`~partc.PartcError` saying ``pip install transformers``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn

from partc.errors import ErrorContext, PartcError

VOCAB_SIZE = 128
MAX_POSITIONS = 32
HIDDEN = 64
LAYERS = 2
HEADS = 4
# Every config: no KV cache, eager attention (see the module docstring).
_TRAINING = {"use_cache": False, "attn_implementation": "eager"}
# Llama's and BERT's sizes under the names most HF configs use (GPT-2 has its own).
_SIZES = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": MAX_POSITIONS,
    "hidden_size": HIDDEN,
    "intermediate_size": 4 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
}
# BertForMaskedLM reads [MASK] tokens; the tiny vocabulary has no tokenizer, so one id is it.
MASK_TOKEN_ID = VOCAB_SIZE - 1
MASKED_FRACTION = 0.15


def _transformers() -> Any:
    """The ``transformers`` module, or a PartcError saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise PartcError(
            f"the HuggingFace models need the transformers package, which is not installed ({e})",
            ErrorContext(fix="pip install transformers   (or: pip install 'partc[hf]')"),
        ) from None


def gpt2_config() -> Any:
    """A 2-layer GPT-2 (``GPT2Config``): tied embedding and LM head, learned positions."""
    return _transformers().GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **_TRAINING,
    )


def llama_config() -> Any:
    """A 2-layer Llama (``LlamaConfig``): RMSNorm, rotary positions, SwiGLU, grouped-query
    attention (4 query heads, 2 key/value heads), untied LM head."""
    return _transformers().LlamaConfig(
        **_SIZES,
        num_key_value_heads=HEADS // 2,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        **_TRAINING,
    )


def bert_config() -> Any:
    """A 2-layer BERT (``BertConfig``): post-LN encoder, bidirectional attention, the MLM
    decoder tied to the word embeddings."""
    return _transformers().BertConfig(
        **_SIZES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        **_TRAINING,
    )


def gpt2_lm(config: Any) -> nn.Module:
    """``GPT2LMHeadModel(config)``: ``model(input_ids).logits`` is ``[batch, seq, vocab]``."""
    return _transformers().GPT2LMHeadModel(config)


def llama_lm(config: Any) -> nn.Module:
    """``LlamaForCausalLM(config)``: ``model(input_ids).logits`` is ``[batch, seq, vocab]``."""
    return _transformers().LlamaForCausalLM(config)


def bert_mlm(config: Any) -> nn.Module:
    """``BertForMaskedLM(config)``: ``model(input_ids).logits`` is ``[batch, seq, vocab]``."""
    return _transformers().BertForMaskedLM(config)


def logits_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``outputs.logits`` against ``targets``, reading the logits as
    an attribute the way HF training code does: a run in which partc handed the loss a
    plain dict or tensor instead of the model's ``ModelOutput`` fails here."""
    from partc.models import language_model_loss  # partc.models imports this module

    return language_model_loss(outputs.logits, targets)


def masked_lm_batch(config: Any, batch_size: int, seq_len: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random tokens with about 15% replaced by the [MASK] id, and the original tokens as
    targets at every position (the usual MLM loss scores the masked positions only; scoring
    all of them keeps every microbatch's mean over the same count, so the pipeline's mean of
    microbatch losses is the whole batch's mean)."""
    tokens = torch.randint(0, MASK_TOKEN_ID, (batch_size, seq_len), dtype=torch.long)
    masked = torch.rand(batch_size, seq_len) < MASKED_FRACTION
    return (tokens.masked_fill(masked, MASK_TOKEN_ID),), tokens
