"""A small causal LM written the way HuggingFace ``transformers`` writes models.

It exists to exercise partc's capture fallback: ``torch.fx.symbolic_trace`` fails on it,
``torch.export.export(model, args, strict=False)`` succeeds. Three HF habits cause that:

1. **Input validation on shapes.** ``forward`` starts with::

       if input_ids.shape[1] > self.config.max_position_embeddings:
           raise ValueError(...)

   Under symbolic tracing ``input_ids`` is a ``Proxy``, so ``input_ids.shape[1] > n``
   is a ``Proxy`` too, and ``if`` calls ``Proxy.__bool__``, which raises
   ``torch.fx.proxy.TraceError: symbolically traced variables cannot be used as inputs
   to control flow``. Non-strict export runs ``forward`` as ordinary Python on fake
   tensors whose (static) shapes are real ints, so the comparison is a plain ``bool``.
2. **Optional inputs.** ``if attention_mask is not None:`` is harmless to fx (``is``
   cannot be overloaded, so a proxy is never ``None`` and the branch is always taken),
   but it means the traced graph silently depends on which arguments were given.
3. **Flag arguments and dict outputs.** ``if return_dict:`` on a proxied ``bool`` fails
   the same way as (1); export specialises non-tensor inputs to their example value.
   The output is a plain ``dict`` (``{"logits": ...}``), which both fx and export
   accept as a pytree (HF's ``ModelOutput`` is an ``OrderedDict`` subclass for the
   same reason).

The architecture itself is a plain pre-LN GPT-2-like decoder with HF module names
(``embeddings.word_embeddings``, ``layers[i].self_attn.q_proj`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class HFStyleConfig:
    vocab_size: int = 128
    max_position_embeddings: int = 32
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    layer_norm_eps: float = 1e-5


class HFStyleEmbeddings(nn.Module):
    def __init__(self, config: HFStyleConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.word_embeddings(input_ids) + self.position_embeddings(position_ids)


class HFStyleAttention(nn.Module):
    def __init__(self, config: HFStyleConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _shape(self, x: torch.Tensor, bsz: int, seq_len: int) -> torch.Tensor:
        return x.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, _ = hidden_states.shape
        q = self._shape(self.q_proj(hidden_states), bsz, seq_len)
        k = self._shape(self.k_proj(hidden_states), bsz, seq_len)
        v = self._shape(self.v_proj(hidden_states), bsz, seq_len)
        # attention_mask is additive, [bsz, 1, seq_len, seq_len], causal part included.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(bsz, seq_len, -1)
        return self.out_proj(out)


class HFStyleDecoderLayer(nn.Module):
    def __init__(self, config: HFStyleConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = HFStyleAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        residual = hidden_states
        hidden_states = self.fc2(F.gelu(self.fc1(self.post_attention_layernorm(hidden_states))))
        return residual + hidden_states


class HFStyleModel(nn.Module):
    """A causal LM: ``forward(input_ids, attention_mask=None, return_dict=True)``."""

    def __init__(self, config: HFStyleConfig):
        super().__init__()
        self.config = config
        self.embeddings = HFStyleEmbeddings(config)
        self.layers = nn.ModuleList(HFStyleDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for module in self.modules():  # HF's _init_weights, minus the per-class dispatch
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def _build_attention_mask(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal mask combined with the padding mask, as one additive float mask.

        Masked entries get ``finfo.min`` once (never twice, which would overflow to
        -inf and turn fully-masked padding rows into NaN); such rows come out finite.
        """
        seq_len = input_ids.shape[1]
        dtype = self.embeddings.word_embeddings.weight.dtype
        keep = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
        keep = keep[None, None, :, :]  # [1, 1, q, k]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :].bool()  # padding: mask keys
        zero = torch.zeros((), dtype=dtype, device=input_ids.device)
        return torch.where(keep, zero, torch.finfo(dtype).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        mask = self._build_attention_mask(attention_mask, input_ids)
        hidden_states = self.embeddings(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        logits = self.lm_head(self.final_layernorm(hidden_states))
        if not return_dict:
            return (logits,)
        return {"logits": logits}


def hf_tiny() -> HFStyleConfig:
    return HFStyleConfig()
