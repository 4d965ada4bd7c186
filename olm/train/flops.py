"""Model FLOPs per token and the peak throughput of known accelerators, for MFU.

Training FLOPs per token follow the PaLM appendix B / nanoGPT convention:

    flops_per_token = 6 * N + 12 * L * H * Q * T

- 6N: forward (2N) and backward (4N) multiply-adds of every weight matrix; N is the parameter count without learned
  position tables (they are looked up, not multiplied). Tied input/output embeddings count once, as they are one
  matrix used in the output projection.
- 12 L H Q T: attention scores and weighted sums (QK^T and AV, forward and backward) for L layers, H heads of size Q
  at sequence length T. Causal masking is not discounted, as in nanoGPT, so figures are comparable with it.
- What a token really uses: in a mixture of experts N counts the router and the ``top_k`` experts a token is sent
  to, not all ``num_experts``; a sliding-window layer attends to at most ``window`` keys, so its T is
  min(window, T).

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
    """Parameters a token passes through: all but the learned position tables and the experts it is not routed to."""
    n = model.num_parameters(exclude_position_embeddings=True)
    for module in model.modules():
        experts, top_k = getattr(module, "num_experts", None), getattr(module, "top_k", None)
        if experts and top_k:
            expert_weights = module.fc.numel() + module.proj.numel()  # (E, 2h, d) and (E, d, h)
            n -= expert_weights * (experts - top_k) // experts
    return n


def flops_per_token(model, seq_len: int) -> float:
    """6N + 12 L H Q T for an olm LM (see module docstring)."""
    attention_term = 0
    for block in model.blocks:
        attention = block.attention
        keys = min(attention.window, seq_len) if attention.window else seq_len
        attention_term += 12 * attention.num_heads * attention.head_dim * keys
    return 6 * active_parameters(model) + attention_term
