"""Registered normalisation layers, on torch's fused functional kernels."""

import torch
import torch.nn.functional as F
from torch import nn

from olm.nn.structure import Block
from olm.registry import register


@register("norm", "layernorm")
class LayerNorm(Block):
    """LayerNorm via F.layer_norm; affine=False gives OLMo's non-parametric norm, bias=False drops the shift only."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


@register("norm", "rmsnorm")
class RMSNorm(Block):
    """RMSNorm via F.rms_norm (Llama, Mistral, Qwen2, Gemma with its 1+w weights folded in at import)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)
