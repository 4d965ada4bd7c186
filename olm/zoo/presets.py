"""Named presets of public model families ("flavours", as in torchtitan): each is the family's published
``config.json`` (the fields that shape the model) turned into an olm config by the family's converter, so the presets
and checkpoint import can never disagree. ``*_tiny`` flavours are toy sizes for tests; they exercise the family's
distinctive features (sliding windows shorter than the test sequences, RoPE scaling, biases, tying, ...).

``conf/model/<name>.yaml`` holds the same configs for Hydra (with the vocabulary taken from the data, as for every
preset); tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olm.registry import ConfigError
from olm.zoo.families import FAMILIES


@dataclass(frozen=True)
class Preset:
    family: str
    hf: dict  # config.json fields of the published model
    published_params: int | None = None  # from the model card; None for tiny flavours
    source: str = ""  # the Hugging Face repo the numbers come from

    def config(self) -> dict:
        return FAMILIES[self.family].to_olm(self.hf)


def _llama(hidden, layers, heads, kv, ffn, vocab, ctx, theta, eps=1e-5, tie=False, **extra):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=ctx, rope_theta=theta,
                rms_norm_eps=eps, tie_word_embeddings=tie, **extra)


LLAMA3_ROPE = dict(rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))
GEMMA2 = dict(hidden_activation="gelu_pytorch_tanh", sliding_window=4096, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=256000,
              max_position_embeddings=8192, tie_word_embeddings=True)


def _gemma2(hidden, layers, heads, kv, head_dim, ffn, scalar):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, intermediate_size=ffn, query_pre_attn_scalar=scalar, **GEMMA2)


def _qwen3(hidden, layers, heads, kv, head_dim, ffn, vocab=151936, ctx=40960, tie=True, **extra):
    return _llama(hidden, layers, heads, kv, ffn, vocab, ctx, 1000000.0, eps=1e-6, tie=tie, head_dim=head_dim, **extra)


def _gemma3(hidden, layers, heads, kv, head_dim, ffn, window, vocab=262144, ctx=32768, **extra):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, intermediate_size=ffn, vocab_size=vocab, max_position_embeddings=ctx,
                sliding_window=window, query_pre_attn_scalar=head_dim, rms_norm_eps=1e-6,
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}, **extra)


def _gpt_oss(hidden, layers, heads, kv, head_dim, ffn, experts, top_k, vocab=201088, ctx=131072, window=128,
             original=4096, theta=150000.0, **extra):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=head_dim, intermediate_size=ffn, num_local_experts=experts, num_experts_per_tok=top_k,
                vocab_size=vocab, max_position_embeddings=ctx, sliding_window=window, rms_norm_eps=1e-5,
                tie_word_embeddings=False, rope_parameters={
                    "rope_type": "yarn", "rope_theta": theta, "factor": ctx / original, "beta_fast": 32.0,
                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": original}, **extra)


def _deepseek_v3(hidden, layers, heads, q_rank, kv_rank, rope, nope, v, ffn, moe_ffn, experts, top_k, groups,
                 top_groups, dense, vocab=129280, ctx=4096, **extra):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v,
                intermediate_size=ffn, moe_intermediate_size=moe_ffn, n_routed_experts=experts,
                num_experts_per_tok=top_k, n_group=groups, topk_group=top_groups, n_shared_experts=1,
                first_k_dense_replace=dense, routed_scaling_factor=2.5, norm_topk_prob=True, vocab_size=vocab,
                max_position_embeddings=ctx, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
                **extra)


DEEPSEEK_V3_ROPE = dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32.0,
                                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                             original_max_position_embeddings=4096))


def _gpt2(embed, layers, heads, ctx=1024, vocab=50257):
    return dict(n_embd=embed, n_layer=layers, n_head=heads, n_positions=ctx, vocab_size=vocab)


def _opt(hidden, layers, heads, ffn, vocab=50272, ctx=2048):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                vocab_size=vocab, max_position_embeddings=ctx, activation_function="relu")


PRESETS: dict[str, Preset] = {
    # GPT-2 (OpenAI 2019): learned positions, LayerNorm, GELU MLP, tied embeddings.
    "gpt2_tiny": Preset("gpt2", _gpt2(32, 2, 4, ctx=64, vocab=100)),
    "gpt2_small": Preset("gpt2", _gpt2(768, 12, 12), 124_439_808, "openai-community/gpt2"),
    "gpt2_medium": Preset("gpt2", _gpt2(1024, 24, 16), 354_823_168, "openai-community/gpt2-medium"),
    "gpt2_large": Preset("gpt2", _gpt2(1280, 36, 20), 774_030_080, "openai-community/gpt2-large"),
    "gpt2_xl": Preset("gpt2", _gpt2(1600, 48, 25), 1_557_611_200, "openai-community/gpt2-xl"),
    # Llama 2 / 3 / 3.2 (Meta): RMSNorm, RoPE (Llama-3 frequency scaling for 3.1+), SwiGLU, GQA.
    "llama_tiny": Preset("llama", _llama(64, 2, 4, 2, 96, 100, 64, 500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama2_7b": Preset("llama", _llama(4096, 32, 32, 32, 11008, 32000, 4096, 10000.0), 6_738_415_616, "meta-llama/Llama-2-7b-hf"),
    "llama3_8b": Preset("llama", _llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0), 8_030_261_248, "meta-llama/Meta-Llama-3-8B"),
    "llama3_2_1b": Preset("llama", _llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, tie=True, head_dim=64, **LLAMA3_ROPE),
                          1_235_814_400, "meta-llama/Llama-3.2-1B"),
    "llama3_2_3b": Preset("llama", _llama(3072, 28, 24, 8, 8192, 128256, 131072, 500000.0, tie=True, head_dim=128, **LLAMA3_ROPE),
                          3_212_749_824, "meta-llama/Llama-3.2-3B"),
    # Mistral 7B v0.1: Llama with GQA and 4096-token sliding-window attention.
    "mistral_tiny": Preset("mistral", _llama(64, 2, 4, 2, 96, 100, 64, 10000.0, sliding_window=5)),
    "mistral_7b": Preset("mistral", _llama(4096, 32, 32, 8, 14336, 32000, 32768, 10000.0, sliding_window=4096),
                         7_241_732_096, "mistralai/Mistral-7B-v0.1"),
    # Qwen2: q/k/v biases (no output bias), large vocabulary, tied embeddings for the small sizes.
    "qwen2_tiny": Preset("qwen2", _llama(64, 2, 4, 2, 96, 100, 64, 1000000.0, eps=1e-6, tie=True)),
    "qwen2_0_5b": Preset("qwen2", _llama(896, 24, 14, 2, 4864, 151936, 131072, 1000000.0, eps=1e-6, tie=True),
                         494_032_768, "Qwen/Qwen2-0.5B"),
    "qwen2_1_5b": Preset("qwen2", _llama(1536, 28, 12, 2, 8960, 151936, 131072, 1000000.0, eps=1e-6, tie=True),
                         1_543_714_304, "Qwen/Qwen2-1.5B"),
    "qwen2_7b": Preset("qwen2", _llama(3584, 28, 28, 4, 18944, 152064, 131072, 1000000.0, eps=1e-6),
                       7_615_616_512, "Qwen/Qwen2-7B"),
    # Gemma 2: sandwich norms, attention and final logit soft-capping, alternating local/global layers, GeGLU,
    # embeddings scaled by sqrt(width), RMSNorm weights stored as w - 1.
    "gemma2_tiny": Preset("gemma2", {**_gemma2(32, 2, 4, 2, 16, 64, 24), "vocab_size": 100, "sliding_window": 5,
                                     "max_position_embeddings": 64, "attn_logit_softcapping": 2.0,
                                     "final_logit_softcapping": 3.0}),
    "gemma2_2b": Preset("gemma2", _gemma2(2304, 26, 8, 4, 256, 9216, 256), 2_614_341_888, "google/gemma-2-2b"),
    "gemma2_9b": Preset("gemma2", _gemma2(3584, 42, 16, 8, 256, 14336, 256), 9_241_705_984, "google/gemma-2-9b"),
    "gemma2_27b": Preset("gemma2", _gemma2(4608, 46, 32, 16, 128, 36864, 144), 27_227_128_320, "google/gemma-2-27b"),
    # Phi-3 mini (4k): Llama layout with fused qkv and gate/up matrices, sliding window of 2047.
    "phi3_tiny": Preset("phi3", _llama(64, 2, 4, 4, 96, 100, 64, 10000.0, sliding_window=6, partial_rotary_factor=0.5)),
    "phi3_mini": Preset("phi3", _llama(3072, 32, 32, 32, 8192, 32064, 4096, 10000.0, sliding_window=2047),
                        3_821_079_552, "microsoft/Phi-3-mini-4k-instruct"),
    # OLMo (AI2): LayerNorm without weights or biases, SwiGLU, RoPE.
    "olmo_tiny": Preset("olmo", _llama(64, 2, 4, 4, 96, 100, 64, 10000.0)),
    "olmo_1b": Preset("olmo", _llama(2048, 16, 16, 16, 8192, 50304, 2048, 10000.0, tie=True), 1_176_764_416, "allenai/OLMo-1B-hf"),
    "olmo_7b": Preset("olmo", _llama(4096, 32, 32, 32, 11008, 50304, 2048, 10000.0), 6_888_095_744, "allenai/OLMo-7B-hf"),
    # StableLM 2 (Stability AI): LayerNorm with weights and biases, RoPE on a quarter of each head, SwiGLU, q/k/v
    # biases: the structure of olm's own lm_tiny / lm_small, which export as this family.
    "stablelm_tiny": Preset("stablelm", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=96, vocab_size=100,
                                             max_position_embeddings=64, layer_norm_eps=1e-5, use_qkv_bias=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  partial_rotary_factor=0.25))),
    # OPT (Meta 2022): learned positions offset by 2, ReLU MLP, pre-LayerNorm, biases everywhere.
    "opt_tiny": Preset("opt", _opt(32, 2, 4, 64, vocab=100, ctx=64)),
    "opt_125m": Preset("opt", _opt(768, 12, 12, 3072), 125_239_296, "facebook/opt-125m"),
    "opt_1_3b": Preset("opt", _opt(2048, 24, 32, 8192), 1_315_758_080, "facebook/opt-1.3b"),
    "opt_6_7b": Preset("opt", _opt(4096, 32, 32, 16384), 6_658_473_984, "facebook/opt-6.7b"),
    # Mixtral 8x7B: Mistral attention with a sparse MoE of 8 SwiGLU experts, top-2 routing.
    "mixtral_tiny": Preset("mixtral", _llama(32, 2, 4, 2, 48, 100, 64, 1000000.0, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_8x7b": Preset("mixtral", _llama(4096, 32, 32, 8, 14336, 32000, 32768, 1000000.0, num_local_experts=8,
                                             num_experts_per_tok=2), 46_702_792_704, "mistralai/Mixtral-8x7B-v0.1"),
    # Qwen3 (2025): per-head RMS QK-norm, GQA, head_dim 128 independent of the width, no q/k/v bias.
    # Published counts: the model cards' figures (0.6B; 30.5B total, 3.3B active), rounded there.
    "qwen3_tiny": Preset("qwen3", _qwen3(48, 2, 6, 3, 16, 96, vocab=100, ctx=64)),
    "qwen3_0_6b": Preset("qwen3", _qwen3(1024, 28, 16, 8, 128, 3072), 600_000_000, "Qwen/Qwen3-0.6B"),
    # Qwen3-MoE: Qwen3 attention, 128 experts of width 768, 8 active, top-k renormalised.
    "qwen3_moe_tiny": Preset("qwen3_moe", _qwen3(32, 2, 4, 2, 16, 48, vocab=100, ctx=64, tie=False,
                                                 moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                                 norm_topk_prob=True)),
    "qwen3_30b_a3b": Preset("qwen3_moe", _qwen3(2048, 48, 32, 4, 128, 6144, tie=False, moe_intermediate_size=768,
                                                num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
                            30_500_000_000, "Qwen/Qwen3-30B-A3B"),
    # Gemma 3 (text): 5 sliding-window layers (RoPE base 10k) per global one (base 1M), QK-norm, sandwich norms.
    # Published count: the technical report's 1B (302M embedding + 698M other parameters).
    "gemma3_tiny": Preset("gemma3", _gemma3(48, 3, 3, 1, 16, 64, 5, vocab=100, ctx=64,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "gemma3_1b": Preset("gemma3", _gemma3(1152, 26, 4, 1, 256, 6912, 512), 1_000_000_000, "google/gemma-3-1b-pt"),
    # OLMo 2: RMSNorm after attention and FFN outputs (no pre-norm), QK-norm over the whole projections.
    "olmo2_tiny": Preset("olmo2", _llama(48, 2, 6, 2, 96, 100, 64, 500000.0, eps=1e-6)),
    "olmo2_1b": Preset("olmo2", _llama(2048, 16, 16, 16, 8192, 100352, 4096, 500000.0, eps=1e-6), None,
                       "allenai/OLMo-2-0425-1B"),
    # SmolLM3: Llama with GQA and RoPE left out of every fourth layer (NoPE), tied embeddings.
    "smollm3_tiny": Preset("smollm3", _llama(32, 4, 4, 2, 64, 100, 64, 2000000.0, eps=1e-6, tie=True,
                                             no_rope_layer_interval=4)),
    "smollm3_3b": Preset("smollm3", _llama(2048, 36, 16, 4, 11008, 128256, 65536, 5000000.0, eps=1e-6, tie=True,
                                           no_rope_layer_interval=4), None, "HuggingFaceTB/SmolLM3-3B"),
    # gpt-oss: attention sinks, q/k/v/o biases, alternating 128-token sliding and full layers, YaRN (x32), MoE of
    # clamped-SwiGLU experts with biases. Published count: the model card's 21B total (20.9B), 3.6B active.
    "gpt_oss_tiny": Preset("gpt_oss", _gpt_oss(32, 2, 4, 2, 16, 24, 4, 2, vocab=100, ctx=64, window=5, original=16,
                                               theta=500.0, swiglu_limit=0.1)),
    "gpt_oss_20b": Preset("gpt_oss", _gpt_oss(2880, 24, 64, 8, 64, 2880, 32, 4), 20_910_000_000, "openai/gpt-oss-20b"),
    # DeepSeek-V3: multi-head latent attention (compressed q and kv, decoupled rotary dims), MoE of 256 experts with
    # one shared expert, sigmoid routing within 4 of 8 groups and a load-balancing bias; 3 dense layers first.
    # deepseek_v3_small is the same design scaled down (no published model).
    "deepseek_v3_tiny": Preset("deepseek_v3", _deepseek_v3(36, 3, 3, 24, 16, 8, 12, 10, 48, 16, 8, 3, 4, 2, 1,
                                                           vocab=100, ctx=64)),
    "deepseek_v3_small": Preset("deepseek_v3", _deepseek_v3(1024, 12, 16, 384, 128, 32, 64, 64, 2816, 256, 32, 4, 4, 2,
                                                            1), None, "DeepSeek-V3's design, scaled down"),
    "deepseek_v3_671b": Preset("deepseek_v3", _deepseek_v3(7168, 61, 128, 1536, 512, 64, 128, 128, 18432, 2048, 256, 8,
                                                           8, 4, 3, ctx=163840, **DEEPSEEK_V3_ROPE),
                               671_000_000_000, "deepseek-ai/DeepSeek-V3"),
}


def preset_config(name: str) -> dict:
    """The olm model config of a preset (``olm.build_model(preset_config("llama3_8b"))``)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"preset {name!r} is not known{hint} known: {', '.join(PRESETS)}")
    return PRESETS[name].config()


def count_parameters(config: dict) -> int:
    """Parameter count of a config, built on the meta device (no memory, no init), tied weights counted once."""
    import olm
    from olm.nn.structure import meta_device

    with meta_device():
        return olm.build_model(config).num_parameters()
