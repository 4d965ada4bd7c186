"""LM: token ids -> embedding -> N transformer blocks -> output head -> logits."""

import math

import torch
import torch.utils.checkpoint
from torch import nn

from olm import registry
from olm.nn.attention import AttentionContext, KVCache
from olm.nn.blocks.embedding import TokenEmbedding
from olm.nn.blocks.output_head import OutputHead
from olm.nn.blocks.transformer_block import TransformerBlock
from olm.nn.position import shared_rope_tables
from olm.nn.structure import Block, check_dropout
from olm.registry import ConfigError, register, where


@register("model", "lm")
class LM(Block):
    """A decoder language model: Input IDs -> Embedding -> [TransformerBlock] x N -> OutputHead -> logits.

    ``layers`` is [embedding, block_0, ..., block_{N-1}, head]. With ``causal=True`` (the default) position t only
    sees positions <= t, as next-token prediction requires; ``causal=False`` lets every position see the whole
    sequence (which leaks the target in next-token training: useful only as a control).

    Keyword-only extras (defaults give the documented structure): ``attention``, ``num_kv_heads``, ``norm``, ``ffn``,
    ``position`` and ``bias`` as in TransformerBlock; ``post_norms`` (sandwich norms) and ``pre_norms`` (false with
    post_norms: OLMo 2's norms after the sub-layers only); ``tie_embeddings`` (share the
    token table with the output projection); ``head_bias``; ``embed_scale`` (multiply token embeddings);
    ``logit_softcap``; ``block_overrides``: a list of per-layer TransformerBlock keyword overrides applied cyclically
    (``[{attention: {name: sliding_window, window: 4096}}, {}]`` alternates local and global layers);
    ``pad_vocab_to``: round the embedding/logit width up to a multiple (50257 -> 50304 for GPT-2 speed);
    ``init_std``: normal init std of all matrices (residual output projections are scaled by 1/sqrt(2N));
    ``parametrization``: ``standard``, or ``mup`` (maximal update parametrization, Yang et al. 2022, "Tensor Programs
    V", Table 3) relative to a model of width ``mup_base_width``: with ``m = embed_dim / mup_base_width``, the
    blocks' matrices start with std ``init_std / sqrt(m)``, attention scores are scaled by ``1/sqrt(m)`` more (1/d
    instead of 1/sqrt(d)), the output head's features by ``1/m`` (the output multiplier), and the optimizer divides
    the hidden matrices' learning rate by ``m`` (``width_multiplier``). At the base width both are the same model.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        max_seq_len: int,
        dropout: float = 0.0,
        causal: bool = True,
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
        tie_embeddings: bool = False,
        head_bias: bool = False,
        embed_scale: float | None = None,
        logit_softcap: float | None = None,
        block_overrides: list | None = None,
        pad_vocab_to: int = 1,
        init_std: float = 0.02,
        parametrization: str = "standard",
        mup_base_width: int | None = None,
    ):
        super().__init__()
        for key, value in dict(vocab_size=vocab_size, embed_dim=embed_dim, num_heads=num_heads, num_layers=num_layers, max_seq_len=max_seq_len, pad_vocab_to=pad_vocab_to).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where(key)}={value!r} must be a positive integer")
        check_dropout(dropout)
        self.width_multiplier = _width_multiplier(parametrization, mup_base_width, embed_dim)
        self.vocab_size, self.max_seq_len, self.causal = vocab_size, max_seq_len, causal
        padded_vocab = pad_vocab_to * math.ceil(vocab_size / pad_vocab_to)
        block_kwargs = dict(
            attention=attention, num_kv_heads=num_kv_heads, norm=norm, ffn=ffn, position=position, bias=bias,
            post_norms=post_norms, pre_norms=pre_norms,
        )
        overrides = list(registry._plain(block_overrides) or [{}])
        blocks = []
        with shared_rope_tables():  # one cos/sin table for all layers, not one per layer
            for i in range(num_layers):
                override = dict(overrides[i % len(overrides)] or {})
                unknown = set(override) - set(block_kwargs) - {"ff_multiplier"}
                if unknown:
                    raise ConfigError(
                        f"{where('block_overrides')}[{i % len(overrides)}].{sorted(unknown)[0]} is not overridable; "
                        f"known: {', '.join(list(block_kwargs) + ['ff_multiplier'])}"
                    )
                kwargs = {**block_kwargs, "ff_multiplier": ff_multiplier, **override}
                blocks.append(TransformerBlock(embed_dim, num_heads, max_seq_len, dropout, causal, **kwargs))
        embedding = TokenEmbedding(padded_vocab, embed_dim, max_seq_len, dropout, position=position, scale=embed_scale)
        head = OutputHead(embed_dim, padded_vocab, bias=head_bias, norm=norm, softcap=logit_softcap,
                          multiplier=1.0 / self.width_multiplier)
        for block in blocks:  # muP: attention logits scale as 1/head_dim (with the default scale)
            block.attention.scale /= math.sqrt(self.width_multiplier)
        self.layers = nn.ModuleList([embedding, *blocks, head])
        self.activation_checkpointing = False  # a runtime switch, not part of the architecture
        self.init_weights(init_std)
        if tie_embeddings:
            head.linear.weight = embedding.token.weight

    @property
    def embedding(self) -> TokenEmbedding:
        return self.layers[0]

    @property
    def blocks(self) -> list[TransformerBlock]:
        return list(self.layers[1:-1])

    @property
    def head(self) -> OutputHead:
        return self.layers[-1]

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for matrices and tables, zeros for biases; residual projections get std / sqrt(2 * num_layers).
        Under muP the blocks' matrices are scaled by 1/sqrt(width_multiplier) more (variance ~ 1/fan_in)."""
        if self.embedding.token.weight.is_meta:  # nothing to initialise (parameter counting, import before loading)
            return
        hidden_std = std / math.sqrt(self.width_multiplier)
        residual_std = hidden_std / math.sqrt(2 * len(self.blocks))
        head_linear = self.head.linear
        for module in self.modules():
            if module is head_linear:
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                is_residual = getattr(module, "is_residual_out", False)
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else hidden_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif module is not self and hasattr(module, "init_parameters"):  # parameters held outside nn.Linear (MoE)
                module.init_parameters(hidden_std, residual_std)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """Empty per-layer KV caches for incremental decoding of up to ``max_len`` positions."""
        max_len = max_len or self.max_seq_len
        weight = self.embedding.token.weight
        return [b.attention.make_cache(batch_size, max_len, weight.device, weight.dtype) for b in self.blocks]

    def hidden_states(self, idx: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """Final hidden states before the output head: (B, T) ids -> (B, T, C)."""
        start = cache[0].length if cache else 0
        if start + idx.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens exceeds max_seq_len={self.max_seq_len}")
        x = self.embedding(idx, start)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only block inputs; recompute the rest in backward (less memory, ~1/3 more compute)
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, context=AttentionContext(cache[i] if cache else None, start))
        return x

    def forward(self, idx: torch.Tensor, cache: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab_size) logits."""
        return self.head(self.hidden_states(idx, cache))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (``last_aux_loss``, e.g. MoE load balancing) of the last forward, or None."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None


PARAMETRIZATIONS = ("standard", "mup")


def _width_multiplier(parametrization: str, base_width: int | None, embed_dim: int) -> float:
    """muP's m = embed_dim / base_width (1 for the standard parametrization), with one-line errors."""
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"{where('parametrization')}={parametrization!r} is not known; known: "
                          f"{', '.join(PARAMETRIZATIONS)}")
    if parametrization == "standard":
        if base_width is not None:
            raise ConfigError(f"{where('mup_base_width')}={base_width!r} applies only with "
                              f"{where('parametrization')}=mup")
        return 1.0
    if not isinstance(base_width, int) or isinstance(base_width, bool) or base_width < 1:
        raise ConfigError(f"{where('parametrization')}=mup needs {where('mup_base_width')}: the width (embed_dim) "
                          f"the hyperparameters were tuned at, a positive integer (got {base_width!r})")
    return embed_dim / base_width
