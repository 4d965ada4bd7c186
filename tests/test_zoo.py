"""Model zoo: every family matches Hugging Face transformers (logits, loss, one optimizer step), exports back, presets
have the published parameter counts, and conversion errors are one line."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import olm
from olm.cli import main as cli_main
from olm.nn import LM
from olm.registry import ConfigError
from olm.zoo import FAMILIES, PRESETS, count_parameters, from_hf, preset_config, to_hf

from test_config import compose_train

HF_REASON = "transformers is not installed: parity tests need the [hf] extra (pip install -e '.[hf]')"
CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "gemma2": "Gemma2Config", "phi3": "Phi3Config", "olmo": "OlmoConfig", "opt": "OPTConfig",
                  "mixtral": "MixtralConfig", "stablelm": "StableLmConfig", "qwen3": "Qwen3Config",
                  "qwen3_moe": "Qwen3MoeConfig", "gemma3": "Gemma3TextConfig", "olmo2": "Olmo2Config",
                  "smollm3": "SmolLM3Config", "gpt_oss": "GptOssConfig", "deepseek_v3": "DeepseekV3Config"}
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "opt": dict(dropout=0.0)}


NEW_FAMILIES = ["qwen3", "qwen3_moe", "gemma3", "olmo2", "smollm3", "gpt_oss", "deepseek_v3"]


def tiny_hf(family: str, **overrides):
    """A random tiny transformers model of ``family`` from its ``<family>_tiny`` preset (no network). Norm weights,
    biases, attention sinks and routing biases start at constants in transformers; they get random offsets here so
    that a wrong mapping of any of them shows in the logits."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    hf = {**PRESETS[f"{family}_tiny"].hf, **NO_DROPOUT.get(family, {}), **overrides}
    config = getattr(transformers, CONFIG_CLASSES[family])(**hf, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dtype.is_floating_point and any(k in name for k in ("norm", "bias", "sinks")):
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return model


def lm_loss(logits, x):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_logits_loss_and_step(family, batch):
    hf = tiny_hf(family)
    model = from_hf(hf).eval()
    out = hf(batch, labels=batch)
    logits = model(batch)
    assert (out.logits - logits).abs().max() < 1e-4
    loss = lm_loss(logits, batch)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    # One SGD step on each side lands on the same weights.
    for m, l in ((hf, out.loss), (model, loss)):
        l.backward()
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    stepped = from_hf(hf).state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stepped[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_equal_logits(family, batch, tmp_path):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    model = from_hf(tiny_hf(family)).eval()
    to_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [FAMILIES[family].architecture]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (back(batch).logits - model(batch)).abs().max() < 1e-4


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_generation_with_the_kv_cache_equals_transformers(family):
    """32 greedy tokens with olm's KV cache (latent cache for MLA, sliding windows shorter than the sequence) are
    transformers' own generate()."""
    from olm.generate import generate

    hf = tiny_hf(family)
    model = from_hf(hf).eval()
    prompt = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(4))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 32, temperature=0), expected)


def _random_lm(preset: str) -> LM:
    torch.manual_seed(0)
    model = olm.build_model(preset_config(preset)).eval()
    for p in model.parameters():  # non-trivial norms too, so offsets (Gemma's w - 1) are exercised
        p.data.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_without_transformers(family, batch, tmp_path):
    model = _random_lm(f"{family}_tiny")
    to_hf(model, tmp_path, max_shard_bytes=40_000)  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = from_hf(tmp_path).eval()
    torch.testing.assert_close(back(batch), model(batch))


def test_gpt2_small_preset_with_padded_vocab_exports_real_vocab(tmp_path):
    """conf/model/gpt2_small pads 50257 -> 50304 rows for speed; export cuts the padding, import restores the model."""
    cfg = {**preset_config("gpt2_tiny"), "pad_vocab_to": 64}
    model = olm.build_model(cfg).eval()
    to_hf(model, tmp_path)
    back = from_hf(tmp_path).eval()
    assert back.embedding.token.weight.shape[0] == 100
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(back(x), model(x)[..., :100])


@pytest.mark.parametrize("preset, keys", [("gpt2_tiny", ["attn_pdrop", "resid_pdrop", "embd_pdrop"]),
                                          ("opt_tiny", ["dropout", "attention_dropout"])])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_export_writes_olms_dropout_not_the_family_default(preset, keys, dropout, tmp_path):
    """GPT2Config and OPTConfig default to 0.1 dropout; an exported olm model trains in transformers with its own."""
    model = olm.build_model({**preset_config(preset), "dropout": dropout})
    to_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [config[k] for k in keys] == [dropout] * len(keys)


