"""Optimizers as registered components: each trains and resumes exactly; parameter groups; muP; bad input."""

import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import olm
from olm import registry
from olm.errors import ConfigError
from olm.train.config import AdamWConfig, LionConfig, MuonConfig, SGDConfig, optimizer_schema
from olm.train.optim import CombinedOptimizer, build_optimizer, parameter_groups, parameter_roles

TINY = dict(name="lm", vocab_size=64, embed_dim=32, num_heads=2, num_layers=2, max_seq_len=16)
CONFIGS = {"adamw": AdamWConfig(lr=3e-3), "muon": MuonConfig(lr=1e-2), "lion": LionConfig(lr=3e-3),
           "sgd": SGDConfig(lr=0.3)}


def batches(n: int, seed: int = 0):
    """Rows counting up in steps of 3 (mod 64) from random starts: the next token is learnable from the last."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (4, 1), generator=g) + 3 * torch.arange(17)) % 64 for _ in range(n)]


def train(model, optimizer, data) -> list[float]:
    losses = []
    for tokens in data:
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_every_registered_optimizer_has_a_schema_a_builder_and_a_config_file():
    from olm.train.config import conf_dir
    from olm.train.optim import BUILDERS

    names = registry.names("optimizer")
    assert names == ["adamw", "lion", "muon", "sgd"]
    for name in names:
        schema = optimizer_schema(name)
        assert schema in BUILDERS and schema().name == name
        assert (conf_dir() / "optim" / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_optimizer_lowers_the_loss_and_resumes_exactly(name):
    """Six steps straight equal three steps, a checkpoint round trip (weights_only, as Lightning loads) and three
    more: parameters bit for bit, so the optimizer's whole state (moments, Muon's momentum, step counts) travels."""
    cfg, data = CONFIGS[name], batches(6)
    torch.manual_seed(0)
    straight = olm.build_model(TINY)
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    losses = train(straight, build_optimizer(straight, cfg, "cpu"), data * 3)  # 18 steps
    assert losses[-1] < 0.7 * losses[0], losses

    def fresh():
        model = olm.build_model(TINY)
        model.load_state_dict(start)
        return model, build_optimizer(model, cfg, "cpu")

    a, opt_a = fresh()
    train(a, opt_a, data)
    b, opt_b = fresh()
    train(b, opt_b, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": b.state_dict(), "optim": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    c, opt_c = fresh()
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["optim"])
    train(c, opt_c, data[3:])
    for (key, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(p, q), key


def test_parameter_groups_by_role_with_multipliers_and_decay():
    model = olm.build_model({**TINY, "tie_embeddings": False})
    roles = parameter_roles(model)
    assert [p for ps in roles.values() for p in ps].__len__() == len(list(model.parameters()))
    assert roles["embedding"] == [model.embedding.token.weight] and roles["head"] == [model.head.linear.weight]
    assert all(p.ndim == 2 for p in roles["hidden"]) and all(p.ndim == 1 for p in roles["vector"])
    cfg = AdamWConfig(lr=1e-3, weight_decay=0.1)
    cfg.lr_multipliers.embedding, cfg.lr_multipliers.vector = 2.0, 0.0
    groups = {g["role"]: g for g in parameter_groups(model, cfg)}
    assert {r: (g["lr"], g["weight_decay"]) for r, g in groups.items()} == {
        "embedding": (2e-3, 0.0), "hidden": (1e-3, 0.1), "head": (1e-3, 0.1), "vector": (0.0, 0.0)}
    tied = parameter_roles(olm.build_model({**TINY, "tie_embeddings": True}))
    assert tied["head"] == []  # the tied head is the embedding table, counted once


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = olm.build_model({**TINY, "ffn": {"name": "moe", "num_experts": 2, "top_k": 1}})
    optimizer = build_optimizer(model, MuonConfig(lr=0.02, adamw_lr=1e-3), "cpu")
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    hidden_3d = [g for g in adamw.param_groups if g["role"] == "hidden"]  # the MoE expert stacks
    assert hidden_3d and all(p.ndim == 3 for p in hidden_3d[0]["params"]) and hidden_3d[0]["lr"] == 1e-3
    assert {g["role"] for g in muon.param_groups} == {"hidden"} and muon.param_groups[0]["lr"] == 0.02
    assert optimizer.param_groups == muon.param_groups + adamw.param_groups  # one list for schedules and clipping


def test_muon_on_a_model_without_hidden_matrices_is_one_line():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(ConfigError, match=r"^optim.name='muon' needs 2-D hidden matrices .*use optim=adamw") as e:
        build_optimizer(model, MuonConfig(), "cpu")
    assert "\n" not in str(e.value)


# ---- muP


MUP_BASE = dict(name="lm", vocab_size=256, num_heads=4, num_layers=2, max_seq_len=32, ff_multiplier=2.0)


def test_mup_coordinate_check_activations_stay_flat_across_widths():
    """After 5 AdamW steps at lr 1e-2, the blocks' outputs grow ~100x from width 32 to 256 in the standard
    parametrization and stay within 1.3x under muP; the logits, which muP starts near zero, stay within 3x."""
    from olm.train.mup import coordinate_check

    widths, adamw = [32, 64, 128, 256], AdamWConfig(lr=1e-2, weight_decay=0.0)
    standard = coordinate_check({**MUP_BASE, "parametrization": "standard"}, widths, adamw)
    mup = coordinate_check({**MUP_BASE, "parametrization": "mup", "mup_base_width": 32}, widths, adamw)

    def spread(sizes, layer):  # largest over smallest width's size before the last step
        last = [sizes[w][layer][-1] for w in widths]
        return max(last) / min(last)

    for layer in ("block_0", "last_block"):
        assert spread(mup, layer) < 1.3 and spread(standard, layer) > 20, (layer, mup, standard)
    assert spread(mup, "logits") < 3 < spread(standard, "logits")
    assert standard[32] == mup[32]  # at the base width both parametrizations are the same model


def test_mup_scales_init_attention_output_and_hidden_learning_rates():
    base = olm.build_model({**MUP_BASE, "embed_dim": 64, "parametrization": "mup", "mup_base_width": 64})
    wide = olm.build_model({**MUP_BASE, "embed_dim": 256, "parametrization": "mup", "mup_base_width": 64})
    standard = olm.build_model({**MUP_BASE, "embed_dim": 256})
    assert base.width_multiplier == 1 and wide.width_multiplier == 4
    assert wide.head.multiplier == 0.25 and standard.head.multiplier == 1
    head_dim = 256 // 4
    assert wide.blocks[0].attention.scale == pytest.approx(head_dim**-0.5 / 2)  # sqrt(base head dim) / head_dim
    std = lambda m: m.blocks[0].ffn.fc.weight.std().item()  # noqa: E731
    assert std(wide) == pytest.approx(std(standard) / 2, rel=0.05)  # variance ~ 1/fan_in
    assert wide.embedding.token.weight.std().item() == pytest.approx(0.02, rel=0.05)  # embeddings keep theirs
    cfg = AdamWConfig(lr=1e-2)
    lrs = {g["role"]: g["lr"] for g in parameter_groups(wide, cfg)}
    assert lrs == {"embedding": 1e-2, "hidden": 1e-2 / 4, "head": 1e-2, "vector": 1e-2}  # head: by its multiplier
    muon = build_optimizer(wide, MuonConfig(lr=1e-2, adjust_lr="original"), "cpu")
    assert muon.optimizers[0].param_groups[0]["lr"] == 1e-2  # Muon's own shape scaling, not muP's 1/m


def test_mup_model_saves_and_loads_with_its_parametrization(tmp_path):
    model = olm.build_model({**MUP_BASE, "embed_dim": 128, "parametrization": "mup", "mup_base_width": 32})
    model.save(tmp_path / "m")
    loaded = olm.nn.Block.load(tmp_path / "m")
    tokens = torch.randint(0, 256, (2, 8))
    assert loaded.width_multiplier == 4 and torch.equal(loaded(tokens), model(tokens))
