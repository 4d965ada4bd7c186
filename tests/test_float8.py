"""FP8 training (``float8``): torchao's Float8Linear swapped into the model's linear layers. On the CPU torch emulates
the FP8 matmuls, which checks which layers are converted, that weights, ties and checkpoint names are kept, and that
the math stays close to full precision; the speed is measured on the GPU (benchmarks/RESULTS.md)."""

import functools
import importlib.util
import logging
import sys
import types

import pytest
import torch

from olm.errors import ConfigError
import olm.train.module
from olm.train.config import AdamWConfig, SchedulerConfig, speed_config
from olm.train.module import LMModule
from olm.train.speed import convert_to_float8

from torchao.float8.float8_linear import Float8Linear  # torchao is a test dependency (the dev extra)

CFG = {"name": "lm", "vocab_size": 64, "embed_dim": 32, "num_heads": 2, "num_layers": 3, "max_seq_len": 16,
       "tie_embeddings": True}


def module(cfg=CFG, **kwargs):
    return LMModule(cfg, AdamWConfig(lr=1e-3), SchedulerConfig(name="constant", warmup_steps=0),
                    speed_config({"fused_loss": False, **kwargs}), max_steps=10, log_every_n_steps=10)


def float8_names(m):
    return sorted(name for name, mod in m.named_modules() if isinstance(mod, Float8Linear))


@pytest.mark.parametrize("head", [False, True])
def test_block_linears_become_fp8_and_weights_ties_and_names_stay(head):
    torch.manual_seed(0)
    ref = module()
    m = module(float8="tensorwise", float8_head=head)
    m.load_state_dict(ref.state_dict())
    weights = {name: p for name, p in m.named_parameters()}
    m.configure_model()
    converted = float8_names(m.model)
    assert len(converted) == 3 * 4 + head  # per block: fused qkv, attention out, FFN in and out
    assert all(name.startswith("layers.") for name in converted)
    assert isinstance(m.model.head.linear, Float8Linear) == head
    assert m.model.head.linear.weight is m.model.embedding.token.weight  # the tie survives the swap
    assert {name: p for name, p in m.named_parameters()} == weights  # the same parameter objects: optimizer state stays
    assert list(m.state_dict()) == list(ref.state_dict())  # checkpoints and exports keep their names
    residual = sorted(n for n, mod in m.model.named_modules() if getattr(mod, "is_residual_out", False))
    assert residual == sorted(n for n, mod in ref.model.named_modules() if getattr(mod, "is_residual_out", False))
    assert len(residual) == 6  # attention and FFN output projections keep their scaled-init mark
    m.configure_model()  # Lightning may call it again: converted once
    assert float8_names(m.model) == converted


def test_fp8_loss_and_gradients_are_close_to_full_precision():
    torch.manual_seed(0)
    ref = module()
    m = module(float8=True)  # true means tensorwise
    m.load_state_dict(ref.state_dict())
    m.configure_model()
    assert m.float8 == "tensorwise"
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    ref_loss, loss = ref.loss(x, y), m.loss(x, y)
    ref_loss.backward()
    loss.backward()
    assert loss.item() != ref_loss.item()  # it really rounds to FP8
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine.item())


