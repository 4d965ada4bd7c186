"""`olm compare` on an Optuna sweep: a planted study (built with optuna, run dirs as olm's sweeper writes them) read
back as trials named t<N>, the best trial stated first, pruned and failed trials shown, importances equal to
Optuna's own; and long variant names of any study replaced by ids with a legend table, in figures of fixed size."""

import contextlib
import io
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image
from test_compare import make_run

from olm.cli import main
from olm.compare import write_report
from olm.compare.study import overrides

PRUNED, FAILED = (2, 5), (6,)
SPACE = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
         "optim.weight_decay": optuna.distributions.FloatDistribution(0.0, 0.2),
         "model.ff_multiplier": optuna.distributions.CategoricalDistribution((2, 2.6666666666666665, 4))}
SWEEPER = {"sampler": "random", "pruner": "median", "objectives": ["val_loss"], "direction": "minimize",
           "params": {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "optim.weight_decay": "interval(0.0, 0.2)",
                      "model.ff_multiplier": "choice(2, 2.6666666666666665, 4)"}}


def planted_loss(params: dict) -> float:
    """The learning rate matters most (the higher the better), weight decay a little, the FFN width not at all."""
    return 2.0 - 0.5 * math.log10(params["optim.lr"]) + 0.1 * params["optim.weight_decay"]


def plant_sweep(root: Path, n_trials: int = 20, *, pruned=PRUNED, failed=FAILED, name: str = "planted") -> Path:
    """A sweep dir as olm's Optuna sweeper leaves it: study.db, multirun.yaml and one run dir per trial."""
    root.mkdir(parents=True)
    url = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(study_name=name, storage=url, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n_trials):
        trial = study.ask(SPACE)
        loss = planted_loss(trial.params)
        curve = [loss + 1.0, loss + 0.4, loss]
        fixed = [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()]
        sweep = {"sweep": {"study": name, "storage": url, "trial": trial.number}}
        job = [*fixed, f"sweep.study={name}", f"sweep.storage={url}", f"sweep.trial={trial.number}"]
        if trial.number in pruned:  # stopped at its second validation (step 20)
            for step, value in zip((10, 20), curve):
                trial.report(value, step)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            make_run(root / str(trial.number), job, None, curve=curve[:2], status="pruned", config=sweep)
        elif trial.number in failed:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            make_run(root / str(trial.number), job, None, status="failed", error="loss is nan", config=sweep)
        else:
            for step, value in zip((10, 20, 30), curve):
                trial.report(value, step)
            study.tell(trial, loss)
            make_run(root / str(trial.number), job, loss, curve=curve, config=sweep, extra={"steps": 30})
    (root / "multirun.yaml").write_text(json.dumps({"hydra": {"sweeper": SWEEPER}}))
    return root


# matplotlib only warns when long labels squeeze the axes to nothing: a figure nobody can read
LAYOUT = "constrained_layout not applied"


