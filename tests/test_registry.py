"""Registry: every component builds and trains, errors are one line with suggestions, plugins, save/load."""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

import olm
from olm import registry
from olm.nn import Block, LM
from olm.registry import ConfigError

from conftest import TINY

VARIANTS = {
    "attention": [{"name": "mha"}, {"name": "gqa", "num_kv_heads": 2}, {"name": "mqa"}, {"name": "sliding_window", "window": 4},
                  {"name": "mha", "qk_norm": "rmsnorm"}, {"name": "mha", "softcap": 30.0}],
    "norm": ["layernorm", "rmsnorm", {"name": "layernorm", "affine": False}],
    "ffn": ["swiglu", "geglu", "gelu_mlp", {"name": "gelu_mlp", "activation": "relu"}],
    "position": ["rope", "learned", "alibi", "none", {"name": "rope", "scaling": {"type": "llama3", "factor": 8.0, "original_max_seq_len": 16}}],
}


def test_builtin_kinds_and_names():
    assert {"mha", "gqa", "mqa", "sliding_window"} <= set(registry.names("attention"))
    assert {"layernorm", "rmsnorm"} <= set(registry.names("norm"))
    assert {"swiglu", "geglu", "gelu_mlp"} <= set(registry.names("ffn"))
    assert {"rope", "learned", "alibi", "none"} <= set(registry.names("position"))
    assert registry.names("block") == ["transformer"] and registry.names("head") == ["output_head"]
    assert "lm" in registry.names("model")


@pytest.mark.parametrize("kind,spec", [(k, s) for k, specs in VARIANTS.items() for s in specs])
def test_every_component_builds_trains_and_is_causal(kind, spec):
    torch.manual_seed(0)
    model = olm.build_model({**TINY, kind: spec})
    x = torch.randint(0, 64, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 64) and torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    model.eval()
    torch.testing.assert_close(model(x)[:, :8], model(changed)[:, :8])


