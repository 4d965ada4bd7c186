"""Runs -> studies -> variants -> statistics: what ``olm compare`` decides before it draws or writes anything.

A *study* is the runs of one experiment (``compare.experiment`` in their config), else of one multirun dir, else
all loose runs together. A *variant* is the runs of a study that differ only in their seed (and, in a ladder, in
their size). Statistics are computed over the finished runs of a variant; its unfinished (or still running) runs
are listed and left out. Failed, interrupted and pruned runs are listed apart, a line per status, and never ranked:
one that shares its overrides with other runs counts as a run of that variant that did not finish, one alone (a
refused config, a pruned trial) makes no variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm.compare import ladder as ladders
from olm.compare import stats, trials
from olm.compare.runs import Run, is_number
from olm.errors import ConfigError, did_you_mean

# Override keys that do not change what a run learns (or are its seed or its ladder rung): never a variant's name.
NOT_VARIANTS = ("paths.", "logger", "trainer.enable_progress_bar", "sample.", "export", "resume", "ckpt_path",
                "lock_timeout", "compare.", "hydra.", "name", "sweep.")
SEED_KEYS = ("seed", "seeds")
# Runs that ended without a result: listed apart from the variants, a line per status.
SET_ASIDE = ("failed", "interrupted", "pruned")
# Config keys that decide which tokens a run sees, in which order, and for how long.
DATA_KEYS = ("data.source", "data.path", "data.pattern", "data.seq_len", "data.batch_size", "data.val_fraction",
             "data.val_batches", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes")
BUDGET_KEYS = ("trainer.max_steps",)
TOKENIZER_KEYS = ("data.tokenizer", "data.tokenizer_vocab_size", "data.tokenizer_path")
NAMED_METRICS = ("val_loss", "val_bpb", "train_loss", "tokens_per_sec")
# A variant description longer than this is replaced by a short id (v1, v2, ...; t<N> for Optuna trials) in tables
# and plots, with a legend table giving each id's values: long names squeeze a figure's axes and crowd its ticks.
LONG_LABEL = 32
UNITS = {"val_loss": "nats/token", "train_loss": "nats/token", "val_bpb": "bits/byte", "tokens_per_sec": "tokens/s"}


def units(metric: str) -> str:
    if metric in UNITS:
        return UNITS[metric]
    if metric.endswith("/bpb"):
        return "bits/byte"
    if metric.endswith("/loss"):
        return "nats/token"
    return ""


def per_token(metric: str) -> bool:
    """Whether a metric is measured per token (so it depends on the tokenizer)."""
    return units(metric) == "nats/token" or metric.endswith(("/ppl", "_ppl"))


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "bpb", "ppl", "perplexity", "error"))


@dataclass
class Options:
    metric: str | None = None  # None: each study's compare.metric (auto by default)
    baseline: str | None = None
    test: str = "auto"
    interval: str = "t"
    alpha: float = stats.ALPHA
    detect: float | None = None
    target_compute: float | None = None
    resamples: int = 1000


@dataclass
class Variant:
    key: tuple[tuple[str, str], ...]
    label: str = ""  # what tables and plots call it: its description, or its id in a study with a legend
    runs: list[Run] = field(default_factory=list)  # every run, finished or not
    description: str = ""  # the values that set it apart ("lr=0.003, weight_decay=0.1")
    id: str = ""  # v1, v2, ... in order of the first run; t<N> for trial N of an Optuna study
    trial: int | None = None

    def finished(self, rung: str | None = None) -> list[Run]:
        return [r for r in self.runs if r.finished and (rung is None or rung_of(r) == rung)]

    def runs_by_seed(self, metric: str, rung: str | None = None) -> dict[int, list[float]]:
        """{seed: the values of the finished runs with that seed} (a run without a seed is a seed of its own)."""
        values: dict[int, list[float]] = {}
        for i, run in enumerate(self.finished(rung)):
            value = run.metric(metric)
            if value is not None:
                values.setdefault(run.seed if run.seed is not None else -1 - i, []).append(value)
        return values

    def by_seed(self, metric: str, rung: str | None = None) -> dict[int, list[float]]:
        """{seed: [its value]}: runs repeated with the same seed (a sweep run twice into two dirs) are one
        observation, their mean; they are not independent samples."""
        return {seed: [sum(vs) / len(vs)] for seed, vs in self.runs_by_seed(metric, rung).items()}

    def values(self, metric: str, rung: str | None = None) -> list[float]:
        return [vs[0] for vs in self.by_seed(metric, rung).values()]

    def not_finished(self, rung: str | None = None) -> list[Run]:
        return [r for r in self.runs if not r.finished and (rung is None or rung_of(r) == rung)]

    @property
    def leaks(self) -> bool:
        """A bidirectional model (model.causal=false) sees the token it is scored on: its loss is no LM loss."""
        return any(r.config.get("model.causal") is False for r in self.runs)


@dataclass
class Row:
    variant: Variant
    summary: stats.Summary | None
    diff: stats.Difference | None = None  # None for the baseline
    p_holm: float | None = None
    verdict: str = ""
    detectable: float | None = None  # smallest difference found with power 0.8 at this n
    seeds_needed: int | None = None  # seeds per variant to find the observed difference with power 0.8


@dataclass
class MetricTable:
    metric: str
    rung: str | None
    rows: list[Row]
    noise: float | None  # pooled seed-to-seed standard deviation
    best: Variant | None
    best_note: str
    detect: tuple[float, int | None] | None = None  # (--detect, seeds needed)


@dataclass
class VariantLadder:
    variant: Variant
    fit: ladders.LadderFit | None
    note: str = ""
    prediction: tuple[float, tuple | None] | None = None
    gap: tuple[float, tuple | None] | None = None  # variant - baseline at the target compute
    crossover: float | None = None


@dataclass
class Study:
    name: str
    runs: list[Run]
    variants: list[Variant] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    question: str | None = None
    baseline: Variant | None = None
    metric: str = "val_loss"
    metrics: list[str] = field(default_factory=list)
    rungs: list[str] = field(default_factory=list)  # ladder sizes, smallest compute first
    notes: list[str] = field(default_factory=list)
    tables: dict[str, MetricTable] = field(default_factory=dict)
    ladder: list[VariantLadder] = field(default_factory=list)
    target_compute: float | None = None
    alpha: float = stats.ALPHA
    legend: bool = False  # variants are labelled by their ids; legend_table() gives each id's values
    optuna: trials.OptunaStudy | None = None
    headline: list[str] = field(default_factory=list)  # stated before anything else (an Optuna study's best trial)

    set_aside: list[Run] = field(default_factory=list)  # failed, interrupted and pruned runs: in no variant

    @property
    def excluded(self) -> list[Run]:
        """The runs of its variants that did not finish (still running, or killed without a word)."""
        return [r for v in self.variants for r in v.runs if not r.finished and r.status not in SET_ASIDE]


def rung_of(run: Run) -> str | None:
    size = run.config.get("ladder.size")
    return None if size is None else str(size)


def _study_name(run: Run) -> str:
    name = run.config.get("compare.experiment")
    if name:
        return str(name)
    if (run.path.parent / "multirun.yaml").is_file():
        return run.path.parent.name
    return "runs"


def _rung_keys(runs: list[Run]) -> set[str]:
    """The override keys that pick a ladder run's size: their value is the run's ladder.size in every ladder run."""
    ladder = [r for r in runs if rung_of(r) is not None]
    if not ladder:
        return set()
    keys = set(ladder[0].overrides)
    for run in ladder:
        keys = {k for k in keys if run.overrides.get(k) == rung_of(run)}
    return keys


def _variant_key(run: Run, rung_keys: set[str] = frozenset()) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(
        (k, v) for k, v in run.overrides.items()
        if k not in SEED_KEYS and not k.startswith(NOT_VARIANTS) and k not in rung_keys
    ))


def _short(key: str) -> str:
    return key.replace("/", ".").rsplit(".", 1)[-1]


def _labels(variants: list[Variant]) -> list[str]:
    """The override keys whose value differs between variants (a key missing from a variant counts as different),
    and each variant's label from them."""
    keys = list(dict.fromkeys(k for v in variants for k, _ in v.key))
    swept = [k for k in keys if len({dict(v.key).get(k) for v in variants}) > 1]
    shorts = [_short(k) for k in swept]
    names = shorts if len(set(shorts)) == len(shorts) else swept
    for variant in variants:
        given = dict(variant.key)
        parts = [f"{name}={fmt_value(given.get(k))}" for name, k in zip(names, swept)]
        variant.description = variant.label = ", ".join(parts) or "all runs"
    return swept


