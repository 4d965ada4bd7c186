"""How long the command line takes to answer: each command's wall time over ``python -c 'import torch'``.

Every olm command imports torch, so the figure that olm controls is the time beyond torch's own import, measured in
the same run (torch's import moves with the machine's load and disk cache). Cases, each a real subprocess:

    typo        olm-train model=lm_tinny                       (the did-you-mean line, exit 2)
    typo_m      olm-train -m model=lm_tiny,lm_tinny            (a sweep with one bad job, exit 2)
    help        olm-train --help
    cfg_job     olm-train --cfg job model=lm_tiny              (every check, then the composed config)
    models      olm models
    components  olm components
    eval_task   olm eval --ckpt <model dir> --tasks olm_nextlin (an unknown task, exit 2)

Cases and the torch baseline are interleaved within each repeat, after one untimed warm-up of each. Reported per case:
the median wall time, the median over the torch import, and the modules of Lightning, transformers, lm-eval and
scipy the command imported (read back from ``sys.modules`` at exit: none is the target).

    python benchmarks/cli_latency.py --repeats 5

Run from the repository root with its .venv; no network.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(".venv/bin")
HEAVY = ("lightning", "transformers", "lm_eval", "scipy")
# Runs a console script in-process and reports, at exit, which heavy packages it imported.
PROBE = """
import atexit, json, os, runpy, sys
def report():
    found = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
    with open(os.environ["OLM_LATENCY_PROBE"], "w") as f:
        json.dump(found, f)
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
""" % (HEAVY,)


def cases(model_dir: str) -> dict[str, list[str]]:
    train, olm = str(BIN / "olm-train"), str(BIN / "olm")
    return {
        "typo": [train, "model=lm_tinny"],
        "typo_m": [train, "-m", "model=lm_tiny,lm_tinny"],
        "help": [train, "--help"],
        "cfg_job": [train, "--cfg", "job", "model=lm_tiny"],
        "models": [olm, "models"],
        "components": [olm, "components"],
        "eval_task": [olm, "eval", model_dir, "--tasks", "olm_nextlin"],
    }


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def heavy_imports(command: list[str], env: dict, tmp: Path) -> list[str]:
    probe = tmp / "probe.json"
    subprocess.run([sys.executable, "-c", PROBE, *command], env={**env, "OLM_LATENCY_PROBE": str(probe)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return json.loads(probe.read_text()) if probe.is_file() else ["(no report)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=None, help="a subset of the cases (default: all)")
    args = parser.parse_args()
    python = str(BIN / "python")
    env = {**os.environ, "WANDB_MODE": "offline"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        subprocess.run([python, "-c", "import sys, olm; olm.build_model(dict(vocab_size=256, embed_dim=32, "
                        "num_heads=2, num_layers=1, max_seq_len=32)).save(sys.argv[1])", str(model_dir)], check=True)
        chosen = {k: v for k, v in cases(str(model_dir)).items() if not args.cases or k in args.cases}
        baseline = [python, "-c", "import torch"]
        for command in [baseline, *chosen.values()]:
            timed(command, env)  # warm the disk cache
        times: dict[str, list[float]] = {"torch": [], **{k: [] for k in chosen}}
        for _ in range(args.repeats):
            times["torch"].append(timed(baseline, env))
            for name, command in chosen.items():
                times[name].append(timed(command, env))
        torch_s = statistics.median(times["torch"])
        print(f"load averages: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; repeats: {args.repeats}")
        print(f"| command | median s | over `import torch` s | heavy modules imported |")
        print("|---|---|---|---|")
        print(f"| python -c 'import torch' | {torch_s:.2f} | - | - |")
        for name, command in chosen.items():
            median = statistics.median(times[name])
            heavy = ", ".join(heavy_imports(command, env, Path(tmp))) or "none"
            shown = " ".join(Path(command[0]).name if i == 0 else a for i, a in enumerate(command))
            shown = shown.replace(str(model_dir), "MODEL_DIR")
            print(f"| `{shown}` | {median:.2f} | {median - torch_s:+.2f} | {heavy} |")


if __name__ == "__main__":
    main()
