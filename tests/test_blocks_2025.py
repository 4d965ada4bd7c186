"""The 2025 blocks on their own: QK-norm over the whole projection, attention sinks, multi-head latent attention
and its cache, post-only norms, MoE routing (sigmoid, groups, balancing bias, shared experts), clamped SwiGLU;
each against a reference written out by hand or transformers' own module, and FLOPs against a hand count."""

import json

import pytest
import torch
import torch.nn.functional as F

import olm
from olm.nn.attention import AttentionContext
from olm.nn.blocks import TransformerBlock
from olm.nn.ffn import MoE, clamped_swiglu
from olm.registry import ConfigError
from olm.train.flops import active_parameters, flops_per_token
from olm.zoo import from_hf, preset_config, to_hf

from conftest import TINY
from test_zoo import HF_REASON, tiny_hf


def _attention(position="none", **spec):
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 16, causal=True, attention=spec, norm="rmsnorm", position=position).eval()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    return block.attention


def _heads(t, n):  # (B, T, n * hd) -> (B, n, T, hd)
    return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)


def test_qk_norm_over_the_whole_projection_is_olmo2s():
    attn = _attention(name="gqa", num_kv_heads=2, qk_norm="rmsnorm", qk_norm_scope="all")
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)  # H * hd and KV * hd
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).split([32, 16, 16], dim=-1)
    q = F.rms_norm(q, (32,), attn.q_norm.weight, attn.q_norm.eps)  # before the split into heads
    k = F.rms_norm(k, (16,), attn.k_norm.weight, attn.k_norm.eps)
    q, k, v = _heads(q, 4), _heads(k, 2).repeat_interleave(2, 1), _heads(v, 2).repeat_interleave(2, 1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn.proj(y.transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_sinks_are_an_extra_softmax_column(window):
    """As GPT-OSS's reference: softmax over [scores, sink] per head, the sink's column dropped."""
    spec = dict(name="sliding_window", window=window) if window else dict(name="mha")
    attn = _attention(**spec, sinks=True)
    x = torch.randn(2, 10, 32)
    q, k, v = (_heads(t, 4) for t in attn.qkv(x).split(32, dim=-1))
    scores = q @ k.transpose(-1, -2) / 8**0.5
    i, j = torch.arange(10)[:, None], torch.arange(10)[None]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sinks = attn.sinks[None, :, None, None].expand(2, 4, 10, 1)
    weights = torch.cat([scores, sinks], -1).softmax(-1)[..., :-1]
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)
    # Very low sinks take no mass: plain attention.
    attn.sinks.data.fill_(-1e4)
    plain = _attention(**spec)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "sinks"})
    torch.testing.assert_close(attn(x), plain(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("q_rank", [None, 12])
def test_mla_decodes_from_its_latent_cache(q_rank):
    model = olm.build_model({**TINY, "attention": {"name": "mla", "kv_rank": 8, "q_rank": q_rank, "rope_dim": 4,
                                                   "nope_dim": 6, "v_dim": 5}}).eval()
    cache = model.make_cache(2, 20)
    assert cache[0].k.shape == (2, 1, 20, 8) and cache[0].v.shape == (2, 1, 20, 4)  # kv_rank + rope_dim per token
    x = torch.randint(0, 64, (2, 20))
    pieces = [model(x[:, :7], cache)] + [model(x[:, t : t + 1], cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, 1), model(x), atol=1e-5, rtol=1e-5)
    assert cache[0].length == 20


def test_mla_is_causal_and_its_rope_dims_carry_position():
    model = olm.build_model({**TINY, "attention": {"name": "mla", "kv_rank": 8, "q_rank": None, "rope_dim": 4,
                                                   "nope_dim": 6, "v_dim": 5}}).eval()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 64
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])  # the future does not leak
    shifted = model(torch.cat([x[:, :1], x], 1))[:, 1:]  # same tokens one position later: RoPE changes the logits
    assert (shifted[:, 3:] - model(x)[:, 3:]).abs().max() > 1e-4


