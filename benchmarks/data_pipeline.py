"""The data pipeline, measured: `olm data prepare` throughput (MB/s of input text) and peak memory with 1 and N
worker processes, the mixture loader's tokens/s with 0..N DataLoader workers, and the datamodule's memory at two
corpus sizes.

    python benchmarks/data_pipeline.py prepare --mb 64 --workers 1 2 --rust-threads
    python benchmarks/data_pipeline.py loader --tokens 50000000 500000000 --workers 0 1 2

prepare: the input is the running interpreter's standard library (.py files, ~31 MB) written as JSONL rows
until it holds --mb MB, tokenized with a byte-level BPE of 4096 ids trained beforehand on the stdlib (training is
not timed). Each setting runs `olm data prepare` in a fresh process; reported: input MB / wall seconds of the whole
command, and the peak resident memory (ru_maxrss) of the main process and of the largest worker. workers=1 is one
process with one thread (TOKENIZERS_PARALLELISM=false); --rust-threads adds one process that lets the tokenizers
library parallelise encode_batch over its own threads.

loader: two prepared sources (weights 0.7 / 0.3) of random uint16 tokens in olm's prepared format (manifest,
shards of 2**27 tokens), --tokens in all per corpus size; the datamodule of data.source=prepared with
seq_len 1024 and batch 16 (gpt2_small's shape) yields --batches train batches per setting, after 20 untimed ones.
Reported: tokens/s, and the process's anonymous resident memory (RssAnon: memory the process owns; pages of the
memory-mapped shards are file cache, counted in RssFile) and total RSS after the batches, at each corpus size, with
num_workers=0 (the workers' memory is their own).

Run from the repository root with its .venv; no network. Data goes to a temporary directory that is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def stdlib_rows(target_bytes: int):
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "site-packages" not in p.parts)
    written = 0
    while written < target_bytes:
        for f in files:
            text = f.read_bytes().decode("utf-8", "replace")
            written += len(text.encode())
            yield text
            if written >= target_bytes:
                return


def write_input(path: Path, mb: float) -> int:
    with open(path, "w") as f:
        for text in stdlib_rows(int(mb * 1e6)):
            f.write(json.dumps({"text": text}) + "\n")
    return path.stat().st_size


def prepare_once(args) -> None:
    """One prepare in this process; prints its measurements as JSON (the parent runs this in a fresh process)."""
    from olm.data.prepare import prepare

    start = time.perf_counter()
    manifest = prepare(args.input, args.out, tokenizer_path=args.tokenizer, workers=args.workers,
                       shard_tokens=1 << 24, progress=False)
    wall = time.perf_counter() - start
    kb = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({"wall_s": wall, "tokens": sum(s["num_tokens"] for s in manifest["splits"].values()),
                      "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb / 1e6,
                      "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kb / 1e6}))


def bench_prepare(args) -> list[dict]:
    from olm.data import StdlibCorpus
    from olm.data.tokenizers import build_bpe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = write_input(tmp / "input.jsonl", args.mb)
        build_bpe(StdlibCorpus(), 4096, tmp / "cache").save(tmp / "tokenizer")
        settings = [(w, False) for w in args.workers] + ([(1, True)] if args.rust_threads else [])
        for workers, rust_threads in settings:
            out = tmp / f"out-{workers}-{rust_threads}"
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            env.pop("TOKENIZERS_PARALLELISM", None)
            if workers == 1 and not rust_threads:  # one process, one thread: the baseline the pool is compared with
                env["TOKENIZERS_PARALLELISM"] = "false"
            proc = subprocess.run([sys.executable, __file__, "prepare-once", "--input", str(tmp / "input.jsonl"),
                                   "--out", str(out), "--tokenizer", str(tmp / "tokenizer"), "--workers",
                                   str(workers)], capture_output=True, text=True, env=env, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(workers=workers, rust_threads=rust_threads, input_mb=size / 1e6,
                       mb_per_s=size / 1e6 / row["wall_s"], load=os.getloadavg()[0])
            rows.append(row)
            label = " (the tokenizers library's own threads)" if rust_threads else ""
            print(f"workers={workers}{label}: {row['mb_per_s']:.2f} MB/s ({size / 1e6:.0f} MB in "
                  f"{row['wall_s']:.1f} s, "
                  f"{row['tokens']:,} tokens), peak RSS main {row['main_peak_mb']:.0f} MB, largest worker "
                  f"{row['worker_peak_mb']:.0f} MB (1-min load average after it: {row['load']:.2f})", flush=True)
    return rows


def synthetic_source(path: Path, tokens: int, seed: int, shard_tokens: int = 1 << 27) -> None:
    """A prepared folder of random byte ids (the byte tokenizer), in the layout `olm data prepare` writes."""
    from olm.data import ByteTokenizer

    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", tokens), ("val", max(tokens // 100, 1 << 16))):
        (path / split).mkdir(parents=True)
        shards, left, i = [], n, 0
        while left:
            count = min(left, shard_tokens)
            with open(path / split / f"shard_{i:05d}.bin", "wb") as f:
                for lo in range(0, count, 1 << 24):
                    f.write(rng.integers(0, 256, min(1 << 24, count - lo), dtype=np.uint16).tobytes())
            shards.append({"file": f"{split}/shard_{i:05d}.bin", "num_tokens": count})
            left, i = left - count, i + 1
        splits[split] = {"num_tokens": n, "num_documents": 1, "num_bytes": n, "max_id": 255, "shards": shards}
    tok.save(path / "tokenizer")
    manifest = {"format": "olm-prepared", "version": 1, "dtype": "uint16", "separator": "\n\n", "splits": splits,
                "tokenizer": {"name": "byte", "identity": tok.identity, "vocab_size": 256, "eos_id": None,
                              "dir": "tokenizer"}}
    (path / "manifest.json").write_text(json.dumps(manifest))


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def loader_once(args) -> None:
    """Iterate the mixture loader in this process; prints tokens/s and memory as JSON."""
    import torch

    from olm.data import TextDataModule

    torch.set_num_threads(1)
    sources = {"code": {"path": args.code, "weight": 0.7}, "prose": {"path": args.prose, "weight": 0.3}}
    dm = TextDataModule(source="prepared", sources=sources, seq_len=1024, batch_size=16, num_workers=args.workers,
                        pin_memory=False, val_batches=2)
    dm.setup()
    it = iter(dm.train_dataloader())
    for _ in range(20):
        next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        x, y = next(it)
    wall = time.perf_counter() - start
    assert x.shape == (16, 1024) and x.dtype == torch.int64
    print(json.dumps({"tokens_per_s": args.batches * 16 * 1024 / wall, **memory_mb()}))


def bench_loader(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            code, prose = Path(tmp) / f"code-{tokens}", Path(tmp) / f"prose-{tokens}"
            synthetic_source(code, int(tokens * 0.7), 0)
            synthetic_source(prose, int(tokens * 0.3), 1)
            for workers in args.workers:
                proc = subprocess.run([sys.executable, __file__, "loader-once", "--code", str(code), "--prose",
                                       str(prose), "--workers", str(workers), "--batches", str(args.batches)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                      check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row.update(corpus_tokens=tokens, workers=workers)
                rows.append(row)
                print(f"corpus {tokens:,} tokens, num_workers={workers}: {row['tokens_per_s'] / 1e6:.2f}M tokens/s; "
                      f"RssAnon {row['RssAnon']:.0f} MB, RssFile {row['RssFile']:.0f} MB, VmRSS {row['VmRSS']:.0f} MB "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
            for d in (code, prose):
                subprocess.run(["rm", "-rf", str(d)], check=True)
    return rows


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--mb", type=float, default=64, help="input size in MB (stdlib sources as JSONL, repeated)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rust-threads", action="store_true",
                   help="also one process with the tokenizers library's own thread pool (its encode_batch default)")
    p = sub.add_parser("prepare-once")
    for flag in ("--input", "--out", "--tokenizer"):
        p.add_argument(flag, required=True)
    p.add_argument("--workers", type=int, required=True)
    p = sub.add_parser("loader")
    p.add_argument("--tokens", type=int, nargs="+", default=[50_000_000, 500_000_000])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=300)
    p = sub.add_parser("loader-once")
    for flag in ("--code", "--prose"):
        p.add_argument(flag, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--batches", type=int, required=True)
    args = parser.parse_args(argv)
    return {"prepare": bench_prepare, "prepare-once": prepare_once, "loader": bench_loader,
            "loader-once": loader_once}[args.what](args)


if __name__ == "__main__":
    main()
