"""Public model families: how a Hugging Face ``config.json`` maps to an olm ``LM`` config, and back, and where every
olm parameter lives in the family's checkpoint.

A family is three functions:

- ``to_olm(hf)``: HF config dict -> olm model config (plain dict, buildable by ``olm.build_model``);
- ``to_hf(model)``: built olm LM -> HF config dict (raises ConfigError for what the family cannot express);
- ``tensors(model)``: a list of ``TensorMap`` pairing each olm parameter with the HF tensor(s) it is made of.

Only torch and olm are imported here; the HF side is plain dicts and tensor names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from olm.registry import ConfigError


@dataclass
class TensorMap:
    """One olm parameter and the HF tensors it is made of.

    Several HF tensors are concatenated along rows (``split`` gives their row counts for export); with ``experts``
    the HF list runs expert by expert and the olm tensor stacks the experts on a new first dim. ``transpose`` swaps
    the last two dims (GPT-2's Conv1D and GPT-OSS's experts are stored as (in, out)); ``offset`` is for Gemma's norms
    (stored as w - 1); ``permute`` reorders dim ``permute_dim`` of the olm tensor (``olm = hf[permute]``: GPT-OSS's
    interleaved gate/up columns, DeepSeek's interleaved rotary pairs); ``vocab`` marks tables whose rows may be
    padded in olm beyond the real vocabulary (cut on export).
    """

    olm: str
    hf: list[str]
    split: list[int] | None = None
    experts: int = 0
    transpose: bool = False
    offset: float = 0.0
    vocab: bool = False
    permute: list[int] | None = None
    permute_dim: int = 0

    def to_olm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.transpose:
            tensors = [t.transpose(-2, -1) for t in tensors]
        if self.experts:
            per = len(tensors) // self.experts
            out = torch.stack([torch.cat(tensors[e * per : (e + 1) * per]) for e in range(self.experts)])
        else:
            out = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if self.permute is not None:
            out = out.index_select(self.permute_dim, torch.tensor(self.permute))
        return out + self.offset if self.offset else out

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.offset:
            tensor = tensor - self.offset
        if self.permute is not None:
            tensor = tensor.index_select(self.permute_dim, torch.argsort(torch.tensor(self.permute)))
        if self.experts:
            parts = [p for expert in tensor for p in (expert.split(self.split) if self.split else [expert])]
        else:
            parts = list(tensor.split(self.split)) if self.split else [tensor]
        return [p.transpose(-2, -1) if self.transpose else p for p in parts]


@dataclass
class Family:
    name: str
    architecture: str  # the HF class written to config.json "architectures"
    model_type: str
    to_olm: Callable[[dict], dict]
    to_hf: Callable[[object], dict]
    tensors: Callable[[object], list[TensorMap]]


# ---------------------------------------------------------------------------------------------------------------------
# HF config -> olm config

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
               "silu": "silu", "swish": "silu"}


def _activation(hf: dict, key: str, default: str) -> str:
    name = hf.get(key) or default
    if name not in ACTIVATIONS:
        raise ConfigError(f"{key}={name!r} is not supported; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _rope(hf: dict) -> dict:
    """The olm rope spec from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (older files)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    base = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    spec = {"name": "rope", "base": base}
    kind = params.get("rope_type", params.get("type", "default"))
    # As transformers reads it: a top-level original_max_position_embeddings (Phi-3 has one) wins over the rope
    # parameters' own, then the model's length; a missing factor is the ratio of the two lengths.
    if kind in ("llama3", "yarn", "longrope"):
        original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                       or hf["max_position_embeddings"])
    if kind == "llama3":
        spec["scaling"] = {
            "type": "llama3", "factor": float(params["factor"]), "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]), "original_max_seq_len": original,
        }
    elif kind == "linear":
        spec["scaling"] = {"type": "linear", "factor": float(params["factor"])}
    elif kind == "yarn":
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        spec["scaling"] = {"type": "yarn", "factor": float(factor), "original_max_seq_len": original}
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if params.get(key):  # as transformers reads them: 0 or null means the default
                spec["scaling"][key] = float(params[key])
        if params.get("truncate") is not None:
            spec["scaling"]["truncate"] = bool(params["truncate"])
    elif kind == "longrope":
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        spec["scaling"] = {"type": "longrope", "factor": float(factor), "original_max_seq_len": original,
                           "short_factor": [float(v) for v in params["short_factor"]],
                           "long_factor": [float(v) for v in params["long_factor"]]}
        if params.get("attention_factor") is not None:
            spec["scaling"]["attention_factor"] = float(params["attention_factor"])
    elif kind != "default":
        raise ConfigError(f"rope_parameters.rope_type={kind!r} is not supported; known: default, linear, llama3, yarn, longrope")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        spec["rotary_dim"] = int(_head_dim(hf) * partial)
    return spec


def _head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _attention(hf: dict, window: int | None = None, **extra) -> dict:
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    spec = {"name": "sliding_window", "window": window} if window else {"name": "mha" if kv == heads else "gqa"}
    if kv != heads:
        spec["num_kv_heads"] = kv
    if _head_dim(hf) != hf["hidden_size"] // heads:
        spec["head_dim"] = _head_dim(hf)
    return {**spec, **extra}


def _base(hf: dict, **extra) -> dict:
    max_seq_len = hf["max_position_embeddings"]
    scaling = (extra.get("position") or {}).get("scaling") or {}
    if scaling.get("type") == "yarn":  # YaRN configs (Qwen2.5) keep the original length there; the extended one is factor x
        max_seq_len = max(max_seq_len, int(scaling["factor"] * scaling["original_max_seq_len"]))
    return {
        "name": "lm", "vocab_size": hf["vocab_size"], "embed_dim": hf["hidden_size"],
        "num_heads": hf["num_attention_heads"], "num_layers": hf["num_hidden_layers"],
        "max_seq_len": max_seq_len, "causal": True, **extra,
    }


