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


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """GPT-OSS's gated unit: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``.

    The clamps bound the activations (and so the experts' outputs) whatever the inputs; ``alpha = 1.702`` makes
    ``g * sigmoid(alpha * g)`` the sigmoid approximation of GELU.
    """
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


@register("ffn", "clamped_swiglu")
class ClampedSwiGLU(GatedMLP):
    """SwiGLU with GPT-OSS's clamps, GELU-like gate and +1 on the up projection (see ``clamped_swiglu``)."""

    def __init__(
        self,
        embed_dim: int,
        ff_multiplier: float = 2.5,
        dropout: float = 0.0,
        *,
        hidden_dim: int | None = None,
        multiple_of: int = 1,
        bias: bool = False,
        limit: float = 7.0,
        alpha: float = 1.702,
    ):
        super().__init__(embed_dim, ff_multiplier, dropout, hidden_dim=hidden_dim, multiple_of=multiple_of, bias=bias)
        self.limit, self.alpha = limit, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(clamped_swiglu(gate, up, self.limit, self.alpha)))


EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")
ROUTINGS = ("softmax", "sigmoid")


@register("ffn", "moe")
class MoE(Block):
    """Sparse mixture of gated experts (Mixtral, Qwen3-MoE, GPT-OSS, DeepSeek-V3): each token goes to ``top_k``.

    Router: ``routing: softmax`` (Mixtral, Qwen3, GPT-OSS) or ``sigmoid`` (DeepSeek-V3) scores over
    ``num_experts``, from a linear ``router`` (with a learned bias if ``router_bias``). With ``num_groups > 1`` the
    experts are split into groups, ranked by the sum of their two best scores, and a token picks only among the
    ``top_groups`` best groups (DeepSeek's group-limited routing). ``normalize_top_k`` renormalises the chosen
    scores to sum to one; ``routed_scale`` multiplies them afterwards.

    Load balance: ``aux_loss_coef > 0`` stores the Switch-Transformer loss
    ``aux_loss_coef * E * sum_e(fraction of routed slots_e * mean router probability_e)`` in ``last_aux_loss``
    (``LM.aux_loss()`` sums it over layers; for sigmoid routing the probabilities are the scores normalised per
    token). ``balance_bias`` adds DeepSeek-V3's auxiliary-loss-free balancing instead or as well: a bias (buffer
    ``expert_bias``, saved with the weights, never trained by gradients) that is added to the scores only to
    choose the experts, and that after each training forward moves by ``balance_rate`` towards the
    under-loaded experts: ``bias_e += rate * sign(mean load - load_e)``. ``last_load`` keeps the last forward's
    fraction of routed slots per expert.

    Experts: ``activation`` ``swiglu`` or ``clamped_swiglu`` (GPT-OSS, with ``limit`` and ``alpha``), stacked as
    ``fc`` (E, 2 * hidden, C) = [gate; up] rows and ``proj`` (E, C, hidden), with biases ``fc_bias``/``proj_bias``
    if ``bias``. ``shared_experts`` (DeepSeek) adds a dense SwiGLU of ``shared_experts * hidden`` that every token
    passes through.
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
        routing: str = "softmax",
        router_bias: bool = False,
        num_groups: int = 1,
        top_groups: int = 1,
        routed_scale: float = 1.0,
        balance_bias: bool = False,
        balance_rate: float = 0.001,
        shared_experts: int = 0,
        activation: str = "swiglu",
        limit: float = 7.0,
        alpha: float = 1.702,
        bias: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"{where('top_k')}={top_k} must be between 1 and num_experts={num_experts}")
        if routing not in ROUTINGS:
            raise ConfigError(f"{where('routing')}={routing!r} is not known; known: {', '.join(ROUTINGS)}")
        if activation not in EXPERT_ACTIVATIONS:
            raise ConfigError(f"{where('activation')}={activation!r} is not known; "
                              f"known: {', '.join(EXPERT_ACTIVATIONS)}")
        if num_groups < 1 or num_experts % num_groups:
            raise ConfigError(f"{where('num_groups')}={num_groups} must divide num_experts={num_experts}")
        if not 1 <= top_groups <= num_groups or top_groups * (num_experts // num_groups) < top_k:
            raise ConfigError(f"{where('top_groups')}={top_groups} must be between 1 and num_groups={num_groups} "
                              f"and leave at least top_k={top_k} experts to choose from")
        if shared_experts < 0:
            raise ConfigError(f"{where('shared_experts')}={shared_experts} must be 0 or more")
        hidden = hidden_size(embed_dim, ff_multiplier, multiple_of, hidden_dim)
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.normalize_top_k, self.aux_loss_coef = normalize_top_k, aux_loss_coef
        self.routing, self.routed_scale = routing, routed_scale
        self.num_groups, self.top_groups = num_groups, top_groups
        self.balance_rate, self.activation, self.limit, self.alpha = balance_rate, activation, limit, alpha
        self.router = nn.Linear(embed_dim, num_experts, bias=router_bias)
        self.fc = nn.Parameter(torch.empty(num_experts, 2 * hidden, embed_dim))  # [gate; up] per expert
        self.proj = nn.Parameter(torch.empty(num_experts, embed_dim, hidden))
        self.fc_bias = nn.Parameter(torch.zeros(num_experts, 2 * hidden)) if bias else None
        self.proj_bias = nn.Parameter(torch.zeros(num_experts, embed_dim)) if bias else None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if balance_bias else None)
        self.shared = SwiGLU(embed_dim, hidden_dim=shared_experts * hidden) if shared_experts else None
        self.dropout = nn.Dropout(dropout)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.init_parameters()

    def init_parameters(self, std: float = 0.02, residual_std: float | None = None) -> None:
        """Called by ``LM.init_weights``: the stacked expert matrices are not nn.Linear layers."""
        nn.init.normal_(self.fc, 0.0, std)
        nn.init.normal_(self.proj, 0.0, std if residual_std is None else residual_std)
        for bias in (self.fc_bias, self.proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C) -> per-token scores (N, E) fp32, chosen weights (N, k) and experts (N, k)."""
        logits = self.router(x).float()
        scores = logits.softmax(dim=-1) if self.routing == "softmax" else logits.sigmoid()
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if self.num_groups > 1:
            grouped = choice.view(-1, self.num_groups, self.num_experts // self.num_groups)  # (N, G, E/G)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (N, G)
            best = group_scores.topk(self.top_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights * self.routed_scale, experts

    def _expert(self, e: int, x_e: torch.Tensor) -> torch.Tensor:
        h = F.linear(x_e, self.fc[e], None if self.fc_bias is None else self.fc_bias[e])
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up if self.activation == "swiglu" else clamped_swiglu(gate, up, self.limit, self.alpha)
        return F.linear(h, self.proj[e], None if self.proj_bias is None else self.proj_bias[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        scores, weights, experts = self._route(x)
        # Routed slots (token, slot) sorted by expert: one gather, and one read of the per-expert counts per layer
        # (a host sync on a GPU), instead of one nonzero() per expert.
        routed_to = experts.reshape(-1)  # slot s of token t at t * top_k + s
        order = torch.argsort(routed_to, stable=True)
        counts = torch.bincount(routed_to, minlength=self.num_experts)
        token = order // self.top_k
        ys = [self._expert(e, x_e) for e, x_e in enumerate(x[token].split(counts.tolist()))]
        y = torch.cat(ys) * weights.to(x.dtype).reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        load = counts.float() / routed_to.numel()  # (E,) fraction of routed slots
        self.last_load = load.detach()
        if self.aux_loss_coef:
            probs = scores if self.routing == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            routed = load * self.top_k  # mean slots per token
            self.last_aux_loss = self.aux_loss_coef * self.num_experts * (routed * probs.mean(dim=0)).sum()
        if self.expert_bias is not None and self.training:
            with torch.no_grad():  # under-loaded experts become more likely to be chosen, over-loaded less
                self.expert_bias += self.balance_rate * torch.sign(load.mean() - load)
        return self.dropout(out.view(shape))
