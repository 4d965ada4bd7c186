"""NCCL all-reduce bus bandwidth between the GPUs of this host (the ceiling for DDP gradient sync).

    torchrun --nproc-per-node 4 benchmarks/allreduce.py --mib 512
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--mib", type=int, default=512)
p.add_argument("--iters", type=int, default=10)
a = p.parse_args()
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.ones(a.mib * 2**20 // 4, device="cuda")
for _ in range(3):
    dist.all_reduce(x)
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(a.iters):
    dist.all_reduce(x)
torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / a.iters
bus = x.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9
if rank == 0:
    print(f"all-reduce {a.mib} MiB fp32 over {world} GPUs: {seconds * 1e3:.2f} ms, bus bandwidth {bus:.0f} GB/s")
dist.destroy_process_group()
