"""Forward+backward time of F.scaled_dot_product_attention per kernel family at one attention shape (causal, bf16).

    python benchmarks/sdpa_backends.py --batch 32 --heads 12 --seq-len 1024 --head-dim 64
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    kv = a.kv_heads or a.heads
    q = torch.randn(a.batch, a.heads, a.seq_len, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(a.batch, kv, a.seq_len, a.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    flops = 4 * a.batch * a.heads * a.seq_len**2 * a.head_dim * 3.5 / 2  # fwd 2 matmuls + bwd 5, causal half
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != a.heads).sum().backward()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(a.iters):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != a.heads).sum().backward()
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / a.iters
            print(f"{name:10s} {ms:8.2f} ms fwd+bwd  {flops / ms / 1e9:7.1f} TFLOP/s (causal-halved count)")
        except RuntimeError as exc:
            print(f"{name:10s} unavailable: {str(exc).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