def test_post_only_norms_are_olmo2s_order():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 16, causal=True, norm="rmsnorm", pre_norms=False, post_norms=True).eval()
    assert isinstance(block.layers[0], torch.nn.Identity) and isinstance(block.layers[2], torch.nn.Identity)
    x = torch.randn(2, 10, 32)
    h = x + block.layers[4](block.attention(x))
    torch.testing.assert_close(block(x), h + block.layers[5](block.ffn(h)))
    with pytest.raises(ConfigError, match="^pre_norms=false needs post_norms=true"):
        TransformerBlock(32, 4, 16, pre_norms=False)


def test_sigmoid_group_routing_with_bias_and_shared_experts_matches_deepseek_v3():
    """olm's MoE against transformers' DeepseekV3MoE with the same weights and a non-zero correction bias."""
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, n_group=4,
                                           topk_group=2, num_experts_per_tok=3, n_shared_experts=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    torch.manual_seed(0)
    ref = DeepseekV3MoE(config).eval()
    moe = MoE(16, hidden_dim=8, num_experts=8, top_k=3, routing="sigmoid", num_groups=4, top_groups=2,
              routed_scale=2.5, balance_bias=True, shared_experts=2, aux_loss_coef=0.0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        ref.gate.e_score_correction_bias.normal_(0, 0.3)
        moe.router.weight.copy_(ref.gate.weight)
        moe.expert_bias.copy_(ref.gate.e_score_correction_bias)
        moe.fc.copy_(ref.experts.gate_up_proj)
        moe.proj.copy_(ref.experts.down_proj)
        moe.shared.fc.weight.copy_(torch.cat([ref.shared_experts.gate_proj.weight, ref.shared_experts.up_proj.weight]))
        moe.shared.proj.weight.copy_(ref.shared_experts.down_proj.weight)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref(x), atol=1e-5, rtol=1e-5)
    assert moe.last_aux_loss is None


