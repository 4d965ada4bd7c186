"""Fuzzing the config layer (hypothesis): random override combinations, good and bad, end either in a built model
that runs or in a clean one-line error naming a key; never a traceback from deep inside the model or torch."""

from __future__ import annotations

import pytest
import torch

from olm.nn.structure import meta_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

import olm
from olm.registry import ConfigError
from olm.train.checks import check_run
from olm.train.compose import compose as compose_run_config
from olm.train.outcome import one_line_error

BASE = ["data.tokenizer=byte", "data.seq_len=32", "trainer=cpu", "logger=none"]
# key -> values: valid ones, and the mistakes people make (typos, wrong types, zero, negative, out of range)
CHOICES = {
    "model": ["lm_tiny", "llama_tiny", "gpt2_tiny", "mistral_tiny", "mixtral_tiny", "olmo_tiny", "phi3_tiny",
              "qwen2_tiny", "gemma2_tiny", "opt_tiny", "lm_tinny", "gpt2_large"],
    "model/attention": ["mha", "gqa", "mqa", "sliding_window", "gqa2"],
    "model/norm": ["layernorm", "rmsnorm", "rmsnrom"],
    "model/ffn": ["swiglu", "geglu", "gelu_mlp", "relu"],
    "model/position": ["rope", "learned", "alibi", "none", "rotary"],
    "model.embed_dim": [-8, 0, 1, 6, 8, 16, 24, 32, 1.5, "wide", "null"],
    "model.num_heads": [-1, 0, 1, 2, 3, 4, 8, "two"],
    "model.num_layers": [-1, 0, 1, 2],
    "model.dropout": [-0.1, 0.0, 0.1, 0.99, 1.0, 1.5, "high"],
    "model.ff_multiplier": [-1, 0, 0.5, 2.5, 4],
    "model.max_seq_len": [-1, 0, 4, 16, 64],
    "model.vocab_size": [-1, 0, 100, 256, 300, "big"],
    "model.bias": ["true", "false", "maybe"],
    "model.tie_embeddings": ["true", "false", 2],
    "model.nmu_layers": [2],
    "model.attention.num_kv_heads": [-1, 0, 1, 2, 3, 4],
    "model.attention.window": [-2, 0, 1, 4],
    "model.attention.softcap": [-1.0, 0.0, 30.0],
    "data.seq_len": [-1, 0, 8, 16, 128],
    "data.batch_size": [-2, 0, 1, 4, "many"],
    "trainer.max_steps": [-5, 0, 1, 10],
    "trainer.max_stepz": [3],
    "optim.lr": [-1, 0, 1e-3, "fast"],
    "optim.betas": ["[0.9,0.95]", "[0.9,1.5]", "[0.9]"],
    "scheduler.warmup_steps": [-1, 0, 5],
    "callbacks.nan_guard.skip_batches": [-1, 0, 3],
}


def override(key: str, value) -> str:
    return f"{key}={value}"


overrides_strategy = st.dictionaries(st.sampled_from(sorted(CHOICES)), st.none(), max_size=7).flatmap(
    lambda keys: st.tuples(*[st.sampled_from(CHOICES[k]).map(lambda v, k=k: override(k, v)) for k in sorted(keys)])
)