def ped_anova(study, **kwargs) -> dict[str, float]:
    """Optuna's own importances, by a fresh evaluator of the kind the report uses (Optuna's default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), **kwargs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """20 trials (importances settle only with about that many); the tests only read it."""
    return plant_sweep(tmp_path_factory.mktemp("optuna") / "sweep")


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory) -> tuple[dict, str, list[str], Path]:
    """``olm compare`` on the planted sweep: (the study's report.json record, report.md, stdout lines, out dir)."""
    out = tmp_path_factory.mktemp("report")
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.filterwarnings("error", LAYOUT)
        assert main(["compare", str(sweep), "--out", str(out)]) == 0
    study, = json.loads((out / "report.json").read_text())["studies"]
    return study, (out / "report.md").read_text(), printed.getvalue().splitlines(), out


def stored_study(sweep: Path):
    return optuna.load_study(study_name="planted", storage=f"sqlite:///{sweep / 'study.db'}")


def report_of(sweep: Path, out: Path) -> tuple[dict, str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("error", LAYOUT)
        write_report([sweep], out)
    study, = json.loads((out / "report.json").read_text())["studies"]
    return study, (out / "report.md").read_text()


def test_the_best_trial_and_its_parameters_come_first(sweep, report):
    best = stored_study(sweep).best_trial
    record, text, out, _ = report
    first = text.split("## sweep\n\n", 1)[1].splitlines()[0]
    assert first == (f"Best trial: **t{best.number}**, val_loss {best.value:.4f} nats/token, of 20 trials "
                     f"(17 complete, 2 pruned, 1 failed); its parameters: `{overrides(best.params)}`.")
    # full precision: the overrides are the ones that rerun that trial
    assert f"optim.lr={best.params['optim.lr']!r}" in first
    chosen, = record["optuna"]["best"]
    assert (chosen["id"], chosen["values"], chosen["params"]) == (f"t{best.number}", [best.value], best.params)
    assert out[0] == "== sweep: 20 runs, 20 variants, metric val_loss"
    assert out[1].startswith(f"   Best trial: t{best.number}, val_loss {best.value:.4f}")


def test_trials_go_by_ids_and_the_trials_table_is_their_legend(sweep, report):
    stored = stored_study(sweep)
    record, text, _, _ = report
    assert [r["variant"] for r in record["runs"]] == [f"t{i}" for i in range(20)]
    assert record["legend"] == {f"t{t.number}": {k: f"{v!r}" if isinstance(v, float) else str(v)
                                                 for k, v in t.params.items()} for t in stored.trials}
    table = text.split("### Trials\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0] == ("| trial | state | val_loss | last reported step | optim.lr | optim.weight_decay | "
                        "model.ff_multiplier | run |")
    rows = {line.split(" | ")[0].strip("| *").split("**")[0]: line.split(" | ") for line in table[2:]}
    assert list(rows) == [f"t{i}" for i in range(20)]
    assert rows[f"t{stored.best_trial.number}"][0] == f"| **t{stored.best_trial.number}** (best)"
    for t in stored.trials:
        row = rows[f"t{t.number}"]
        ff = t.params["model.ff_multiplier"]
        assert row[4] == f"{t.params['optim.lr']:.4g}" and row[6] == (f"{ff:.4g}" if isinstance(ff, float) else str(ff))
    for number in PRUNED:  # listed with where they stopped and the value they last reported
        reported = stored.trials[number].intermediate_values[20]
        assert rows[f"t{number}"][1:4] == ["pruned at step 20", f"({reported:.4f} last reported)", "20"]
    assert rows["t6"][1:3] == ["failed", "—"]
    assert "| t1 |" in text and "t1 (baseline)" not in text  # trials are not tested against a baseline


def drawn(png: Path, colour: tuple[int, int, int]) -> int:
    """The pixels of a figure within a small distance of ``colour``."""
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - colour).sum(axis=1) < 30).sum())


def test_pruned_and_failed_trials_are_drawn_in_figures_of_fixed_size(report):
    out = report[3]
    trials = out / "trials.png"
    assert drawn(trials, (255, 127, 14)) > 50 and drawn(trials, (214, 39, 40)) > 20  # pruned crosses, failed marks
    assert drawn(trials, (44, 160, 44)) > 50  # the best trial's star
    assert drawn(out / "val_loss.png", (128, 128, 128)) > 20  # pruned curves end in grey crosses
    for name in ("trials.png", "val_loss.png", "train_loss.png"):
        with Image.open(out / name) as image:
            assert image.size == (880, 495)  # 8 x 4.5 inches at 110 dpi, whatever the names
    assert not (out / "final.png").exists()  # one run per trial: trials.png is the figure of values


def test_importances_are_optunas_own(sweep, report):
    expected = ped_anova(stored_study(sweep))  # a fresh evaluator: the report's numbers are reproducible
    record, text, _, _ = report
    got = record["optuna"]["importances"]["val_loss"]
    assert list(got) == list(expected) and got == pytest.approx(expected, abs=1e-12)
    assert next(iter(got)) == "optim.lr" and got["optim.lr"] > 0.9  # the planted dependence
    table = text.split("### Parameter importance\n\n", 1)[1]
    assert table.startswith("Optuna's get_param_importances (its default evaluator, PED-ANOVA: ")
    assert "over the 17 complete trials" in table.split("\n")[0]
    assert f"| optim.lr | {expected['optim.lr']:.3f} |" in table


def test_too_few_complete_trials_get_a_line_instead_of_importances(tmp_path):
    sweep = plant_sweep(tmp_path / "sweep", 4, pruned=(1,), failed=(2,))
    record, text = report_of(sweep, tmp_path / "r")
    assert record["optuna"]["importances"] == {}
    assert ("Parameter importance needs at least 3 complete trials (the best of them compared with all); this study "
            "has 2.") in text and "| parameter | importance |" not in text


def test_a_copied_sweep_dir_reads_its_own_study_and_the_report_writes_nothing_into_it(sweep, tmp_path):
    copy = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(sweep, copy)  # its jobs' configs still name the original's study.db
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.rglob("*") if p.is_file()}
    record, _ = report_of(copy, tmp_path / "r")
    assert record["optuna"]["storage"] == f"sqlite:///{(copy / 'study.db').resolve()}"
    assert record["optuna"]["importances"]["val_loss"] == pytest.approx(
        ped_anova(stored_study(copy)), abs=1e-12)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in copy.rglob("*") if p.is_file()} == before