def test_gqa_matches_mha_with_repeated_kv_heads():
    """GQA is MHA whose K/V heads are shared: expanding the K/V weights gives identical outputs."""
    torch.manual_seed(0)
    gqa = olm.build_model({**TINY, "attention": {"name": "gqa", "num_kv_heads": 2}}).eval()
    mha = olm.build_model(TINY).eval()
    state = gqa.state_dict()
    for i in range(TINY["num_layers"]):
        w = state[f"layers.{i + 1}.layers.1.qkv.weight"]  # rows: 4 q heads, 2 k heads, 2 v heads (8 each)
        q, k, v = w.split([32, 16, 16])
        rep = lambda t: t.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
        state[f"layers.{i + 1}.layers.1.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_context():
    torch.manual_seed(0)
    model = olm.build_model({**TINY, "num_layers": 1, "attention": {"name": "sliding_window", "window": 3}}).eval()
    x = torch.randint(0, 64, (1, 10))
    changed = x.clone()
    changed[0, 2] = (x[0, 2] + 1) % 64
    a, b = model(x), model(changed)
    assert not torch.allclose(a[0, 4], b[0, 4])  # position 4 sees 2, 3, 4
    torch.testing.assert_close(a[0, 5:], b[0, 5:])  # position 5 on sees only 3, 4, 5 and later


@pytest.mark.parametrize("bad,message", [
    ({"attention": "gqa2"}, "model.attention='gqa2' is not a registered attention; did you mean 'gqa'? known: gqa, mha, mla, mqa, sliding_window"),
    ({"attention": {"name": "gqa", "num_kv_head": 2}}, "model.attention.num_kv_head is not a parameter of attention 'gqa'; did you mean 'num_kv_heads'?"),
    ({"nrom": "rmsnorm"}, "model.nrom is not a parameter of model 'lm'; did you mean 'norm'?"),
    ({"norm": "rmsnrom"}, "model.norm='rmsnrom' is not a registered norm; did you mean 'rmsnorm'?"),
    ({"num_heads": 5}, "model.embed_dim=32 must be divisible by model.num_heads=5"),
    ({"attention": {"name": "gqa", "num_kv_heads": 3}}, "model.attention.num_kv_heads=3 must divide num_heads=4"),
    ({"num_kv_heads": 2}, "model.num_kv_heads=2 does not apply to attention 'mha'; use one of: gqa, sliding_window"),
    ({"dropout": 1.5}, "model.dropout=1.5 must be in [0, 1)"),
    ({"dropout": -0.1}, "model.dropout=-0.1 must be in [0, 1)"),
    ({"num_layers": "four"}, "model.num_layers='four' must be an integer"),
    ({"attention": {"name": "mha", "embed_dim": 8}}, "model.attention.embed_dim is set by the enclosing block"),
    ({"ffn": {"name": "gelu_mlp", "activation": "tanhh"}}, "model.ffn.activation='tanhh' is not known; known: gelu, gelu_tanh"),
    ({"name": "lmm"}, "model.name='lmm' is not a registered model; did you mean 'lm'?"),
])
def test_config_errors_are_one_line(bad, message):
    with pytest.raises(ConfigError) as info:
        olm.build_model({**TINY, **bad})
    text = str(info.value)
    assert "\n" not in text
    assert message in text


def test_registration_clash_fails_loudly():
    with pytest.raises(ConfigError, match="norm 'rmsnorm' is already registered by olm.nn.norms.RMSNorm"):
        @registry.register("norm", "rmsnorm")
        class MyNorm(Block):
            def __init__(self, dim: int):
                super().__init__()


def test_plugin_module_through_imports(tmp_path, monkeypatch):
    (tmp_path / "my_blocks.py").write_text(textwrap.dedent('''
        import torch
        from olm.nn import Block
        from olm.registry import register

        @register("norm", "scalenorm_test")
        class ScaleNorm(Block):
            """ScaleNorm: x * g / ||x||."""
            def __init__(self, dim: int, eps: float = 1e-5):
                super().__init__()
                self.g = torch.nn.Parameter(torch.tensor(dim ** 0.5))
                self.eps = eps
            def forward(self, x):
                return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = olm.build_model({**TINY, "imports": ["my_blocks"], "norm": "scalenorm_test"})
    assert type(model.blocks[0].layers[0]).__name__ == "ScaleNorm"
    saved = model.save(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["block"]["imports"] == ["my_blocks"]
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(Block.load(saved)(x), model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"model.imports\[0\]='no_such_module' cannot be imported"):
        olm.build_model({**TINY, "imports": ["no_such_module"]})


def test_entry_point_plugins_are_loaded(monkeypatch):
    calls = []

    class FakeEntryPoint:
        name, value = "demo", "demo_pkg.blocks"

        def load(self):
            calls.append(self.value)

    import importlib.metadata

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    registry.load_plugins()
    assert calls == ["demo_pkg.blocks"]


@pytest.mark.parametrize("overrides", [{}, {"attention": {"name": "gqa", "num_kv_heads": 2}, "norm": "rmsnorm", "position": "learned", "tie_embeddings": True}])
def test_save_load_round_trip_is_bit_identical(tmp_path, overrides):
    torch.manual_seed(0)
    model = olm.build_model({**TINY, **overrides}).eval()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Block.load(tmp_path / "m").eval()
    assert isinstance(loaded, LM) and loaded.to_config() == model.to_config()
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(x), model(x))
    if overrides.get("tie_embeddings"):
        assert loaded.head.linear.weight is loaded.embedding.token.weight


def test_load_errors_name_the_file(tmp_path):
    model = olm.build_model(TINY)
    model.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors cannot be loaded"):
        Block.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        Block.load(tmp_path / "missing")


def test_components_cli_lists_parameters(capsys):
    from olm.cli import main

    assert main(["components", "attention"]) == 0
    out = capsys.readouterr().out
    assert "gqa(" in out and "num_kv_heads: int = 1" in out and "sliding_window(" in out and "window: int = 4096" in out
    assert main(["components"]) == 0
    out = capsys.readouterr().out
    for kind in ("attention:", "norm:", "ffn:", "position:", "block:", "head:", "model:"):
        assert kind in out
