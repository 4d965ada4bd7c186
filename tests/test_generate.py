"""KV-cache decoding equals the full forward pass; sampling filters behave."""

import pytest
import torch

import olm
from olm.generate import _filter_logits, generate

from conftest import TINY


@pytest.mark.parametrize("overrides", [
    {}, {"attention": {"name": "gqa", "num_kv_heads": 2}}, {"position": "learned"}, {"position": "alibi"},
    {"attention": {"name": "sliding_window", "window": 5}}, {"attention": {"name": "mha", "softcap": 20.0}},
    {"attention": {"name": "sliding_window", "window": 5, "sinks": True}},
    {"attention": {"name": "mha", "softcap": 20.0, "sinks": True}},
    {"attention": {"name": "gqa", "num_kv_heads": 2, "qk_norm": "rmsnorm", "qk_norm_scope": "all"}},
    {"block_overrides": [{}, {"position": "none"}]},
    {"attention": {"name": "mla", "kv_rank": 8, "rope_dim": 4, "nope_dim": 6, "v_dim": 5, "q_rank": 12}},
])
def test_incremental_logits_equal_full_forward(overrides):
    torch.manual_seed(0)
    model = olm.build_model({**TINY, **overrides}).eval()
    x = torch.randint(0, 64, (2, 20))
    full = model(x)
    cache = model.make_cache(2, 20)
    pieces = [model(x[:, :7], cache)]  # prompt, then one token at a time
    for t in range(7, 20):
        pieces.append(model(x[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    torch.manual_seed(0)
    model = olm.build_model(TINY)
    prompt = torch.randint(0, 64, (3, 5))
    with_cache = generate(model, prompt, 20, temperature=0)
    without = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without) and with_cache.shape == (3, 25)
    # greedy by hand with full forward passes
    tokens = prompt
    for _ in range(20):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(with_cache, tokens)


def test_sampling_is_seeded_and_stops_at_max_seq_len():
    model = olm.build_model(TINY)
    prompt = torch.tensor([1, 2, 3])
    a = generate(model, prompt, 10, temperature=0.8, top_k=10, top_p=0.9, seed=1)
    b = generate(model, prompt, 10, temperature=0.8, top_k=10, top_p=0.9, seed=1)
    assert torch.equal(a, b)
    long = generate(model, prompt, 100, temperature=1.0, seed=0)
    assert long.shape[1] == TINY["max_seq_len"]


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(_filter_logits(logits, 2, None))
    assert kept.tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = torch.isfinite(_filter_logits(logits, None, 0.8))
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8 < probs[:2].sum()


def greedy_over_last_window(model, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by hand: each token is the argmax of a full forward over the last max_seq_len - 1
    tokens."""
    tokens = prompt
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -(model.max_seq_len - 1) :])[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], 1)
    return tokens


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_greedy_generation_slides_past_max_seq_len(position, use_cache):
    torch.manual_seed(0)
    model = olm.build_model({**TINY, "max_seq_len": 16, "position": position}).eval()
    prompt = torch.randint(0, 64, (2, 5))
    out = generate(model, prompt, 30, temperature=0, use_cache=use_cache, slide_context=True)
    assert out.shape == (2, 35)  # 5 + 30, more than twice the context of 16
    assert torch.equal(out, greedy_over_last_window(model, prompt, 30))


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_longer_than_the_context(use_cache):
    torch.manual_seed(0)
    model = olm.build_model({**TINY, "max_seq_len": 16}).eval()
    prompt = torch.randint(0, 64, (1, 40))
    assert torch.equal(generate(model, prompt, 8, temperature=0, use_cache=use_cache), prompt)  # stops: no room
    out = generate(model, prompt, 8, temperature=0, use_cache=use_cache, slide_context=True)
    assert out.shape == (1, 48) and torch.equal(out[:, :40], prompt)
    assert torch.equal(out, greedy_over_last_window(model, prompt, 8))