def _name_by_ids(study: Study) -> None:
    """Short ids for every variant; an Optuna study's trials, and variants with a long description, go by them."""
    for i, variant in enumerate(study.variants):
        variant.id = f"t{variant.trial}" if variant.trial is not None else f"v{i + 1}"
    long = any(len(v.description) > LONG_LABEL for v in study.variants)
    study.legend = long or any(v.trial is not None for v in study.variants)
    if study.legend:
        for variant in study.variants:
            variant.label = variant.id


def legend_table(study: Study) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each variant's id and its value of every swept key."""
    rows = [[v.id, *[fmt_value(dict(v.key).get(k)) for k in study.swept]] for v in study.variants]
    return ["id", *study.swept], rows


def fmt_value(value: str | None) -> str:
    if value is None:
        return "—"
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value and len(value) > 8 else value


def group(runs: list[Run]) -> list[Study]:
    """Studies in order of their first run; variants in order of their first run."""
    studies: dict[str, Study] = {}
    for run in runs:
        studies.setdefault(_study_name(run), Study(_study_name(run), [])).runs.append(run)
    for study in studies.values():
        variants: dict[tuple, Variant] = {}
        rung_keys = _rung_keys(study.runs)
        optuna = trials.identity(study.runs) is not None
        unfinished = [r for r in study.runs if r.status in SET_ASIDE]
        for run in study.runs:
            if optuna:  # each trial is its own variant (pruned ones too: one run each, never ranked)
                key, trial = _variant_key(run, rung_keys), trials.trial_number(run)
                variants.setdefault((key, trial), Variant(key, trial=trial)).runs.append(run)
            elif run.status not in SET_ASIDE:
                key = _variant_key(run, rung_keys)
                variants.setdefault((key, None), Variant(key)).runs.append(run)
        study.set_aside = unfinished  # runs that ended without a result: listed apart, a line per status
        for run in [] if optuna else unfinished:
            # a seed of a variant that did not finish still counts against it, unranked; alone (a refused config)
            # it makes no variant
            variant = variants.get((_variant_key(run, rung_keys), None))
            if variant is not None:
                variant.runs.append(run)
        study.variants = list(variants.values())
        study.swept = _labels(study.variants)
        _name_by_ids(study)
        study.question = next((r.config["compare.question"] for r in study.runs if r.config.get("compare.question")),
                              None)
    return list(studies.values())