def outcome(overrides: list[str]) -> str:
    """'model' (built and ran), or 'error: <one line>'; anything else raises."""
    if not any(o.startswith("model=") for o in overrides):
        overrides = ["model=lm_tiny", *overrides]
    try:
        cfg = compose_run_config([*BASE, *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = "/nonexistent"
            cfg.name = "fuzz"
        check_run(cfg, memory=False)
        if cfg.model.vocab_size < 256:  # what the run checks against the byte tokenizer once it exists
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary")
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        if isinstance(model_cfg.get("embed_dim"), int) and model_cfg["embed_dim"] > 256:  # a large preset: shapes only
            with meta_device():
                olm.build_model(model_cfg)
            return "model"
        model = olm.build_model(model_cfg)
        seq = min(cfg.data.seq_len, model.max_seq_len, 8)
        x = torch.randint(0, 256, (2, seq))
        logits = model(x)
        assert logits.shape[:2] == (2, seq) and logits.shape[-1] >= 256
        return "model"
    except Exception as exc:
        reported = one_line_error(exc)  # what olm-train would print; None means a traceback
        if reported is None:
            raise
        code, message = reported
        assert code == 2 and message and "\n" not in message, message
        return f"error: {message}"


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(overrides_strategy)
def test_random_overrides_build_a_model_or_fail_in_one_line(overrides):
    outcome(list(overrides))


@pytest.mark.parametrize("overrides,expected", [
    (["model=llama_tiny", "model/attention=gqa", "model.attention.num_kv_heads=2"], "model"),
    (["model/position=rotary"], "error: model/position=rotary is not a known option of 'model/position'; known: alibi, learned, none, rope"),
    (["data.seq_len=128", "model.max_seq_len=64"], "error: data.seq_len=128 exceeds model.max_seq_len=64"),
    (["model.nmu_layers=3"], "error: model.nmu_layers is not a config key; did you mean 'num_layers'?"),
    (["model.embed_dim=null"], "error: model.embed_dim"),
])
def test_examples(overrides, expected):
    assert outcome(overrides).startswith(expected)


DICT_KEYS = {
    "embed_dim": st.sampled_from([-4, 0, 2, 8, 12, 16, 32, 8.0, "8", None, True]),
    "num_heads": st.sampled_from([-2, 0, 1, 2, 3, 4, 16, 2.0, "2"]),
    "num_layers": st.sampled_from([-1, 0, 1, 2, 1.0]),
    "max_seq_len": st.sampled_from([-1, 0, 1, 8, 16]),
    "vocab_size": st.sampled_from([-1, 0, 1, 7, 64]),
    "dropout": st.sampled_from([-0.5, 0.0, 0.2, 1.0, float("nan"), "0.1"]),
    "ff_multiplier": st.sampled_from([-1.0, 0, 0.25, 1, 4.0, float("inf")]),
    "norm": st.sampled_from(["layernorm", "rmsnorm", "batchnorm", 3, {"name": "rmsnorm", "eps": -1.0},
                             {"name": "layernorm", "affine": "no"}, {"eps": 1e-5}]),
    "attention": st.sampled_from(["mha", "gqa", "mqa", {"name": "gqa", "num_kv_heads": 3}, {"name": "gqa", "num_kv_heads": 0},
                                  {"name": "sliding_window", "window": 0}, {"name": "mha", "qk_norm": "rmsnorm"},
                                  {"name": "mha", "softcap": -5.0}, {"name": "mha", "scale": 0.0}, ["mha"]]),
    "ffn": st.sampled_from(["swiglu", "geglu", "gelu_mlp", {"name": "gelu_mlp", "activation": "relu"},
                            {"name": "gelu_mlp", "activation": "tanh"}, {"name": "swiglu", "hidden": -3}]),
    "position": st.sampled_from(["rope", "learned", "alibi", "none", {"name": "rope", "base": -1.0},
                                 {"name": "rope", "rotary_dim": 3}, {"name": "rope", "scaling": "x"},
                                 {"name": "rope", "scaling": {"type": "linear", "factor": 2.0}}]),
    "tie_embeddings": st.sampled_from([True, False, "yes"]),
    "causal": st.sampled_from([True, False, 0]),
    "imports": st.sampled_from([[], ["olm.nn"], ["no_such_module_xyz"], "olm", [1]]),
}


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({}, optional=DICT_KEYS))
def test_random_model_dicts_build_or_fail_in_one_line(spec):
    """The same property one layer down, without Hydra: olm.build_model on raw dicts (as from Python or JSON)."""
    cfg = {"vocab_size": 64, "embed_dim": 16, "num_heads": 2, "num_layers": 1, "max_seq_len": 16, **spec}
    try:
        model = olm.build_model(cfg)
    except ConfigError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    x = torch.randint(0, model.vocab_size, (1, min(8, model.max_seq_len)))
    assert model(x).shape[:2] == x.shape
