"""The documented olm.nn.blocks API: signatures, structure, shapes, causality, gradients, parameter counts."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from olm.nn import Block
from olm.nn.blocks import LM, OutputHead, QKVProjection, TransformerBlock
from olm.nn.ffn import hidden_size
from olm.nn.norms import LayerNorm


def _positional(cls):
    return [(p.name, p.default) for p in inspect.signature(cls).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]


def test_documented_signatures():
    e = inspect.Parameter.empty
    assert _positional(LM) == [
        ("vocab_size", e), ("embed_dim", e), ("num_heads", e), ("num_layers", e), ("max_seq_len", e),
        ("dropout", 0.0), ("causal", True), ("ff_multiplier", 2.5),
    ]
    assert _positional(TransformerBlock) == [
        ("embed_dim", e), ("num_heads", e), ("max_seq_len", e), ("dropout", 0.0), ("causal", False), ("ff_multiplier", 2.5),
    ]
    assert _positional(OutputHead) == [("embed_dim", e), ("vocab_size", e), ("bias", False)]
    for cls in (LM, TransformerBlock, OutputHead, QKVProjection):
        assert issubclass(cls, Block) and issubclass(cls, nn.Module)


def test_lm_structure_and_shapes():
    model = LM(100, 32, 4, 3, 16)
    assert isinstance(model.layers, nn.ModuleList)
    assert isinstance(model.layers[0].token, nn.Embedding)
    assert [type(m) for m in model.layers[1:-1]] == [TransformerBlock] * 3
    assert isinstance(model.layers[-1], OutputHead)
    assert model.causal is True
    logits = model(torch.randint(0, 100, (2, 16)))
    assert logits.shape == (2, 16, 100)


def test_transformer_block_default_structure():
    block = TransformerBlock(32, 4, 16)
    norm1, attn, norm2, ffn = block.layers
    assert isinstance(norm1, LayerNorm) and isinstance(norm2, LayerNorm)
    assert type(attn).component_name == "mha" and attn.num_kv_heads == 4 and attn.causal is False
    assert type(attn.position).component_name == "rope"
    assert type(ffn).component_name == "swiglu"
    assert ffn.hidden == hidden_size(32, 2.5) == 80  # ceil(2.5 * 32)
    x = torch.randn(2, 16, 32)
    assert block(x).shape == x.shape


def test_transformer_block_matches_reference_math():
    """Pre-norm residual structure, written out by hand with F.layer_norm / SDPA / SwiGLU and RoPE."""
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 16, causal=True).eval()
    x = torch.randn(2, 10, 32)
    norm1, attn, norm2, ffn = block.layers
    h = F.layer_norm(x, (32,), norm1.weight, norm1.bias)
    q, k, v = attn.qkv(h).split(32, dim=-1)
    q, k, v = (t.view(2, 10, 4, 8).transpose(1, 2) for t in (q, k, v))
    pos = torch.arange(10, dtype=torch.float64)[:, None] / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    cos, sin = torch.cat([pos, pos], -1).cos().float(), torch.cat([pos, pos], -1).sin().float()
    rot = lambda t: t * cos + torch.cat([-t[..., 4:], t[..., :4]], -1) * sin
    scores = (rot(q) @ rot(k).transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 32)
    h1 = x + attn.proj(a)
    g, u = ffn.fc(F.layer_norm(h1, (32,), norm2.weight, norm2.bias)).chunk(2, -1)
    expected = h1 + ffn.proj(F.silu(g) * u)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_embed_dim_not_divisible_raises_value_error():
    with pytest.raises(ValueError, match="embed_dim=30 must be divisible by num_heads=4"):
        TransformerBlock(30, 4, 16)
    with pytest.raises(ValueError, match="divisible"):
        LM(10, 30, 4, 1, 16)


def test_output_head():
    head = OutputHead(16, 50)
    assert isinstance(head.layers[0], LayerNorm) and isinstance(head.layers[1], nn.Linear)
    assert head.layers[1].bias is None and OutputHead(16, 50, bias=True).layers[1].bias is not None
    x = torch.randn(3, 5, 16)
    expected = head.layers[1](F.layer_norm(x, (16,), head.layers[0].weight, head.layers[0].bias))
    torch.testing.assert_close(head(x), expected)


@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal", "orthogonal"])
def test_qkv_projection(init):
    torch.manual_seed(0)
    proj = QKVProjection(64, 64, init=init)
    x = torch.randn(2, 7, 64)
    q, k, v = proj(x)
    assert q.shape == k.shape == v.shape == (2, 7, 64)
    torch.testing.assert_close(q, x @ proj.W_q.weight.T)
    if init == "normal":
        assert abs(proj.W_q.weight.std().item() - 0.02) < 0.002
    if init == "xavier_uniform":
        bound = math.sqrt(6 / (64 + 64))
        assert proj.W_k.weight.abs().max() <= bound


def test_qkv_projection_bad_init():
    with pytest.raises(ValueError, match="init='he'.*known: xavier_uniform"):
        QKVProjection(8, 8, init="he")


def test_causal_masking():
    torch.manual_seed(0)
    x = torch.randint(0, 50, (1, 12))
    changed = x.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50
    causal = LM(50, 32, 4, 2, 16).eval()
    a, b = causal(x), causal(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    bidirectional = LM(50, 32, 4, 2, 16, causal=False).eval()
    a, b = bidirectional(x), bidirectional(changed)
    assert not torch.allclose(a[:, :7], b[:, :7])


def test_gradients_reach_every_parameter():
    model = LM(50, 32, 4, 2, 16)
    logits = model(torch.randint(0, 50, (2, 16)))
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 50, (32,))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_count_formula_lm_tiny():
    V, C, L, T = 64, 32, 2, 32
    model = LM(V, C, 2, L, T)
    hidden = math.ceil(2.5 * C)
    per_block = 2 * (2 * C) + (C * 3 * C) + (C * C) + (C * 2 * hidden) + (hidden * C)  # 2 LNs, qkv, proj, ffn
    expected = V * C + L * per_block + 2 * C + C * V
    assert model.num_parameters() == expected


def test_parameter_count_gpt2_small():
    from olm import build_model

    model = build_model(dict(
        vocab_size=50257, embed_dim=768, num_heads=12, num_layers=12, max_seq_len=1024, ff_multiplier=4.0,
        ffn="gelu_mlp", position="learned", bias=True, tie_embeddings=True,
    ))
    V, C, L, T = 50257, 768, 12, 1024
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    expected = V * C + T * C + L * per_block + 2 * C
    assert model.num_parameters() == expected == 124_439_808  # GPT-2 small's published count
    assert model.num_parameters(exclude_position_embeddings=True) == expected - T * C


def test_rope_tables_are_shared_by_the_layers_of_a_model_and_stay_fp32():
    """One cos/sin pair per model, not per layer (131k-position presets would hold 128 MB per layer otherwise)."""
    import copy
    import pickle

    import olm

    cfg = {"name": "lm", "vocab_size": 64, "embed_dim": 32, "num_heads": 2, "num_layers": 4, "max_seq_len": 4096}
    model, other = olm.build_model(cfg), olm.build_model(cfg)
    ptrs = lambda m: {b.attention.position.cos.data_ptr() for b in m.blocks} | {b.attention.position.sin.data_ptr() for b in m.blocks}
    assert len(ptrs(model)) == 2 and ptrs(model).isdisjoint(ptrs(other))  # models do not share with each other
    assert sum(b.numel() for b in model.buffers()) == 2 * 4096 * 16  # counted once: (T, head_dim) cos and sin
    x = torch.randint(0, 64, (1, 8))
    expected = model(x)
    model.to(torch.bfloat16).to(torch.float64)  # casts move the tables once, and never change their dtype
    assert len(ptrs(model)) == 2 and model.blocks[0].attention.position.cos.dtype == torch.float32
    twin = copy.deepcopy(other)
    assert len(ptrs(twin)) == 2 and ptrs(twin).isdisjoint(ptrs(other))
    other.load_state_dict(model.state_dict())
    assert "cos" not in " ".join(model.state_dict())  # derived from the config, never saved
    assert torch.allclose(other.double()(x), model(x)) and expected.shape == model(x).shape
    pickle.loads(pickle.dumps(model))  # torch.save(model) and multiprocessing still work after .to()
    model.to("meta")  # a device move takes every layer's tables along, still shared
    tables = {id(b.attention.position.cos) for b in model.blocks} | {id(b.attention.position.sin) for b in model.blocks}
    assert len(tables) == 2 and model.blocks[3].attention.position.cos.is_meta and not other.blocks[0].attention.position.cos.is_meta


def test_moe_dispatch_equals_the_per_expert_formula_without_a_nonzero_per_expert():
    """The MoE forward (slots sorted by expert, one read of the per-expert counts) equals the per-expert formula
    out_t = sum over t's top-k experts e of w_te * expert_e(x_t), in value and gradient, also when an expert gets no
    token; and it issues no nonzero() per expert (each is a host sync on a GPU)."""
    import torch.nn.functional as F

    from olm.nn.ffn import MoE

    torch.manual_seed(0)
    moe = MoE(16, num_experts=6, top_k=2, hidden_dim=24)
    moe.router = torch.nn.Linear(16, 6)  # with a bias, so that expert 5 is never chosen
    with torch.no_grad():
        moe.router.bias.zero_()
        moe.router.bias[5] = -100.0
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = moe(x)
    ref_x = x.detach().clone().requires_grad_()
    probs = moe.router(ref_x).softmax(-1)
    w, chosen = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    expected = torch.zeros_like(ref_x)
    for e in range(6):
        gate, up = F.linear(ref_x, moe.fc[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, moe.proj[e])
        expected = expected + y * (w * (chosen == e)).sum(-1, keepdim=True)
    assert not (chosen == 5).any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    fc_grad = moe.fc.grad.clone()
    moe.zero_grad()
    expected.backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fc_grad, moe.fc.grad, rtol=1e-5, atol=1e-6)
    with torch.profiler.profile() as prof:
        moe(x)
    assert not [e for e in prof.events() if e.name == "aten::nonzero"]
