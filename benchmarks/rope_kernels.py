"""What rotary embeddings cost in a compiled training step, per formulation of the rotation.

Times forward + backward of the attention input path of one layer, compiled: fused qkv activations (B, T, (H + 2 KV)
hd) -> split into heads -> rotation of queries and keys -> SDPA (causal, native GQA) -> gradient back to the fused
qkv activations. ``none`` skips the rotation (the floor); the others differ only in how the same rotation is written:

- ``olm``: the model's own ``_rotate`` (rotate-half with torch.cat, fp32 math, heads before positions);
- ``explicit_backward``: ``olm``'s forward in an autograd.Function whose backward is the rotation by the opposite
  angles (cos, -sin) instead of autograd's derivation through the slicing;
- ``halves``: out = cat(x1 cos - x2 sin, x2 cos + x1 sin) on the two halves, fp32 math;
- ``bf16``: rotate-half in the activation dtype (as transformers' Llama computes it);
- ``before_transpose``: ``olm``'s math applied in (B, T, heads, hd), before the transpose to SDPA's layout;
- ``interleaved``: pairs of neighbouring features (2i, 2i+1) instead of (i, i + hd/2), fp32 math, as Meta's original
  Llama code; the same rotation of a permuted feature order (a checkpoint would need its q/k rows permuted), so its
  gradient is not compared with the others.

    python benchmarks/rope_kernels.py                        # llama_small's attention shape, batch 32 x 1024
    python benchmarks/rope_kernels.py --device cpu --batch-size 2 --seq-len 64 --iters 2   # smoke test

Prints ms per forward + backward for each variant, the largest gradient difference against the first rotating
variant, and the largest kernels of each under the profiler. (RESULTS.md: in every formulation tried, the backward
of the rotation fused with the transpose back to the qkv layout costs 5-11x the forward's kernel.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olm.nn.position import _rotate  # noqa: E402


class _ExplicitBackward(torch.autograd.Function):
    @staticmethod
    def forward(x, cos, sin):
        return _rotate(x, cos, sin, x.shape[-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin, grad.shape[-1]), None, None


def rotate_halves(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rotate_bf16(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def rotate_interleaved(x, cos, sin):
    half = x.shape[-1] // 2
    pairs = x.float().unflatten(-1, (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., :half], sin[..., :half]
    return torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2).to(x.dtype)


VARIANTS = ["none", "olm", "explicit_backward", "halves", "bf16", "before_transpose", "interleaved"]


def attention_inputs(variant: str, H: int, KV: int, hd: int):
    def run(qkv, cos, sin):
        B, T, _ = qkv.shape
        q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
        q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
        if variant == "before_transpose":
            q, k = _rotate(q, cos[:, None], sin[:, None], hd), _rotate(k, cos[:, None], sin[:, None], hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if variant == "olm":
            q, k = _rotate(q, cos, sin, hd), _rotate(k, cos, sin, hd)
        elif variant == "explicit_backward":
            q, k = _ExplicitBackward.apply(q, cos, sin), _ExplicitBackward.apply(k, cos, sin)
        elif variant == "halves":
            q, k = rotate_halves(q, cos, sin), rotate_halves(k, cos, sin)
        elif variant == "interleaved":
            q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        elif variant == "bf16":
            q, k = rotate_bf16(q, cos, sin), rotate_bf16(k, cos, sin)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)

    return run


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    B, T, H, KV, hd = args.batch_size, args.seq_len, args.heads, args.kv_heads, args.head_dim
    angles = torch.arange(T, dtype=torch.float64)[:, None] * (10000.0 ** (-torch.arange(0, hd, 2) / hd))[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float().to(args.device), angles.sin().float().to(args.device)
    qkv = torch.randn(B, T, (H + 2 * KV) * hd, device=args.device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, H, T, hd, device=args.device, dtype=dtype)
    reference = None
    rows = []
    for variant in args.variants:
        fn = torch.compile(attention_inputs(variant, H, KV, hd))

        def step():
            qkv.grad = None
            fn(qkv, cos, sin).backward(grad)

        for _ in range(3):
            step()
        if variant not in ("none", "interleaved"):  # the same gradient (bf16: within its rounding)
            if reference is None:
                reference = qkv.grad.float().clone()
            error = (qkv.grad.float() - reference).abs().max().item() / reference.abs().max().item()
        else:
            error = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        if cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / args.iters
        activities = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        kernels = sorted(((e.device_time if cuda else e.cpu_time_total, e.name) for e in prof.events()
                          if not cuda or e.device_type == torch.autograd.DeviceType.CUDA), reverse=True)[:6]
        row = {"variant": variant, "ms_fwd_bwd": round(ms, 3), "max_rel_grad_difference": error,
               "top_kernels_us": [(round(t), name[:90]) for t, name in kernels]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
