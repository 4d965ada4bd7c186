"""The run half of the config: one typed declaration, one validation path for every entry point, Hydra's plain API,
resume rules that cannot damage a run, and the first-hour behaviour of olm-train (help, names, quiet logs, debug)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import olm
from olm.errors import ConfigError
from olm.nn.structure import meta_device
from olm.train import cli
from olm.train.checks import check_run
from olm.train.compose import compose
from olm.train.config import DataConfig, TrainConfig, conf_dir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["+experiment=smoke", "logger=none"]

# The examples, and what each must say: the key, the value, the allowed values or the closest key.
BAD_RUN_KEYS = {
    "optim.lrr=1": "optim.lrr is not a config key; did you mean 'lr'?",
    "optim.lr=abc": "optim.lr='abc': Value 'abc' of type 'str' could not be converted to Float",
    "scheduler.name=cosin": "scheduler.name='cosin' is not known; did you mean 'cosine'? known: cosine, linear, "
                            "constant, wsd",
    "compile=maybe": "compile='maybe': Value 'maybe' is not a valid bool",
    "trainer.max_steps=-5": "trainer.max_steps=-5 must be a positive integer",
    "data.batch_size=0": "data.batch_size=0 must be a positive integer",
    "model.num_heads=3": "model.embed_dim=32 must be divisible by model.num_heads=3",
}


def cli_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """olm-train in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["olm-train", *argv])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def olm_train(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "olm.train", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ---- one declaration ----------------------------------------------------------------------------------------------
def test_no_run_key_is_read_with_a_fallback_default():
    """Every run default lives in olm/train/config.py: Python never supplies a second one with cfg.get(key, x)."""
    for path in (ROOT / "olm" / "train").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bcfg\.get\(|_cfg\.get\(|cfg\.\w+\.get\(\"(?!max_seq_len|vocab_size|parametrization)", text), path.name


def test_group_files_only_state_what_differs_from_the_schema():
    """A value written in a group file equal to the schema's default is a second copy of that default."""
    defaults = OmegaConf.structured(TrainConfig)
    for group in ("data", "trainer", "optim", "scheduler", "logger", "callbacks", "paths"):
        for path in (conf_dir() / group).glob("*.yaml"):
            node = OmegaConf.to_container(OmegaConf.load(path) or OmegaConf.create()) or {}
            for key, value in node.items():
                if key in ("defaults", "name", "source") or isinstance(value, dict):
                    continue
                assert value != OmegaConf.to_container(defaults[group])[key], f"{path.name}: {group}.{key}={value}"


def test_data_schema_is_the_datamodule_signature():
    from olm.data import SOURCES, TOKENIZERS, TextDataModule
    from olm.train import config

    params = list(inspect.signature(TextDataModule).parameters)
    assert [f.name for f in dataclasses.fields(DataConfig)] == params
    assert config.DATA_SOURCES == SOURCES and config.TOKENIZERS == TOKENIZERS


def test_the_module_takes_typed_configs():
    from olm.train.module import LMModule

    names = list(inspect.signature(LMModule).parameters)
    assert names[:4] == ["model_cfg", "optim", "scheduler", "speed"] and len(names) <= 8


# ---- one validation path for every entry point ---------------------------------------------------------------------
@pytest.mark.parametrize("override", BAD_RUN_KEYS)
def test_bad_run_keys_are_one_line_errors_through_every_entry_point(override, monkeypatch, capsys, tmp_path):
    message = BAD_RUN_KEYS[override]
    base = ["model=lm_tiny", "data.tokenizer=byte", *SMOKE]
    runs = {
        "single run": [*base, override],
        "multirun": ["-m", *base, "seed=0,1", override],
        "--cfg job": ["--cfg", "job", *base, override],
        "--config-path": ["--config-path", str(conf_dir()), *base, override],
        "--config-dir": ["--config-dir", str(tmp_path), *base, override],
    }
    for name, argv in runs.items():
        code, out, err = cli_main([*argv, f"hydra.sweep.dir={tmp_path}/sweep"], monkeypatch, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert message in lines[0], (name, lines[0])
        assert "Traceback" not in err and not out.strip(), name
    assert not (tmp_path / "sweep").exists()  # a refused multirun leaves no sweep dir behind
    # Hydra's own compose API: the types fail while composing, naming the key; olm's checks give the same line.
    key = override.split("=")[0]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose("train", overrides=[*base, override])
        except ConfigCompositionException as exc:
            assert key in str(exc) + str(exc.__cause__)  # Hydra's own exception, naming the key
            return
    with pytest.raises(ConfigError) as info:
        check_run(cfg)
    assert message in str(info.value)


def test_a_sweep_is_checked_job_by_job_before_it_starts(monkeypatch, capsys, tmp_path):
    argv = ["-m", "model=lm_tiny", *SMOKE, "model.num_heads=2,3", f"hydra.sweep.dir={tmp_path}/sweep"]
    code, _, err = cli_main(argv, monkeypatch, capsys)
    assert code == 2 and err.strip() == "error: model.embed_dim=32 must be divisible by model.num_heads=3 (all heads share one size)"
    assert not (tmp_path / "sweep").exists()


def test_a_sequence_that_cannot_fit_in_memory_is_refused_with_the_estimate(monkeypatch, capsys):
    code, _, err = cli_main(["--cfg", "job", "model=lm_tiny", "data.seq_len=99999"], monkeypatch, capsys)
    assert code == 2
    match = re.fullmatch(r"error: data.seq_len=99999 with data.batch_size=16 needs at least ([\d.]+) GiB per step "
                         r"\(estimated: .*\), more than the ([\d.]+) GiB of .*", err.strip())
    assert match and float(match[1]) > float(match[2]), err
    # the logits and their gradient (16 x 99999 tokens x 4096 ids x 4 bytes), and 34 values per token, width and
    # block at 2 bytes (2 blocks of width 32)
    tokens = 16 * 99999
    assert float(match[1]) >= round((2 * tokens * 4096 * 4 + tokens * 32 * 2 * 34 * 2) / 2**30, 1)


def test_memory_estimate_is_a_lower_bound_of_a_measured_step():
    """The estimate never exceeds what a step really takes (so it refuses only runs that cannot fit)."""
    import torch

    from olm.train.checks import activation_bytes

    code = textwrap.dedent("""
        import torch, olm

        def status(field):  # kB
            return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

        m = olm.build_model(dict(vocab_size=4096, embed_dim=32, num_heads=2, num_layers=2, max_seq_len=2048))
        x = torch.randint(0, 4096, (4, 2048))
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
        before = status("VmRSS:")
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
        print((status("VmHWM:") - before) * 1024)
    """)
    measured = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
    with meta_device():
        model = olm.build_model(dict(vocab_size=4096, embed_dim=32, num_heads=2, num_layers=2, max_seq_len=2048))
    estimate = activation_bytes(model, 4, 2048, fused_loss=False)
    assert 0.3 * measured < estimate < measured, (estimate, measured)


# ---- Hydra's plain API -----------------------------------------------------------------------------------------------
def test_hydra_plain_api_composes_and_builds_presets_with_no_olm_call(tmp_path):
    """As a notebook or a conftest would: Hydra's initialize + compose, then olm.build_model, in a fresh process
    that calls nothing of olm.train; olm's SearchPathPlugin registers the schemas (tests/test_config.py composes
    every preset the same way)."""
    code = textwrap.dedent("""
        import sys, torch
        from hydra import compose, initialize_config_dir, initialize_config_module
        import olm
        from pathlib import Path
        conf = Path(olm.__file__).parent / "conf"
        presets = ["lm_tiny", "llama_small", "gemma2_tiny", "mixtral_8x7b"]  # tests/test_config.py: all of them
        with initialize_config_dir(str(conf), version_base="1.3"):
            for name in presets:
                cfg = compose("train", overrides=[f"model={name}"])
                with torch.device("meta"):
                    model = olm.build_model(cfg.model)
                print(name, model.vocab_size, sum(p.numel() for p in model.parameters()))
        assert "olm.train.cli" not in sys.modules
        with initialize_config_module("olm.conf", version_base="1.3"):
            cfg = compose("train", overrides=["model=llama_small", "data.tokenizer=byte"])
            print("module", olm.build_model(cfg.model).vocab_size)
            try:
                compose("train", overrides=["data=bin", "data.path=/x"]).model.vocab_size
            except Exception as exc:
                print("bin", repr(str(exc.__cause__ or exc).splitlines()[0]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    built = {line.split()[0]: int(line.split()[1]) for line in lines if line.split()[0] not in ("module", "bin")}
    assert len(built) == 4 and set(built.values()) == {4096}
    assert "module 256" in lines
    assert any(line.startswith("bin ") and "data.vocab_size" in line for line in lines), lines


def test_cfg_job_resolve_prints_the_resolved_config(monkeypatch, capsys):
    code, out, err = cli_main(["--cfg", "job", "--resolve", "model=lm_tiny", "data.tokenizer=byte"], monkeypatch, capsys)
    assert code == 0, err
    cfg = OmegaConf.create(out)
    assert cfg.model.vocab_size == 256 and cfg.data.vocab_size == 256 and cfg.model.max_seq_len == 256
    assert cfg.name == "data.tokenizer=byte,model=lm_tiny" and "${" not in out
    assert Path(cfg.paths.cache_dir).name == "olm" and not cfg.paths.cache_dir.startswith(".")


def test_vocab_size_is_known_without_a_tokenizer_or_names_the_key(tmp_path):
    assert compose(["data.tokenizer=byte"]).model.vocab_size == 256
    assert compose(["data.tokenizer_vocab_size=1000"]).model.vocab_size == 1000  # bpe: exactly that many ids
    with pytest.raises(ConfigError, match=r"^data.vocab_size must be set for data.source='bin'"):
        check_run(compose(["data=bin", f"data.path={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"^data.tokenizer_path=None: the hf tokenizer needs a tokenizer.json"):
        check_run(compose(["data.tokenizer=hf"]))


# ---- resume ----------------------------------------------------------------------------------------------------------
def record_of(run_dir: Path) -> dict[str, bytes]:
    files = ["config.yaml", "metrics.csv", "summary.json", *(str(p.relative_to(run_dir)) for p in
                                                              (run_dir / ".hydra").rglob("*.yaml"))]
    return {name: (run_dir / name).read_bytes() for name in files}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 20-step smoke run (checkpoints at steps 10 and 20), shared by the resume tests: copy it before changing it."""
    root = tmp_path_factory.mktemp("resume")
    proc = olm_train([*SMOKE, "model=lm_tiny", "trainer.val_check_interval=10", f"hydra.run.dir={root}/run"], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_resume_alone_on_a_finished_run_changes_nothing(finished_run, monkeypatch, capsys):
    before = record_of(finished_run)
    code, _, err = cli_main(["resume=auto", f"hydra.run.dir={finished_run}"], monkeypatch, capsys)
    assert code == 0 and f"{finished_run} finished at step 20 (trainer.max_steps=20); nothing to resume" in err
    assert record_of(finished_run) == before


@pytest.mark.parametrize("override,named", [
    ("model.embed_dim=64", "model.embed_dim=64"),
    ("model=llama_tiny", "model=llama_tiny"),
    ("data.seq_len=16", "data.seq_len=16"),
    ("data.tokenizer=bpe", "data.tokenizer=bpe"),
    ("shape=wide", "shape=wide"),  # an experiment variable that selects model settings
    ("seed=3", "seed=3"),  # the data order follows the seed
])
def test_a_resume_that_changes_the_model_or_data_is_refused_and_writes_nothing(finished_run, override, named,
                                                                              monkeypatch, capsys):
    before = record_of(finished_run)
    argv = ["resume=auto", f"hydra.run.dir={finished_run}", "trainer.max_steps=30", override]
    code, _, err = cli_main(argv, monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: resume: {named} would change what the run trains"), err
    assert len(err.strip().splitlines()) == 1
    assert record_of(finished_run) == before


def test_resume_extends_a_finished_run_with_its_own_config(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    original_hydra = {k: v for k, v in record_of(run_dir).items() if k.startswith(".hydra")}
    rows_before = (run_dir / "metrics.csv").read_text().splitlines()
    proc = olm_train(["resume=auto", f"hydra.run.dir={run_dir}", "trainer.max_steps=30", "optim.lr=1e-4",
                      "scheduler=constant"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 30
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[: len(rows_before)] == rows_before  # the first 20 steps' rows are kept as they were
    header = rows[0].split(",")
    new_rows = [dict(zip(header, r.split(","))) for r in rows[len(rows_before):]]
    steps = [int(r["step"]) for r in new_rows]
    assert steps and min(steps) >= 20 and max(steps) == 29  # continued from step 20, not from 0
    # the new optimizer settings apply (Lightning would restore the checkpoint's lr): constant 1e-4 from step 20
    assert {round(float(r["lr"]), 9) for r in new_rows if r["lr"]} == {1e-4}
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.trainer.max_steps == 30 and saved.model.embed_dim == 32 and saved.logger.name == "none"
    assert saved.name == OmegaConf.load(finished_run / "config.yaml").name  # the run keeps its name
    assert {k: v for k, v in record_of(run_dir).items() if k in original_hydra} == original_hydra
    resume_overrides = OmegaConf.load(run_dir / ".hydra/resume-20/overrides.yaml")
    assert "trainer.max_steps=30" in resume_overrides and (run_dir / ".hydra/resume-20/finished").is_file()


def test_a_resume_that_did_not_finish_is_not_remembered(finished_run, tmp_path):
    from olm.train.resume import latest_record

    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(finished_run), str(run_dir)], check=True)
    failed = run_dir / ".hydra" / "resume-20"
    failed.mkdir()
    (failed / "overrides.yaml").write_text("- trainer.accelerator=foo\n")  # e.g. a resume that crashed
    assert latest_record(run_dir) == run_dir / ".hydra"
    (failed / "finished").write_text("")
    assert latest_record(run_dir) == failed


def test_a_fresh_run_into_a_run_dir_holding_a_run_is_refused_before_hydra_writes(finished_run, monkeypatch, capsys):
    before = record_of(finished_run)
    code, _, err = cli_main([*SMOKE, "model=lm_tiny", f"hydra.run.dir={finished_run}"], monkeypatch, capsys)
    assert code == 2 and "already holds a run" in err and "resume=auto" in err
    assert record_of(finished_run) == before


def test_a_fresh_run_never_starts_over_a_run_dir_that_holds_a_run(finished_run):
    from olm.train.run import train

    before = record_of(finished_run)
    cfg = compose([*SMOKE, "model=lm_tiny", f"paths.output_dir={finished_run}"])
    with pytest.raises(ConfigError, match="already holds a run .*; continue it with resume=auto"):
        train(cfg)
    assert record_of(finished_run) == before


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(finished_run, tmp_path):
    from olm.train.run import train

    cfg = compose([*SMOKE, "model=lm_tiny", "model.embed_dim=64", f"ckpt_path={finished_run}/checkpoints/last.ckpt",
                   f"paths.output_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"holds another model than this config builds: model.embed_dim=64 "
                                          r"\(checkpoint: 32\)"):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_auto_without_a_checkpoint_says_so(tmp_path):
    from olm.train.outcome import sigterm_message
    from olm.train.resume import resume_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert "before the first checkpoint" in sigterm_message(run_dir) and "resume=auto" not in sigterm_message(run_dir)
    cfg = compose(["resume=auto", "data.tokenizer=byte"])
    with pytest.raises(ConfigError, match="^resume=auto: .* holds no run .* use resume=allow"):
        resume_checkpoint(cfg, run_dir)  # a mistyped path never trains a new run
    allow = compose(["resume=allow", "data.tokenizer=byte"])
    assert resume_checkpoint(allow, run_dir) is None  # nothing there yet: a fresh start (e.g. a first SLURM attempt)
    (run_dir / "metrics.csv").write_text("step\n")
    with pytest.raises(ConfigError, match="holds no checkpoint .* nothing to resume, start a new run"):
        resume_checkpoint(cfg, run_dir)
    assert resume_checkpoint(allow, run_dir) is None  # stopped before its first checkpoint: started again
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_text("x")
    assert "resume=auto hydra.run.dir=" in sigterm_message(run_dir)


# ---- the first hour ----------------------------------------------------------------------------------------------
def test_help_describes_olm(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per group
    code, out, _ = cli_main(["--help"], monkeypatch, capsys)
    assert code == 0 and out.startswith("olm-train: train a language model")
    assert "schema" not in out and "Outputs: outputs/runs/" in out and "resume=auto hydra.run.dir=" in out
    groups = dict(line.strip().split(": ", 1) for line in out.splitlines() if re.match(r"  [a-z_/]+: ", line))
    assert "lm_small*" in groups["model"] and "lm_tiny" in groups["model"]
    assert set(groups["debug"].split(", ")) == {"default", "fdr", "limit", "overfit", "profiler"}
    assert "gqa" in groups["model/attention"]


def test_olm_models_lists_the_config_presets_too(capsys):
    from olm.cli import main

    assert main(["models", "--family", "config"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert {"lm_tiny", "lm_small", "llama_small"} <= set(rows)
    assert rows["lm_tiny"][1] == "config" and rows["lm_tiny"][4] == "256"  # context: data.seq_len


def test_run_names_come_from_the_experiment_and_overrides(tmp_path):
    proc = olm_train(["-m", "+experiment=[ffn_multiplier,smoke]", "model.ff_multiplier=2", "seeds=2",
                      "trainer.max_steps=6", "trainer.val_check_interval=6", "logger=csv",
                      f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs = [OmegaConf.load(p) for p in sorted((tmp_path / "sweep").glob("*/config.yaml"))]
    # the variant is the overrides without the seed (W&B's job type); the run's name adds the seed
    variant = "model.ff_multiplier=2,trainer.max_steps=6,trainer.val_check_interval=6"
    assert [c.name for c in configs] == [f"ffn_multiplier+smoke/{variant}/seed={i}" for i in (0, 1)]
    assert {c.logger.job_type for c in configs} == {variant}
    assert sorted(p.name for p in (tmp_path / "sweep" / "0").glob("*.log")) == ["train.log"]
    # quiet by default: no FLOPs column, no "Epoch 0/-2", no TPU line
    log = (tmp_path / "sweep" / "0" / "train.log").read_text() + proc.stdout + proc.stderr
    assert "FLOPs" not in log and "Flops" not in log and "/-2" not in log and "TPU" not in log


def test_an_error_is_printed_once_and_kept_in_the_log_file(tmp_path, capsys):
    """As under Hydra's job logging (a console handler and the job's log file on the root logger): the console
    gets the ``error:`` line once, the log file the message."""
    import logging

    root = logging.getLogger()
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(tmp_path / "train.log")]
    for handler in handlers:
        root.addHandler(handler)
    cfg = compose([*SMOKE, "data=text", f"data.path={tmp_path}/none", f"paths.output_dir={tmp_path}/run"])
    try:
        with pytest.raises(SystemExit) as info:
            cli.run_job(cfg)
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert err == f"error: data.path='{tmp_path}/none' does not exist (data.source=text: a file or a directory)\n"
    assert "does not exist" not in out and "does not exist" in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "run").exists()  # refused before training: no run dir for `olm compare` to list


def test_cpu_threads_never_oversubscribe_the_cores(monkeypatch):
    from olm.train import speed
    from olm.train.speed import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(speed, "busy_cores", lambda: 0.1)  # an idle machine
    assert cpu_threads(None, 1) == 2 and cpu_threads(None, 2) == 1 and cpu_threads(None, 4) == 1
    assert cpu_threads(3, 2) == 3  # cpu_threads=3 wins
    monkeypatch.setattr(speed, "busy_cores", lambda: 0.9)  # one core busy with other work: one thread
    assert cpu_threads(None, 1) == 1
    monkeypatch.setattr(speed, "busy_cores", lambda: 2.0)  # both busy: still one
    assert cpu_threads(None, 1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(None, 1) == 2  # the environment wins over the load


def test_busy_cores_sees_a_process_burning_a_core():
    import signal

    from olm.train.speed import busy_cores

    burner = subprocess.Popen([sys.executable, "-c", "print('burning', flush=True)\nwhile True: pass"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert burner.stdout.readline() == "burning\n"  # it runs: sample from now on
        # A burner keeps about one core busy (less when it shares the machine, but then others are busy too).
        assert busy_cores(0.5) >= 0.5
    finally:
        burner.send_signal(signal.SIGKILL)
        burner.wait()


# ---- debug configs ---------------------------------------------------------------------------------------------------
def debug_run(tmp_path: Path, name: str, extra=()) -> Path:
    from olm.train.run import train

    cfg = compose([f"debug={name}", "model=lm_tiny", "data.tokenizer=byte", "data.seq_len=32", "data.batch_size=4",
                   "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / name)
    train(cfg)
    return tmp_path / name


def test_debug_fast_dev_run_runs_one_batch_and_writes_no_checkpoint(tmp_path):
    run_dir = debug_run(tmp_path, "fdr")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["val_loss"] is not None
    assert not list(run_dir.glob("checkpoints/*.ckpt"))


def test_debug_overfit_drives_the_loss_of_one_batch_down(tmp_path):
    import csv

    run_dir = debug_run(tmp_path, "overfit", ["trainer.max_steps=40", "trainer.val_check_interval=40",
                                              "optim.lr=2e-2", "trainer.detect_anomaly=false"])
    with open(run_dir / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert losses[-1] < 0.5 * losses[0], losses


def test_debug_profiler_writes_its_report(tmp_path):
    run_dir = debug_run(tmp_path, "profiler", ["trainer.max_steps=4", "trainer.val_check_interval=4"])
    report = (run_dir / "fit-profile.txt").read_text()
    assert "run_training_batch" in report
