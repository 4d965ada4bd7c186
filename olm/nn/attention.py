"""Registered self-attention kinds, all computed by F.scaled_dot_product_attention.

Queries, keys and values come from one fused matmul (``qkv``), which is cheaper than three separate projections;
``olm.nn.blocks.QKVProjection`` remains the documented stand-alone projection. Grouped-query attention passes
``enable_gqa`` to SDPA, so K/V heads are never copied. Attention sinks (GPT-OSS) are one extra all-zero key whose
logit comes from the float mask, so they stay on SDPA; only logit soft-capping (Gemma 2), which SDPA cannot express,
takes an explicit softmax path. Multi-head latent attention (``mla``, DeepSeek-V2/V3) has its own projections and a
cache of the compressed latents.

Every attention kind is called as ``attention(x, context=AttentionContext(...))``: the per-call inputs travel in one
object from ``LM`` through ``TransformerBlock``, so a new per-call input changes no signature.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from olm import registry
from olm.nn.structure import Block, check_dropout
from olm.registry import ConfigError, register, where


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated to ``max_len`` positions.

    ``value_dim`` (default ``head_dim``) lets the two halves differ in width: MLA stores its compressed latent as
    the "keys" and the shared rotary key as the "values".
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int, device, dtype,
                 value_dim: int | None = None):
        self.k = torch.zeros(batch_size, num_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, num_kv_heads, max_len, value_dim or head_dim, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[-2]
        if self.length + T > self.k.shape[-2]:
            raise ValueError(f"KV cache holds {self.k.shape[-2]} positions; cannot append {T} after {self.length}")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


@dataclass
class AttentionContext:
    """The per-call inputs of one layer's attention, built by ``LM`` and handed on by ``TransformerBlock``.

    ``cache``: this layer's KV cache during incremental decoding, else None. ``offset``: the position of the first
    query (the number of cached positions). A document mask (FlexAttention block masks, per-token document ids and
    per-document positions) belongs here as further fields: attention kinds read what they need and the block and
    LM signatures stay as they are.
    """

    cache: KVCache | None = None
    offset: int = 0


def _allowed(q_len: int, k_len: int, offset: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """Boolean (Tq, Tk) mask of allowed positions, or None when every key may be seen."""
    if not causal and window is None:
        return None
    query_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
    key_pos = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= key_pos <= query_pos
    if window is not None:
        allowed &= (query_pos - key_pos).abs() < window
    return allowed


QK_NORM_SCOPES = ("head", "all")


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
        qk_norm_scope: str = "head",
        sinks: bool = False,
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
        if qk_norm_scope not in QK_NORM_SCOPES:
            raise ConfigError(f"{where('qk_norm_scope')}={qk_norm_scope!r} is not known; "
                              f"known: {', '.join(QK_NORM_SCOPES)}")
        # "head": one norm over each head's vector, shared by the heads (Qwen3, Gemma 3); "all": one norm over the
        # whole query / key projection, before it is split into heads (OLMo 2).
        self.qk_norm_scope = qk_norm_scope
        q_dim, k_dim = (head_dim, head_dim) if qk_norm_scope == "head" else (num_heads * head_dim,
                                                                              num_kv_heads * head_dim)
        self.q_norm = registry.build("norm", qk_norm, "attention.qk_norm", dim=q_dim) if qk_norm else None
        self.k_norm = registry.build("norm", qk_norm, "attention.qk_norm", dim=k_dim) if qk_norm else None
        # Attention sinks (GPT-OSS): a learned logit per head in each softmax that takes probability mass and gives
        # no value, so a head can attend to nothing.
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None

    def forward(self, x: torch.Tensor, *, context: AttentionContext | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        cache, offset = (context.cache, context.offset) if context is not None else (None, 0)
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        if self.q_norm is not None and self.qk_norm_scope == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.q_norm is not None and self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(self.position, nn.Module) and hasattr(self.position, "rotate"):
            q, k = self.position.rotate(q, k, offset)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, offset+T, hd)
        y = self._attend(q, k, v, offset)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)
        return self.resid_dropout(self.proj(y))

    def make_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, max_len, device, dtype)

    def _attend(self, q, k, v, offset: int) -> torch.Tensor:
        q_len, k_len = q.shape[-2], k.shape[-2]
        dropout = self.dropout if self.training else 0.0
        has_bias = self.position is not None and hasattr(self.position, "bias")
        gqa = self.num_kv_heads != self.num_heads
        plain = self.softcap is None and self.sinks is None and not has_bias and self.window is None
        if plain and (q_len == k_len or not self.causal):
            # The fast path: flash / cuDNN / memory-efficient kernels with is_causal and native GQA.
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=self.causal, scale=self.scale, enable_gqa=gqa
            )
        mask = _allowed(q_len, k_len, offset, self.causal, self.window, q.device)
        bias = self.position.bias(q_len, k_len, offset, q.device, q.dtype) if has_bias else None
        if self.softcap is None and self.sinks is None:
            if bias is not None and mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            attn_mask = bias if bias is not None else mask
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale, enable_gqa=gqa
            )
        if self.softcap is None:
            return self._attend_with_sinks(q, k, v, mask, bias, dropout, gqa)
        # Soft-capped logits: cap * tanh(scores / cap) before the mask (Gemma 2).
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is not None:  # the sink joins the softmax and is dropped after it
            sink = self.sinks.to(scores.dtype)[:, None, None].expand(*scores.shape[:-1], 1)
            weights = torch.cat([scores, sink], dim=-1).float().softmax(dim=-1)[..., :-1]
        else:
            weights = scores.float().softmax(dim=-1)
        return F.dropout(weights.to(q.dtype), dropout, self.training) @ v

    def _attend_with_sinks(self, q, k, v, mask, bias, dropout: float, gqa: bool) -> torch.Tensor:
        """SDPA with one more key of zeros and a zero value: its logit is the mask's last column, the sink."""
        B, KV, k_len, hd = k.shape
        k = torch.cat([k, k.new_zeros(B, KV, 1, hd)], dim=-2)  # (B, KV, Tk+1, hd)
        v = torch.cat([v, v.new_zeros(B, KV, 1, v.shape[-1])], dim=-2)
        q_len = q.shape[-2]
        scores = torch.zeros(self.num_heads, q_len, k_len, dtype=q.dtype, device=q.device) if bias is None else bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sink = self.sinks.to(q.dtype)[:, None, None].expand(self.num_heads, q_len, 1)
        attn_mask = torch.cat([scores.expand(self.num_heads, q_len, k_len), sink], dim=-1)  # (H, Tq, Tk+1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale, enable_gqa=gqa
        )


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
        qk_norm_scope: str = "head",
        sinks: bool = False,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, position=position, bias=bias, out_bias=out_bias,
            head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale, qk_norm_scope=qk_norm_scope,
            sinks=sinks,
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
        qk_norm_scope: str = "head",
        sinks: bool = False,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=num_kv_heads, position=position,
            bias=bias, out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale,
            qk_norm_scope=qk_norm_scope, sinks=sinks,
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
        qk_norm_scope: str = "head",
        sinks: bool = False,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=1, position=position, bias=bias,
            out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap, scale=scale,
            qk_norm_scope=qk_norm_scope, sinks=sinks,
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
        qk_norm_scope: str = "head",
        sinks: bool = False,
    ):
        super().__init__(
            embed_dim, num_heads, max_seq_len, dropout, causal, num_kv_heads=num_kv_heads, window=window,
            position=position, bias=bias, out_bias=out_bias, head_dim=head_dim, qk_norm=qk_norm, softcap=softcap,
            scale=scale, qk_norm_scope=qk_norm_scope, sinks=sinks,
        )


