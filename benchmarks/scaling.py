"""Weak scaling of olm training over GPUs: the same model and per-GPU batch at 1, 2, 4, ... GPUs (Lightning DDP or
FSDP, the path olm-train uses), reporting tokens/s, scaling efficiency and peak memory per GPU.

efficiency(n) = tokens_per_sec(n) / (n * tokens_per_sec(1))

    python benchmarks/scaling.py --gpus 1 2 4 --preset gpt2_small --batch-size 32 --compile --out results/
    python benchmarks/scaling.py --gpus 1 2 --repeats 3 ...   # 1,2,1,2,1,2; efficiency from the medians
    python benchmarks/scaling.py --gpus 1 4 --strategy fsdp --preset llama_small --override model.num_layers=24 ...

Each point runs benchmarks/throughput.py in a fresh process (Lightning starts the other ranks). With ``--repeats R``
the whole sequence of GPU counts runs R times, interleaved so that a slow spell of the machine does not fall on one
count only; the table then gives each count's median tokens/s, the spread (min-max) and the efficiency of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_point(n: int, args) -> dict:
    command = [
        sys.executable, str(HERE / "throughput.py"), "--paths", "lightning", "--presets", args.preset,
        "--batch-sizes", str(args.batch_size), "--devices", str(n), "--strategy", args.strategy if n > 1 else "auto",
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
        "--vocab-size", str(args.vocab_size), "--fused-loss", args.fused_loss,
        "--attention-backend", args.attention_backend, "--compile-mode", args.compile_mode,
        "--compile-scope", args.compile_scope, "--gradient-compression", args.gradient_compression,
    ]
    if args.compile:
        command.append("--compile")
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    if args.compile_options:
        command += ["--compile-options", *args.compile_options]
    if args.ddp_options:
        command += ["--ddp-options", *args.ddp_options]
    if args.override:
        command += ["--override", *args.override]
    # Its own process group, so that a timeout (or Ctrl-C) stops the ranks Lightning started too: ranks left behind
    # would share the GPUs with the next point and spoil its timing.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.point_timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"{n} GPU(s) failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return rows[-1]


def summarize(rows: list[dict], command: str) -> str:
    """Markdown table, one line per GPU count: median tokens/s over its repeats, their spread, and the efficiency of
    the medians against the 1-GPU median. Sets ``efficiency`` on each row (against the 1-GPU median)."""
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["world_size"], []).append(r)
    median = {n: statistics.median(r["tokens_per_sec"] for r in rs) for n, rs in by_n.items()}
    base = median.get(1)
    for r in rows:
        r["efficiency"] = round(r["tokens_per_sec"] / (r["world_size"] * base), 3) if base else None
    lines = [f"date {date.today().isoformat()}; command: `{command}`", "",
             "| GPUs | strategy | compile scope | grad. compression | DDP options | batch/GPU | runs | tokens/s (median) | min-max | efficiency | MFU | peak mem GiB/GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, rs in by_n.items():
        r, values = rs[0], [x["tokens_per_sec"] for x in rs]
        efficiency = round(median[n] / (n * base), 3) if base else None
        mfu = f"{statistics.median(x['mfu'] for x in rs):.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {n} | {r['strategy']} | {r.get('compile_scope')} | {r.get('gradient_compression')} | {r.get('ddp_options') or '-'} "
                     f"| {r['batch_size']} | {len(rs)} | {round(median[n]):,} | {min(values):,}-{max(values):,} | {efficiency} | {mfu} "
                     f"| {max(x['peak_mem_gib'] or 0 for x in rs) or None} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--preset", default="gpt2_small")
    parser.add_argument("--batch-size", type=int, default=32, help="per GPU")
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fused-loss", default="false")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-scope", default="model", choices=["model", "blocks"])
    parser.add_argument("--compile-options", nargs="*", default=[], help="inductor options, e.g. coordinate_descent_tuning=true")
    parser.add_argument("--gradient-compression", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--ddp-options", nargs="*", default=[], help="e.g. bucket_cap_mb=100 gradient_as_bucket_view=true")
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--repeats", type=int, default=1, help="run the whole --gpus sequence this many times")
    parser.add_argument("--point-timeout", type=float, default=900.0, help="seconds per point; its ranks are stopped too")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    rows = []
    try:
        for _ in range(args.repeats):
            for n in args.gpus:
                row = run_point(n, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:  # a failed or stopped point keeps the points measured before it
        if rows:
            table = summarize(rows, "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
            print(table)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
                (args.out / "scaling.md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
