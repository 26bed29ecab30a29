"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Written for capture like :mod:`partc.models.gpt`: no control flow on tensors, shapes via
``x.size(i)``, and everything decomposes into plain ops. In particular

* ``RMSNorm`` is a local module (not ``nn.RMSNorm``) so tracing into it yields
  elementwise ops and a reduction that sharding passes already understand;
* rotary embeddings use real arithmetic on precomputed cos/sin tables (no complex
  tensors, which neither the sharding passes nor the meta device handle well);
* grouped-query attention repeats k/v explicitly with ``repeat_interleave`` so the graph
  shows the repetition instead of hiding it inside an SDPA flag.

Rotary convention: the "rotate half" layout (GPT-NeoX / HF Llama), where dimension ``i``
is paired with ``i + head_dim/2``. Meta's reference pairs adjacent dimensions instead;
the two are equivalent up to a fixed permutation of the q/k projection rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    max_seq_len: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    ffn_hidden: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_weights: bool = False

    def __post_init__(self):
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``; the normalisation runs in float32 (low
    precision loses too much in the mean of squares) and is cast back before the weight
    multiply, as in Meta's reference implementation."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim // 2], in float32 on the default
    device (meta under ``with torch.device("meta")``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, head_dim] by position; ``cos``/``sin`` are [T, head_dim//2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos = cos[:, None, :].to(x.dtype)  # broadcast over heads
    sin = sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_rep = config.n_head // config.n_kv_head  # query heads per k/v head
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_head * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(1)
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.n_rep > 1:  # a config constant, not a tensor: fine for fx
            # Query head h reads k/v head h // n_rep.
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        # [B, T, H, hd] -> [B, H, T, hd]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.w3 = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        x = x + self.feed_forward(self.ffn_norm(x))
        return x


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.output.weight = self.tok_embeddings.weight
        # Rope tables derive from the config, so they stay out of state_dict
        # (persistent=False); init_weights() fills them, also after a meta ->
        # to_empty() materialisation.
        half = config.head_dim // 2
        self.register_buffer("rope_cos", torch.empty(config.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_seq_len, half), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise parameters and rope tables; call after ``to_empty()``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Scale the residual-stream projections by depth, as in GPT-2.
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.attention.wo.weight, mean=0.0, std=std)
            nn.init.normal_(layer.feed_forward.w2.weight, mean=0.0, std=std)
        with torch.device(self.rope_cos.device):
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx``: LongTensor [B, T] with T <= max_seq_len; returns logits [B, T, vocab]."""
        T = idx.size(1)
        # narrow(), not [:T]: under fx, T is a Proxy and the buffer is a plain tensor
        # (fx does not proxy buffers by default), and a Proxy inside a slice object
        # reaches C++ unseen and fails; narrow() passes T as an argument fx records.
        cos, sin = self.rope_cos.narrow(0, 0, T), self.rope_sin.narrow(0, 0, T)
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


# ---- presets --------------------------------------------------------------------------


def llama_tiny() -> LlamaConfig:
    """A few-KB model for tests; 2 k/v heads for 4 query heads so GQA is exercised."""
    return LlamaConfig(
        vocab_size=128, max_seq_len=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=176
    )


def llama_1b() -> LlamaConfig:
    """TinyLlama-shaped, at 16 layers (about 0.84B parameters with an untied head)."""
    return LlamaConfig(
        vocab_size=32000, max_seq_len=2048, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, ffn_hidden=5632
    )


def llama_7b() -> LlamaConfig:
    """LLaMA 7B shape (multi-head attention: n_kv_head == n_head; 2048 context)."""
    return LlamaConfig(
        vocab_size=32000, max_seq_len=2048, n_layer=32, n_head=32, n_kv_head=32, d_model=4096, ffn_hidden=11008
    )


def llama_70b() -> LlamaConfig:
    """Llama-2 70B (grouped-query attention with 8 k/v heads)."""
    return LlamaConfig(
        vocab_size=32000, max_seq_len=4096, n_layer=80, n_head=64, n_kv_head=8, d_model=8192, ffn_hidden=28672
    )
