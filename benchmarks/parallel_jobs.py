"""Filling one machine: a sweep of small jobs one after another (Hydra's basic launcher) against olm's parallel
launcher with k jobs per GPU (`hydra/launcher=parallel hydra.launcher.jobs_per_gpu=k`).

Runs the same grid twice, each time as one `olm-train -m` command, and reports the wall time of each command, their
ratio, and each job's training tokens/s (summary.json). The jobs are small on purpose (lm_small, 1.8M parameters,
byte tokens, batch 16 x 256): one such job leaves most of a large GPU idle, which is what a sweep of small jobs
does to a machine run one job at a time. The grid is over optim.lr, so every job trains the same number of steps.

    python benchmarks/parallel_jobs.py --jobs 8 --jobs-per-gpu 4 --steps 300
    python benchmarks/parallel_jobs.py --jobs 4 --jobs-per-gpu 2 --steps 30 --cpu     # the same on a CPU

Run from the repository root; no network. Sweep dirs go to a temporary directory that is removed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(args, launcher: list[str], sweep_dir: Path) -> float:
    lrs = ",".join(f"{1e-3 * (1 + i / 10):.5g}" for i in range(args.jobs))
    device = ["trainer=cpu"] if args.cpu else ["trainer.accelerator=gpu", "trainer.devices=1",
                                               "trainer.precision=bf16-mixed"]
    cmd = [sys.executable, "-m", "olm.train", "-m", "model=lm_small", "data.tokenizer=byte", "data.seq_len=256",
           "data.batch_size=16", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
           "trainer.enable_progress_bar=false", "logger=csv", "sample.max_new_tokens=0", "export=false", *device,
           f"optim.lr={lrs}", *launcher, f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--jobs-per-gpu", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cpu", action="store_true", help="CPU jobs: the parallel launcher's jobs= slots")
    args = parser.parse_args()
    parallel = ["hydra/launcher=parallel", f"hydra.launcher.jobs_per_gpu={args.jobs_per_gpu}"]
    if args.cpu:
        parallel.append(f"hydra.launcher.jobs={args.jobs_per_gpu}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        label = f"parallel, {args.jobs_per_gpu} jobs" + ("" if args.cpu else " per GPU")
        for i, (name, launcher) in enumerate((("one at a time", []), (label, parallel))):
            where = Path(tmp) / str(i)
            wall = sweep(args, launcher, where)
            summaries = [json.loads(p.read_text()) for p in sorted(where.glob("*/summary.json"))]
            rows[name] = {"wall_s": round(wall, 1), "jobs": len(summaries),
                          "finished": sum(s["status"] == "finished" for s in summaries),
                          "tokens_per_sec_per_job": round(sum(s["tokens_per_sec"] for s in summaries) / len(summaries)),
                          "device": summaries[0]["device"]}
    names = list(rows)
    rows["ratio"] = round(rows[names[0]]["wall_s"] / rows[names[1]]["wall_s"], 2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
