"""A mixture-of-experts GPT: GPT-2 blocks whose MLP is a top-k router over E experts.

The experts are stacked weights ``w_in`` [E, d, f] and ``w_out`` [E, f, d], so expert
parallelism is one sharding of their leading dim, and the routing is dense tensor
algebra with static shapes (GShard's formulation), which fx traces and the sharding
pass can place:

    probs = softmax(router(x))                    [B, T, E]   router: d -> E, no bias
    gate, expert = top-k(probs)                   [B, T, k]   gates renormalised to sum 1
    slot of each (token, choice) in its expert's queue, counted per sequence: every first
    choice in token order, then every second choice, ... (GShard's priority)
    dispatch [B, T, E, C] = 1 where the token sits in slot c of expert e
    combine  [B, T, E, C] = dispatch x the gate of that choice
    buffers = einsum("btec,btd->ebcd", dispatch, x)           [E, B, C, d]
    out     = einsum("ebcf,efd->ebcd", gelu(einsum("ebcd,edf->ebcf", buffers, w_in)), w_out)
    y       = einsum("btec,ebcd->btd", combine, out)

Capacity: each expert takes at most ``C = ceil(capacity_factor * k * block_size / E)``
tokens of each sequence (the token group is the sequence). A choice whose slot is ``>= C``
is dropped: that expert does not see the token and the choice adds nothing to ``y`` (the
residual connection still carries the token); the other choice's gate is not
renormalised. The rule counts only the tokens of the sequence, so it is the same when the
sequences of a batch are spread over ranks: the single-device model and every
distributed layout compute the same function (parity holds exactly, dropped tokens
included).

Expert parallelism in partc's layouts: with the batch sharded (S(0) on B) each rank routes
its own sequences into buffers [E, B/tp, C, d] (S(1)); an all-to-all turns them into
[E/tp, B, C, d] (S(0): each rank's experts with every sequence's tokens), the expert
einsums run on the rank's experts, and an all-to-all brings the outputs back to S(1) for
the combine. The sharding ILP chooses this when its all-to-alls are cheaper than the
alternatives (replicated experts, or expert-sharded buffers from replicated tokens with an
all-reduce of the combine).

No auxiliary load-balancing loss (the router learns from the gates alone). Dropout is not
applied inside the experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from partc.models.gpt import CausalSelfAttention, GPTConfig

__all__ = ["MoEConfig", "MoEGPT", "MoELayer", "moe_8x1b", "moe_tiny"]


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int
    block_size: int  # maximum sequence length
    n_layer: int
    n_head: int
    d_model: int
    n_expert: int  # E
    expert_hidden: int  # f: hidden width of each expert's MLP
    top_k: int = 2
    capacity_factor: float = 1.25
    bias: bool = False

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_expert:
            raise ValueError(f"top_k must be in [1, n_expert={self.n_expert}], got {self.top_k}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")

    @property
    def capacity(self) -> int:
        """Tokens of one sequence each expert takes at most (C)."""
        return math.ceil(self.capacity_factor * self.top_k * self.block_size / self.n_expert)

    def attention_config(self) -> GPTConfig:
        return GPTConfig(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.d_model, 0.0, True, self.bias)


class MoELayer(nn.Module):
    """Top-k routing over stacked experts with a fixed capacity per sequence (module docstring)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.top_k, self.n_expert, self.capacity = config.top_k, config.n_expert, config.capacity
        self.router = nn.Linear(config.d_model, config.n_expert, bias=False)
        self.w_in = nn.Parameter(torch.empty(config.n_expert, config.d_model, config.expert_hidden))
        self.w_out = nn.Parameter(torch.empty(config.n_expert, config.expert_hidden, config.d_model))

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dispatch, combine), both [B, T, E, C]."""
        gate, expert = self.router(x).softmax(-1).topk(self.top_k, dim=-1)  # [B, T, k]
        gate = gate / gate.sum(-1, keepdim=True)
        chosen = F.one_hot(expert, self.n_expert)  # [B, T, k, E]
        queue = chosen.transpose(1, 2).flatten(1, 2)  # [B, k*T, E]: first choices, then second ...
        slot = queue.cumsum(1) - 1  # place in the expert's queue where chosen
        kept = queue * (slot < self.capacity)  # chosen and within capacity
        slots = F.one_hot(slot.clamp(0, self.capacity - 1), self.capacity) * kept.unsqueeze(-1)  # [B, kT, E, C]
        slots = slots.unflatten(1, (self.top_k, -1)).to(x.dtype)  # [B, k, T, E, C]
        dispatch = slots.sum(1)  # a token goes to an expert at most once
        combine = (slots * gate.transpose(1, 2).unsqueeze(-1).unsqueeze(-1)).sum(1)
        return dispatch, combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dispatch, combine = self.routing(x)
        buffers = torch.einsum("btec,btd->ebcd", dispatch, x)
        hidden = F.gelu(torch.einsum("ebcd,edf->ebcf", buffers, self.w_in), approximate="tanh")
        out = torch.einsum("ebcf,efd->ebcd", hidden, self.w_out)
        return torch.einsum("btec,ebcd->btd", combine, out)


class MoEBlock(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config.attention_config())
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.moe = MoELayer(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.moe(self.ln_2(x))


class MoEGPT(nn.Module):
    """GPT-2 layout (token and position embeddings, pre-LN blocks, LM head) with MoE MLPs."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(MoEBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter (GPT-2's recipe); call after ``to_empty()``."""
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, MoELayer):
                nn.init.normal_(module.w_in, std=0.02)
                nn.init.normal_(module.w_out, std=std)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` [B, T] token ids, T <= block_size; returns logits [B, T, vocab]."""
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def moe_tiny() -> MoEConfig:
    """Two blocks, 4 experts of width 64, d_model 32: a few hundred KB."""
    return MoEConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, d_model=32, n_expert=4, expert_hidden=64)


def moe_8x1b() -> MoEConfig:
    """A Mixtral-like shape at GPT-2 XL width: 8 experts, top-2, 24 layers (7.06B parameters)."""
    return MoEConfig(vocab_size=50257, block_size=2048, n_layer=24, n_head=16, d_model=2048, n_expert=8, expert_hidden=8192)
