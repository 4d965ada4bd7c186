"""TokenEmbedding: token table, optional learned absolute positions, optional scale."""

import torch
from torch import nn

from olm import registry
from olm.nn.structure import Block
from olm.registry import register


@register("embedding", "token")
class TokenEmbedding(Block):
    """Token embedding; adds a learned position table when the model's position kind applies to embeddings.

    ``scale`` multiplies the token embeddings (Gemma uses sqrt(embed_dim)).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        max_seq_len: int,
        dropout: float = 0.0,
        *,
        position="none",
        scale: float | None = None,
    ):
        super().__init__()
        self.scale = scale
        self.token = nn.Embedding(vocab_size, embed_dim)
        name, _ = registry.split_spec(position, "position")
        applies_to = registry.get("position", name, "position").cls.applies_to
        self.position = (
            registry.build("position", position, "position", embed_dim=embed_dim, max_seq_len=max_seq_len)
            if applies_to == "embedding"
            else None
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.token(idx)  # (B, T, C)
        if self.scale is not None:
            x = x * torch.tensor(self.scale, dtype=x.dtype)
        if self.position is not None:
            x = x + self.position(idx.shape[1], start)
        return self.dropout(x)