def llama_to_olm(hf: dict, window: int | None = None, attention_extra: dict | None = None) -> dict:
    """Llama and its direct descendants (Mistral, Qwen2, Phi-3): RMSNorm, RoPE, SwiGLU, GQA."""
    extra = {"bias": True} if hf.get("attention_bias") else {}
    attention = _attention(hf, window, **{**extra, **(attention_extra or {})})
    ffn = {"name": "swiglu", "hidden_dim": hf["intermediate_size"]}
    if hf.get("mlp_bias"):
        ffn["bias"] = True
    if _activation(hf, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported for {hf.get('model_type')}; known: silu")
    return _base(
        hf, attention=attention, norm={"name": "rmsnorm", "eps": hf.get("rms_norm_eps", 1e-6)}, ffn=ffn,
        position=_rope(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def mistral_to_olm(hf: dict) -> dict:
    return llama_to_olm(hf, window=hf.get("sliding_window", 4096))


def qwen2_to_olm(hf: dict) -> dict:
    hf = {**hf, "sliding_window": hf.get("sliding_window") if hf.get("use_sliding_window") else None}
    cfg = llama_to_olm(hf, attention_extra={"bias": True, "out_bias": False})
    return _windowed(cfg, hf, _layer_types(hf))


def phi3_to_olm(hf: dict) -> dict:
    return llama_to_olm(hf, window=hf.get("sliding_window"))


def mixtral_to_olm(hf: dict) -> dict:
    cfg = llama_to_olm(hf, window=hf.get("sliding_window"))
    cfg["ffn"] = {"name": "moe", "hidden_dim": hf["intermediate_size"], "num_experts": hf.get("num_local_experts", 8),
                  "top_k": hf.get("num_experts_per_tok", 2), "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001)}
    return cfg


def olmo_to_olm(hf: dict) -> dict:
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"clip_qkv={hf['clip_qkv']} is not supported (OLMo checkpoints with clipped q/k/v)")
    cfg = llama_to_olm({**hf, "rms_norm_eps": None})
    cfg["norm"] = {"name": "layernorm", "eps": 1e-5, "affine": False}
    return cfg


def stablelm_to_olm(hf: dict) -> dict:
    """StableLM (Stability AI): LayerNorm with weights and biases, RoPE on a fraction of each head, SwiGLU, GQA;
    the default structure of olm's own presets (lm_tiny, lm_small)."""
    for key in ("qk_layernorm", "use_parallel_residual"):
        if hf.get(key):
            raise ConfigError(f"{key}=true is not supported (per-head q/k LayerNorm, parallel residual)")
    params = hf.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))  # StableLmConfig's default
    cfg = llama_to_olm({**hf, "partial_rotary_factor": partial, "attention_bias": False,
                        "rope_parameters": {k: v for k, v in params.items() if k != "partial_rotary_factor"}})
    if hf.get("use_qkv_bias"):
        cfg["attention"] = {**cfg["attention"], "bias": True, "out_bias": False}
    cfg["norm"] = {"name": "layernorm", "eps": hf.get("layer_norm_eps", 1e-5)}
    return cfg


def gemma2_to_olm(hf: dict) -> dict:
    hf = {**hf, "sliding_window": hf.get("sliding_window", 4096)}
    extra = {"scale": hf.get("query_pre_attn_scalar", 256) ** -0.5}
    if hf.get("attn_logit_softcapping") is not None:
        extra["softcap"] = float(hf["attn_logit_softcapping"])
    if hf.get("attention_bias"):
        extra["bias"] = True
    attention = _attention(hf, **extra)
    cfg = _base(
        hf, attention=attention, norm={"name": "rmsnorm", "eps": hf.get("rms_norm_eps", 1e-6)},
        ffn={"name": "geglu", "hidden_dim": hf["intermediate_size"]}, position=_rope(hf), post_norms=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), embed_scale=math.sqrt(hf["hidden_size"]),
        logit_softcap=hf.get("final_logit_softcapping", 30.0),
    )
    if _activation(hf, "hidden_activation", "gelu_pytorch_tanh") != "gelu_tanh":
        raise ConfigError(f"hidden_activation={hf['hidden_activation']!r} is not supported; known: gelu_pytorch_tanh")
    return _windowed(cfg, hf, _layer_types(hf, 2))


def gpt2_to_olm(hf: dict) -> dict:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(key):
            raise ConfigError(f"{key}=true is not supported")
    hidden = {"num_attention_heads": hf["n_head"], "hidden_size": hf["n_embd"]}
    attention = {"name": "mha"} if hf.get("scale_attn_weights", True) else {"name": "mha", "scale": 1.0}
    return {
        "name": "lm", "vocab_size": hf["vocab_size"], "embed_dim": hf["n_embd"], "num_heads": hidden["num_attention_heads"],
        "num_layers": hf["n_layer"], "max_seq_len": hf["n_positions"], "causal": True, "attention": attention,
        "norm": {"name": "layernorm", "eps": hf.get("layer_norm_epsilon", 1e-5)},
        "ffn": {"name": "gelu_mlp", "activation": _activation(hf, "activation_function", "gelu_new"),
                "hidden_dim": hf.get("n_inner") or 4 * hf["n_embd"]},
        "position": "learned", "bias": True, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }


def opt_to_olm(hf: dict) -> dict:
    if not hf.get("do_layer_norm_before", True) or hf.get("_remove_final_layer_norm"):
        raise ConfigError("do_layer_norm_before=false (post-norm OPT, e.g. opt-350m) is not supported")
    if hf.get("word_embed_proj_dim") not in (None, hf["hidden_size"]):
        raise ConfigError(f"word_embed_proj_dim={hf['word_embed_proj_dim']} != hidden_size is not supported")
    bias = hf.get("enable_bias", True)
    return _base(
        hf, attention={"name": "mha"}, norm={"name": "layernorm", "eps": 1e-5, "bias": bias,
                                             "affine": hf.get("layer_norm_elementwise_affine", True)},
        ffn={"name": "gelu_mlp", "activation": _activation(hf, "activation_function", "relu"), "hidden_dim": hf["ffn_dim"]},
        position={"name": "learned", "offset": 2}, bias=bias, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _cycle(per_layer: list[dict]) -> list | None:
    """Per-layer block overrides as their shortest repeating cycle (LM applies them cyclically); None if all empty."""
    if not any(per_layer):
        return None
    for period in range(1, len(per_layer) + 1):
        if all(o == per_layer[i % period] for i, o in enumerate(per_layer)):
            return per_layer[:period]


def _layer_types(hf: dict, pattern: int | None = None) -> list[str]:
    """``layer_types``, or from Qwen's use_sliding_window/max_window_layers, or every ``pattern``-th layer global."""
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    n = hf["num_hidden_layers"]
    if pattern:
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        return ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    return ["full_attention"] * n


def _windowed(cfg: dict, hf: dict, types: list[str], per_layer: list[dict] | None = None) -> dict:
    """Put sliding layers (and any other per-layer settings) into ``block_overrides``."""
    per_layer = per_layer or [{} for _ in types]
    window = hf.get("sliding_window")
    attention = {k: v for k, v in cfg["attention"].items() if k not in ("name", "window")}
    if window and set(types) == {"sliding_attention"}:
        cfg["attention"] = {**attention, "name": "sliding_window", "window": window}
    elif window:
        for t, override in zip(types, per_layer):
            if t == "sliding_attention":
                override["attention"] = {**attention, "name": "sliding_window", "window": window}
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ConfigError(f"layer_types={sorted(unknown)[0]!r} is not supported; "
                          "known: full_attention, sliding_attention")
    cfg["block_overrides"] = _cycle(per_layer)
    return _drop_none(cfg)


def _rms(hf: dict, eps_default: float = 1e-6) -> dict:
    return {"name": "rmsnorm", "eps": hf.get("rms_norm_eps", eps_default)}


def qwen3_to_olm(hf: dict) -> dict:
    """Qwen3: Llama with per-head RMS QK-norm, an explicit head_dim, no q/k/v bias (attention_bias=false)."""
    cfg = llama_to_olm(hf, attention_extra={"qk_norm": _rms(hf)})
    return _windowed(cfg, hf, _layer_types(hf))


def _moe_layers(hf: dict, cfg: dict, moe: dict, dense_layers: list[int]) -> list[dict]:
    """The moe spec for every layer, the dense SwiGLU in ``dense_layers``."""
    cfg["ffn"] = moe
    dense = {"name": "swiglu", "hidden_dim": hf["intermediate_size"]}
    return [{"ffn": dense} if i in dense_layers else {} for i in range(hf["num_hidden_layers"])]


def qwen3_moe_to_olm(hf: dict) -> dict:
    """Qwen3-MoE: Qwen3 attention, many small softmax-routed experts (top-k renormalised when norm_topk_prob)."""
    cfg = llama_to_olm(hf, attention_extra={"qk_norm": _rms(hf)})
    moe = {"name": "moe", "hidden_dim": hf["moe_intermediate_size"],
           "num_experts": hf.get("num_experts") or hf["num_local_experts"],
           "top_k": hf["num_experts_per_tok"], "normalize_top_k": bool(hf.get("norm_topk_prob", False)),
           "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001)}
    n, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense = [i for i in range(n) if i in (hf.get("mlp_only_layers") or []) or (i + 1) % step]
    return _windowed(cfg, hf, _layer_types(hf), _moe_layers(hf, cfg, moe, dense))


def gemma3_to_olm(hf: dict) -> dict:
    """Gemma 3 (text): Gemma 2's sandwich norms and scaled embeddings, QK-norm instead of soft-capping, 5 local
    layers per global one, each kind with its own RoPE base (``rope_parameters`` per layer type)."""
    if hf.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=true is not supported (olm's Gemma 3 is causal)")
    types = _layer_types(hf, hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention", params["full_attention"])
    else:  # older files: rope_theta (and rope_scaling) for the global layers, rope_local_base_freq for the local ones
        full = {**(params or hf.get("rope_scaling") or {"rope_type": "default"}),
                "rope_theta": params.get("rope_theta", hf.get("rope_theta", 1_000_000.0))}
        local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    cfg = gemma2_to_olm({**hf, "layer_types": ["full_attention"] * len(types), "rope_parameters": full,
                         "final_logit_softcapping": hf.get("final_logit_softcapping"),
                         "query_pre_attn_scalar": hf.get("query_pre_attn_scalar", 256)})
    cfg["attention"]["qk_norm"] = _rms(hf)
    local_rope = _rope({**hf, "rope_parameters": local})
    per_layer = [{"position": local_rope} if t == "sliding_attention" and local_rope != cfg["position"] else {}
                 for t in types]
    return _windowed(cfg, hf, types, per_layer)


def olmo2_to_olm(hf: dict) -> dict:
    """OLMo 2: RMSNorm after the attention and feed-forward outputs only, QK-norm over the whole projections."""
    if hf.get("clip_qkv") is not None:
        raise ConfigError(f"clip_qkv={hf['clip_qkv']} is not supported (OLMo checkpoints with clipped q/k/v)")
    cfg = llama_to_olm(hf, attention_extra={"qk_norm": _rms(hf, 1e-5), "qk_norm_scope": "all"})
    return {**cfg, "norm": _rms(hf, 1e-5), "pre_norms": False, "post_norms": True}


def smollm3_to_olm(hf: dict) -> dict:
    """SmolLM3: Llama with RoPE left out of the layers marked 0 in ``no_rope_layers`` (every 4th: NoPE layers)."""
    n = hf["num_hidden_layers"]
    interval = hf.get("no_rope_layer_interval", 4)
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    cfg = llama_to_olm(hf)
    return _windowed(cfg, hf, _layer_types(hf), [{} if rope else {"position": "none"} for rope in uses_rope])


def gpt_oss_to_olm(hf: dict) -> dict:
    """GPT-OSS: attention sinks, biases on q/k/v/o, alternating sliding and full layers, YaRN, and a softmax-routed
    MoE of clamped-SwiGLU experts with biases (the router has a bias too)."""
    cfg = llama_to_olm({**hf, "attention_bias": True}, attention_extra={"sinks": True})
    cfg["ffn"] = {"name": "moe", "hidden_dim": hf["intermediate_size"], "num_experts": hf["num_local_experts"],
                  "top_k": hf["num_experts_per_tok"], "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001),
                  "router_bias": True, "bias": True, "activation": "clamped_swiglu",
                  "limit": float(hf.get("swiglu_limit", 7.0)), "alpha": float(hf.get("swiglu_alpha", 1.702))}
    return _windowed(cfg, hf, _layer_types(hf, 2))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _mla_scale(hf: dict) -> float:
    """DeepSeek's softmax scale: (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]) ** -0.5
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"])) ** 2
    return scale


def deepseek_v3_to_olm(hf: dict) -> dict:
    """DeepSeek-V3: multi-head latent attention and a sigmoid-routed MoE with shared experts, group-limited
    routing and a load-balancing bias; the first ``first_k_dense_replace`` layers are dense."""
    if hf.get("num_key_value_heads") not in (None, hf["num_attention_heads"]):
        raise ConfigError(f"num_key_value_heads={hf['num_key_value_heads']} is not supported: multi-head latent "
                          f"attention has num_attention_heads={hf['num_attention_heads']} key/value heads")
    if hf.get("rope_interleave", True) is False:
        raise ConfigError("rope_interleave=false is not supported (olm reads DeepSeek's interleaved rotary layout)")
    rope_hf = {**hf, "head_dim": hf["qk_rope_head_dim"]}
    attention = {"name": "mla", "kv_rank": hf["kv_lora_rank"], "q_rank": hf.get("q_lora_rank"),
                 "rope_dim": hf["qk_rope_head_dim"], "nope_dim": hf["qk_nope_head_dim"], "v_dim": hf["v_head_dim"],
                 "latent_norm": {"name": "rmsnorm", "eps": 1e-6}, "scale": _mla_scale(hf)}
    if hf.get("attention_bias"):
        attention["bias"] = True
    cfg = _base(hf, attention=attention, norm=_rms(hf), position=_rope(rope_hf),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if _activation(hf, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported for deepseek_v3; known: silu")
    moe = {"name": "moe", "hidden_dim": hf["moe_intermediate_size"], "num_experts": hf["n_routed_experts"],
           "top_k": hf["num_experts_per_tok"], "routing": "sigmoid", "num_groups": hf.get("n_group") or 1,
           "top_groups": hf.get("topk_group") or 1, "normalize_top_k": bool(hf.get("norm_topk_prob", True)),
           "routed_scale": float(hf.get("routed_scaling_factor", 1.0)), "balance_bias": True,
           "shared_experts": hf.get("n_shared_experts") or 0, "aux_loss_coef": 0.0}
    per_layer = _moe_layers(hf, cfg, moe, list(range(hf.get("first_k_dense_replace") or 0)))
    cfg["block_overrides"] = _cycle(per_layer)
    return _drop_none(cfg)


def _drop_none(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if v is not None}


# ---------------------------------------------------------------------------------------------------------------------
# olm model -> HF config


def _facts(model) -> dict:
    """What the HF configs need, read from the built modules (so any way of writing the olm config works)."""
    first = model.blocks[0]
    attn, ffn, norm = first.attention, first.ffn, first.layers[0 if first.pre_norms else 4]
    positioned = [b.attention.position for b in model.blocks if b.attention.position is not None]
    position = positioned[0] if positioned else model.embedding.position
    ffn = next((b.ffn for b in model.blocks if type(b.ffn).component_name == "moe"), ffn)  # DeepSeek: dense first
    ffn_kind = type(ffn).component_name
    hidden = getattr(ffn, "hidden", None) or ffn.fc.out_features
    qkv = getattr(attn, "qkv", None) or attn.kv_a  # mla has no fused qkv
    return dict(
        vocab_size=model.vocab_size, hidden_size=model.embedding.token.weight.shape[1], num_hidden_layers=len(model.blocks),
        num_attention_heads=attn.num_heads, num_key_value_heads=attn.num_kv_heads, head_dim=attn.head_dim,
        max_position_embeddings=model.max_seq_len, intermediate_size=hidden,
        tie_word_embeddings=model.head.linear.weight is model.embedding.token.weight,
        norm=type(norm).component_name, eps=norm.eps, ffn=ffn_kind, position=position,
        windows=[b.attention.window for b in model.blocks], attn_bias=qkv.bias is not None,
        out_bias=attn.proj.bias is not None, post_norms=first.post_norms, attention=attn, dropout=attn.dropout,
        pre_norms=first.pre_norms, kind=type(attn).component_name, sinks=getattr(attn, "sinks", None) is not None,
        q_norm=getattr(attn, "q_norm", None) if type(attn).component_name != "mla" else None,
        # NoPE layers: without rotary positions among layers with them (not a model without any, like GPT-2)
        nope_layers=[bool(positioned) and b.attention.position is None for b in model.blocks],
    )


def _rope_to_hf(position, family: str) -> dict:
    _require(position is not None and type(position).component_name == "rope", family, "needs rope positions")
    cfg = position.config
    params = {"rope_type": "default", "rope_theta": float(cfg["base"])}
    scaling = cfg.get("scaling")
    if scaling:
        kind = scaling.get("type", "llama3")
        params = {**params, "rope_type": kind, "factor": float(scaling["factor"])}
        if kind == "llama3":
            params.update(low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                          high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                          original_max_position_embeddings=int(scaling["original_max_seq_len"]))
        _require(not (kind == "yarn" and family == "phi3"), family, "yarn rope scaling (transformers' Phi-3 reads longrope only)")
        if kind in ("yarn", "longrope"):
            params["original_max_position_embeddings"] = int(scaling["original_max_seq_len"])
            params.update({k: scaling[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                                                    "truncate", "short_factor", "long_factor") if scaling.get(k) is not None})
    if position.rotary_dim != cfg["head_dim"]:
        _require(family in ("phi3", "stablelm"), family,
                 "partial rotary embeddings (rotary_dim < head_dim) need phi3 or stablelm")
        params["partial_rotary_factor"] = position.rotary_dim / cfg["head_dim"]
    return params


def _require(condition: bool, family: str, what: str) -> None:
    if not condition:
        raise ConfigError(f"cannot export to {family}: {what}")


def _llama_like_hf(model, family: str, f: dict | None = None) -> dict:
    f = f or _facts(model)
    _require(f["norm"] == "rmsnorm" and f["ffn"] in ("swiglu", "moe"), family, "needs rmsnorm and swiglu")
    _require(not f["post_norms"] and model.head.softcap is None and model.embedding.scale is None, family,
             "sandwich norms, logit soft-capping and embedding scale need gemma2")
    _require(f["kind"] != "mla" and not f["sinks"] and f["pre_norms"], family,
             "latent attention, attention sinks and post-only norms need deepseek_v3, gpt_oss and olmo2")
    _require(f["attention"].softcap is None, family, "attention soft-capping needs gemma2")
    _require(f["q_norm"] is None or family in ("qwen3", "qwen3_moe"), family, "qk_norm needs qwen3, gemma3 or olmo2")
    _require(not any(f["nope_layers"]) or family == "smollm3", family, "layers without rope need smollm3")
    return {
        k: f[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "max_position_embeddings", "intermediate_size", "tie_word_embeddings")
    } | {"rms_norm_eps": f["eps"], "hidden_act": "silu"} | _rope_fields(f["position"], family)


def _rope_fields(position, family: str) -> dict:
    """``rope_parameters``, and the original length also at the top level, where transformers looks first."""
    params = _rope_to_hf(position, family)
    original = params.get("original_max_position_embeddings")
    return {"rope_parameters": params} | ({"original_max_position_embeddings": original} if original else {})


def llama_to_hf(model) -> dict:
    f = _facts(model)
    _require(set(f["windows"]) == {None}, "llama", "sliding-window attention needs mistral")
    _require(f["attn_bias"] == f["out_bias"], "llama", "q/k/v bias without output bias needs qwen2")
    return _llama_like_hf(model, "llama", f) | {"attention_bias": f["attn_bias"], "mlp_bias": model.blocks[0].ffn.fc.bias is not None}


def _one_window_hf(model, family: str, f: dict | None = None) -> dict:
    """Mistral, Phi-3 and Mixtral: one sliding window (or none) for all layers, no attention bias."""
    f = f or _facts(model)
    _require(len(set(f["windows"])) == 1 and not f["attn_bias"], family, "one window for all layers, no bias")
    return _llama_like_hf(model, family, f) | {"sliding_window": f["windows"][0]}


def mistral_to_hf(model) -> dict:
    return _one_window_hf(model, "mistral")


def qwen2_to_hf(model) -> dict:
    f = _facts(model)
    _require(f["attn_bias"] and not f["out_bias"], "qwen2", "needs q/k/v bias and no output bias")
    windows = [w for w in f["windows"] if w]
    _require(len(set(windows)) <= 1, "qwen2", "one sliding window size")
    types = ["sliding_attention" if w else "full_attention" for w in f["windows"]]
    return _llama_like_hf(model, "qwen2", f) | {
        "use_sliding_window": bool(windows), "sliding_window": windows[0] if windows else None,
        "max_window_layers": f["num_hidden_layers"], "layer_types": types,
    }


def phi3_to_hf(model) -> dict:
    return _one_window_hf(model, "phi3")


def mixtral_to_hf(model) -> dict:
    f = _facts(model)
    moe = model.blocks[0].ffn
    _require(f["ffn"] == "moe" and moe.normalize_top_k, "mixtral", "needs the moe ffn with normalize_top_k")
    return _one_window_hf(model, "mixtral", f) | {
        "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
    }


def olmo_to_hf(model) -> dict:
    f = _facts(model)
    _require(f["norm"] == "layernorm" and model.blocks[0].layers[0].weight is None and f["eps"] == 1e-5, "olmo",
             "needs non-parametric layernorm (eps 1e-5)")
    _require(set(f["windows"]) == {None} and f["attn_bias"] == f["out_bias"], "olmo", "no sliding window")
    cfg = _llama_like_hf(model, "olmo", {**f, "norm": "rmsnorm"}) | {"attention_bias": f["attn_bias"]}
    cfg.pop("rms_norm_eps")
    return cfg


def stablelm_to_hf(model) -> dict:
    f = _facts(model)
    norm = model.blocks[0].layers[0]
    _require(f["norm"] == "layernorm" and norm.weight is not None and norm.bias is not None, "stablelm",
             "needs layernorm with weights and biases")
    _require(set(f["windows"]) == {None} and not f["out_bias"], "stablelm", "no sliding window, no output bias")
    _require(model.blocks[0].ffn.fc.bias is None and f["head_dim"] * f["num_attention_heads"] == f["hidden_size"],
             "stablelm", "no ffn bias, head_dim x num_heads = embed_dim")
    cfg = _llama_like_hf(model, "stablelm", {**f, "norm": "rmsnorm"})  # rmsnorm: the rest of llama's rules apply
    rope = cfg["rope_parameters"]
    rope["partial_rotary_factor"] = rope.get("partial_rotary_factor", 1.0)
    for key in ("rms_norm_eps", "head_dim"):
        cfg.pop(key)
    return cfg | {"layer_norm_eps": f["eps"], "use_qkv_bias": f["attn_bias"], "qk_layernorm": False,
                  "use_parallel_residual": False, "hidden_dropout": 0.0, "attention_dropout": f["dropout"]}


def gemma2_to_hf(model) -> dict:
    f = _facts(model)
    _none_of_the_2025_blocks(f, "gemma2")
    attn = f["attention"]
    _require(f["post_norms"] and f["norm"] == "rmsnorm" and f["ffn"] == "geglu", "gemma2", "needs sandwich rmsnorm, geglu")
    windows = [w for w in f["windows"] if w]
    _require(len(set(windows)) <= 1, "gemma2", "one sliding window size")
    return {
        k: f[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "max_position_embeddings", "intermediate_size", "tie_word_embeddings")
    } | {
        "rms_norm_eps": f["eps"], "hidden_activation": "gelu_pytorch_tanh", **_rope_fields(f["position"], "gemma2"),
        "attention_bias": f["attn_bias"], "query_pre_attn_scalar": round(attn.scale**-2),
        "attn_logit_softcapping": attn.softcap, "final_logit_softcapping": model.head.softcap,
        "sliding_window": windows[0] if windows else None,
        "layer_types": ["sliding_attention" if w else "full_attention" for w in f["windows"]],
    }


def _none_of_the_2025_blocks(f: dict, family: str) -> None:
    _require(f["kind"] != "mla" and not f["sinks"] and f["pre_norms"] and f["q_norm"] is None
             and not any(f["nope_layers"]), family,
             "latent attention, sinks, post-only norms, qk_norm and NoPE layers need a 2025 family")


def _qk_norm_eps(f: dict, family: str, scope: str) -> None:
    """The families' QK-norms are RMSNorms with the model's eps."""
    norm = f["q_norm"]
    _require(norm is not None and type(norm).component_name == "rmsnorm" and norm.eps == f["eps"]
             and f["attention"].qk_norm_scope == scope, family,
             f"needs rmsnorm qk_norm over {scope} with the model's eps")


def _sliding_fields(f: dict, family: str) -> dict:
    windows = [w for w in f["windows"] if w]
    _require(len(set(windows)) <= 1, family, "one sliding window size")
    return {"sliding_window": windows[0] if windows else None,
            "layer_types": ["sliding_attention" if w else "full_attention" for w in f["windows"]]}


def qwen3_to_hf(model) -> dict:
    f = _facts(model)
    _qk_norm_eps(f, "qwen3", "head")
    _require(f["attn_bias"] == f["out_bias"], "qwen3", "q/k/v bias without output bias needs qwen2")
    sliding = _sliding_fields(f, "qwen3")
    return _llama_like_hf(model, "qwen3", f) | sliding | {
        "attention_bias": f["attn_bias"], "use_sliding_window": sliding["sliding_window"] is not None,
        "max_window_layers": f["num_hidden_layers"],
    }


def _moe_fields(model, family: str, **allowed) -> tuple[object, list[int]]:
    """The MoE of the model and the indices of its dense (SwiGLU) layers; refuses settings the family lacks."""
    moes = [b.ffn for b in model.blocks if type(b.ffn).component_name == "moe"]
    _require(bool(moes), family, "needs the moe ffn")
    configs = {repr(sorted((k, v) for k, v in m.config.items() if k != "dropout")) for m in moes}
    _require(len(configs) == 1, family, "one moe configuration for all its layers")
    moe = moes[0]
    defaults = dict(routing="softmax", router_bias=False, num_groups=1, top_groups=1, routed_scale=1.0,
                    balance_bias=False, shared_experts=0, activation="swiglu", bias=False)
    for key, default in defaults.items():
        expected = allowed.get(key, default)
        if expected is not None:  # None: any value, written to the HF config
            _require(moe.config[key] == expected, family, f"moe {key}={moe.config[key]!r} (it supports {expected!r})")
    dense = [i for i, b in enumerate(model.blocks) if type(b.ffn).component_name != "moe"]
    _require(all(type(model.blocks[i].ffn).component_name == "swiglu" for i in dense), family,
             "dense layers use swiglu")
    return moe, dense


def qwen3_moe_to_hf(model) -> dict:
    f = _facts(model)
    moe, dense = _moe_fields(model, "qwen3_moe")
    dense_width = {model.blocks[i].ffn.hidden for i in dense}
    _require(len(dense_width) <= 1, "qwen3_moe", "one width for the dense layers")
    return qwen3_to_hf(model) | {
        "moe_intermediate_size": moe.hidden, "intermediate_size": dense_width.pop() if dense_width else moe.hidden,
        "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.normalize_top_k,
        "router_aux_loss_coef": moe.aux_loss_coef, "decoder_sparse_step": 1, "mlp_only_layers": dense,
    }


def gemma3_to_hf(model) -> dict:
    f = _facts(model)
    attn = f["attention"]
    _require(f["post_norms"] and f["pre_norms"] and f["norm"] == "rmsnorm" and f["ffn"] == "geglu", "gemma3",
             "needs sandwich rmsnorm, geglu")
    _require(f["kind"] != "mla" and not f["sinks"] and not any(f["nope_layers"]), "gemma3", "no sinks, mla or NoPE")
    _qk_norm_eps(f, "gemma3", "head")
    sliding = _sliding_fields(f, "gemma3")
    ropes = {}
    for block, kind in zip(model.blocks, sliding["layer_types"]):
        params = _rope_to_hf(block.attention.position, "gemma3")
        _require(ropes.setdefault(kind, params) == params, "gemma3", f"one rope setting for all {kind} layers")
    ropes.setdefault("full_attention", ropes.get("sliding_attention"))
    ropes.setdefault("sliding_attention", ropes["full_attention"])
    return {
        k: f[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "max_position_embeddings", "intermediate_size", "tie_word_embeddings")
    } | sliding | {
        "sliding_window": sliding["sliding_window"] or f["max_position_embeddings"],
        "rms_norm_eps": f["eps"], "hidden_activation": "gelu_pytorch_tanh", "rope_parameters": ropes,
        "attention_bias": f["attn_bias"], "query_pre_attn_scalar": round(attn.scale**-2),
        "attn_logit_softcapping": attn.softcap, "final_logit_softcapping": model.head.softcap,
    }


def olmo2_to_hf(model) -> dict:
    f = _facts(model)
    _require(not f["pre_norms"] and f["post_norms"], "olmo2", "needs norms after the sub-layers only (pre_norms=false)")
    _qk_norm_eps(f, "olmo2", "all")
    _require(set(f["windows"]) == {None} and f["attn_bias"] == f["out_bias"], "olmo2", "no sliding window")
    f = {**f, "pre_norms": True, "post_norms": False, "q_norm": None}  # checked above; the rest is Llama's
    return _llama_like_hf(model, "olmo2", f) | {"attention_bias": f["attn_bias"]}


def smollm3_to_hf(model) -> dict:
    f = _facts(model)
    _require(f["attn_bias"] == f["out_bias"], "smollm3", "q/k/v bias without output bias needs qwen2")
    ropes = {repr(b.attention.position.config) for b in model.blocks if b.attention.position is not None}
    _require(len(ropes) == 1, "smollm3", "one rope setting for the layers that use rope")
    sliding = _sliding_fields(f, "smollm3")
    return _llama_like_hf(model, "smollm3", f) | sliding | {
        "attention_bias": f["attn_bias"], "mlp_bias": model.blocks[0].ffn.fc.bias is not None,
        "no_rope_layers": [int(not nope) for nope in f["nope_layers"]],
        "use_sliding_window": bool(sliding["sliding_window"]),
    }


def gpt_oss_to_hf(model) -> dict:
    f = _facts(model)
    _require(f["sinks"] and f["attn_bias"] and f["out_bias"], "gpt_oss", "needs attention sinks and q/k/v/o biases")
    moe, dense = _moe_fields(model, "gpt_oss", router_bias=True, activation="clamped_swiglu", bias=True)
    _require(not dense and moe.normalize_top_k, "gpt_oss", "moe in every layer with normalize_top_k")
    f = {**f, "sinks": False}  # checked above; the rest is Llama's
    return _llama_like_hf(model, "gpt_oss", f) | _sliding_fields(f, "gpt_oss") | {
        "attention_bias": True, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coef, "swiglu_limit": moe.limit, "swiglu_alpha": moe.alpha,
    }


def deepseek_v3_to_hf(model) -> dict:
    f = _facts(model)
    attn = f["attention"]
    _require(f["kind"] == "mla", "deepseek_v3", "needs mla attention")
    _require(f["norm"] == "rmsnorm" and f["pre_norms"] and not f["post_norms"] and model.head.softcap is None
             and model.embedding.scale is None, "deepseek_v3", "needs pre-norm rmsnorm, no soft-capping or embed scale")
    _require(attn.kv_norm.eps == 1e-6 and (attn.q_norm is None or attn.q_norm.eps == 1e-6), "deepseek_v3",
             "latent norms with eps 1e-6")
    moe, dense = _moe_fields(model, "deepseek_v3", routing="sigmoid", num_groups=None, top_groups=None,
                             routed_scale=None, balance_bias=True, shared_experts=None)
    _require(dense == list(range(len(dense))), "deepseek_v3", "dense layers only before the moe layers")
    rope = _rope_fields(f["position"], "deepseek_v3")
    cfg = {
        "vocab_size": f["vocab_size"], "hidden_size": f["hidden_size"], "num_hidden_layers": f["num_hidden_layers"],
        "num_attention_heads": attn.num_heads, "num_key_value_heads": attn.num_heads,
        "max_position_embeddings": f["max_position_embeddings"], "tie_word_embeddings": f["tie_word_embeddings"],
        "rms_norm_eps": f["eps"], "hidden_act": "silu", "attention_bias": f["attn_bias"], **rope,
        "kv_lora_rank": attn.kv_rank, "q_lora_rank": attn.config["q_rank"], "qk_rope_head_dim": attn.rope_dim,
        "qk_nope_head_dim": attn.nope_dim, "v_head_dim": attn.v_dim, "rope_interleave": True,
        "intermediate_size": model.blocks[dense[0]].ffn.hidden if dense else moe.hidden,
        "moe_intermediate_size": moe.hidden, "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.config["shared_experts"], "n_group": moe.num_groups, "topk_group": moe.top_groups,
        "norm_topk_prob": moe.normalize_top_k, "routed_scaling_factor": moe.routed_scale,
        "first_k_dense_replace": len(dense), "num_nextn_predict_layers": 0,
    }
    expected = _mla_scale(cfg | {"rope_parameters": rope["rope_parameters"]})
    _require(math.isclose(attn.scale, expected, rel_tol=1e-6), "deepseek_v3",
             f"attention scale {attn.scale:g} (transformers derives {expected:g} from the head dims and rope)")
    return cfg


def gpt2_to_hf(model) -> dict:
    f = _facts(model)
    _none_of_the_2025_blocks(f, "gpt2")
    _require(f["norm"] == "layernorm" and f["ffn"] == "gelu_mlp" and f["attn_bias"], "gpt2", "needs layernorm, gelu_mlp, biases")
    _require(type(f["position"]).component_name == "learned" and f["position"].offset == 0, "gpt2", "needs learned positions")
    _require(f["num_key_value_heads"] == f["num_attention_heads"] and set(f["windows"]) == {None}, "gpt2", "needs mha")
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[model.blocks[0].ffn.config["activation"]]
    return {
        "vocab_size": f["vocab_size"], "n_embd": f["hidden_size"], "n_layer": f["num_hidden_layers"],
        "n_head": f["num_attention_heads"], "n_positions": f["max_position_embeddings"], "n_inner": f["intermediate_size"],
        "activation_function": activation, "layer_norm_epsilon": f["eps"], "tie_word_embeddings": f["tie_word_embeddings"],
        "scale_attn_weights": f["attention"].scale == f["head_dim"] ** -0.5,
        # olm's dropout, not GPT2Config's default of 0.1
        "attn_pdrop": f["dropout"], "resid_pdrop": f["dropout"], "embd_pdrop": f["dropout"],
    }


def opt_to_hf(model) -> dict:
    f = _facts(model)
    _none_of_the_2025_blocks(f, "opt")
    _require(f["norm"] == "layernorm" and f["ffn"] == "gelu_mlp" and f["attn_bias"], "opt", "needs layernorm, gelu_mlp, biases")
    _require(type(f["position"]).component_name == "learned" and f["position"].offset == 2, "opt", "needs learned positions, offset 2")
    return {
        "vocab_size": f["vocab_size"], "hidden_size": f["hidden_size"], "num_hidden_layers": f["num_hidden_layers"],
        "num_attention_heads": f["num_attention_heads"], "ffn_dim": f["intermediate_size"],
        "max_position_embeddings": f["max_position_embeddings"], "do_layer_norm_before": True,
        "activation_function": model.blocks[0].ffn.config["activation"], "word_embed_proj_dim": f["hidden_size"],
        "tie_word_embeddings": f["tie_word_embeddings"], "enable_bias": True,
        "dropout": f["dropout"], "attention_dropout": f["dropout"],  # olm's, not OPTConfig's default of 0.1
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tensor names. olm names: layers.0 = embedding, layers.{i+1}.layers.{0..5} = [attn norm, attention, ffn norm, ffn,
# post-attn norm, post-ffn norm] of block i, layers.{N+1}.layers.{0,1} = final norm, output projection.


def _norm(olm: str, hf: str, offset: float = 0.0) -> list[TensorMap]:
    return [TensorMap(f"{olm}.weight", [f"{hf}.weight"], offset=offset), TensorMap(f"{olm}.bias", [f"{hf}.bias"])]


def _linear(olm: str, hf: list[str], split=None, transpose=False) -> list[TensorMap]:
    return [TensorMap(f"{olm}.weight", [f"{h}.weight" for h in hf], split, transpose=transpose),
            TensorMap(f"{olm}.bias", [f"{h}.bias" for h in hf], split)]


def _head(model, prefix: str, final_norm: str, lm_head: str = "lm_head", offset: float = 0.0) -> list[TensorMap]:
    n = len(model.blocks) + 1
    maps = [TensorMap("layers.0.token.weight", [f"{prefix}.embed_tokens.weight"], vocab=True), *_norm(f"layers.{n}.layers.0", final_norm, offset)]
    if model.head.linear.weight is not model.embedding.token.weight:
        maps += [TensorMap(f"layers.{n}.layers.1.weight", [f"{lm_head}.weight"], vocab=True),
                 TensorMap(f"layers.{n}.layers.1.bias", [f"{lm_head}.bias"], vocab=True)]
    return maps


def _qkv_split(attn) -> list[int]:
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    return [q, kv, kv]


def _interleaved_rotary(rows: int, rope_dim: int, period: int | None = None) -> list[int]:
    """Row order that turns DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3), ... into olm's rotate-half
    halves (x0, x2, ...; x1, x3, ...): the last ``rope_dim`` rows of every ``period`` rows are reordered."""
    period = period or rows
    order = []
    for start in range(0, rows, period):
        rope_start = start + period - rope_dim
        order += list(range(start, rope_start))
        rope_rows = range(rope_start, rope_start + rope_dim)
        order += list(rope_rows[0::2]) + list(rope_rows[1::2])
    return order


def _mla_tensors(o: str, a: str, attn) -> list[TensorMap]:
    head = attn.nope_dim + attn.rope_dim
    q_order = _interleaved_rotary(attn.num_heads * head, attn.rope_dim, head)
    maps = [TensorMap(f"{o}.q.weight", [f"{a}.q_proj.weight"], permute=q_order)]
    maps += _linear(f"{o}.q_a", [f"{a}.q_a_proj"]) + _norm(f"{o}.q_norm", f"{a}.q_a_layernorm")
    maps.append(TensorMap(f"{o}.q_b.weight", [f"{a}.q_b_proj.weight"], permute=q_order))
    kv_a_order = _interleaved_rotary(attn.kv_rank + attn.rope_dim, attn.rope_dim)
    maps += [TensorMap(f"{o}.kv_a.weight", [f"{a}.kv_a_proj_with_mqa.weight"], permute=kv_a_order),
             TensorMap(f"{o}.kv_a.bias", [f"{a}.kv_a_proj_with_mqa.bias"], permute=kv_a_order)]
    maps += _norm(f"{o}.kv_norm", f"{a}.kv_a_layernorm") + _linear(f"{o}.kv_b", [f"{a}.kv_b_proj"])
    return maps + _linear(f"{o}.proj", [f"{a}.o_proj"])


def _moe_tensors(o: str, h: str, ffn, style: str) -> list[TensorMap]:
    """Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE's and DeepSeek's ``mlp.experts.{e}.gate_proj/
    up_proj/down_proj``, GPT-OSS's stacked ``mlp.experts.gate_up_proj`` (columns interleaved, stored (in, out))."""
    E, hidden = ffn.num_experts, ffn.hidden
    if style == "gpt_oss":
        m = f"{h}.mlp"
        interleaved = list(range(0, 2 * hidden, 2)) + list(range(1, 2 * hidden, 2))
        return [
            TensorMap(f"{o}.router.weight", [f"{m}.router.weight"]),
            TensorMap(f"{o}.router.bias", [f"{m}.router.bias"]),
            TensorMap(f"{o}.fc", [f"{m}.experts.gate_up_proj"], transpose=True, permute=interleaved, permute_dim=1),
            TensorMap(f"{o}.fc_bias", [f"{m}.experts.gate_up_proj_bias"], permute=interleaved, permute_dim=1),
            TensorMap(f"{o}.proj", [f"{m}.experts.down_proj"], transpose=True),
            TensorMap(f"{o}.proj_bias", [f"{m}.experts.down_proj_bias"]),
        ]
    if style == "mixtral":
        m, (gate, up, down) = f"{h}.block_sparse_moe", ("w1", "w3", "w2")
    else:
        m, (gate, up, down) = f"{h}.mlp", ("gate_proj", "up_proj", "down_proj")
    maps = [
        TensorMap(f"{o}.router.weight", [f"{m}.gate.weight"]),
        TensorMap(f"{o}.expert_bias", [f"{m}.gate.e_score_correction_bias"]),
        TensorMap(f"{o}.fc", [f"{m}.experts.{e}.{w}.weight" for e in range(E) for w in (gate, up)], [hidden, hidden],
                  experts=E),
        TensorMap(f"{o}.proj", [f"{m}.experts.{e}.{down}.weight" for e in range(E)], experts=E),
    ]
    if ffn.shared is not None:
        shared = ffn.shared.hidden
        s = f"{m}.shared_experts"
        maps += [TensorMap(f"{o}.shared.fc.weight", [f"{s}.gate_proj.weight", f"{s}.up_proj.weight"], [shared, shared]),
                 TensorMap(f"{o}.shared.proj.weight", [f"{s}.down_proj.weight"])]
    return maps


def llama_tensors(model, norms: str = "pre", offset: float = 0.0, fused: bool = False,
                  moe: str = "mixtral") -> list[TensorMap]:
    """Llama layout (also Mistral, Qwen2/3, OLMo, SmolLM3, the MoE families; Phi-3 with fused qkv/gate_up).

    ``norms``: "pre" (input_layernorm, post_attention_layernorm before the FFN), "sandwich" (Gemma 2/3: plus
    pre_/post_feedforward_layernorm), "post" (OLMo 2: post_attention_ and post_feedforward_layernorm after the
    sub-layers); ``offset`` for norms stored as w - 1 (Gemma); ``moe`` names the expert layout.
    """
    maps = _head(model, "model", "model.norm", offset=offset)
    for i, block in enumerate(model.blocks):
        o, h = f"layers.{i + 1}.layers", f"model.layers.{i}"
        a = f"{h}.self_attn"
        if type(block.attention).component_name == "mla":
            maps += _mla_tensors(f"{o}.1", a, block.attention)
        else:
            qkv = [f"{a}.qkv_proj"] if fused else [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]
            maps += _linear(f"{o}.1.qkv", qkv, None if fused else _qkv_split(block.attention))
            maps += _linear(f"{o}.1.proj", [f"{a}.o_proj"])
            maps += _norm(f"{o}.1.q_norm", f"{a}.q_norm", offset) + _norm(f"{o}.1.k_norm", f"{a}.k_norm", offset)
            maps.append(TensorMap(f"{o}.1.sinks", [f"{a}.sinks"]))
        if norms == "post":
            maps += _norm(f"{o}.4", f"{h}.post_attention_layernorm")
            maps += _norm(f"{o}.5", f"{h}.post_feedforward_layernorm")
        else:
            maps += _norm(f"{o}.0", f"{h}.input_layernorm", offset)
        if norms == "sandwich":
            maps += _norm(f"{o}.2", f"{h}.pre_feedforward_layernorm", offset)
            maps += _norm(f"{o}.4", f"{h}.post_attention_layernorm", offset)
            maps += _norm(f"{o}.5", f"{h}.post_feedforward_layernorm", offset)
        elif norms == "pre":
            maps += _norm(f"{o}.2", f"{h}.post_attention_layernorm")
        ffn = block.ffn
        if type(ffn).component_name == "moe":
            maps += _moe_tensors(f"{o}.3", h, ffn, moe)
        else:
            gate_up = [f"{h}.mlp.gate_up_proj"] if fused else [f"{h}.mlp.gate_proj", f"{h}.mlp.up_proj"]
            maps += _linear(f"{o}.3.fc", gate_up, None if fused else [ffn.hidden, ffn.hidden])
            maps += _linear(f"{o}.3.proj", [f"{h}.mlp.down_proj"])
    return maps


def gpt2_tensors(model) -> list[TensorMap]:
    maps = _head(model, "transformer", "transformer.ln_f")
    maps[0] = TensorMap("layers.0.token.weight", ["transformer.wte.weight"], vocab=True)
    maps.append(TensorMap("layers.0.position.table.weight", ["transformer.wpe.weight"]))
    for i in range(len(model.blocks)):
        o, h = f"layers.{i + 1}.layers", f"transformer.h.{i}"
        maps += _norm(f"{o}.0", f"{h}.ln_1") + _norm(f"{o}.2", f"{h}.ln_2")
        maps += _linear(f"{o}.1.qkv", [f"{h}.attn.c_attn"], transpose=True)
        maps += _linear(f"{o}.1.proj", [f"{h}.attn.c_proj"], transpose=True)
        maps += _linear(f"{o}.3.fc", [f"{h}.mlp.c_fc"], transpose=True)
        maps += _linear(f"{o}.3.proj", [f"{h}.mlp.c_proj"], transpose=True)
    return maps


def opt_tensors(model) -> list[TensorMap]:
    d = "model.decoder"
    maps = _head(model, d, f"{d}.final_layer_norm")
    maps.append(TensorMap("layers.0.position.table.weight", [f"{d}.embed_positions.weight"]))
    for i, block in enumerate(model.blocks):
        o, h = f"layers.{i + 1}.layers", f"{d}.layers.{i}"
        a = f"{h}.self_attn"
        maps += _linear(f"{o}.1.qkv", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], _qkv_split(block.attention))
        maps += _linear(f"{o}.1.proj", [f"{a}.out_proj"])
        maps += _norm(f"{o}.0", f"{h}.self_attn_layer_norm") + _norm(f"{o}.2", f"{h}.final_layer_norm")
        maps += _linear(f"{o}.3.fc", [f"{h}.fc1"]) + _linear(f"{o}.3.proj", [f"{h}.fc2"])
    return maps


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt2", "GPT2LMHeadModel", "gpt2", gpt2_to_olm, gpt2_to_hf, gpt2_tensors),
        Family("llama", "LlamaForCausalLM", "llama", llama_to_olm, llama_to_hf, llama_tensors),
        Family("mistral", "MistralForCausalLM", "mistral", mistral_to_olm, mistral_to_hf, llama_tensors),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", qwen2_to_olm, qwen2_to_hf, llama_tensors),
        Family("gemma2", "Gemma2ForCausalLM", "gemma2", gemma2_to_olm, gemma2_to_hf,
               lambda m: llama_tensors(m, "sandwich", offset=1.0)),
        Family("phi3", "Phi3ForCausalLM", "phi3", phi3_to_olm, phi3_to_hf, lambda m: llama_tensors(m, fused=True)),
        Family("olmo", "OlmoForCausalLM", "olmo", olmo_to_olm, olmo_to_hf, llama_tensors),
        Family("opt", "OPTForCausalLM", "opt", opt_to_olm, opt_to_hf, opt_tensors),
        Family("mixtral", "MixtralForCausalLM", "mixtral", mixtral_to_olm, mixtral_to_hf, llama_tensors),
        Family("stablelm", "StableLmForCausalLM", "stablelm", stablelm_to_olm, stablelm_to_hf, llama_tensors),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", qwen3_to_olm, qwen3_to_hf, llama_tensors),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", qwen3_moe_to_olm, qwen3_moe_to_hf,
               lambda m: llama_tensors(m, moe="qwen3_moe")),
        Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", gemma3_to_olm, gemma3_to_hf,
               lambda m: llama_tensors(m, "sandwich", offset=1.0)),
        Family("olmo2", "Olmo2ForCausalLM", "olmo2", olmo2_to_olm, olmo2_to_hf, lambda m: llama_tensors(m, "post")),
        Family("smollm3", "SmolLM3ForCausalLM", "smollm3", smollm3_to_olm, smollm3_to_hf, llama_tensors),
        Family("gpt_oss", "GptOssForCausalLM", "gpt_oss", gpt_oss_to_olm, gpt_oss_to_hf,
               lambda m: llama_tensors(m, moe="gpt_oss")),
        Family("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", deepseek_v3_to_olm, deepseek_v3_to_hf,
               lambda m: llama_tensors(m, moe="deepseek_v3")),
    ]
}


