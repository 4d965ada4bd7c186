"""QKVProjection: separate query/key/value projections with a choice of weight initialisation."""

import math

import torch
from torch import nn

from olm.nn.structure import Block
from olm.registry import ConfigError, register, where


def _init_normal(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, mean=0.0, std=0.02)


INIT_SCHEMES = {
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),  # nn.Linear's own default
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
    "normal": _init_normal,  # N(0, 0.02) as in GPT-2
    "orthogonal": nn.init.orthogonal_,
}


@register("projection", "qkv")
class QKVProjection(Block):
    """Query, key and value projections as three Linear layers ``W_q``, ``W_k``, ``W_v``.

    ``dim_out`` is the query width; ``kv_dim`` (default ``dim_out``) the key/value width, smaller for grouped-query
    attention. ``init`` picks the weight initialisation: one of ``INIT_SCHEMES``; biases start at zero.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        bias: bool = False,
        init: str = "xavier_uniform",
        *,
        kv_dim: int | None = None,
    ):
        super().__init__()
        if init not in INIT_SCHEMES:
            raise ConfigError(f"{where('init')}={init!r} is not a known initialisation; known: {', '.join(INIT_SCHEMES)}")
        kv_dim = kv_dim or dim_out
        self.W_q = nn.Linear(dim_in, dim_out, bias=bias)
        self.W_k = nn.Linear(dim_in, kv_dim, bias=bias)
        self.W_v = nn.Linear(dim_in, kv_dim, bias=bias)
        for linear in (self.W_q, self.W_k, self.W_v):
            INIT_SCHEMES[init](linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (batch, seq_len, dim_in) -> (Q, K, V), each (batch, seq_len, width)."""
        return self.W_q(x), self.W_k(x), self.W_v(x)
