"""A GPT-2/GPT-3 style decoder (nanoGPT layout).

The forward pass is written for capture, not for speed tricks:

* no Python control flow on tensor values or shapes, so ``torch.fx`` symbolic tracing
  (including a tracer that traces *into* ``nn.Linear``) and ``torch.export`` both work;
* shapes come from ``x.size(i)``, which fx turns into proxies, so a traced graph is not
  specialised to the example sequence length;
* attention goes through ``F.scaled_dot_product_attention`` so it appears as one node.

Weight init is the GPT-2 recipe (normal 0.02, residual projections scaled by
``1/sqrt(2 * n_layer)``) and uses only ``nn.init`` functions, which are no-ops on the
meta device: ``with torch.device("meta"): GPT(gpt3_175b())`` allocates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # maximum sequence length (size of the position table)
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    tie_weights: bool = True  # lm_head.weight is wte.weight
    bias: bool = True  # bias in Linear and LayerNorm

    def __post_init__(self):
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        # One fused projection for q, k and v (as GPT-2 checkpoints store it).
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), x.size(1)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        # self.training is a Python bool, not a tensor: fine for fx.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU ("gelu_new" in HF).
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            # One Parameter under two names; named_parameters() reports it once (as wte).
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after ``to_empty()`` to materialise."""
        self.apply(self._init_weights)
        # GPT-2: residual-stream projections are scaled so the residual variance does
        # not grow with depth (two residual adds per block).
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx``: LongTensor [B, T] with T <= block_size; returns logits [B, T, vocab]."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---- presets --------------------------------------------------------------------------
# GPT-3 sizes follow Brown et al. 2020, Table 2.1 (all use a 2048-token context).

GPT3_VOCAB = 50257
GPT3_CONTEXT = 2048


def gpt2() -> GPTConfig:
    """GPT-2 small, 124M parameters (tied head)."""
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768)


def gpt2_medium() -> GPTConfig:
    """GPT-2 medium, 350M parameters."""
    return GPTConfig(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024)


def gpt3_shaped(n_layer: int, d_model: int = 12288, n_head: int = 96) -> GPTConfig:
    """A GPT-3-shaped config (GPT-3 vocab and context) with any depth/width; benchmarks
    use it to scale GPT-3 175B layers down to what fits."""
    return GPTConfig(
        vocab_size=GPT3_VOCAB, block_size=GPT3_CONTEXT, n_layer=n_layer, n_head=n_head, d_model=d_model
    )


def gpt3_1_3b() -> GPTConfig:
    return gpt3_shaped(24, d_model=2048, n_head=16)


def gpt3_2_6b() -> GPTConfig:
    return gpt3_shaped(32, d_model=2560, n_head=32)


def gpt3_6_7b() -> GPTConfig:
    return gpt3_shaped(32, d_model=4096, n_head=32)


def gpt3_175b() -> GPTConfig:
    return gpt3_shaped(96, d_model=12288, n_head=96)


def gpt_tiny() -> GPTConfig:
    """A few-KB model for tests and examples."""
    return GPTConfig(vocab_size=128, block_size=32, n_layer=2, n_head=4, d_model=64)