# -- choosing -----------------------------------------------------------------------------------------------------
def logged_metrics(runs: list[Run]) -> list[str]:
    found = set()
    for run in runs:
        if run.finished:
            for key, value in run.summary.items():
                if is_number(value) and (key in NAMED_METRICS or key.startswith(("val/", "eval/"))):
                    found.add(key)
    named = [m for m in NAMED_METRICS if m in found]
    return named + sorted(found - set(named))


def _differs(runs: list[Run], key: str) -> bool:
    return len({repr(r.config.get(key)) for r in runs if r.config}) > 1


def choose_metric(study: Study, requested: str | None, flag: str = "--metric") -> str:
    # the config's tokenizer keys, or (prepared data brings its own tokenizer) the identity the summary records
    mixed = any(_differs(study.runs, k) for k in TOKENIZER_KEYS) or len(
        {r.summary.get("tokenizer") for r in study.runs if r.summary and r.summary.get("tokenizer")}) > 1
    if requested is None:
        requested = next((str(r.config["compare.metric"]) for r in study.runs if r.config.get("compare.metric")),
                         "auto")
        flag = "compare.metric"
    if requested == "auto":
        metric = "val_bpb" if mixed and "val_bpb" in study.metrics else "val_loss"
        if metric not in study.metrics:
            metric = study.metrics[0]
            study.notes.append(f"The runs logged no val_loss; ranked by {metric}.")
        if mixed:
            study.notes.append(f"The runs use different tokenizers, so they are compared in bits/byte ({metric}); "
                               "loss in nats/token is not comparable across tokenizers.")
        return metric
    if requested not in study.metrics:
        raise ConfigError(f"{flag}={requested!r} was not logged by any finished run of {study.name!r}"
                          f"{did_you_mean(requested, study.metrics, 'logged')}")
    if mixed and per_token(requested):
        raise ConfigError(f"{flag}={requested!r} is per token, and the runs of {study.name!r} use different "
                          "tokenizers; compare them with --metric=val_bpb (bits/byte)")
    return requested


