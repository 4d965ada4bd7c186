"""TransformerBlock: pre-norm attention and feed-forward sub-layers with residual connections."""

import torch
from torch import nn

from olm import registry
from olm.nn.attention import AttentionContext
from olm.nn.structure import Block, check_dropout
from olm.registry import ConfigError, register, where


@register("block", "transformer")
class TransformerBlock(Block):
    """x -> x + Attn(Norm(x)) -> h + FFN(Norm(h)); by default LayerNorm, multi-head attention with RoPE, SwiGLU.

    ``layers`` holds [attention norm, attention, ffn norm, ffn] (followed by the two post-norms when
    ``post_norms=True``, the "sandwich" layout of Gemma 2). ``pre_norms=False`` with ``post_norms=True`` normalises
    only the sub-layer outputs, ``x + Norm(Attn(x))`` (OLMo 2); the pre-norm slots then hold ``nn.Identity``. The
    FFN hidden size is
    ``ceil(ff_multiplier * embed_dim)`` (see ``olm.nn.ffn.hidden_size``).

    Keyword-only extras choose variants by registered name (``olm components`` lists them): ``attention``,
    ``num_kv_heads`` (grouped-query attention), ``norm``, ``ffn``, ``position``, ``bias`` (all linear layers).
    A component may be given as a name or as a mapping ``{name: ..., param: value}``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = False,
        ff_multiplier: float = 2.5,
        *,
        attention="mha",
        num_kv_heads: int | None = None,
        norm="layernorm",
        ffn="swiglu",
        position="rope",
        bias: bool = False,
        post_norms: bool = False,
        pre_norms: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"{where('embed_dim')}={embed_dim} must be divisible by {where('num_heads')}={num_heads} (all heads share one size)")
        check_dropout(dropout)
        registry.get("position", registry.split_spec(position, where("position"))[0], where("position"))
        attention_spec = _with_defaults("attention", attention, bias=bias, num_kv_heads=num_kv_heads)
        ffn_spec = _with_defaults("ffn", ffn, bias=bias)
        attn = registry.build(
            "attention", attention_spec, "attention", embed_dim=embed_dim, num_heads=num_heads,
            max_seq_len=max_seq_len, dropout=dropout, causal=causal, position=position,
        )
        mlp = registry.build("ffn", ffn_spec, "ffn", embed_dim=embed_dim, ff_multiplier=ff_multiplier, dropout=dropout)
        if not pre_norms and not post_norms:
            raise ConfigError(f"{where('pre_norms')}=false needs {where('post_norms')}=true: a block without norms "
                              "is not supported")

        def pre_norm() -> nn.Module:
            return registry.build("norm", norm, "norm", dim=embed_dim) if pre_norms else nn.Identity()

        layers = [pre_norm(), attn, pre_norm(), mlp]
        if post_norms:
            layers += [registry.build("norm", norm, "norm", dim=embed_dim) for _ in range(2)]
        self.post_norms, self.pre_norms = post_norms, pre_norms
        self.layers = nn.ModuleList(layers)

    @property
    def attention(self) -> nn.Module:
        return self.layers[1]

    @property
    def ffn(self) -> nn.Module:
        return self.layers[3]

    def forward(self, x: torch.Tensor, *, context: AttentionContext | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``context`` carries the per-call attention inputs (KV cache, offset)."""
        attn_norm, attn, ffn_norm, ffn = self.layers[:4]
        a = attn(attn_norm(x), context=context)
        f_in = x + (self.layers[4](a) if self.post_norms else a)
        f = ffn(ffn_norm(f_in))
        return f_in + (self.layers[5](f) if self.post_norms else f)


def _with_defaults(kind: str, spec, **defaults):
    """Add block-level defaults (bias, num_kv_heads) to a component spec unless it sets them itself.

    A default the chosen component cannot take is an error only when the user set it explicitly (not None/False
    for bias), e.g. num_kv_heads with attention=mha.
    """
    name, params = registry.split_spec(spec, where(kind))
    entry = registry.get(kind, name, where(kind))
    for key, value in defaults.items():
        if value is None or key in params:
            continue
        if key in entry.params:
            params[key] = value
        elif key != "bias" or value:
            accepting = [e.name for e in registry.entries(kind) if key in e.params]
            raise ConfigError(f"{where(key)}={value} does not apply to {kind} {name!r}; use one of: {', '.join(accepting)}")
    return {"name": name, **params}