def test_moe_aux_loss_matches_mixtral():
    hf = tiny_hf("mixtral", num_hidden_layers=1, output_router_logits=True)
    model = from_hf(hf).eval()
    x = torch.randint(0, 100, (2, 16))
    out = hf(x)
    model(x)
    torch.testing.assert_close(model.aux_loss(), hf.config.router_aux_loss_coef * out.aux_loss)
    dense = olm.build_model(preset_config("llama_tiny"))
    dense(x)
    assert dense.aux_loss() is None


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.published_params])
def test_preset_parameter_count_matches_published(name):
    preset = PRESETS[name]
    assert abs(count_parameters(preset.config()) / preset.published_params - 1) < 0.01


def _signature(model: LM) -> list:
    """What determines a model's function: module types, parameter shapes and the behaviour-relevant settings."""
    out = [(model.embedding.scale, model.head.softcap, model.head.linear.weight is model.embedding.token.weight)]
    for name, module in model.named_modules():
        entry = [name, type(module).__name__, [tuple(p.shape) for p in module.parameters(recurse=False)]]
        for attr in ("num_heads", "num_kv_heads", "head_dim", "window", "softcap", "scale", "causal", "eps", "offset",
                     "rotary_dim", "top_k", "normalize_top_k", "aux_loss_coef", "post_norms"):
            entry.append(getattr(module, attr, None))
        if type(module).__name__ == "RotaryEmbedding":
            entry += [module.config["base"], module.config["scaling"]]
        entry.append(getattr(module, "config", {}).get("activation"))
        out.append(entry)
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_preset_agrees_with_python(name):
    """conf/model/<name>.yaml builds the same model as olm.zoo.presets (compared at two layers to stay quick)."""
    cfg = OmegaConf.to_container(compose_train([f"model={name}", f"data.vocab_size={PRESETS[name].hf['vocab_size']}"]).model, resolve=True)
    python = preset_config(name)
    assert cfg["num_layers"] == python["num_layers"]
    padding = {"pad_vocab_to": 64} if name == "gpt2_small" else {}  # the older preset pads 50257 -> 50304 for speed
    with torch.device("meta"):
        from_yaml = olm.build_model({**cfg, "num_layers": 2})
        from_python = olm.build_model({**python, **padding, "num_layers": 2})
    assert _signature(from_yaml) == _signature(from_python)


