"""Tokens and training time each run needed to reach a target validation loss, from olm-train run dirs.

    python benchmarks/time_to_target.py RUN_DIR [RUN_DIR ...] --target 2.5 [--markdown]

A run reaches the target at the first validation whose ``val/loss`` is at or below it (validate often: the figure
is only as fine as ``trainer.val_check_interval``). Tokens are counted as training saw them (``tokens_seen`` at that
step); the time is the training time up to that step, summed from the logged throughput (each logging interval's
tokens over its tokens/s), so validation pauses, start-up and compilation are left out and runs that validate at
different rates compare fairly. The first logging interval, which holds torch.compile's compilation, is counted at
the second interval's rate. Only the files of each run dir are read.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def time_to_target(run_dir: Path, target: float) -> dict:
    """{run, optimizer, lr, steps, tokens, seconds, final_val_loss} for one run (steps None: never reached)."""
    rows = _rows(run_dir)
    config = _config(run_dir)
    val = [(int(r["step"]), _float(r["val/loss"])) for r in rows if _float(r.get("val/loss")) is not None]
    reached = next((step for step, loss in val if loss <= target), None)
    throughput = [(int(r["step"]), _float(r["tokens_seen"]), _float(r["perf/tokens_per_sec"])) for r in rows
                  if _float(r.get("perf/tokens_per_sec"))]
    if len(throughput) > 1:  # compilation and warm-up are not training time
        throughput[0] = (*throughput[0][:2], throughput[1][2])
    seconds = tokens = None
    if reached is not None:
        seconds, previous_tokens = 0.0, 0.0
        for step, seen, per_sec in throughput:
            if step > reached:
                break
            seconds += (seen - previous_tokens) / per_sec
            previous_tokens = seen
        per_step = throughput[0][1] / (throughput[0][0] + 1) if throughput else math.nan
        tokens = (reached + 1) * per_step
        if throughput and throughput[-1][0] < reached:  # between the last log step and the target: at its rate
            seconds += (tokens - previous_tokens) / throughput[-1][2]
    optim = config["optim"]
    lr = f"{optim['lr']:g}" + (f" (AdamW half {optim['adamw_lr']:g})" if optim.get("adamw_lr") else "")
    return {"run": str(run_dir), "optimizer": optim["name"], "lr": lr,
            "steps": None if reached is None else reached + 1, "tokens": tokens, "seconds": seconds,
            "final_val_loss": val[-1][1] if val else None}


def _config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--target", type=float, required=True, help="the validation loss to reach (nats/token)")
    args = parser.parse_args()
    print(f"| optimizer | lr | final val loss | steps to {args.target} | tokens to {args.target} | training time |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = time_to_target(run, args.target)
        if r["steps"] is None:
            print(f"| {r['optimizer']} | {r['lr']} | {r['final_val_loss']:.4f} | not reached | | |")
        else:
            print(f"| {r['optimizer']} | {r['lr']} | {r['final_val_loss']:.4f} | {r['steps']} | "
                  f"{r['tokens'] / 1e6:.1f}M | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