def test_without_its_storage_the_trials_come_from_the_run_dirs(tmp_path):
    sweep = plant_sweep(tmp_path / "sweep", 8)
    best = stored_study(sweep).best_trial
    (sweep / "study.db").unlink()
    record, text = report_of(sweep, tmp_path / "r")
    assert record["optuna"]["storage"] is None and record["optuna"]["importances"] == {}
    assert [t["state"] for t in record["optuna"]["trials"]] == [
        "PRUNED" if i in PRUNED else "FAIL" if i in FAILED else "COMPLETE" for i in range(8)]
    assert record["optuna"]["best"][0]["id"] == f"t{best.number}"
    assert f"Best trial: **t{best.number}**, val_loss {best.value:.4f}" in text
    assert f"| **t{best.number}** (best) | complete | {best.value:.4f} | 30 | {best.params['optim.lr']:.4g} |" in text
    assert "cannot be read: the trials come from their run dirs, and parameter importances need the storage" in text


def test_long_variant_names_become_ids_with_a_legend_table(tmp_path, capsys):
    keys = ["model.attention.num_kv_heads", "model.ff_multiplier", "optim.weight_decay"]
    for i, values in enumerate([(1, 2, 0.0), (2, 2, 0.0), (1, 4, 0.1), (2, 4, 0.1)]):
        for seed in range(2):
            make_run(tmp_path / "grid" / f"{i}_{seed}", [f"{k}={v}" for k, v in zip(keys, values)],
                     3.0 - i / 10 + seed / 100, seed=seed, curve=[4.0, 3.0 - i / 10])
    (tmp_path / "grid" / "multirun.yaml").write_text("hydra: {}\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", LAYOUT)
        report = write_report([tmp_path / "grid"], tmp_path / "r")
    study, = report["studies"]
    assert [v.label for v in study.variants] == ["v1", "v2", "v3", "v4"]
    assert study.variants[2].description == "num_kv_heads=1, ff_multiplier=4, weight_decay=0.1"
    legend = report["text"].split("### Variants\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert legend[0] == "| id | " + " | ".join(keys) + " |" and legend[4] == "| v3 | 1 | 4 | 0.1 |"
    for name in ("final.png", "val_loss.png"):
        with Image.open(tmp_path / "r" / name) as image:
            assert image.size == (880, 495)
    # an id, or the values, name the baseline
    assert main(["compare", str(tmp_path / "grid"), "--out", str(tmp_path / "r2"), "--baseline", "v3"]) == 0
    assert main(["compare", str(tmp_path / "grid"), "--out", str(tmp_path / "r3"), "--baseline",
                 "num_kv_heads=1,ff_multiplier=4"]) == 0
    for out in ("r2", "r3"):
        assert json.loads((tmp_path / out / "report.json").read_text())["studies"][0]["baseline"] == "v3"


def test_a_multi_objective_study_states_its_pareto_front(tmp_path):
    root = tmp_path / "mo"
    root.mkdir()
    url = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(study_name="mo", storage=url, directions=["minimize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(6):
        trial = study.ask(SPACE)
        values = (planted_loss(trial.params), 1000.0 / trial.params["model.ff_multiplier"])
        study.tell(trial, values)
        job = [f"optim.lr={trial.params['optim.lr']!r}", f"sweep.trial={trial.number}"]
        make_run(root / str(trial.number), job, values[0], extra={"tokens_per_sec": values[1]},
                 config={"sweep": {"study": "mo", "storage": url, "trial": trial.number}})
    sweeper = {**SWEEPER, "objectives": ["val_loss", "tokens_per_sec"], "direction": ["minimize", "maximize"]}
    (root / "multirun.yaml").write_text(json.dumps({"hydra": {"sweeper": sweeper}}))
    record, text = report_of(root, tmp_path / "r")
    front = sorted(t.number for t in study.best_trials)
    assert sorted(b["trial"] for b in record["optuna"]["best"]) == front
    assert text.split("## mo\n\n", 1)[1].startswith(f"Pareto front of val_loss, tokens_per_sec over 6 trials")
    expected = ped_anova(study, target=lambda t: -t.values[1])  # maximised: PED-ANOVA looks for low targets
    assert record["optuna"]["importances"]["tokens_per_sec"] == pytest.approx(expected, abs=1e-12)