def test_balancing_bias_moves_towards_the_underloaded_experts_in_training_only():
    torch.manual_seed(0)
    moe = MoE(16, hidden_dim=8, num_experts=4, top_k=1, routing="sigmoid", balance_bias=True, balance_rate=0.01,
              aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # every token prefers expert 0 ...
    x = torch.ones(1, 8, 16)
    moe.eval()(x)
    assert torch.equal(moe.expert_bias, torch.zeros(4))  # evaluation never moves it
    moe.train()(x)
    assert moe.last_load.tolist() == [1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert "expert_bias" in moe.state_dict()  # checkpoints keep it, so a resumed run routes the same


def test_clamped_swiglu_matches_gpt_oss_where_the_clamps_bind():
    transformers = pytest.importorskip("transformers", reason=HF_REASON)
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    ref = GptOssExperts(transformers.GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=1))
    gate_up = torch.randn(5, 12) * 10  # far beyond the limit of 7
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # transformers interleaves gate and up columns
    assert (gate_up.abs() > 7).any()
    torch.testing.assert_close(clamped_swiglu(gate, up, 7.0, 1.702), ref._apply_gate(gate_up))


def _hand_count_mla_model():
    return olm.build_model({**TINY, "num_layers": 2, "attention": {
        "name": "mla", "kv_rank": 8, "q_rank": 12, "rope_dim": 4, "nope_dim": 6, "v_dim": 5},
        "ffn": {"name": "moe", "num_experts": 4, "top_k": 1, "hidden_dim": 8, "shared_experts": 2, "bias": True},
        "norm": "rmsnorm"})


def test_flops_count_mla_shared_experts_and_sinks_by_hand():
    with torch.device("meta"):
        model = _hand_count_mla_model()
        sinks = olm.build_model({**TINY, "num_layers": 2, "attention": {"name": "mha", "sinks": True}})
    C, H, V = 32, 4, 64
    mla = C * 12 + 12 + 12 * H * 10 + C * (8 + 4) + 8 + 8 * H * (6 + 5) + H * 5 * C  # q_a, q_norm, q_b, kv_a, ...
    expert = 2 * 8 * C + C * 8 + 2 * 8 + C  # fc, proj, fc_bias, proj_bias
    moe_active = C * 4 + 1 * expert + (2 * 16 * C + C * 16)  # router, 1 of 4 experts, shared SwiGLU of 2 x 8
    block = mla + moe_active + 2 * C  # two RMSNorms
    n = V * C + 2 * block + C + C * V  # embedding, blocks, final norm, untied head
    assert active_parameters(model) == n
    # scores over (6 + 4)-wide query/key heads, weighted sums of 5-wide values, for each of the 2 layers
    assert flops_per_token(model, 16) == 6 * n + 2 * 6 * H * (10 + 5) * 16
    # sinks: an extra logit per head, not a weight a token multiplies
    assert active_parameters(sinks) == sinks.num_parameters() - 2 * H
    assert flops_per_token(sinks, 16) == 6 * (sinks.num_parameters() - 2 * H) + 2 * 12 * H * 8 * 16


@pytest.mark.parametrize("spec, message", [
    ({"attention": {"name": "mha", "qk_norm": "rmsnorm", "qk_norm_scope": "heads"}},
     "model.attention.qk_norm_scope='heads' is not known; known: head, all"),
    ({"attention": {"name": "mla", "kv_rank": 8}, "position": "alibi"},
     "model.attention.position='alibi' does not apply to attention 'mla'; its decoupled rotary part needs: rope"),
    ({"ffn": {"name": "moe", "routing": "relu"}}, "model.ffn.routing='relu' is not known; known: softmax, sigmoid"),
    ({"ffn": {"name": "moe", "num_experts": 8, "num_groups": 3}}, "model.ffn.num_groups=3 must divide num_experts=8"),
    ({"ffn": {"name": "moe", "activation": "geglu"}},
     "model.ffn.activation='geglu' is not known; known: swiglu, clamped_swiglu"),
])
def test_bad_settings_are_one_line(spec, message):
    with pytest.raises(ConfigError) as info:
        olm.build_model({**TINY, **spec})
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("family, change, message", [
    ("deepseek_v3", {"rope_interleave": False}, "rope_interleave=false is not supported"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ("gpt_oss", {"layer_types": ["chunked_attention", "full_attention"]}, "layer_types='chunked_attention' is not"),
])
def test_options_olm_does_not_implement_are_refused_in_one_line(family, change, message, tmp_path):
    to_hf(olm.build_model(preset_config(f"{family}_tiny")), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError) as info:
        from_hf(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepseek_multi_token_prediction_layers_are_left_out(tmp_path):
    """DeepSeek-V3 checkpoints carry an MTP layer after the last one; like transformers, olm does not load it."""
    from safetensors.torch import load_file, save_file

    model = olm.build_model(preset_config("deepseek_v3_tiny")).eval()
    to_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.enorm.weight"] = torch.ones(36)
    save_file(tensors, tmp_path / "model.safetensors")
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(from_hf(tmp_path)(x), model(x))


def test_context_carries_the_cache_and_offset_to_every_attention_kind():
    """One keyword argument, the same for every kind: a block fed its own cache through the context."""
    for spec in ({"name": "gqa", "num_kv_heads": 2}, {"name": "mla", "kv_rank": 8, "rope_dim": 4, "nope_dim": 4,
                                                     "v_dim": 8, "q_rank": None}):
        torch.manual_seed(0)
        block = TransformerBlock(32, 4, 16, causal=True, attention=spec).eval()
        x = torch.randn(1, 9, 32)
        cache = block.attention.make_cache(1, 16, x.device, x.dtype)
        first = block(x[:, :5], context=AttentionContext(cache, 0))
        rest = block(x[:, 5:], context=AttentionContext(cache, 5))
        torch.testing.assert_close(torch.cat([first, rest], 1), block(x), atol=1e-5, rtol=1e-5)


def test_tiny_random_weights_exercise_the_gpt_oss_clamp():
    """gpt_oss_tiny's limit (0.1) binds on its random activations, so the parity tests check the clamps."""
    hf = tiny_hf("gpt_oss")
    model = from_hf(hf).eval()
    moe = model.blocks[0].ffn
    h = torch.einsum("nc,ehc->neh", torch.randn(16, 32), moe.fc)
    assert (h.abs() > moe.limit).float().mean() > 0.1