@pytest.mark.parametrize("scope,checkpointing", [("model", False), ("blocks", True)])
def test_compiled_fp8_equals_eager_fp8(scope, checkpointing, monkeypatch):
    """Conversion happens before compilation, so the compiled graphs hold the FP8 casts (aot_eager on the CPU)."""
    torch.manual_seed(0)
    eager = module(float8="tensorwise")
    eager.configure_model()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    m = module(float8="tensorwise", compile=True, compile_scope=scope, activation_checkpointing=checkpointing)
    m.configure_model()
    m.load_state_dict(eager.state_dict())
    assert len(float8_names(m.model)) == 12
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ref_loss, loss = eager.loss(x, y), m.loss(x, y)
    ref_loss.backward()
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for (name, p), (_, q) in zip(m.named_parameters(), eager.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_rowwise_recipe_and_what_is_not_converted(caplog):
    moe = {"name": "lm", "vocab_size": 64, "embed_dim": 32, "num_heads": 2, "num_layers": 1, "max_seq_len": 16,
           "ffn": {"name": "moe", "hidden_dim": 48, "num_experts": 16, "top_k": 2}}
    m = module(moe, float8="rowwise")
    with caplog.at_level(logging.INFO, logger="olm"):
        m.configure_model()
    assert float8_names(m.model) == ["layers.1.layers.1.proj", "layers.1.layers.1.qkv"]  # attention only
    config = m.model.layers[1].layers[1].qkv.config
    assert config.cast_config_input.scaling_granularity.name == "AXISWISE"  # rowwise: one scale per row
    message = caplog.text
    assert "float8=rowwise: 2 linear layers in FP8" in message
    assert "layers.1.layers.3.router (MoE router)" in message  # experts are not nn.Linear layers
    assert "layers.2.layers.1 (output head, float8_head=false)" in message


def test_layers_whose_dimensions_are_not_multiples_of_16_are_kept_and_none_is_an_error():
    odd = {**CFG, "embed_dim": 24, "num_heads": 2}
    with pytest.raises(ConfigError, match=r"^float8=tensorwise: no linear layer qualifies \(set float8=false\); kept: .*24x72 not mult"):
        module(odd, float8="tensorwise").configure_model()
    model = module().model
    assert convert_to_float8(model, "tensorwise", head=True) == (13, [])
    odd_head = {**CFG, "vocab_size": 60}  # a 32x60 head
    with pytest.raises(ConfigError) as info:
        module(odd_head, float8="tensorwise", float8_head=True).configure_model()
    assert str(info.value) == "float8_head=true: the output head is 32x60, FP8 needs multiples of 16; set float8_head=false"
    m = module(odd_head, float8="tensorwise")  # without the head: converted, the head named as kept
    m.configure_model()
    assert len(float8_names(m.model)) == 12


@pytest.mark.parametrize("kwargs,message", [
    ({"float8": "fp8"}, "float8='fp8' must be false, true (= tensorwise), tensorwise, rowwise"),
    ({"float8_head": True}, "float8_head=true needs float8 on (float8=tensorwise or rowwise)"),
    ({"float8": "rowwise", "float8_head": "maybe"}, "float8_head='maybe': Value 'maybe' is not a valid bool (type str)"),
])
def test_bad_float8_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as info:
        module(**kwargs)
    assert str(info.value) == message


def test_missing_torchao_and_fused_loss_with_fp8_head_are_one_line_errors(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        module(float8="tensorwise")  # at construction: before data, trainer or processes
    assert str(info.value) == "float8=tensorwise needs torchao (pip install 'olm[perf]')"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # the function on its own: the import fails
    with pytest.raises(ConfigError, match=r"^float8=rowwise needs torchao \(pip install 'olm\[perf\]'\)$"):
        convert_to_float8(module().model, "rowwise")
    monkeypatch.undo()
    for fused_loss in (True, "auto"):
        m = module(fused_loss=fused_loss, float8="tensorwise", float8_head=True)
        # as when liger-kernel's fused loss is in use
        monkeypatch.setattr(olm.train.module, "fused_cross_entropy", lambda *args: object())
        with pytest.raises(ConfigError, match=f"^float8_head=true does not apply with fused_loss={str(fused_loss).lower()} "):
            m.configure_model()


def test_gpus_without_fp8_matmuls_are_refused(monkeypatch):
    m = module(float8="tensorwise")
    m._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as info:
        m.configure_model()
    assert str(info.value) == ("float8=tensorwise needs a GPU with FP8 matmuls (compute capability 8.9+); "
                               "NVIDIA A100-SXM4-80GB has 8.0; set float8=false")


@pytest.mark.slow
def test_olm_train_with_float8_follows_full_precision_and_exports_a_plain_model(tmp_path):
    """The config keys reach the module; the loss curve stays within 1% of full precision's; the export loads into
    the plain model (nn.Linear layers) with the trained weights; the checkpoint resumes. (Short: torch's FP8 matmul
    is a slow reference implementation on the CPU.)"""
    import json

    from olm.nn.structure import Block
    from test_train import run, train_losses

    common = ["trainer.val_check_interval=4", "data.val_batches=1", "sample.max_new_tokens=0"]
    full, _ = run(tmp_path, tmp_path / "cache", [*common, "trainer.max_steps=8", "logger=csv", "export=false"], name="full")
    out, _ = run(tmp_path, tmp_path / "cache", [*common, "float8=tensorwise", "float8_head=true", "trainer.max_steps=8",
                                                "logger=csv"])
    fp8_losses, full_losses = train_losses(out), train_losses(full)
    assert list(fp8_losses) == list(full_losses) and len(fp8_losses) == 8
    assert list(fp8_losses.values()) == pytest.approx(list(full_losses.values()), rel=0.01)
    assert fp8_losses != full_losses  # FP8 rounding did happen
    exported = Block.load(out / "model")
    assert not any(isinstance(m, Float8Linear) for m in exported.modules())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    exported_state = exported.state_dict()
    assert exported_state.keys() == trained.keys()
    assert all(torch.equal(exported_state[k], trained[k]) for k in trained)
    resumed, _ = run(tmp_path, tmp_path / "cache", [*common, "float8=tensorwise", "float8_head=true", "trainer.max_steps=12",
                                                    "logger=none", "export=false", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"],
                     name="resumed")
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 12
