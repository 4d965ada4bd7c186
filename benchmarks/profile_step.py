"""Where a training step's GPU time goes: torch.profiler over a few full steps (forward, backward, clipping, AdamW)
of an olm preset, after warm-up, grouped into kernel families.

    python benchmarks/profile_step.py --preset gpt2_small --batch-size 32 --compile --out results/
    python benchmarks/profile_step.py --device cpu --preset lm_tiny --batch-size 2 --seq-len 32 --vocab-size 256
    torchrun --nproc-per-node 4 benchmarks/profile_step.py --preset gpt2_small --compile   # DDP; every rank reports
    python benchmarks/profile_step.py --path lightning --devices 2 --strategy ddp --preset gpt2_small --compile

``--path lightning`` profiles the same steps as olm-train runs them: olm's module in the Lightning Trainer, on
``--devices`` GPUs with ``--strategy``. Prints the share of GPU time per family (matmul, attention,
fused/elementwise, cross-entropy, optimizer, communication, other), the 25 most expensive kernels, and the GPU-busy
fraction of the wall time (the union of kernel intervals: idle gaps mean the host is not keeping up). Under torchrun the model is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPUs) and every rank profiles its steps (rank 0 in full, the others
as one JSON line each, to compare which rank the others wait for), so gradient communication shows
up in its own family, ``collectives_per_step`` counts the c10d operators each step issues, ``host_reads_per_step``
the reads of a tensor's value by the host (``aten::item``, which ``.item()``, ``float()`` and ``bool()`` of a tensor
call: on a GPU each one waits for the queued work; other syncing operators such as ``nonzero`` are not counted), and
``exposed_communication_ms_per_step`` is the time in which communication kernels run while
no compute kernel does (what overlap with the backward did not hide), ``compute_ms_per_step`` the time in which some
compute kernel runs (compare ranks: a rank with more of it and short all-reduce kernels is the one the others wait
for), ``idle_gaps`` the time with no kernel at all in gaps of 20 us or more, totalled per pair of kernels around the
gap, and ``top_host_ops`` the operators, CUDA runtime calls and ``record_function`` ranges by their own CPU time.
``--out`` also writes a Chrome trace (open in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Kernel name patterns, first match wins (cuBLAS/CUTLASS GEMMs, SDPA kernels, inductor's Triton kernels, ...).
FAMILIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdpa)|_efficient_attention"),
    ("matmul", r"gemm|sm90_xmma|cutlass|ampere_|sm80_|nvjet|matmul|triton_tem_fused_mm|mm_|^aten::(add|b)?mm$|^aten::linear$"),
    ("optimizer", r"adam|foreach|multi_tensor|fused_adamw|clip|norm_kernel_multi"),
    ("communication", r"nccl|allreduce|all_reduce|reduce_scatter|allgather|^c10d::|^gloo:"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll_loss|logsumexp"),
    ("fused (inductor)", r"^triton_"),
    ("elementwise/other", r".*"),
]


@lru_cache(maxsize=None)  # a few hundred distinct kernel names, each seen once per step
def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.I):
            return label
    return "elementwise/other"


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_plain(model_cfg, args, activities, world_size: int, rank: int):
    """Profile ``args.steps`` steps of the hand-written loop (DistributedDataParallel under torchrun)."""
    import throughput

    module = throughput.make_module(model_cfg, args, args.compile).to(args.device)
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    batches = throughput.device_batches(args.batch_size, model_cfg["vocab_size"], args, n=2, seed=rank)
    loss_of = module.loss
    if world_size > 1:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        class Loss(torch.nn.Module):  # DDP hooks its reducer into forward, so the loss is the forward here
            def __init__(self):
                super().__init__()
                self.module = module

            def forward(self, x, y):
                return self.module.loss(x, y)

        cuda = args.device == "cuda"
        ddp = DistributedDataParallel(Loss(), device_ids=[torch.cuda.current_device()] if cuda else None,
                                      **throughput.parse_options(args.ddp_options))
        if args.gradient_compression != "none":
            ddp.register_comm_hook(None, getattr(default_hooks, f"{args.gradient_compression}_compress_hook"))
        loss_of = ddp

    module.train()
    step = throughput.training_step(module, loss_of, optimizer, batches, args.device)
    for i in range(args.warmup):
        step(i)
    throughput.sync(args.device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        throughput.sync(args.device)
        wall_us = (time.perf_counter() - start) * 1e6
    return prof, wall_us


def profile_lightning(model_cfg, args, activities):
    """Profile ``args.steps`` steps of olm's LMModule in the Lightning Trainer (``--devices N --strategy ddp``:
    Lightning starts the other ranks, each profiles its own steps and reports them)."""
    import lightning as L
    import throughput

    class ProfileSteps(L.Callback):
        def __init__(self):
            self.prof, self.start, self.wall_us = torch.profiler.profile(activities=activities), None, None

        # From one batch start to the batch start ``steps`` later: whole steps, each with its gap to the next batch.
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == args.warmup and self.start is None:
                throughput.sync(args.device)
                self.prof.__enter__()
                self.start = time.perf_counter()
            elif trainer.global_step == args.warmup + args.steps and self.wall_us is None:
                throughput.sync(args.device)
                self.wall_us = (time.perf_counter() - self.start) * 1e6
                self.prof.__exit__(None, None, None)
                if trainer.global_rank != 0:  # it exits after fit; rank 0 reports in main()
                    summary = summarize(self.prof, args.steps, self.wall_us, args.device == "cuda")
                    report_rank({**run_metadata(args, trainer.world_size, trainer.global_rank), **summary},
                                trainer.global_rank, args)

    callback = ProfileSteps()
    result = throughput.lightning_loop(model_cfg, args.batch_size, args, callbacks=[callback], extra_steps=1)
    return callback.prof, callback.wall_us, result["world_size"]


def _in_fused_adamw(event) -> bool:
    """Inside the fused AdamW operator, whose CPU kernel reads its step counters (its CUDA kernel does not).
    Lightning runs the whole training step inside ``Optimizer.step`` (the closure), so that range is no guide."""
    while event is not None:
        if event.name == "aten::_fused_adamw_":
            return True
        event = event.cpu_parent
    return False


def summarize(prof, steps: int, wall_us: float, cuda: bool) -> dict:
    """Per-step GPU time by kernel family, the 25 most expensive kernels, busy time (union of kernel intervals) and
    exposed communication. On CPU: top-level operators instead of kernels."""
    by_family: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    collectives: dict[str, int] = defaultdict(int)  # c10d operators issued per step, at any depth (GPU and CPU)
    host_reads = 0
    timeline: list[tuple[float, float, str]] = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("c10d::"):
            collectives[event.name] += 1
        if event.device_type == torch.autograd.DeviceType.CPU and event.name == "aten::item" and not _in_fused_adamw(event):
            host_reads += 1
        if cuda and (event.device_type != torch.autograd.DeviceType.CUDA or getattr(event, "is_user_annotation", False)):
            continue  # GPU kernels only; record_function ranges (e.g. "Optimizer.step") would count their kernels twice
        if not cuda and event.cpu_parent is not None:  # CPU: top-level ops only, so that time is not counted twice
            continue
        us = event.device_time if cuda else event.cpu_time_total
        by_family[family(event.name)] += us
        kernels[event.name][0] += us
        kernels[event.name][1] += 1
        timeline.append((event.time_range.start, event.time_range.end, event.name))
    busy = covered([(start, end) for start, end, _ in timeline])
    compute = covered([(start, end) for start, end, name in timeline if family(name) != "communication"])
    exposed_comm = busy - compute
    return {
        "step_ms": round(wall_us / steps / 1000, 2),
        "busy_ms_per_step": round(busy / steps / 1000, 2), "gpu_busy_fraction": round(busy / wall_us, 3),
        # Time with some compute kernel running: comparing ranks, the one with the most is the one the others wait for
        # if its GPU is slower; equal compute with a short all-reduce points at that rank's host instead.
        "compute_ms_per_step": round(compute / steps / 1000, 2),
        "exposed_communication_ms_per_step": round(exposed_comm / steps / 1000, 2),
        "collectives_per_step": {k: round(n / steps, 2) for k, n in sorted(collectives.items())},
        "host_reads_per_step": round(host_reads / steps, 2),
        "families_ms_per_step": {k: round(v / steps / 1000, 2) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "idle_gaps": idle_gaps(timeline, steps) if cuda else [],
        # Host side: operators and CUDA runtime calls by the time spent in them on the CPU, without their children.
        "top_host_ops": [
            {"name": e.key[:80], "self_cpu_ms_per_step": round(e.self_cpu_time_total / steps / 1000, 3),
             "calls_per_step": round(e.count / steps, 2)}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        ],
        "top_kernels": [
            {"name": name[:120], "ms_per_step": round(t / steps / 1000, 3), "calls_per_step": n // steps,
             "family": family(name)}
            for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
        ],
    }


def idle_gaps(timeline: list[tuple[float, float, str]], steps: int, top: int = 5, min_us: float = 20.0) -> list[dict]:
    """Where the GPU sits idle: gaps of at least ``min_us`` between the end of all kernels so far and the next
    kernel's start, totalled per pair (``after``: the kernel that ended last before the gap, ``before``: the one that
    starts it), largest total first, in ms per step. Idle time in shorter gaps is not reported."""
    gaps: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    reach, last = float("-inf"), ""
    for start, end, name in sorted(timeline):
        if last and start - reach >= min_us:
            gaps[(last, name)][0] += start - reach
            gaps[(last, name)][1] += 1
        if end > reach:
            reach, last = end, name
    return [{"ms_per_step": round(t / steps / 1000, 3), "count_per_step": round(n / steps, 2), "after": a[:80],
             "before": b[:80]} for (a, b), (t, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]]


def run_metadata(args, world_size: int, rank: int) -> dict:
    return {
        "path": args.path, "world_size": world_size, "rank": rank,
        "gradient_compression": args.gradient_compression if world_size > 1 else None,
        "ddp_options": " ".join(args.ddp_options) or None if world_size > 1 else None,
        "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len, "compile": args.compile,
        "compile_mode": args.compile_mode, "compile_scope": args.compile_scope,
        "float8": args.float8, "float8_head": args.float8_head,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
    }


def headline(result: dict) -> str:
    """The result as one JSON line, without the kernel table."""
    return json.dumps({k: v for k, v in result.items() if k != "top_kernels"})


def report_rank(summary: dict, rank: int, args) -> None:
    """One JSON line (and with --out profile_<preset>_rank<r>.json) for a rank other than 0. Comparing ranks shows
    which one the others wait for: its communication kernels are short (they start when the peers are already
    there), the waiting ranks' are long (an all-reduce kernel spins until every rank has joined)."""
    print(headline(summary), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{args.preset}_rank{rank}.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None) -> dict:
    import throughput

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="plain", choices=["plain", "lightning"],
                        help="plain: the hand-written loop; lightning: olm's module in the Lightning Trainer")
    parser.add_argument("--devices", type=int, default=1, help="lightning path: GPUs (or CPU processes)")
    parser.add_argument("--strategy", default="auto", help="lightning path: auto, ddp, fsdp")
    parser.add_argument("--preset", default="gpt2_small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-scope", default="model", choices=["model", "blocks"])
    parser.add_argument("--compile-options", nargs="*", default=[], help="inductor options, e.g. coordinate_descent_tuning=true")
    parser.add_argument("--fused-loss", default="false", type=lambda v: {"true": True, "false": False}.get(v, v))
    parser.add_argument("--attention-backend", default="auto")
    throughput.add_float8_arguments(parser)
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--gradient-compression", default="none", choices=["none", "bf16", "fp16"], help="DDP: under torchrun, or --path lightning")
    parser.add_argument("--ddp-options", nargs="*", default=[],
                        help="DistributedDataParallel arguments (torchrun or --path lightning), e.g. gradient_as_bucket_view=true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1 and args.path == "plain":  # under torchrun; Lightning sets up its own ranks
        import torch.distributed as dist

        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    args.activation_checkpointing, args.log_every = False, 10
    torch.set_float32_matmul_precision("high")

    model_cfg = throughput.model_config(args.preset, args.vocab_size, args.seq_len, args.override)
    cuda = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if args.path == "lightning":
        prof, wall_us, world_size = profile_lightning(model_cfg, args, activities)  # ranks > 0 exit inside
    else:
        prof, wall_us = profile_plain(model_cfg, args, activities, world_size, rank)
    result = {**run_metadata(args, world_size, rank), **summarize(prof, args.steps, wall_us, cuda)}
    if world_size > 1 and args.path == "plain":
        import torch.distributed as dist

        dist.destroy_process_group()
        if rank != 0:
            report_rank(result, rank, args)
            return result
    lines = [headline(result),
             f"{'ms/step':>8} {'calls':>5}  family            kernel"]
    lines += [f"{k['ms_per_step']:8.3f} {k['calls_per_step']:5d}  {k['family']:<17} {k['name']}" for k in result["top_kernels"]]
    sys.stdout.write("\n".join(lines) + "\n")  # one write, so that another rank's line does not split the table
    sys.stdout.flush()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
        prof.export_chrome_trace(str(args.out / f"trace_{args.preset}.json"))
    return result


if __name__ == "__main__":
    main()
