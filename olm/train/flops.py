"""Model FLOPs per token and the peak throughput of known accelerators, for MFU.

Training FLOPs per token follow the PaLM appendix B / nanoGPT convention:

    flops_per_token = 6 * N + 6 * L * H * (Q + V) * T      (= 6N + 12 L H Q T when values are Q wide)

- 6N: forward (2N) and backward (4N) multiply-adds of every weight matrix; N is the parameter count without learned
  position tables (they are looked up, not multiplied). Tied input/output embeddings count once, as they are one
  matrix used in the output projection.
- 6 L H (Q + V) T: attention scores and weighted sums (QK^T with query/key heads of width Q, AV with values of width
  V; forward and backward) for L layers and H heads at sequence length T. Causal masking is not discounted, as in
  nanoGPT, so figures are comparable with it. Multi-head latent attention has Q = nope_dim + rope_dim and
  V = v_dim; its latent projections are weight matrices in N.
- What a token really uses: in a mixture of experts N counts the router, the shared experts and the ``top_k``
  routed experts a token is sent to (their biases too), not all ``num_experts``; a sliding-window layer attends to
  at most ``window`` keys, so its T is min(window, T). Attention sinks are one logit per head added to the softmax,
  no matmul: their parameters are left out of N, like learned position tables.

Training FLOPs of a run = flops_per_token x tokens seen (logged as ``flops_seen``; ``train_flops`` in summary.json).

MFU = achieved FLOP/s / peak FLOP/s, with the dense (no sparsity) bf16 peak of the card.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; matched by substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is listed separately below and matched first
    "GH200": 989e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16
}
PEAK_OVERRIDES = {"H100 PCIe": 756e12}


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak for a CUDA device name, or None when unknown (CPU included): MFU is then not reported."""
    if not device_name:
        return None
    for key, value in {**PEAK_OVERRIDES, **PEAK_BF16_FLOPS}.items():
        if key in device_name:
            return value
    return None


def active_parameters(model) -> int:
    """Parameters a token multiplies: all but learned position tables, attention sinks and the experts it is not
    routed to."""
    n = model.num_parameters(exclude_position_embeddings=True)
    for module in model.modules():
        experts, top_k = getattr(module, "num_experts", None), getattr(module, "top_k", None)
        if experts and top_k:
            stacked = [module.fc, module.proj, module.fc_bias, module.proj_bias]  # (E, 2h, d), (E, d, h), biases
            expert_weights = sum(p.numel() for p in stacked if p is not None)
            n -= expert_weights * (experts - top_k) // experts
        if getattr(module, "sinks", None) is not None:
            n -= module.sinks.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """6N + 6 L H (Q + V) T for an olm LM (see module docstring)."""
    attention_term = 0
    for block in model.blocks:
        attention = block.attention
        keys = min(attention.window, seq_len) if attention.window else seq_len
        value_dim = getattr(attention, "v_dim", attention.head_dim)
        attention_term += 6 * attention.num_heads * (attention.head_dim + value_dim) * keys
    return 6 * active_parameters(model) + attention_term