@pytest.mark.parametrize("bad,message", [
    (lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]})),
     "architecture 'FooForCausalLM' is not supported; known: GPT2LMHeadModel"),
    (lambda d: _drop_tensor(d, "model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda d: _edit_config(d, intermediate_size=100), "shape mismatch for model.layers.0.mlp.gate_proj.weight (96, 64)"),
    (lambda d: _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic' is not supported"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickle files are not read"),
])
def test_conversion_errors_are_one_line(bad, message, tmp_path):
    to_hf(_random_lm("llama_tiny"), tmp_path)
    bad(tmp_path)
    with pytest.raises((ConfigError, FileNotFoundError)) as info:
        from_hf(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_tensor(directory, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors")


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="cannot export to llama: sliding-window attention needs mistral"):
        to_hf(_random_lm("mistral_tiny"), tmp_path, family="llama")
    with pytest.raises(ConfigError, match="family='llama4' is not known"):
        to_hf(_random_lm("mistral_tiny"), tmp_path, family="llama4")


def test_cli_models_and_convert(tmp_path, capsys):
    assert cli_main(["models", "--family", "llama"]) == 0
    listing = capsys.readouterr().out
    assert "llama3_8b" in listing and "8.03B" in listing and "131072" in listing and "gpt2" not in listing
    model = _random_lm("qwen2_tiny")
    model.save(tmp_path / "olm")
    assert cli_main(["convert", "--to-hf", str(tmp_path / "olm"), "--out", str(tmp_path / "hf")]) == 0
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(LM.load(tmp_path / "back")(x), model(x))
    assert cli_main(["convert", "--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_cli_converts_the_2025_families_both_ways(family, tmp_path):
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    model = _random_lm(f"{family}_tiny")
    model.save(tmp_path / "olm")
    assert cli_main(["convert", "--to-hf", str(tmp_path / "olm"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    x = torch.randint(0, 100, (1, 12))
    torch.testing.assert_close(LM.load(tmp_path / "back")(x), model(x))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert (hf(x).logits - model(x)).abs().max() < 1e-4


def test_imported_model_shares_rope_tables_and_moves(tmp_path):
    """from_hf builds on the meta device: the RoPE tables come back computed once, shared, and follow .to()."""
    model = from_hf(tiny_hf("llama"))
    positions = [b.attention.position for b in model.blocks]
    assert len({p.cos.data_ptr() for p in positions}) == 1 and not positions[0].cos.is_meta
    fresh = type(model).from_config(model.to_config())
    assert torch.equal(positions[0].cos, fresh.blocks[0].attention.position.cos)
    model.to(torch.float64)
    assert len({p.cos.data_ptr() for p in positions}) == 1 and positions[0].cos.dtype == torch.float32
    x = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(model(x)).all()


# rope_theta 50 on head_dim 16 puts the interpolation ramp inside the 8 frequencies at these short lengths.
YARN = [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 50.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "rope_theta": 50.0, "beta_fast": 1.0,
     "beta_slow": 0.05, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("rope", YARN)
def test_yarn_rope_matches_transformers_and_round_trips(family, rope, batch, tmp_path):
    """YaRN context extension: logits equal transformers' past the original length (16 tokens vs 8 or 4), the
    attention factor included, and export gives back the same rope_parameters."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from olm.nn.position import _rope_inverse_frequencies

    hf = tiny_hf(family, rope_parameters=rope, rope_scaling=None)
    model = from_hf(hf).eval()
    scaling = model.blocks[0].attention.position.config["scaling"]
    assert scaling["type"] == "yarn" and scaling["original_max_seq_len"] == rope["original_max_position_embeddings"]
    interpolated = _rope_inverse_frequencies(16, 50.0, scaling) != _rope_inverse_frequencies(16, 50.0, None)
    assert 0 < interpolated.sum() < 8  # some frequencies kept, some interpolated: the ramp is exercised
    with torch.no_grad():
        assert (hf(batch).logits - model(batch)).abs().max() < 1e-4
    to_hf(model, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    assert {k: exported[k] for k in rope} == rope
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (back(batch).logits - model(batch)).abs().max() < 1e-4


def test_rope_scaling_keys_are_checked():
    base = {"name": "lm", "vocab_size": 64, "embed_dim": 32, "num_heads": 2, "num_layers": 1, "max_seq_len": 16}
    for scaling, message in [
        ({"type": "yarn", "factor": 4.0}, "scaling.original_max_seq_len must be set for yarn scaling"),
        ({"type": "yarn", "factor": 4.0, "original_max_seq_len": 8, "beta": 3}, "scaling.beta is not a yarn scaling key; known: attention_factor, beta_fast"),
        ({"type": "yarn", "factor": 4.0, "original_max_seq_len": 8, "beta_fast": 0}, "scaling.beta_fast=0 must be a positive number"),
        ({"type": "ntk", "factor": 4.0}, "scaling.type='ntk' is not supported; known: linear, llama3, yarn, longrope"),
        ({"type": "longrope", "factor": 4.0, "original_max_seq_len": 8, "short_factor": [1.0], "long_factor": [1.0]}, "scaling.short_factor must be 8 positive numbers"),
        ({"type": "linear", "factor": -1}, "scaling.factor=-1 must be a positive number"),
    ]:
        with pytest.raises(ConfigError) as info:
            olm.build_model({**base, "position": {"name": "rope", "scaling": scaling}})
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("length", [6, 16])
def test_longrope_matches_transformers_below_and_past_the_original_length(length, tmp_path):
    """Phi-3 128k style LongRoPE: the short factors up to the original length (8), the long ones past it."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    short, long = [1.0, 1.3, 2.0, 3.0], [1.0, 2.5, 6.0, 16.0]  # phi3_tiny rotates 8 of 16 dims: 4 pairs
    rope = {"rope_type": "longrope", "rope_theta": 50.0, "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": 8}
    hf = tiny_hf("phi3", rope_parameters=rope, original_max_position_embeddings=8)
    model = from_hf(hf).eval()
    position = model.blocks[0].attention.position
    assert position.long_after == 8 and not torch.equal(position.cos, position.long_cos)
    x = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    to_hf(model, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["original_max_position_embeddings"] == 8
    assert {k: exported["rope_parameters"][k] for k in ("short_factor", "long_factor")} == {"short_factor": short, "long_factor": long}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max() < 1e-4


def test_yarn_import_extends_the_context_and_reads_zero_betas_as_defaults():
    """Qwen2.5-style configs keep max_position_embeddings at the original length; olm's model gets factor x original
    positions (transformers has no limit), and beta_fast/beta_slow = 0 mean the defaults there."""
    pytest.importorskip("transformers", reason=HF_REASON)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 50.0,
            "beta_fast": 0.0, "beta_slow": None}
    hf = tiny_hf("qwen2", rope_parameters=rope, rope_scaling=None, max_position_embeddings=8)
    model = from_hf(hf).eval()
    scaling = model.blocks[0].attention.position.config["scaling"]
    assert model.max_seq_len == 32 and "beta_fast" not in scaling and "beta_slow" not in scaling
    x = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4


def test_yarn_cannot_be_exported_as_phi3(tmp_path):
    cfg = preset_config("phi3_tiny")
    cfg["position"] = {**cfg["position"], "scaling": {"type": "yarn", "factor": 4.0, "original_max_seq_len": 8}}
    with pytest.raises(ConfigError, match=r"^cannot export to phi3: yarn rope scaling \(transformers' Phi-3 reads longrope only\)$"):
        to_hf(olm.build_model(cfg), tmp_path)


CONFIG_PRESETS = {"lm_tiny": "stablelm", "lm_small": "stablelm", "llama_small": "llama", "gpt2_small": "gpt2",
                  "attn2025_mha": "stablelm", "attn2025_gqa": "stablelm"}
# attention_2025's variants that no Hugging Face family expresses: `olm models` says so, with the reason.
NOT_EXPORTABLE = {"attn2025_local_global": "cannot export to stablelm: no sliding window",
                  "attn2025_mla": "cannot export to deepseek_v3: needs pre-norm rmsnorm"}


def test_every_config_preset_is_listed_here(capsys):
    from olm.cli import config_presets

    listed = set(CONFIG_PRESETS) | set(NOT_EXPORTABLE)
    assert {name for name in config_presets() if name not in PRESETS} | {"gpt2_small"} == listed
    assert cli_main(["models", "--family", "config"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name, family in CONFIG_PRESETS.items():
        assert name == "gpt2_small" or f"; exports as {family})" in rows[name], rows[name]
    for name, reason in NOT_EXPORTABLE.items():
        assert f"; not exportable: {reason}" in rows[name], rows[name]


@pytest.mark.parametrize("preset,family", sorted(CONFIG_PRESETS.items()))
def test_config_presets_export_with_logits_parity(preset, family, batch, tmp_path):
    """make train's default (lm_small) and the config tree's other presets leave olm: the inferred family loads in
    transformers with the same logits (two layers, random non-trivial weights)."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    cfg = compose_train([f"model={preset}", "data.vocab_size=100", "model.num_layers=2"]).model
    torch.manual_seed(0)
    model = olm.build_model(cfg).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    to_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (back(batch).logits - model(batch)[..., :100]).abs().max() < 1e-4


def test_convert_takes_a_run_dir_and_keeps_the_tokenizer_both_ways(tmp_path, capsys):
    """A run dir (its model/ and tokenizer) -> HF dir with the tokenizer -> olm model dir with its tokenizer/, which
    olm generate samples from; --tokenizer names another."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from olm.data.tokenizers import EOS, HFTokenizer, train_bpe

    corpus = ["def add(a, b):\n    return a + b\n" * 20, "class Point:\n    x: int = 0\n" * 20]
    tokenizer = HFTokenizer(train_bpe(corpus, 300), "bpe", 300, EOS)
    torch.manual_seed(0)
    cfg = compose_train(["model=lm_tiny", f"data.vocab_size={tokenizer.vocab_size}"]).model
    model = olm.build_model(cfg).eval()
    run = tmp_path / "run"
    model.save(run / "model")
    tokenizer.save(run / "model" / "tokenizer")
    assert cli_main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("def add")["input_ids"] == tokenizer.encode("def add")
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer" / "tokenizer.json").is_file()
    x = torch.tensor([tokenizer.encode("def add(a, b):")])
    torch.testing.assert_close(LM.load(tmp_path / "back")(x), model(x))
    capsys.readouterr()
    greedy = ["--prompt", "def add", "--max-new-tokens", "8", "--temperature", "0"]
    assert cli_main(["generate", "--ckpt", str(tmp_path / "back"), *greedy]) == 0
    imported = capsys.readouterr().out
    assert cli_main(["generate", "--ckpt", str(run), *greedy]) == 0
    assert imported == capsys.readouterr().out and imported.startswith("def add")
    (tmp_path / "bare").mkdir()
    model.save(tmp_path / "bare" / "model")  # no tokenizer: --tokenizer names one (the HF dir's tokenizer.json)
    assert cli_main(["generate", "--ckpt", str(tmp_path / "bare"), "--tokenizer", str(tmp_path / "hf"), *greedy]) == 0
    assert capsys.readouterr().out == imported
    assert cli_main(["generate", "--ckpt", str(tmp_path / "bare"), "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --tokenizer {str(tmp_path / 'nowhere')!r} does not exist")
    assert cli_main(["convert", "--to-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --to-hf {str(tmp_path / 'empty')!r} does not exist")


def test_gemma3_reads_the_older_rope_fields():
    """Hub files of Gemma 3 give rope_theta / rope_scaling for the global layers and rope_local_base_freq for the
    local ones (transformers 5 writes rope_parameters per layer type); both read alike."""
    hf = {k: v for k, v in PRESETS["gemma3_tiny"].hf.items() if k != "rope_parameters"}
    old = FAMILIES["gemma3"].to_olm({**hf, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                     "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    new = FAMILIES["gemma3"].to_olm({**hf, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert old == new and old["position"]["scaling"] == {"type": "linear", "factor": 8.0}
    assert [o.get("position") for o in old["block_overrides"]] == [{"name": "rope", "base": 1e4}] * 2 + [None]
