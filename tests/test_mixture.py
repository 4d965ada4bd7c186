"""Mixtures of prepared sources: proportions, permutations, rank disjointness and resume at the sampler; the
datamodule's windows; one training run resumed against an uninterrupted one, with per-source val metrics in
metrics.csv, W&B and summary.json; `olm compare` per source; bad input through olm-train's entry points."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from olm.data import TextDataModule
from olm.data.mixture import MixtureBatchSampler, MixtureSchedule, Permutation, block_counts
from olm.data.prepare import prepare

WEIGHTS = [0.6, 0.3, 0.1]


def test_permutations_are_bijections_and_differ_by_key():
    for n in (1, 2, 3, 17, 1000, 4097):
        perm = Permutation(n, [0, 1, 2])(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    a, b = Permutation(1000, [0, 0, 0])(np.arange(1000)), Permutation(1000, [0, 0, 1])(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))


def test_observed_proportions_over_10k_samples_are_within_2_percent_of_the_weights():
    for seed in (0, 1):
        sources, _ = MixtureSchedule(WEIGHTS, seed)(np.arange(10_000))
        observed = np.bincount(sources, minlength=3) / 10_000
        assert np.all(np.abs(observed - WEIGHTS) < 0.02), observed
    assert block_counts([1, 1e-9]).tolist() == [4095, 1]  # a tiny weight still gets sampled
    assert block_counts([0.7, 0.3]).tolist() == [2867, 1229]  # largest remainder: 2867.2 and 1228.8


def test_every_pass_over_a_source_visits_each_window_once():
    sampler = MixtureBatchSampler([7, 50, 3], WEIGHTS, batch_size=4, seed=5)
    sources, windows = sampler.sources_and_windows(range(3000))
    for s, n in enumerate([7, 50, 3]):
        seen = windows[sources == s]
        for start in range(0, len(seen) - n + 1, n):
            assert sorted(seen[start:start + n].tolist()) == list(range(n))


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_ranks_are_disjoint_their_union_is_one_process_and_resume_continues_exactly():
    """Two ranks (as gloo DDP runs them: rank and world size from the trainer) read disjoint samples whose union is
    a one-process run's batch; a sampler started at micro-batch 9 (a resume) yields the uninterrupted batches."""
    windows, B, W = [30, 11, 5], 3, 2
    single = MixtureBatchSampler(windows, WEIGHTS, B * W, seed=2)
    ranks = [MixtureBatchSampler(windows, WEIGHTS, B, seed=2, rank=r, world_size=W) for r in range(W)]
    for b in range(0, 60, 7):
        gs = [set(s.global_indices(b)) for s in ranks]
        assert not gs[0] & gs[1] and gs[0] | gs[1] == set(single.global_indices(b))
    per_rank = [take(s, 40) for s in ranks]
    assert [r0 + r1 for r0, r1 in zip(*per_rank)] == take(single, 40)
    for r in range(W):
        resumed = MixtureBatchSampler(windows, WEIGHTS, B, seed=2, rank=r, world_size=W, start_batch=9)
        assert take(resumed, 31) == per_rank[r][9:]
    assert take(MixtureBatchSampler(windows, WEIGHTS, B * W, seed=3), 5) != take(single, 5)


# ---- prepared sources in the datamodule and in training

