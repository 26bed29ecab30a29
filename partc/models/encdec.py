"""An encoder-decoder transformer (the "Attention Is All You Need" / T5 layout, pre-LN).

``forward(source, target)`` takes two token sequences: the encoder reads ``source``
[B, S] with bidirectional self-attention; the decoder reads ``target`` [B, T] with causal
self-attention and cross-attention to the encoder's output (the *memory*), and returns
next-token logits [B, T, vocab]. The registry's batch gives ``target`` and its next-token
shift as the targets, so the loss is :func:`partc.models.language_model_loss`.

Why it is in the zoo: it has two inputs, one of them (``target``) read only after the
whole encoder has run, and one value (the memory) read by every decoder layer. Cut into a
pipeline, the stages before the decoder relay ``target`` unchanged, and every stage that
holds decoder layers receives the memory and sends it on (its gradient flows back the
same way); tensor parallelism shards cross-attention like self-attention (queries from
the decoder, keys and values from the memory).

Written for capture like :mod:`partc.models.gpt`: no control flow on tensors, shapes from
``x.size(i)``, head counts from the config (never hard-coded in views), attention through
``F.scaled_dot_product_attention``. Linear layers carry no bias (as T5's), which also
avoids the key bias whose true gradient is zero (rounding noise that AdamW would amplify
in parity tests).

``encdec_tiny()`` is the test model; ``t5_base_shaped()`` has T5-base's sizes (12 + 12
layers, d_model 768, 12 heads, d_ff 3072, vocabulary 32128) with learned absolute
positions instead of T5's relative position buckets, for planning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class EncDecConfig:
    vocab_size: int = 128
    max_seq_len: int = 32  # the longest source or target sequence
    d_model: int = 32
    n_head: int = 4
    d_ff: int = 128
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


def encdec_tiny() -> EncDecConfig:
    """Two encoder and two decoder layers, d_model 32, 4 heads, vocabulary 128."""
    return EncDecConfig()


def t5_base_shaped() -> EncDecConfig:
    """T5-base's sizes; 273M parameters here (T5-base has 220M: it shares one embedding
    between encoder, decoder and LM head, and has no position tables)."""
    return EncDecConfig(vocab_size=32128, max_seq_len=512, d_model=768, n_head=12, d_ff=3072, n_encoder_layers=12, n_decoder_layers=12)


class Attention(nn.Module):
    """Multi-head attention of ``queries_from`` over ``keys_from`` (the same tensor for
    self-attention, the encoder's memory for cross-attention)."""

    def __init__(self, config: EncDecConfig, *, causal: bool):
        super().__init__()
        self.n_head, self.causal = config.n_head, causal
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, queries_from: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:
        B, T, S = queries_from.size(0), queries_from.size(1), keys_from.size(1)
        k, v = self.kv(keys_from).chunk(2, dim=-1)
        q = self.q(queries_from).view(B, T, self.n_head, -1).transpose(1, 2)  # [B, heads, T, head_dim]
        k = k.view(B, S, self.n_head, -1).transpose(1, 2)
        v = v.view(B, S, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class EncoderLayer(nn.Module):
    """x + self_attn(ln(x)), then x + ff(ln(x))."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.ln_attn, self.ln_ff = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.self_attn = Attention(config, causal=False)
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_attn(x)
        x = x + self.self_attn(h, h)
        return x + self.ff(self.ln_ff(x))


class DecoderLayer(nn.Module):
    """y + causal_self_attn(ln(y)), then y + cross_attn(ln(y), memory), then y + ff(ln(y))."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_ff = (nn.LayerNorm(config.d_model) for _ in range(3))
        self.self_attn = Attention(config, causal=True)
        self.cross_attn = Attention(config, causal=False)
        self.ff = FeedForward(config)

    def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(y)
        y = y + self.self_attn(h, h)
        y = y + self.cross_attn(self.ln_cross(y), memory)
        return y + self.ff(self.ln_ff(y))


class EncoderDecoder(nn.Module):
    """(source [B, S], target [B, T]) token ids -> logits [B, T, vocab]."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        self.config = config
        self.source_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.source_pos = nn.Embedding(config.max_seq_len, config.d_model)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(config.d_model)
        self.target_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.target_pos = nn.Embedding(config.max_seq_len, config.d_model)
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.source_embed(source) + self.source_pos(torch.arange(source.size(1), device=source.device))
        for layer in self.encoder:
            x = layer(x)
        memory = self.encoder_norm(x)
        y = self.target_embed(target) + self.target_pos(torch.arange(target.size(1), device=target.device))
        for layer in self.decoder:
            y = layer(y, memory)
        return self.lm_head(self.decoder_norm(y))


def translation_batch(config: EncDecConfig, batch_size: int, seq_len: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Random source tokens [batch_size, seq_len], decoder input tokens [batch_size, seq_len]
    and their next-token targets (the decoder input shifted by one)."""
    source = torch.randint(0, config.vocab_size, (batch_size, seq_len), dtype=torch.long)
    target = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), dtype=torch.long)
    return (source, target[:, :-1].contiguous()), target[:, 1:].contiguous()
