"""Hydra composition: every preset composes and builds; schema errors are caught while composing."""


import pytest
import torch

from olm.nn.structure import meta_device
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import olm
from olm.train.config import conf_dir, register_configs

CONF_DIR = conf_dir()

PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def compose_train(overrides=()):
    """Hydra's plain compose API: olm's SearchPathPlugin registers the schemas, nothing else is called."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return cfg


def test_presets_exist():
    assert {"lm_tiny", "lm_small", "gpt2_small", "llama_small"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_composes_and_builds(preset):
    cfg = compose_train([f"model={preset}", "model.num_layers=1"])
    with meta_device():  # shapes only: the 27B presets build in milliseconds
        model = olm.build_model(cfg.model)
    assert model.vocab_size == 4096 and len(model.blocks) == 1  # the default BPE's size, known before training it


def test_gpt2_small_shape():
    cfg = compose_train(["model=gpt2_small", "data.vocab_size=50257"])
    m = OmegaConf.to_container(cfg.model, resolve=True)
    assert (m["num_layers"], m["embed_dim"], m["num_heads"], m["max_seq_len"]) == (12, 768, 12, 1024)
    assert m["position"]["name"] == "learned" and m["ffn"]["name"] == "gelu_mlp" and m["tie_embeddings"]
    model = olm.build_model(m)
    assert model.embedding.token.weight.shape == (50304, 768)  # padded to a multiple of 64
    # 124M-class: GPT-2's 124,439,808 plus the 47 padding rows
    assert model.num_parameters() == 124_439_808 + 47 * 768


def test_llama_small_components():
    cfg = compose_train(["model=llama_small"])
    model = olm.build_model(cfg.model)
    block = model.blocks[0]
    assert type(block.layers[0]).component_name == "rmsnorm"
    assert block.attention.num_kv_heads == 4 and block.attention.num_heads == 12
    assert type(block.attention.position).component_name == "rope"
    assert type(block.ffn).component_name == "swiglu" and block.ffn.hidden == 2048


def test_compose_variant_from_command_line():
    cfg = compose_train(["model/attention=gqa", "model.attention.num_kv_heads=2", "model.num_heads=4", "model.embed_dim=192",
                         "model.num_layers=6", "model.ff_multiplier=4", "model.causal=false", "model/norm=rmsnorm",
                         "model/position=alibi", "model/ffn=geglu"])
    model = olm.build_model(cfg.model)
    assert len(model.blocks) == 6 and model.causal is False
    attn = model.blocks[0].attention
    assert attn.num_kv_heads == 2 and attn.num_heads == 4 and attn.causal is False
    assert type(attn.position).component_name == "alibi"
    assert type(model.blocks[0].ffn).component_name == "geglu" and model.blocks[0].ffn.hidden == 4 * 192


def test_model_level_bias_reaches_components():
    model = olm.build_model(compose_train(["model.bias=true"]).model)
    assert model.blocks[0].attention.qkv.bias is not None and model.blocks[0].ffn.fc.bias is not None


@pytest.mark.parametrize("override,needle", [
    ("model.attention.num_kv_head=2", "num_kv_head"),
    ("model.num_heads=abc", "model.num_heads"),
    ("model.nmu_layers=3", "nmu_layers"),
])
def test_schema_errors_name_the_key(override, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override])
    full = str(info.value) + " " + str(info.value.__cause__)
    assert needle in full


def test_unknown_component_option_lists_it():
    with pytest.raises(MissingConfigException, match="model/attention/gqa2"):
        compose_train(["model/attention=gqa2"])


def test_component_groups_come_from_the_registry():
    from olm import registry
    from hydra.core.config_store import ConfigStore

    register_configs()
    repo = ConfigStore.instance().repo
    for kind in ("attention", "norm", "ffn", "position"):
        assert set(n.removesuffix(".yaml") for n in repo["model"][kind]) == set(registry.names(kind))
