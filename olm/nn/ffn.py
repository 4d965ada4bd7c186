"""Registered feed-forward networks.

Hidden size (per expert for `moe`): ``hidden_dim`` if given, else ``multiple_of * ceil(ff_multiplier * embed_dim / multiple_of)``
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
        if hidden_dim < 1:
            raise ConfigError(f"{where('hidden_dim')}={hidden_dim} must be a positive integer")
        return hidden_dim
    if ff_multiplier <= 0:
        raise ConfigError(f"{where('ff_multiplier')}={ff_multiplier} must be positive")
    if multiple_of < 1:
        raise ConfigError(f"{where('multiple_of')}={multiple_of} must be a positive integer")
    # round() first so that 8/3 * 768 = 2048.0000000000002 does not round up to 2049
    hidden = multiple_of * math.ceil(round(ff_multiplier * embed_dim / multiple_of, 6))
    if hidden < 1:
        raise ConfigError(f"{where('ff_multiplier')}={ff_multiplier} gives an FFN of width {hidden}; it must be at least 1")
    return hidden


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


@register("ffn", "moe")
class MoE(Block):
    """Sparse mixture of SwiGLU experts (Mixtral): each token goes to its ``top_k`` experts by router score.

    Expert weights are stacked: ``fc`` (E, 2 * hidden, C) holds each expert's [gate; up] rows, ``proj``
    (E, C, hidden) its down projection. With ``normalize_top_k`` the chosen experts' probabilities are renormalised
    to sum to one. Every forward stores the Switch-Transformer load-balancing loss
    ``aux_loss_coef * E * sum_e(fraction of routed slots_e * mean router probability_e)`` in ``last_aux_loss``,
    which ``LM.aux_loss()`` sums over layers.
    """

    def __init__(
        self,
        embed_dim: int,
        ff_multiplier: float = 2.5,
        dropout: float = 0.0,
        *,
        num_experts: int = 8,
        top_k: int = 2,
        hidden_dim: int | None = None,
        multiple_of: int = 1,
        normalize_top_k: bool = True,
        aux_loss_coef: float = 0.01,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"{where('top_k')}={top_k} must be between 1 and num_experts={num_experts}")
        hidden = hidden_size(embed_dim, ff_multiplier, multiple_of, hidden_dim)
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.normalize_top_k, self.aux_loss_coef = normalize_top_k, aux_loss_coef
        self.router = nn.Linear(embed_dim, num_experts, bias=False)
        self.fc = nn.Parameter(torch.empty(num_experts, 2 * hidden, embed_dim))  # [gate; up] per expert
        self.proj = nn.Parameter(torch.empty(num_experts, embed_dim, hidden))
        self.dropout = nn.Dropout(dropout)
        self.last_aux_loss: torch.Tensor | None = None
        self.init_parameters()

    def init_parameters(self, std: float = 0.02, residual_std: float | None = None) -> None:
        """Called by ``LM.init_weights``: the stacked expert matrices are not nn.Linear layers."""
        nn.init.normal_(self.fc, 0.0, std)
        nn.init.normal_(self.proj, 0.0, std if residual_std is None else residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # Routed slots (token, slot) sorted by expert: one gather, and one read of the per-expert counts per layer
        # (a host sync on a GPU), instead of one nonzero() per expert.
        routed_to = experts.reshape(-1)  # slot s of token t at t * top_k + s
        order = torch.argsort(routed_to, stable=True)
        counts = torch.bincount(routed_to, minlength=self.num_experts).tolist()
        token = order // self.top_k
        ys = []
        for e, x_e in enumerate(x[token].split(counts)):
            gate, up = F.linear(x_e, self.fc[e]).chunk(2, dim=-1)
            ys.append(F.linear(F.silu(gate) * up, self.proj[e]))
        y = torch.cat(ys) * weights.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        routed = F.one_hot(experts, self.num_experts).sum(dim=1).float().mean(dim=0)  # (E,) mean slots per token
        self.last_aux_loss = self.aux_loss_coef * self.num_experts * (routed * probs.mean(dim=0)).sum()
        return self.dropout(out.view(shape))