def choose_baseline(study: Study, requested: str | None) -> Variant:
    chosen = _choose_baseline(study, requested)
    if not chosen.finished() and any(v.finished() for v in study.variants):
        instead = next(v for v in study.variants if v.finished())
        study.notes.append(f"The baseline {chosen.label} has no finished run; {instead.label} is the baseline.")
        return instead
    return chosen


def matches(study: Study, spec: str) -> bool:
    return _match(study.variants, spec) is not None


def _choose_baseline(study: Study, requested: str | None) -> Variant:
    if requested is not None:
        found = _match(study.variants, requested)
        if found is None:
            labels = " | ".join(v.label for v in study.variants)
            raise ConfigError(f"--baseline={requested!r} matches no variant of {study.name!r}; variants: {labels}")
        return found
    declared = next((str(r.config["compare.baseline"]) for r in study.runs if r.config.get("compare.baseline")), None)
    if declared is not None:
        found = _match(study.variants, declared)
        if found is not None:
            return found
        study.notes.append(f"The experiment's baseline ({declared}) is not among these runs; the first variant "
                           f"({study.variants[0].label}) is the baseline.")
    return study.variants[0]


def _match(variants: list[Variant], spec: str) -> Variant | None:
    for variant in variants:
        if spec in (variant.label, variant.description, variant.id):
            return variant
    wanted = []
    for part in spec.split(","):
        key, sep, value = part.strip().lstrip("+").partition("=")
        if not sep:
            return None
        wanted.append((key, value))
    hits = [v for v in variants if all(_has(v, key, value) for key, value in wanted)]
    return hits[0] if len(hits) == 1 else None


def _has(variant: Variant, key: str, value: str) -> bool:
    for k, v in variant.key:
        if key in (k, _short(k)) and (v == value or _same_number(v, value)):
            return True
    return False


