"""A small transformer encoder classifier whose every projection is a plain ``nn.Linear``.

Input is channels-first like the 1-D tasks (``(batch, in_dim, seq_len)``, e.g. mnist1d's
``(1, 40)``): a Linear embeds each position, a learned position embedding is added, pre-norm
blocks (attention, then a GELU MLP) with residuals follow, tokens are mean-pooled, a Linear
classifies.

Each attention head has its own ``q``/``k``/``v`` Linear (``dim -> head_dim``) and the heads'
outputs are concatenated into one ``out`` Linear. A fused ``dim -> dim`` query projection
reshaped into heads would be faster, but the dependency graph only sees a reshape, not the head
boundaries: pruning it would remove channels unevenly across heads (silently moving channels
into another head) and crash whenever the kept width is not a multiple of the head count.
With per-head projections each head is its own pruning group.

What :func:`autocompress.compress.prune.find_prune_groups` exposes (Torch-Pruning's graph
treats the attention matmuls as element-wise, which couples exactly the right layers):

* ``blocks.i.fc1`` -- the MLP hidden width (fc1 outputs, fc2 inputs);
* ``blocks.i.attn.heads.j.v`` -- head j's width: its q, k and v outputs together (q and k must
  lose the same dimensions of their dot product) and the matching inputs of ``out``; the
  softmax scale stays the unpruned head's;
* the residual stream width (``embed``, the position embedding, every ``attn.out`` and ``fc2``
  output, all LayerNorms, the inputs of every q/k/v/fc1 and of ``head``), named after the last
  ``fc2``. Pruning it changes what each LayerNorm averages over, so it is the most lossy.

The classifier ``head`` is the output layer and is never pruned. All Linears (``embed`` aside,
whose input is 1-wide) can be low-rank factorized by :mod:`autocompress.compress.lowrank`.
"""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """One attention head: its own q/k/v projections and softmax(q k^T * scale) v."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        # Fixed at construction: after pruning, the kept dimensions still approximate the
        # original dot product, so the original scale stays right.
        self.scale = head_dim**-0.5
        self.q = nn.Linear(dim, head_dim)
        self.k = nn.Linear(dim, head_dim)
        self.v = nn.Linear(dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (self.q(x) @ self.k(x).transpose(-2, -1)) * self.scale
        return scores.softmax(dim=-1) @ self.v(x)


class Attention(nn.Module):
    """Multi-head self-attention: independent heads, concatenated, one output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        self.heads = nn.ModuleList(Head(dim, dim // heads) for _ in range(heads))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([head(x) for head in self.heads], dim=-1))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Embed, add positions, ``depth`` encoder blocks, final LayerNorm, mean-pool, classify."""

    def __init__(self, seq_len: int, in_dim: int, dim: int, depth: int, heads: int, ffn: int, num_classes: int) -> None:
        super().__init__()
        for key, value in dict(seq_len=seq_len, in_dim=in_dim, dim=dim, depth=depth, ffn=ffn).items():
            if value < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        self.embed = nn.Linear(in_dim, dim)
        # An Embedding (not a bare Parameter) so the pruner knows which axis is the width.
        self.pos = nn.Embedding(seq_len, dim)
        self.register_buffer("positions", torch.arange(seq_len), persistent=False)
        self.blocks = nn.Sequential(*(Block(dim, heads, ffn) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.transpose(1, 2)) + self.pos(self.positions)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def tiny_transformer(
    seq_len: int = 40,
    in_dim: int = 1,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    ffn: int = 256,
    num_classes: int = 10,
) -> nn.Module:
    """Transformer encoder classifier for ``(batch, in_dim, seq_len)`` inputs (see module docstring)."""
    return TinyTransformer(seq_len, in_dim, dim, depth, heads, ffn, num_classes)