def family_of_architecture(architecture: str, where: str = "config.json") -> Family:
    for family in FAMILIES.values():
        if architecture in (family.architecture, family.model_type):
            return family
    known = ", ".join(f.architecture for f in FAMILIES.values())
    raise ConfigError(f"{where}: architecture {architecture!r} is not supported; known: {known}")


def infer_family(model) -> Family:
    """The family an olm LM exports to when none is named: the first whose rules the model meets."""
    f = _facts(model)
    if f["kind"] == "mla":
        return FAMILIES["deepseek_v3"]
    if f["sinks"]:
        return FAMILIES["gpt_oss"]
    if not f["pre_norms"]:
        return FAMILIES["olmo2"]
    if f["q_norm"] is not None:
        return FAMILIES["gemma3" if f["post_norms"] else "qwen3_moe" if f["ffn"] == "moe" else "qwen3"]
    if any(f["nope_layers"]):
        return FAMILIES["smollm3"]
    if f["ffn"] == "moe":
        return FAMILIES["mixtral"]
    if f["post_norms"]:
        return FAMILIES["gemma2"]
    if f["ffn"] == "gelu_mlp":
        return FAMILIES["opt" if getattr(f["position"], "offset", 0) == 2 else "gpt2"]
    if f["norm"] == "layernorm":  # OLMo's has no weights; StableLM's (olm's default presets) weights and biases
        return FAMILIES["olmo" if model.blocks[0].layers[0].weight is None else "stablelm"]
    if f["attn_bias"] and not f["out_bias"]:
        return FAMILIES["qwen2"]
    if f["position"] is not None and getattr(f["position"], "rotary_dim", None) not in (None, f["head_dim"]):
        return FAMILIES["phi3"]
    if any(f["windows"]):
        return FAMILIES["mistral"]
    return FAMILIES["llama"]