@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict[str, Path]:
    """Two sources prepared with the byte tokenizer, several shards each."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for name, line in (("code", "def f{i}(x):\n    return x * {i}\n"), ("prose", "The {i}th quiet river bends.\n")):
        (root / f"{name}-text").mkdir()
        for i in range(24):
            (root / f"{name}-text" / f"{i}.txt").write_text(line.format(i=i) * (8 + i % 5))
        prepare(root / f"{name}-text", root / name, tokenizer="byte", val_fraction=0.25, shard_tokens=1500,
                workers=1, progress=False)
        out[name] = root / name
    return out


def sources_override(mixture, code=0.7, prose=0.3) -> str:
    entries = [f"{name}:{{path:'{mixture[name]}',weight:{weight}}}" for name, weight in (("code", code),
                                                                                     ("prose", prose))]
    return f"data.sources={{{','.join(entries)}}}"


def test_datamodule_windows_come_from_the_sources_shards(mixture):
    dm = TextDataModule(source="prepared", sources={n: {"path": str(p), "weight": w} for (n, p), w in
                                                    zip(mixture.items(), (0.7, 0.3))}, seq_len=32, batch_size=4,
                        val_batches=2)
    dm.setup()
    streams = {}
    for name, path in mixture.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert len(manifest["splits"]["train"]["shards"]) > 1  # windows cross shard boundaries
        streams[name] = np.concatenate([np.fromfile(path / s["file"], np.uint16)
                                        for s in manifest["splits"]["train"]["shards"]])
    sampler = dm.train_sampler()
    batch = next(iter(sampler))
    sources, windows = sampler.sources_and_windows(sampler.global_indices(0))
    for flat, s, w in zip(batch, sources, windows):
        x, y = dm._train[flat]
        tokens = streams[["code", "prose"][s]][w * 32: w * 32 + 33].astype(np.int64)
        assert torch.equal(x, torch.from_numpy(tokens[:-1])) and torch.equal(y, torch.from_numpy(tokens[1:]))
    assert dm.val_source_names() == ["code", "prose"] and [len(v) for v in dm.val_dataloader()] == [2, 2]
    assert dm.num_train_tokens == sum(len(t) for t in streams.values())
    assert dm.val_bytes_per_token == 1.0 and dm.source_bytes_per_token() == [1.0, 1.0]  # bytes are the tokens


TINY = ["model=lm_tiny", "data=prepared", "data.seq_len=32", "data.batch_size=4", "data.val_batches=2",
        "trainer=cpu", "sample.max_new_tokens=0", "export=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "callbacks.eval.tasks=[]", "scheduler.total_steps=6",
        "trainer.val_check_interval=3", "cpu_threads=1"]


def run(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    from olm.train.compose import compose
    from olm.train.run import train

    cfg = compose([*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.name = name
    train(cfg)
    return tmp_path / name


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_killed_mixture_run_resumes_to_an_uninterrupted_one_and_logs_val_per_source(mixture, tmp_path):
    """olm-train on a mixture SIGKILLs itself at its 5th batch (checkpoint at step 3); resume=auto continues to the
    same per-step losses as an uninterrupted run, whose per-source val metrics reach metrics.csv, W&B and
    summary.json."""
    import os
    import signal
    import subprocess
    import time

    from test_reliability import FAULTS
    from wandb_records import summarize

    mix = sources_override(mixture)
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "sitecustomize.py").write_text(FAULTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path / "faults"),
                                                                                 os.environ.get("PYTHONPATH", "")]),
           "OLM_TEST_FAULT": json.dumps({"die": {"rank": 0, "batch": 5, "marker": str(tmp_path / "died")}})}
    killed = subprocess.run([sys.executable, "-m", "olm.train", *TINY, mix, "trainer.max_steps=6", "logger=none",
                             f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'parts'}"],
                            env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "died").exists() and not (tmp_path / "parts" / "summary.json").exists()
    threads = torch.get_num_threads()
    try:  # one thread in both, as in the killed process: bit-identical arithmetic
        parts = run(tmp_path, "parts", [mix, "trainer.max_steps=6", "logger=none", "resume=auto"])
        whole = run(tmp_path, "whole", [mix, "trainer.max_steps=6", "logger=wandb"])
    finally:
        torch.set_num_threads(threads)

    def losses(run_dir):
        return {int(r["step"]): float(r["train/loss"]) for r in rows(run_dir) if r["train/loss"]}

    assert sorted(losses(whole)) == list(range(6)) and losses(parts) == losses(whole)

    names = ("val/loss", "val/bpb", "val/code/loss", "val/code/bpb", "val/prose/loss", "val/prose/bpb")
    val_rows = [r for r in rows(whole) if r["val/loss"]]
    assert [int(r["step"]) for r in val_rows] == [2, 5] and all(r[n] for r in val_rows for n in names)
    last = {n: float(val_rows[-1][n]) for n in names}
    # 2 val windows of 32 targets per source: the overall loss is the token-weighted mean of the two sources'
    assert last["val/loss"] == pytest.approx((last["val/code/loss"] + last["val/prose/loss"]) / 2, rel=1e-6)
    assert last["val/code/bpb"] == pytest.approx(last["val/code/loss"] / np.log(2), rel=1e-6)  # 1 byte per token
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(last["val/loss"], rel=1e-6)
    assert summary["tokenizer"] == TextDataModule(source="prepared", path=str(mixture["code"])).tokenizer.identity
    for n in names[2:]:
        assert summary[n] == pytest.approx(last[n], rel=1e-6)
    wandb_file = next((whole / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30  # W&B's service process may still be writing the last records
    while time.monotonic() < deadline:
        record = summarize(wandb_file)
        history = [h for h in record["history"] if "val/code/loss" in h]
        if len(history) == 2 and "val/prose/bpb" in record["summary"]:
            break
        time.sleep(0.5)
    assert [h["val/code/loss"] for h in history] == pytest.approx([float(r["val/code/loss"]) for r in val_rows])
    assert record["summary"]["val/prose/bpb"] == pytest.approx(last["val/prose/bpb"], rel=1e-6)


def test_a_checkpoint_continued_on_data_of_another_tokenizer_is_one_line(mixture, tmp_path):
    """Same model (vocabulary padded to 320), other tokenizer: a byte-level run's checkpoint on BPE-prepared data."""
    from olm.errors import ConfigError

    bpe_data = tmp_path / "bpe"
    prepare(mixture["prose"].parent / "prose-text", bpe_data, tokenizer="bpe", vocab_size=300, val_fraction=0.25,
            workers=1, progress=False, cache_dir=tmp_path / "cache")
    common = ["trainer.max_steps=2", "trainer.val_check_interval=2", "logger=none", "model.vocab_size=320"]
    first = run(tmp_path, "byte", [f"data.path='{mixture['prose']}'", *common])
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["olm_tokenizer"]["identity"] == TextDataModule(
        source="prepared", path=str(mixture["prose"])).tokenizer.identity
    with pytest.raises(ConfigError) as info:
        run(tmp_path, "bpe-run", [f"data.path='{bpe_data}'", *common, f"ckpt_path='{ckpt}'"])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{ckpt} was trained with another tokenizer (")
    assert not (tmp_path / "bpe-run" / "config.yaml").exists()  # refused before the run wrote anything


def test_olm_compare_compares_variants_per_source(tmp_path):
    from scipy import stats as sps

    from olm.compare import Options, write_report
    from test_compare import make_run

    planted = {"2": [3.10, 3.14, 3.08], "4": [3.02, 3.05, 3.01]}
    job = 0
    for ff, losses in planted.items():
        for seed, loss in enumerate(losses):
            make_run(tmp_path / "sweep" / str(job), [f"model.ff_multiplier={ff}"], 4.0, seed=seed,
                     extra={"val/code/loss": loss, "val/prose/loss": 4.0})
            job += 1
    write_report([tmp_path / "sweep"], tmp_path / "r", Options(metric="val/code/loss"))
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {r["variant"]: r for r in data["studies"][0]["variants"] if r["metric"] == "val/code/loss"}
    assert rows["ff_multiplier=4"]["mean"] == pytest.approx(np.mean(planted["4"]), abs=1e-12)
    assert rows["ff_multiplier=4"]["p"] == pytest.approx(sps.ttest_rel(planted["4"], planted["2"]).pvalue, abs=1e-9)
    # the same config keys, but data prepared with other tokenizers (summary.json's identity): bits/byte, not loss
    assert write_report([tmp_path / "sweep"], tmp_path / "auto")["studies"][0].metric == "val_loss"
    for job in range(6):
        path = tmp_path / "sweep" / str(job) / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer": "ab"[job // 3]}))
    assert write_report([tmp_path / "sweep"], tmp_path / "mixed")["studies"][0].metric == "val_bpb"


BAD = {  # override(s) -> the one line
    "missing path": ("data.sources={{code:{{path:'{missing}',weight:1}}}}", "data.sources.code.path=",
                     "does not exist"),
    "weight <= 0": ("{mix0}", "data.sources.code.weight=0.0 must be a positive number"),
    "shorter than one sequence": ("{mix} data.seq_len=30000", "shorter than one sequence"),
    "another tokenizer": ("{mix} data.tokenizer=hf data.tokenizer_path='{bpe}'", "than data.tokenizer_path names"),
    "corrupt shard": ("{corrupt}", "is corrupt", "token width (2 bytes)"),
}


@pytest.fixture(scope="module")
def bad_inputs(mixture, tmp_path_factory):
    import shutil

    from olm.data import build_corpus, build_tokenizer

    root = tmp_path_factory.mktemp("bad")
    corpus = build_corpus("text", mixture["code"].parent / "code-text", val_fraction=0.25)
    build_tokenizer("bpe", corpus=corpus, vocab_size=300, cache_dir=root / "cache").save(root / "bpe")
    (root / "bpe" / "tokenizer.json").rename(root / "bpe.json")
    shutil.copytree(mixture["prose"], root / "corrupt")
    with open(root / "corrupt" / "val" / "shard_00000.bin", "ab") as f:
        f.write(b"\0")
    values = {"missing": root / "nope", "bpe": root / "bpe.json",
              "mix": sources_override(mixture), "mix0": sources_override(mixture, code=0),
              "corrupt": sources_override({**mixture, "prose": root / "corrupt"})}
    return {name: tuple(part.format(**values) for part in spec) for name, spec in BAD.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_through_every_entry_point(case, bad_inputs, monkeypatch, capsys, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from olm.errors import ConfigError
    from olm.train import cli
    from olm.train.checks import check_run
    from olm.train.config import conf_dir

    override, *messages = bad_inputs[case]
    base = ["model=lm_tiny", "data=prepared", "trainer=cpu", "logger=none", *override.split(" ")]
    for name, argv in {"single run": base, "multirun": ["-m", *base, "seed=0,1"],
                       "--cfg job": ["--cfg", "job", *base]}.items():
        monkeypatch.setattr(sys, "argv", ["olm-train", *argv, f"hydra.sweep.dir={tmp_path}/sweep",
                                          f"hydra.run.dir={tmp_path}/run"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert all(m in lines[0] for m in messages), (name, lines[0])
        assert "Traceback" not in err and not out.strip(), name
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):  # Hydra's own compose API, then olm's check
        cfg = hydra_compose("train", overrides=base)
    with pytest.raises(ConfigError) as info:
        check_run(cfg)
    assert all(m in str(info.value) for m in messages) and "\n" not in str(info.value)


@pytest.mark.slow
def test_two_gloo_ranks_on_a_mixture_equal_one_process_with_their_global_batch(mixture, tmp_path):
    """2 DDP ranks with 2 windows each train exactly as one process with 4: the ranks read disjoint samples whose
    union is the one process's batch (a repeated or missing sample would change the loss at the first step), and
    the per-source validation, split across ranks, gives the same numbers."""
    import os
    import subprocess

    def train_with(name: str, overrides: list[str]) -> Path:
        out = tmp_path / name
        args = [a for a in TINY if not a.startswith(("trainer=", "data.batch_size="))]
        proc = subprocess.run([sys.executable, "-m", "olm.train", *args, *overrides, sources_override(mixture),
                               "optim=adamw", "trainer.max_steps=6", "logger=csv", f"hydra.run.dir={out}",
                               f"paths.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    ddp = train_with("ddp", ["trainer=ddp_cpu", "data.batch_size=2"])
    one = train_with("one", ["trainer=cpu", "data.batch_size=4"])

    def losses(run_dir):
        return [float(r["train/loss"]) for r in rows(run_dir) if r.get("train/loss")]

    assert len(losses(ddp)) == 6 and losses(ddp) == pytest.approx(losses(one), abs=2e-5)
    s_ddp, s_one = (json.loads((d / "summary.json").read_text()) for d in (ddp, one))
    assert s_ddp["world_size"] == 2 and s_ddp["tokens_seen"] == s_one["tokens_seen"] == 6 * 4 * 32
    for key in ("val_loss", "val/code/loss", "val/prose/loss"):
        assert s_ddp[key] == pytest.approx(s_one[key], abs=2e-5), key