def _same_number(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    except ValueError:
        return False


# -- statistics ---------------------------------------------------------------------------------------------------
def metric_table(study: Study, metric: str, options: Options, rung: str | None = None) -> MetricTable:
    lower = lower_is_better(metric)
    rows = []
    for variant in study.variants:
        values = variant.values(metric, rung)
        rows.append(Row(variant, stats.describe(values, options.interval) if values else None))
    noise = stats.pooled_std([variant.values(metric, rung) for variant in study.variants])
    base = next(r for r in rows if r.variant is study.baseline)
    tested = []
    for row in rows:
        if row is base or row.summary is None or base.summary is None:
            continue
        row.diff = stats.difference(row.variant.by_seed(metric, rung), base.variant.by_seed(metric, rung),
                                    options.test, options.interval)
        tested.append(row)
    for row, p in zip(tested, stats.holm([r.diff.p for r in tested])):
        row.p_holm = p
        row.verdict = _verdict(row.diff, p, lower, options.alpha) + _missing_runs(row.variant, rung)
        sd = row.diff.sd if row.diff.sd is not None else noise
        if sd:
            n_a = row.diff.n_pairs if row.diff.paired else row.summary.n
            n_b = None if row.diff.paired else base.summary.n
            row.detectable = stats.detectable_difference(sd, n_a, n_b, options.alpha)
            row.seeds_needed = stats.seeds_needed(row.diff.diff, sd, row.diff.paired, options.alpha)
    base.verdict = "baseline" + _missing_runs(base.variant, rung)
    best, note = _best(study, rows, metric, options, rung)
    table = MetricTable(metric, rung, rows, noise, best, note)
    if options.detect is not None and noise:
        paired = [r.diff.sd for r in rows if r.diff is not None and r.diff.paired and r.diff.sd]
        if paired:  # the noise of the paired differences, pooled over the comparisons
            sd = (sum(v * v for v in paired) / len(paired)) ** 0.5
            table.detect = (options.detect, stats.seeds_needed(options.detect, sd, True, options.alpha))
        else:
            table.detect = (options.detect, stats.seeds_needed(options.detect, noise, False, options.alpha))
    return table


def _missing_runs(variant: Variant, rung: str | None) -> str:
    """``; 2 of 5 runs did not finish``: what the statistics of a variant leave out."""
    missing = variant.not_finished(rung)
    if not missing:
        return ""
    total = len(missing) + len(variant.finished(rung))
    return f"; {len(missing)} of {total} runs did not finish ({', '.join(sorted({r.status for r in missing}))})"


def _verdict(diff: stats.Difference, p: float | None, lower: bool, alpha: float) -> str:
    if diff.note and p is None:
        return diff.note
    if p is None or p >= alpha:
        return "not distinguishable at this budget"
    return "better" if (diff.diff < 0) == lower else "worse"


def _best(study: Study, rows: list[Row], metric: str, options: Options, rung: str | None):
    """The variant with the best mean, declared best only when it is distinguishably better than every other
    (Holm over those comparisons). Leaking variants (model.causal=false) never compete on a loss."""
    lower = lower_is_better(metric)
    leak_matters = lower and ("loss" in metric or "bpb" in metric or "ppl" in metric)
    scored = [r for r in rows if r.summary is not None and not (leak_matters and r.variant.leaks)]
    if len(scored) < 2:
        return None, ""
    incomplete = [r.variant.label for r in scored if r.variant.not_finished(rung)]
    if incomplete:  # a variant whose failed seeds are left out may look better than it is
        return None, (f"No variant is marked best: runs of {', '.join(incomplete)} did not finish, and the "
                      "statistics leave them out.")
    top = min(scored, key=lambda r: r.summary.mean if lower else -r.summary.mean)
    others = [r for r in scored if r is not top]
    diffs = [stats.difference(top.variant.by_seed(metric, rung), r.variant.by_seed(metric, rung), options.test,
                              options.interval) for r in others]
    adjusted = stats.holm([d.p for d in diffs])
    unresolved = [r.variant.label for r, d, p in zip(others, diffs, adjusted)
                  if p is None or p >= options.alpha or (d.diff < 0) != lower]
    if unresolved:
        return None, (f"No variant is distinguishably best at this budget: {top.variant.label} has the best mean, "
                      f"but is not distinguishable from {', '.join(unresolved)}.")
    return top.variant, f"Best: {top.variant.label} (distinguishably better than every other variant)."


# -- ladders ------------------------------------------------------------------------------------------------------
def run_compute(run: Run) -> float | None:
    flops = run.summary.get("train_flops")
    if is_number(flops):
        return float(flops)
    per_token, tokens = run.summary.get("flops_per_token"), run.summary.get("tokens_seen")
    return float(per_token) * float(tokens) if is_number(per_token) and is_number(tokens) else None


def ladder_tables(study: Study, options: Options) -> None:
    metric, base = study.metric, study.baseline
    for variant in study.variants:
        rungs: dict[str, list[tuple[float, float]]] = {}
        for run in variant.finished():
            compute, value = run_compute(run), run.metric(metric)
            if compute is not None and value is not None:
                rungs.setdefault(rung_of(run), []).append((compute, value))
        if len(rungs) < ladders.MIN_RUNGS:
            study.ladder.append(VariantLadder(variant, None, f"{len(rungs)} of the {ladders.MIN_RUNGS} sizes a fit "
                                                             "needs have finished runs"))
            continue
        try:
            fit = ladders.fit_ladder(rungs, options.resamples)
        except ValueError as exc:
            study.ladder.append(VariantLadder(variant, None, str(exc)))
            continue
        study.ladder.append(VariantLadder(variant, fit))
    fitted = [entry for entry in study.ladder if entry.fit is not None]
    target = options.target_compute
    if target is not None:
        if not fitted:
            have = max(len({rung_of(r) for r in v.finished()}) for v in study.variants)
            raise ConfigError(f"--target-compute needs a ladder of at least {ladders.MIN_RUNGS} sizes with "
                              f"finished runs; {study.name!r} has {have} ({', '.join(study.rungs)})")
        smallest = min(c for entry in fitted for runs in entry.fit.rungs.values() for c, _ in runs)
        if target < smallest:
            raise ConfigError(f"--target-compute={target:.3g} is below the ladder of {study.name!r}, whose smallest "
                              f"run trained with {smallest:.3g} FLOPs; give a value >= {smallest:.3g}")
    base_fit = next((e.fit for e in fitted if e.variant is base), None)
    computes = [c for e in fitted for runs in e.fit.rungs.values() for c, _ in runs]
    for entry in fitted:
        if target is not None:
            entry.prediction = entry.fit.prediction(target)
        if base_fit is not None and entry.variant is not base:
            if target is not None:
                entry.gap = ladders.gap_interval(entry.fit, base_fit, target)
            entry.crossover = ladders.crossover(entry.fit, base_fit, min(computes), max(max(computes), target or 0))
    study.target_compute = target


# -- the whole analysis -------------------------------------------------------------------------------------------
def analyse(runs: list[Run], options: Options) -> list[Study]:
    studies = group(runs)
    requested_anywhere = options.metric is not None
    for study in studies:
        study.alpha = options.alpha
        if any(v.trial is not None for v in study.variants):
            study.optuna = trials.load(study.runs)
            study.headline = optuna_headline(study.optuna)
        study.metrics = logged_metrics(study.runs)
        study.rungs = _rungs(study)
        if not study.metrics:
            study.notes.append("No finished run: nothing to compare yet.")
            study.baseline = choose_baseline(study, options.baseline) if study.variants else None
            continue
        if requested_anywhere and options.metric not in study.metrics and len(studies) > 1:
            study.notes.append(f"--metric={options.metric} was not logged here; ranked by the default instead.")
            study.metric = choose_metric(study, None)
        else:
            study.metric = choose_metric(study, options.metric)
        requested = options.baseline
        if requested is not None and len(studies) > 1 and not matches(study, requested):
            study.notes.append(f"--baseline={requested} matches no variant here; the default baseline is used.")
            requested = None
        study.baseline = choose_baseline(study, requested)
        top = study.rungs[-1] if study.rungs else None
        for metric in study.metrics:
            study.tables[metric] = metric_table(study, metric, options, top)
        study.notes.extend(fairness_notes(study))
        if study.rungs:
            ladder_tables(study, options)
    if options.baseline is not None and len(studies) > 1 and not any(matches(s, options.baseline) for s in studies):
        raise ConfigError(f"--baseline={options.baseline!r} matches no variant of any study; variants: "
                          + " | ".join(v.label for s in studies for v in s.variants))
    if options.interval == "bootstrap":
        for study in studies:
            fewest = min((len(v.values(study.metric)) for v in study.variants if v.finished()), default=0)
            if 0 < fewest < 10:
                study.notes.append(f"Bootstrap intervals from {fewest} runs are too narrow (a bootstrap of a few "
                                   "values misses the tails); the t intervals (--ci t) are the ones to trust here.")
    if options.target_compute is not None and not any(s.rungs for s in studies):
        raise ConfigError("--target-compute needs a ladder experiment (runs with ladder.size set); "
                          "none of these runs is one")
    return studies


def optuna_headline(optuna: trials.OptunaStudy) -> list[str]:
    """The best trial (or the Pareto front) and its parameters, then what the trials came to."""
    counts = ", ".join(f"{optuna.count(state)} {word}" for state, word in trials.WORDS.items() if optuna.count(state))
    tally = f"{len(optuna.trials)} trials ({counts})"
    if not optuna.best:  # the run dirs alone (no storage) give no Pareto front
        return [f"No trial has completed yet: {tally}." if not optuna.count("COMPLETE") else
                f"{tally}; the Pareto front needs the study's storage."]
    if len(optuna.objectives) == 1:
        best, = optuna.best
        metric = optuna.objectives[0]
        unit = f" {units(metric)}" if units(metric) else ""
        return [f"Best trial: **{best.id}**, {metric} {best.values[0]:.4f}{unit}, of {tally}; its parameters: "
                f"`{overrides(best.params)}`.",
                "One run per trial: the search's best, not a tested difference (rerun it with seeds=3 for an "
                "interval)."]
    front = "; ".join(f"**{t.id}** (" + ", ".join(f"{v:.4g}" for v in t.values) + ")" for t in optuna.best)
    return [f"Pareto front of {', '.join(optuna.objectives)} over {tally}: {front}; their parameters are in the "
            "trials table."]


def overrides(params: dict[str, Any]) -> str:
    """Parameters as the command-line overrides that set them (full precision, as the sweeper passed them)."""
    return " ".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _rungs(study: Study) -> list[str]:
    """The ladder sizes of a study, ordered by the compute their runs used (by name when unknown)."""
    compute: dict[str, list[float]] = {}
    for run in study.runs:
        rung = rung_of(run)
        if rung is not None:
            compute.setdefault(rung, [])
            if run_compute(run) is not None:
                compute[rung].append(run_compute(run))
    return sorted(compute, key=lambda r: (min(compute[r]) if compute[r] else float("inf"), r))


def fairness_notes(study: Study) -> list[str]:
    """Markdown lines: the design (seeds, data order, budget), and what makes runs not like-for-like."""
    runs = [r for r in study.runs if r.config]
    if not runs:
        return []
    notes = []
    unequal = [k for k in DATA_KEYS if _differs(runs, k)]
    if not study.rungs:
        unequal += [k for k in BUDGET_KEYS if _differs(runs, k)]
    for key in unequal:
        values = ", ".join(sorted({repr(r.config.get(key)) for r in runs}))
        notes.append(f"- `{key}` differs between runs: {values}")
    finished = [r for r in study.runs if r.finished]
    if not study.rungs:  # a ladder's budgets differ by design: tokens = tokens_per_parameter x parameters
        tokens = {r.summary.get("tokens_seen") for r in finished}
        if len(tokens) > 1:
            notes.append("- finished runs saw different numbers of tokens: "
                         + ", ".join(_fmt_int(t) for t in sorted(tokens, key=lambda t: t or 0)))
    lines = []
    if notes:
        lines += ["**Not a like-for-like comparison** (different data or budget):", *notes, ""]
    lines.append(_design(study))
    leaky = [v.label for v in study.variants if v.leaks]
    if leaky:
        lines += ["", f"**Leak:** model.causal=false in {', '.join(leaky)}: each position also sees the token it is "
                  "scored on, so its next-token loss is no language-model loss (never marked best)."]
    return lines


def _design(study: Study) -> str:
    seeds = sorted({r.seed for r in study.runs if r.seed is not None})
    counts = sorted({len(v.finished(study.rungs[-1] if study.rungs else None)) for v in study.variants})
    per = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    data_seeds = {r.config.get("data.seed") for r in study.runs}
    follows = all(r.config.get("data.seed") == r.seed for r in study.runs)
    if len(data_seeds) == 1 and len(seeds) > 1:
        order = (f"the data order is fixed (data.seed={next(iter(data_seeds))} in every run): the seed varies the "
                 "initialisation (and dropout) only")
    elif follows:
        order = "the data order follows the seed (data.seed = seed): variants run with the same seed saw the same tokens"
    else:
        order = "data.seed does not follow the seed in every run: check the data order of the pairs"
    first = next((r for r in study.runs if r.config), None)
    data = ", ".join(f"{k.split('.', 1)[1]}={first.config.get(k)}" for k in ("data.source", "data.seq_len",
                                                                             "data.batch_size")) if first else ""
    ladder = ""
    if study.rungs and first is not None:
        ladder = (f" Ladder: sizes {', '.join(study.rungs)}, each run trained on "
                  f"{first.config.get('ladder.tokens_per_parameter')} tokens per parameter.")
    return (f"Design: {per} finished seed(s) per variant (seeds {', '.join(map(str, seeds)) or '—'}); {order}. "
            f"Data: {data}.{ladder}")


def _fmt_int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def study_dir_name(study: Study, studies: list[Study]) -> Path:
    """Where a study's files go inside the report dir: the report dir itself when it is the only one."""
    return Path(".") if len(studies) == 1 else Path(study.name.replace("/", "_"))
