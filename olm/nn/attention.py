"""Registered self-attention kinds, all computed by F.scaled_dot_product_attention.

Queries, keys and values come from one fused matmul (``qkv``), which is cheaper than three separate projections;
``olm.nn.blocks.QKVProjection`` remains the documented stand-alone projection. Grouped-query attention passes
``enable_gqa`` to SDPA, so K/V heads are never copied. Only logit soft-capping (Gemma 2), which SDPA cannot express,
takes an explicit softmax path.
"""

import torch
import torch.nn.functional as F
from torch import nn

from olm import registry
from olm.nn.structure import Block, check_dropout
from olm.registry import ConfigError, register, where


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated to ``max_len`` positions."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[-2]
        if self.length + T > self.k.shape[-2]:
            raise ValueError(f"KV cache holds {self.k.shape[-2]} positions; cannot append {T} after {self.length}")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Attention(Block):
    """Self-attention with every option; the registered kinds below expose the parameters that apply to them."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        num_kv_heads: int | None = None,
        window: int | None = None,
        position="rope",
        bias: bool = False,
        out_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm=None,
        softcap: float | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads:
                raise ConfigError(f"{where('embed_dim')}={embed_dim} must be divisible by {where('num_heads')}={num_heads}")
            head_dim = embed_dim // num_heads
        num_kv_heads = num_kv_heads or num_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ConfigError(f"{where('num_kv_heads')}={num_kv_heads} must divide num_heads={num_heads}")
        if window is not None and window < 1:
            raise ConfigError(f"{where('window')}={window} must be a positive number of positions")
        check_dropout(dropout)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.softcap, self.dropout = causal, window, softcap, dropout
        self.scale = scale if scale is not None else head_dim**-0.5
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias if out_bias is None else out_bias)
        self.proj.is_residual_out = True  # scaled init in LM
        self.resid_dropout = nn.Dropout(dropout)
        position_name, _ = registry.split_spec(position, "position")
        applies_to = registry.get("position", position_name, "position").cls.applies_to
        self.position = (
            registry.build("position", position, "position", head_dim=head_dim, num_heads=num_heads, max_seq_len=max_seq_len)
            if applies_to == "attention"
            else None
        )
        self.q_norm = registry.build("norm", qk_norm, "attention.qk_norm", dim=head_dim) if qk_norm else None
        self.k_norm = registry.build("norm", qk_norm, "attention.qk_norm", dim=head_dim) if qk_norm else None

    def _mask(self, q_len: int, k_len: int, offset: int, device) -> torch.Tensor | None:
        """Boolean (Tq, Tk) mask of allowed positions, or None when every key may be seen."""
        if not self.causal and self.window is None:
            return None
        query_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        key_pos = torch.arange(k_len, device=device)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if self.causal:
            allowed &= key_pos <= query_pos
        if self.window is not None:
            allowed &= (query_pos - key_pos).abs() < self.window
        return allowed

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.length if cache is not None else 0
        if isinstance(self.position, nn.Module) and hasattr(self.position, "rotate"):
            q, k = self.position.rotate(q, k, offset)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, offset+T, hd)
        y = self._attend(q, k, v, offset)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.resid_dropout(self.proj(y))

    def _attend(self, q, k, v, offset: int) -> torch.Tensor:
        q_len, k_len = q.shape[-2], k.shape[-2]
        dropout = self.dropout if self.training else 0.0
        has_bias = self.position is not None and hasattr(self.position, "bias")
        if self.softcap is None and not has_bias and self.window is None and (q_len == k_len or not self.causal):
            # The fast path: flash / cuDNN / memory-efficient kernels with is_causal and native GQA.
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=self.causal, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
            )
        mask = self._mask(q_len, k_len, offset, q.device)
        bias = self.position.bias(q_len, k_len, offset, q.device, q.dtype) if has_bias else None
        if self.softcap is None:
            if bias is not None and mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            attn_mask = bias if bias is not None else mask
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
            )
        # Soft-capped logits: cap * tanh(scores / cap) before the mask (Gemma 2).
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), dropout, self.training)
        return weights @ v


@register("attention", "mha")
class MultiHeadAttention(Attention):
    """Multi-head self-attention: every head has its own keys and values."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        position="rope",
        bias: bool = False,
        out_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm=None,
        softcap: float | None = None,
        scale: float | None = None,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, position=position, bias=bias, out_bias=out_bias,
            head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale,
        )


@register("attention", "gqa")
class GroupedQueryAttention(Attention):
    """Grouped-query attention: ``num_kv_heads`` key/value heads shared by groups of query heads (1 = MQA)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        num_kv_heads: int = 1,
        position="rope",
        bias: bool = False,
        out_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm=None,
        softcap: float | None = None,
        scale: float | None = None,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=num_kv_heads, position=position,
            bias=bias, out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale,
        )


@register("attention", "mqa")
class MultiQueryAttention(Attention):
    """Multi-query attention: one key/value head shared by all query heads (gqa with num_kv_heads=1)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        position="rope",
        bias: bool = False,
        out_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm=None,
        softcap: float | None = None,
        scale: float | None = None,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=1, position=position, bias=bias,
            out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale,
        )


@register("attention", "sliding_window")
class SlidingWindowAttention(Attention):
    """Local attention: each query sees only the ``window`` most recent positions (Mistral, Gemma 2 local layers)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        window: int = 4096,
        num_kv_heads: int | None = None,
        position="rope",
        bias: bool = False,
        out_bias: bool | None = None,
        head_dim: int | None = None,
        qk_norm=None,
        softcap: float | None = None,
        scale: float | None = None,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=num_kv_heads, window=window,
            position=position, bias=bias, out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap,
            scale=scale,
        )
