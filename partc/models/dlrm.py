"""A DLRM-style recommendation model (Naumov et al. 2019): embedding tables, a dense MLP,
pairwise dot-product feature interaction, a top MLP and one click logit.

    dense [B, F] ──bottom MLP──> x [B, D] ─┐
    sparse [B, T, L] ──table t (bag of L ids, pooled by sum)──> e_t [B, D] ─┤
                                           stack: [B, T+1, D]
                                           dot products of every pair: Z = F Fᵀ [B, T+1, T+1]
                                           strictly-lower triangle of Z: [B, (T+1)T/2]
                                 cat(x, pairs) ──top MLP──> logit [B]

The loss is binary cross entropy on the logit (:func:`click_loss`). Tables are
``nn.EmbeddingBag(mode="sum")`` over fixed-size bags (``sparse[:, t]`` is [B, L]), so a
lookup is one operator the sharding pass can place: row-wise (the table's rows split over
the tensor-parallel ranks, each rank pooling its rows' hits, an all-reduce of the partial
sums) or table-wise (the whole table on one rank, its pooled lookup broadcast), or
replicated. The interaction picks the triangle through ``index_select`` on a flattened Z
with a constant index buffer, so every operator has a sharding rule.

Written for capture: no Python control flow on tensor values; ``nn.init`` only, so a
model built on the meta device allocates nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DLRM", "DLRMConfig", "click_batch", "click_loss", "dlrm_criteo", "dlrm_tiny"]


@dataclass(frozen=True)
class DLRMConfig:
    table_sizes: tuple[int, ...]  # rows of each embedding table
    embedding_dim: int  # D: width of every table and of the bottom MLP's output
    dense_features: int  # F: dense (continuous) inputs per sample
    bottom_mlp: tuple[int, ...]  # hidden widths of the bottom MLP (its output is D)
    top_mlp: tuple[int, ...]  # hidden widths of the top MLP (its output is one logit)
    bag_size: int = 1  # L: ids per sample and table (fixed-size bags)

    def __post_init__(self):
        if not self.table_sizes or min(self.table_sizes) < 1:
            raise ValueError(f"table_sizes must name at least one table of >= 1 row, got {self.table_sizes}")
        if self.bag_size < 1:
            raise ValueError(f"bag_size must be >= 1, got {self.bag_size}")

    @property
    def interactions(self) -> int:
        """Pairs of distinct features (the T tables and the dense vector)."""
        n = len(self.table_sizes) + 1
        return n * (n - 1) // 2


def _mlp(widths: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, config: DLRMConfig):
        super().__init__()
        self.config = config
        d = config.embedding_dim
        self.bottom = _mlp([config.dense_features, *config.bottom_mlp, d], last_activation=True)
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, d, mode="sum") for rows in config.table_sizes)
        self.top = _mlp([d + config.interactions, *config.top_mlp, 1], last_activation=False)
        n = len(config.table_sizes) + 1
        rows, cols = torch.tril_indices(n, n, offset=-1)
        # Positions of the strictly-lower triangle in the flattened [n, n] interaction matrix;
        # not persistent: it is a function of the config, not a weight.
        self.register_buffer("pair_index", rows * n + cols, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after ``to_empty()`` to materialise."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.EmbeddingBag):
                nn.init.uniform_(module.weight, -module.num_embeddings**-0.5, module.num_embeddings**-0.5)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``dense`` [B, F] float, ``sparse`` [B, T, L] ids (table t's ids in ``sparse[:, t]``);
        returns the click logits [B]."""
        x = self.bottom(dense)
        pooled = [table(sparse[:, t]) for t, table in enumerate(self.tables)]
        features = torch.stack([x, *pooled], dim=1)  # [B, T+1, D]
        z = torch.bmm(features, features.transpose(1, 2)).flatten(1)  # [B, (T+1)^2]
        pairs = z.index_select(1, self.pair_index)
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(-1)


def click_batch(config: DLRMConfig, batch_size: int, seq_len: int | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random dense features, ids for every table and 0/1 click labels (``seq_len`` unused)."""
    dense = torch.randn(batch_size, config.dense_features)
    ids = [torch.randint(0, rows, (batch_size, 1, config.bag_size)) for rows in config.table_sizes]
    return (dense, torch.cat(ids, dim=1)), torch.randint(0, 2, (batch_size,)).float()


def click_loss(logits: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
    """Mean binary cross entropy of the click logits."""
    return F.binary_cross_entropy_with_logits(logits.float(), clicks)


def dlrm_tiny() -> DLRMConfig:
    """Four tables of different sizes (one much larger), D = 16: a few hundred KB."""
    return DLRMConfig(table_sizes=(4096, 96, 48, 24), embedding_dim=16, dense_features=13, bottom_mlp=(32,), top_mlp=(32, 16), bag_size=2)


# The 26 table sizes of the Criteo Terabyte data set as the MLPerf DLRM reference caps them
# (40M rows at most), with its embedding width and MLPs. Written from memory, not re-checked
# against the reference: planning-scale shapes (24.0B parameters), not a benchmark.
CRITEO_TABLE_SIZES = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
    2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36,
)


def dlrm_criteo() -> DLRMConfig:
    return DLRMConfig(
        table_sizes=CRITEO_TABLE_SIZES, embedding_dim=128, dense_features=13, bottom_mlp=(512, 256), top_mlp=(1024, 1024, 512, 256), bag_size=1
    )
