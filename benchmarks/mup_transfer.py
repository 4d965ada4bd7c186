"""The best learning rate per width and parametrization, from a ``+experiment=mup_transfer`` multirun.

    python benchmarks/mup_transfer.py MULTIRUN_DIR

Reads each job's config.yaml and summary.json, averages the final val loss over seeds for every
(parametrization, width, lr), and prints the table with each width's best lr. muP transfers when the best lr at
width 512 is the one at width 64; in the standard parametrization it moves (down, for Adam). The best is also
given by its seeds: in how many of them it is the best of its row.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml


def collect(sweep_dir: Path) -> dict[tuple[str, int, float], dict[int, float]]:
    """{(parametrization, width, lr): {seed: final val loss}} over the finished jobs under ``sweep_dir``."""
    out: dict[tuple[str, int, float], dict[int, float]] = defaultdict(dict)
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if summary.get("status") != "finished" or summary.get("val_loss") is None:
            continue
        cfg = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        key = (cfg["model"]["parametrization"], int(cfg["model"]["embed_dim"]), float(cfg["optim"]["lr"]))
        out[key][int(cfg["seed"])] = float(summary["val_loss"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    runs = collect(args.sweep_dir)
    lrs = sorted({lr for _, _, lr in runs})
    print("| parametrization | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr (seeds agreeing) |")
    print("|---|---|" + "---|" * len(lrs) + "---|")
    for parametrization in ("standard", "mup"):
        for width in sorted({w for p, w, _ in runs if p == parametrization}):
            row = {lr: runs.get((parametrization, width, lr), {}) for lr in lrs}
            means = {lr: statistics.mean(v.values()) for lr, v in row.items() if v}
            cells = []
            for lr in lrs:
                values = list(row[lr].values())
                spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{means[lr]:.3f}{spread}" if lr in means else "")
            best = min(means, key=means.get)
            seeds = set.intersection(*(set(v) for v in row.values() if v))
            agree = sum(min(lrs, key=lambda lr: row[lr].get(s, float("inf"))) == best for s in seeds)
            print(f"| {parametrization} | {width} | " + " | ".join(cells) + f" | {best:g} ({agree}/{len(seeds)}) |")


if __name__ == "__main__":
    main()
