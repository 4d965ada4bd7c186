"""`olm compare` over many run dirs: how long the report takes for a folder of N runs.

Writes N planted run dirs into a temporary directory, each as olm-train writes it: the resolved config.yaml of a
smoke run (composed by olm itself, about 200 lines), .hydra/overrides.yaml, a metrics.csv of --rows logged rows
(train and val), and summary.json. The runs form --studies experiments of variants x seeds (default 5 x 10 x 10 =
500), so the report has real statistics, tables and plots to compute. Then times `write_report` (runs loaded,
studies analysed, every table, PNG and data file written) in this process, best and median of --repeats, and
prints one JSON line.

    python benchmarks/compare_runs.py --runs 500
    python benchmarks/compare_runs.py --runs 500 --studies 1    # one experiment of 50 variants x 10 seeds

Run from the repository root with its .venv; no network.
"""

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def planted_config() -> str:
    from omegaconf import OmegaConf

    from olm.train.compose import compose

    cfg = compose(["+experiment=smoke", "logger=csv", "paths.output_dir=run", "name=run"])
    return OmegaConf.to_yaml(cfg, resolve=True)


def write_runs(root: Path, runs: int, studies: int, seeds: int, rows: int) -> None:
    import random

    config = planted_config()
    per_study = runs // studies
    variants = max(1, per_study // seeds)
    rng = random.Random(0)
    job = 0
    for study in range(studies):
        sweep = root / f"2026-01-0{study % 9 + 1}_00-00-{study:02d}"
        sweep.mkdir(parents=True)
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
        for variant in range(variants):
            for seed in range(seeds):
                run = sweep / str(variant * seeds + seed)
                (run / ".hydra").mkdir(parents=True)
                overrides = ["+experiment=smoke", f"optim.lr={(variant + 1) * 1e-4:.4g}", f"seed={seed}"]
                (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
                (run / "config.yaml").write_text(config.replace("seed: 0", f"seed: {seed}"))
                final = 3.0 + 0.01 * variant + rng.gauss(0, 0.02)
                with open(run / "metrics.csv", "w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(["epoch", "flops_seen", "lr", "step", "tokens_seen", "train/loss", "val/loss"])
                    for i in range(rows // 2):
                        step = 10 * (i + 1) - 1
                        loss = final + 2.0 * (1 - (i + 1) / (rows // 2))
                        writer.writerow([0, (step + 1) * 128 * 4e5, 1e-3, step, (step + 1) * 128, loss + 0.1, ""])
                        writer.writerow([0, "", "", step, "", "", loss])
                summary = {"status": "finished", "val_loss": final, "val_bpb": final / 0.693, "train_loss": final + 0.1,
                           "num_parameters": 55872, "tokens_seen": 2560, "train_flops": 2560 * 4e5,
                           "flops_per_token": 4e5, "tokens_per_sec": 3000.0 + rng.gauss(0, 100), "mfu": None}
                (run / "summary.json").write_text(json.dumps(summary))
                job += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=100, help="rows of each metrics.csv (half train, half val)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from olm.compare import write_report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "multiruns"
        write_runs(root, args.runs, args.studies, args.seeds, args.rows)
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            report = write_report([root], Path(tmp) / f"report{i}")
            times.append(time.perf_counter() - start)
        print(json.dumps({
            "runs": len(report["runs"]), "studies": len(report["studies"]),
            "variants": sum(len(s.variants) for s in report["studies"]), "rows_per_csv": args.rows,
            "best_s": round(min(times), 2), "median_s": round(statistics.median(times), 2),
            "cpus": os.cpu_count(),
        }))


if __name__ == "__main__":
    main()
