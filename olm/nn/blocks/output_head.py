"""OutputHead: final norm and projection to vocabulary logits."""

import torch
from torch import nn

from olm import registry
from olm.nn.structure import Block
from olm.registry import register


@register("head", "output_head")
class OutputHead(Block):
    """LayerNorm -> Linear(vocab_size). ``layers`` holds [norm, linear].

    Extras: ``norm`` picks another registered norm; ``softcap`` applies ``cap * tanh(logits / cap)`` (Gemma 2);
    ``multiplier`` scales the normalised features entering the projection (muP's output multiplier; without a
    bias the same as scaling the logits).
    """

    def __init__(self, embed_dim: int, vocab_size: int, bias: bool = False, *, norm="layernorm",
                 softcap: float | None = None, multiplier: float = 1.0):
        super().__init__()
        self.softcap, self.multiplier = softcap, multiplier
        self.layers = nn.ModuleList(
            [registry.build("norm", norm, "norm", dim=embed_dim), nn.Linear(embed_dim, vocab_size, bias=bias)]
        )

    @property
    def norm(self) -> nn.Module:
        return self.layers[0]

    @property
    def linear(self) -> nn.Linear:
        return self.layers[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the projection sees: the normalised hidden states, times ``multiplier``."""
        h = self.norm(x)
        return h if self.multiplier == 1.0 else h * self.multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(self.features(x))  # (B, T, vocab)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits
