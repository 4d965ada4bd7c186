"""CPU threads per training process: does torch's default (one intra-op thread per core) oversubscribe the
cores when several olm-train processes share a machine, and is one thread faster for small models?

Runs `olm-train` with OMP_NUM_THREADS=<k> in its environment (torch reads it at start-up) for these
cases:

    alone   one smoke run (+experiment=smoke: 20 steps, 4 layers x 32 wide, batch 4 x 32, byte tokenizer)
    pair    two smoke runs at the same time, as under `pytest -n 2` with each test starting an olm-train
    ddp     one smoke run with trainer=ddp_cpu (2 ranks over gloo)
    larger  lm_small, byte tokenizer, batch 16 x 256, 30 steps: where more threads might start to pay

Each setting is one OMP_NUM_THREADS value; "unset" leaves the variable out, so olm picks (olm.train.speed.cpu_threads:
the cores idle at the start of a single process; under DDP, cores // ranks). `--busy N` keeps N cores busy with other
work (a spinning process each) for the whole measurement, as a shared machine would. The `sweep` case is the README's
smoke sweep (9 jobs, one after another in one process). Cases
and settings are interleaved within each repeat, and the order of the settings alternates between
repeats, so slow drift in the machine's load falls on all settings alike; an untimed run of each case
goes first. Reported per case and setting: the median and min-max over repeats of the command's wall time
(until every process of the case has ended), of the training time from summary.json (tokens_seen /
tokens_per_sec: the timed logging intervals, validation excluded, first interval skipped), and of the CPU
seconds the processes used (user + system; threads that spin or contend show up here).

    python benchmarks/cpu_threads.py --repeats 3
    python benchmarks/cpu_threads.py --repeats 5 --cases alone pair --threads 1 2 unset

Run from the repository root with its .venv; no network. Run dirs go to a temporary directory that is
removed.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OLM_TRAIN = str(Path(".venv/bin/olm-train"))
SMOKE = ["+experiment=smoke", "logger=none"]
LARGER = ["model=lm_small", "data.tokenizer=byte", "data.seq_len=256", "data.batch_size=16", "trainer=cpu",
          "trainer.max_steps=30", "trainer.val_check_interval=30", "logger=none", "sample.max_new_tokens=0",
          "export=false"]
# The README's smoke sweep: 3 FFN widths x 3 seeds, one job after another in one process.
SWEEP = ["-m", "+experiment=[ffn_multiplier,smoke]", "logger=none"]
# case -> the override lists of the processes started together
CASES = {
    "alone": [SMOKE],
    "pair": [SMOKE, SMOKE],
    "ddp": [SMOKE + ["trainer=ddp_cpu"]],
    "larger": [LARGER],
    "sweep": [SWEEP],
}


def run_case(case: str, threads: str, root: Path, index: int) -> dict:
    """Start the case's processes together and wait for all of them; returns times and CPU seconds."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)  # MKL would fall back to it and blur the setting
    if threads != "unset":
        env["OMP_NUM_THREADS"] = threads
    env["WANDB_MODE"] = "disabled"
    run_dirs, procs, logs = [], [], []
    load_before = os.getloadavg()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    for i, overrides in enumerate(CASES[case]):
        run_dir = root / f"{case}-{threads}-{index}-{i}"
        run_dirs.append(run_dir)
        log = open(root / f"{run_dir.name}.log", "w")
        logs.append(log)
        where = f"hydra.sweep.dir={run_dir}" if overrides[0] == "-m" else f"hydra.run.dir={run_dir}"
        cmd = [OLM_TRAIN, *overrides, where]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for log in logs:
        log.close()
    if any(codes):
        raise SystemExit(f"{case} threads={threads} failed ({codes}); see {root}/*.log")
    train = []
    for run_dir in run_dirs:  # a sweep: the sum over its jobs
        summaries = [json.loads(p.read_text()) for p in sorted(run_dir.glob("**/summary.json"))]
        train.append(sum(s["tokens_seen"] / s["tokens_per_sec"] for s in summaries))
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    # The slowest process sets the case's training time (pair: both must finish; ddp: rank 0 reports).
    return {"wall": wall, "train": max(train), "cpu": cpu, "load": load_before}


def fmt(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", nargs="+", default=["1", "2"],
                   help='OMP_NUM_THREADS values; "unset" omits the variable')
    p.add_argument("--ddp-unset", action=argparse.BooleanOptionalAction, default=True,
                   help="also run ddp with the variable unset (Lightning then sets cores // ranks itself)")
    p.add_argument("--busy", type=int, default=0,
                   help="cores kept busy by other work (a `while True: pass` process each) during every run")
    a = p.parse_args()
    if not Path(OLM_TRAIN).exists():
        raise SystemExit(f"{OLM_TRAIN} not found: run from the repository root after `make install`")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy)]
    try:
        run_all(a)
    finally:
        for burner in burners:
            burner.kill()


def run_all(a) -> None:

    settings = {case: list(a.threads) for case in a.cases}
    if "ddp" in settings and a.ddp_unset and "unset" not in settings["ddp"]:
        settings["ddp"].append("unset")
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="olm-cpu-threads-") as tmp:
        root = Path(tmp)
        # One untimed run of each case first: the first run fills the data cache (tokenized corpus) and the
        # page cache with torch's libraries, which would otherwise bill the first setting.
        for case in a.cases:
            run_case(case, settings[case][0], root, -1)
        for rep in range(a.repeats):
            for case in a.cases:
                # Alternate the order so that neither setting always runs right after the other.
                order = settings[case] if rep % 2 == 0 else settings[case][::-1]
                for threads in order:
                    r = run_case(case, threads, root, rep)
                    results.setdefault((case, threads), []).append(r)
                    print(f"# rep {rep} {case:6s} threads={threads:5s} wall {r['wall']:6.2f} s  "
                          f"train {r['train']:6.2f} s  cpu {r['cpu']:6.1f} s  load {r['load']:.2f}",
                          flush=True)

    print(f"\n{a.repeats} repeats, median (min-max); {os.cpu_count()} CPUs, {a.busy} kept busy by other work\n")
    print("| case | OMP_NUM_THREADS | wall s | train s (summary) | CPU s (user+sys) | load avg before |")
    print("|---|---|---|---|---|---|")
    for case in a.cases:
        for threads in settings[case]:
            rs = results[(case, threads)]
            cells = [fmt([r["wall"] for r in rs]), fmt([r["train"] for r in rs]),
                     fmt([r["cpu"] for r in rs], 1), fmt([r["load"] for r in rs], 1)]
            print(f"| {case} | {threads} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
