"""Sampling from an olm LM with a KV cache: the prompt is encoded once, then one position per step (a full
context window is encoded afresh for each step once it slides)."""

from __future__ import annotations

from typing import Callable

import torch


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf elsewhere."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    slide_context: bool = False,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, T) by up to ``max_new_tokens``; temperature 0 is greedy. Returns (B, T + new).

    Each token is predicted from at most the last ``model.max_seq_len - 1`` tokens (the context window). When
    the sequence outgrows the window, generation stops (a longer prompt comes back unchanged), or with
    ``slide_context`` continues on the last window of tokens. Generation also stops when every row has
    produced ``eos_id``, or when ``stop`` (the new tokens so far, (B, n) -> (B,) bool) holds for every row.
    """
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        raise ValueError("prompt must hold at least one token")
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    window = max(model.max_seq_len - 1, 1)
    steps = max_new_tokens if slide_context else min(max_new_tokens, model.max_seq_len - prompt.shape[1])
    cache = model.make_cache(prompt.shape[0], window) if use_cache else None
    tokens = prompt
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for step in range(max(steps, 0)):
        if use_cache and 0 < step and cache[0].length < window:
            step_input = tokens[:, -1:]  # the cache holds every earlier token of the window
        else:
            # The first step, no cache, or a full cache: encode the last window afresh. Rewinding the cache
            # rather than shifting it keeps the positions (RoPE, learned tables) of a plain forward pass.
            step_input = tokens[:, -window:]
            for layer in cache or []:
                layer.length = 0
        logits = model(step_input, cache)[:, -1, : model.vocab_size].float()  # (B, V)
        if temperature <= 0:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
        if eos_id is not None:
            finished |= next_token.squeeze(1) == eos_id
        if stop is not None:
            finished |= stop(tokens[:, prompt.shape[1]:])
        if (eos_id is not None or stop is not None) and finished.all():
            break
    model.train(was_training)
    return tokens