@register("attention", "mla")
class MultiHeadLatentAttention(Block):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are rebuilt from a small compressed latent.

    Queries: ``x -> q_b(norm(q_a(x)))`` through a rank-``q_rank`` bottleneck (DeepSeek-V3: 1536; the default, null,
    gives one full projection ``q``), each head ``nope_dim + rope_dim`` wide. Keys and values: ``kv_a`` maps ``x`` to a
    ``kv_rank`` latent plus one ``rope_dim`` rotary key shared by all heads; ``kv_b`` expands the normalised latent
    into each head's ``nope_dim`` key part and ``v_dim`` value. Only the rotary parts carry positions, so the cache
    holds ``kv_rank + rope_dim`` numbers per token and layer (the latent and the rotated shared key) instead of
    ``2 * num_heads * head_dim``. Scores are scaled by ``scale`` (default ``(nope_dim + rope_dim) ** -0.5``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        *,
        kv_rank: int = 512,
        q_rank: int | None = None,
        rope_dim: int = 64,
        nope_dim: int = 128,
        v_dim: int = 128,
        latent_norm="rmsnorm",
        position="rope",
        bias: bool = False,
        scale: float | None = None,
    ):
        super().__init__()
        ranks = dict(kv_rank=kv_rank, q_rank=q_rank, rope_dim=rope_dim, nope_dim=nope_dim, v_dim=v_dim)
        for key, value in ranks.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where(key)}={value!r} must be a positive integer")
        check_dropout(dropout)
        position_name, _ = registry.split_spec(position, "position")
        if position_name != "rope":
            raise ConfigError(f"{where('position')}={position_name!r} does not apply to attention 'mla'; "
                              "its decoupled rotary part needs: rope")
        self.num_heads, self.num_kv_heads, self.causal, self.dropout = num_heads, num_heads, causal, dropout
        self.kv_rank, self.rope_dim, self.nope_dim, self.v_dim = kv_rank, rope_dim, nope_dim, v_dim
        self.head_dim = nope_dim + rope_dim  # the query/key width; values are v_dim wide
        self.window = None
        self.scale = scale if scale is not None else self.head_dim**-0.5
        low_rank_q = q_rank is not None
        self.q = None if low_rank_q else nn.Linear(embed_dim, num_heads * self.head_dim, bias=False)
        self.q_a = nn.Linear(embed_dim, q_rank, bias=bias) if low_rank_q else None
        self.q_norm = registry.build("norm", latent_norm, "attention.latent_norm", dim=q_rank) if low_rank_q else None
        self.q_b = nn.Linear(q_rank, num_heads * self.head_dim, bias=False) if low_rank_q else None
        self.kv_a = nn.Linear(embed_dim, kv_rank + rope_dim, bias=bias)
        self.kv_norm = registry.build("norm", latent_norm, "attention.latent_norm", dim=kv_rank)
        self.kv_b = nn.Linear(kv_rank, num_heads * (nope_dim + v_dim), bias=False)
        self.proj = nn.Linear(num_heads * v_dim, embed_dim, bias=bias)
        self.proj.is_residual_out = True
        self.resid_dropout = nn.Dropout(dropout)
        self.position = registry.build("position", position, "position", head_dim=rope_dim, max_seq_len=max_seq_len)

    def forward(self, x: torch.Tensor, *, context: AttentionContext | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.num_heads
        cache, offset = (context.cache, context.offset) if context is not None else (None, 0)
        q = self.q(x) if self.q is not None else self.q_b(self.q_norm(self.q_a(x)))
        q = q.view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)[:, None]  # (B, 1, T, kv_rank)
        q_rope, k_rope = self.position.rotate(q_rope, k_rope[:, None], offset)  # k_rope: (B, 1, T, rope)
        if cache is not None:
            latent, k_rope = cache.append(latent, k_rope)  # (B, 1, offset+T, ...)
        S = latent.shape[-2]
        kv = self.kv_b(latent[:, 0]).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)  # (B, H, S, nope + v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rope_dim)], dim=-1)  # (B, H, S, nope + rope)
        q = torch.cat([q_nope, q_rope], dim=-1)
        dropout = self.dropout if self.training else 0.0
        if T == S or not self.causal:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal, scale=self.scale)
        else:
            mask = _allowed(T, S, offset, self.causal, None, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, H * self.v_dim)  # (B, T, H * v)
        return self.resid_dropout(self.proj(y))

    def make_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        """The latent (``kv_rank``) and the rotated shared key (``rope_dim``) per position."""
        return KVCache(batch_size, 1, self.kv_rank, max_len, device, dtype, value_dim=self.rope_dim)
