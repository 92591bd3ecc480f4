"""A small pre-LayerNorm transformer (GPT-style), shared by ``charlm`` and ``modadd-grokking``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Transformer"]


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width))

    def forward(self, h: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``h`` of shape (batch, time, width) -> the same shape, or (batch, 1, width) with ``last_only``: only the
        last position's output (it attends to every position, so no mask is needed), skipping the others' work."""
        b, t, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, h = q[:, :, -1:], h[:, -1:]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and not last_only)
        h = h + self.proj(a.transpose(1, 2).reshape(b, h.shape[1], w))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-LN blocks, a final LayerNorm and a linear read-out to
    ``outputs`` classes at every position. Weights (and position embeddings) are drawn N(0, ``init_std``), biases
    zero; 0.02 is GPT-2's choice."""

    def __init__(
        self,
        vocab: int,
        outputs: int,
        context: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        causal: bool,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_width, causal) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, outputs)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=init_std)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos, std=init_std)

    def forward(self, tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits of shape ``(batch, time, outputs)`` for int64 ``tokens`` of shape ``(batch, time)``; with
        ``last_only``, those of the last position only, ``(batch, outputs)``, computed without the other
        positions' work in the last block."""
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, last_only=last_only and i == len(self.blocks) - 1)
        logits = self.head(self.ln(h))
        return logits[:, -1] if last_only else logits
