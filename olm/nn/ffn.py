"""Registered feed-forward networks.

Hidden size: ``hidden_dim`` if given, else ``multiple_of * ceil(ff_multiplier * embed_dim / multiple_of)``
(``ff_multiplier * embed_dim`` rounded up to a multiple of ``multiple_of``; with the default ``multiple_of=1``,
embed_dim=512 and ff_multiplier=2.5 give 1280). Gated variants (SwiGLU, GeGLU) hold their gate and up projections in
one fused matrix of ``2 * hidden`` rows.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from olm.nn.structure import Block
from olm.registry import ConfigError, register, where

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}


def hidden_size(embed_dim: int, ff_multiplier: float, multiple_of: int = 1, hidden_dim: int | None = None) -> int:
    """The FFN width; see the module docstring for the formula."""
    if hidden_dim is not None:
        return hidden_dim
    if ff_multiplier <= 0:
        raise ConfigError(f"{where('ff_multiplier')}={ff_multiplier} must be positive")
    # round() first so that 8/3 * 768 = 2048.0000000000002 does not round up to 2049
    return multiple_of * math.ceil(round(ff_multiplier * embed_dim / multiple_of, 6))


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where('activation')}={name!r} is not known; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@register("ffn", "gelu_mlp")
class MLP(Block):
    """Two-layer MLP with a pointwise activation (GPT-2: gelu_tanh, OPT: relu)."""

    def __init__(
        self,
        embed_dim: int,
        ff_multiplier: float = 4.0,
        dropout: float = 0.0,
        *,
        activation: str = "gelu_tanh",
        hidden_dim: int | None = None,
        multiple_of: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        hidden = hidden_size(embed_dim, ff_multiplier, multiple_of, hidden_dim)
        self.act = _activation(activation)
        self.fc = nn.Linear(embed_dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, embed_dim, bias=bias)
        self.proj.is_residual_out = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class GatedMLP(Block):
    """act(x W_gate) * (x W_up) -> W_down, with W_gate and W_up fused into ``fc``."""

    activation = "silu"

    def __init__(
        self,
        embed_dim: int,
        ff_multiplier: float = 2.5,
        dropout: float = 0.0,
        *,
        hidden_dim: int | None = None,
        multiple_of: int = 1,
        bias: bool = False,
    ):
        super().__init__()
        hidden = hidden_size(embed_dim, ff_multiplier, multiple_of, hidden_dim)
        self.hidden = hidden
        self.act = _activation(self.activation)
        self.fc = nn.Linear(embed_dim, 2 * hidden, bias=bias)  # [gate; up]
        self.proj = nn.Linear(hidden, embed_dim, bias=bias)
        self.proj.is_residual_out = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(self.act(gate) * up))


@register("ffn", "swiglu")
class SwiGLU(GatedMLP):
    """SwiGLU feed-forward (Shazeer 2020): silu gate; the documented default of TransformerBlock."""

    activation = "silu"


@register("ffn", "geglu")
class GeGLU(GatedMLP):
    """GeGLU feed-forward: tanh-approximated GELU gate (Gemma)."""

    activation = "gelu_tanh"
