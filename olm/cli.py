"""`olm`: utility commands around the registry, runs and checkpoints (training itself is `olm-train`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olm.errors import ConfigError


def cmd_components(args) -> int:
    import shutil
    import textwrap

    from olm import registry
    from olm.train.compose import hydra_app
    from olm.train.schema import PROVIDED_BY_KIND  # imports only the registry: `olm` stays quick to start

    with hydra_app():  # olm's search path imports the team tree's modules (its presets' `imports`)
        pass
    columns = shutil.get_terminal_size().columns
    for kind in [args.kind] if args.kind else registry.kinds():
        # A parent block fills these in, so a config may not set them: listing them would invite an error.
        provided = PROVIDED_BY_KIND.get(kind, set())
        header = f"{kind}:"
        if provided:
            header += f" (set by the enclosing block: {', '.join(sorted(provided))})"
        print(textwrap.fill(header, columns, subsequent_indent="    ", break_on_hyphens=False))
        for entry in registry.entries(kind):
            text = registry.describe(entry, skip=provided, width=columns - 2)  # entries are indented by two
            print("\n".join(f"  {line}" for line in text.splitlines()))
    return 0


def _check_generate_args(args) -> None:
    """One-line errors for sampling flags out of range, before any model is loaded."""
    if not args.prompt:
        raise ConfigError("--prompt is empty; give at least one character to continue")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} must be in (0, 1] (1 keeps every token)")
    if not args.temperature >= 0:  # also rejects nan
        raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        raise ConfigError(f"--top-k={args.top_k} must be >= 0 (0 keeps every token)")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")


def cmd_generate(args) -> int:
    _check_generate_args(args)
    import torch

    from olm.checkpoint import load_model_and_tokenizer
    from olm.generate import generate

    _say_if_live(args.ckpt)
    if args.tokenizer:
        tokenizer = _tokenizer_arg(args.tokenizer)
        model, _ = load_model_and_tokenizer(args.ckpt)
    else:
        model, tokenizer = load_model_and_tokenizer(args.ckpt, require_tokenizer=True)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids and the model's vocab_size is "
                          f"{model.vocab_size}: they were not trained together")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prompt = torch.tensor(tokenizer.encode(args.prompt), device=device)
    if len(prompt) == 0:
        raise ConfigError(f"--prompt={args.prompt!r} encodes to no tokens; give text the tokenizer encodes")
    if len(prompt) + args.max_new_tokens > model.max_seq_len:
        window = max(model.max_seq_len - 1, 1)
        print(
            f"note: prompt ({len(prompt)} tokens) + --max-new-tokens={args.max_new_tokens} exceed the "
            f"model's context (max_seq_len={model.max_seq_len}); each token is predicted from the last "
            f"{window} tokens",
            file=sys.stderr,
        )
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, slide_context=True)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def _tokenizer_arg(path: str):
    """``--tokenizer``: an olm tokenizer dir (a run's tokenizer/), a tokenizer.json or a folder holding one."""
    from olm.data.tokenizers import load_hf, load_tokenizer

    where = Path(path)
    if not where.exists():
        raise ConfigError(f"--tokenizer {path!r} does not exist; give a tokenizer dir or a tokenizer.json")
    try:
        return load_tokenizer(where) if (where / "tokenizer_meta.json").is_file() else load_hf(where)
    except ValueError as exc:
        raise ConfigError(f"--tokenizer {path!r}: {str(exc).splitlines()[0]}") from None


def _say_if_live(path: str) -> None:
    from olm.train.lock import live_note

    note = live_note(path)
    if note is not None:
        print(note, file=sys.stderr, flush=True)


def cmd_compare(args) -> int:
    from olm.compare import Options, write_report

    options = Options(metric=args.metric, baseline=args.baseline, test=args.test, interval=args.ci, alpha=args.alpha,
                      detect=args.detect, target_compute=args.target_compute, resamples=args.resamples)
    report = write_report(args.dirs, args.out, options, x=args.x)
    for study in report["studies"]:
        print(_compare_lines(study))
    print(f"\nwrote {args.out}/report.md, report.html, report.json, CSV and {sum(str(p).endswith('.png') for p in report['files'])} plots")
    return 0


def _compare_lines(study) -> str:
    """A study's verdicts in a few lines for the terminal (the tables are in the report)."""
    from olm.compare.report import _p, set_aside_lines

    lines = [f"== {study.name}: {len(study.runs)} runs, {len(study.variants)} variants, metric {study.metric}"]
    set_aside = [f"   not compared: {line[2:]}" for line in set_aside_lines(study)]
    if study.optuna is not None:  # one run per trial: the best trial first, the report tables every trial
        return "\n".join(lines + [f"   {line.replace('**', '').replace('`', '')}" for line in study.headline]
                         + set_aside)
    lines += set_aside
    table = study.tables.get(study.metric)
    if table is None:
        return "\n".join(lines + ["   no finished run"])
    for row in table.rows:
        s = row.summary
        if s is None:
            lines.append(f"   {row.variant.label}: no finished run")
            continue
        spread = f" ± {(s.high - s.low) / 2:.4f}" if s.low is not None else " (n=1: no interval)"
        where = "baseline" if row.variant is study.baseline else (
            f"{row.diff.diff:+.4f}, p={_p(row.p_holm)}: {row.verdict}" if row.diff else "")
        lines.append(f"   {row.variant.label}: {s.mean:.4f}{spread} (n={s.n})  {where}")
    if table.best_note:
        lines.append(f"   {table.best_note}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def config_presets() -> list[str]:
    """The options of the ``model`` config group (olm's tree and any team tree on the search path)."""
    from hydra.core.object_type import ObjectType

    from olm.train.compose import hydra_app

    with hydra_app() as app:
        options = app.config_loader.get_group_options("model", ObjectType.CONFIG)
    return [o for o in options if not o.startswith("schema")]


def cmd_models(args) -> int:
    """Every model preset: the zoo's (checked against the published parameter counts) and the config tree's own
    (olm's lm_tiny, lm_small, llama_small, ... and a team's), composed as olm-train would with the default data."""
    import olm
    from olm.nn.structure import meta_device
    from olm.train.compose import compose
    from olm.zoo import PRESETS, count_parameters
    from olm.zoo.hf import export_family

    families = sorted({preset.family for preset in PRESETS.values()}) + ["config"]
    if args.family and args.family not in families:
        from olm.errors import did_you_mean

        raise ConfigError(f"--family={args.family!r} is not known" + did_you_mean(args.family, families))
    print(f"{'preset':<21} {'family':<11} {'params':>8} {'published':>10} {'context':>8}  source")
    for name, preset in PRESETS.items():
        if args.family and preset.family != args.family:
            continue
        config = preset.config()
        published = _count(preset.published_params) if preset.published_params else "-"
        print(f"{name:<21} {preset.family:<11} {_count(count_parameters(config)):>8} {published:>10} "
              f"{config['max_seq_len']:>8}  {preset.source or 'toy size for tests'}")
    if args.family and args.family != "config":
        return 0
    broken = 0
    for name in config_presets():
        if name in PRESETS:
            continue
        try:  # one broken preset (a team's) is one line; the others are still listed
            cfg = compose([f"model={name}"])
            with meta_device():
                model = olm.build_model(cfg.model)
        except ConfigError as exc:
            print(f"error: model={name}: {exc}", file=sys.stderr)
            broken += 1
            continue
        try:
            export = f"exports as {export_family(model)[0].name}"
        except ConfigError as exc:
            export = f"not exportable: {exc}"
        print(f"{name:<21} {'config':<11} {_count(model.num_parameters()):>8} {'-':>10} {model.max_seq_len:>8}  "
              f"conf/model/{name}.yaml (data vocab {cfg.data.vocab_size}; {export})")
    return 2 if broken else 0


def cmd_convert(args) -> int:
    import torch

    from olm.checkpoint import load_model_and_tokenizer
    from olm.zoo import from_hf, to_hf

    if args.from_hf:
        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        from_hf(args.from_hf, dtype=dtype).save(args.out)
        if (Path(args.from_hf) / "tokenizer.json").is_file():  # kept as the model's own: olm generate, olm eval
            from olm.data.tokenizers import load_hf

            load_hf(args.from_hf).save(Path(args.out) / "tokenizer")
    else:
        model, tokenizer = load_model_and_tokenizer(args.to_hf, flag="--to-hf")
        to_hf(model, args.out, family=args.family)
        if tokenizer is not None:  # the model's own tokenizer, for AutoTokenizer (and lm-eval's hf model)
            tokenizer.save_for_transformers(args.out)
    print(f"wrote {args.out}")
    return 0


RUN_RECORD = ("summary.json", "metrics.csv", "config.yaml", "hparams.yaml", "train.log")


def _check_eval_args(args) -> None:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit={args.limit} must be a positive integer (items per task)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be a positive integer")
    if args.out and Path(args.out).name in RUN_RECORD:
        raise ConfigError(f"--out {args.out!r} would overwrite a run's record ({', '.join(RUN_RECORD)}); "
                          "name another file, e.g. <run dir>/eval.json")


def cmd_eval(args) -> int:
    _check_eval_args(args)
    from olm.eval import require_lm_eval
    from olm.eval.run import SHIPPED_NAMES, go_offline, unknown_task
    from olm.eval.tasks import unknown_olm_task

    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    typo = None if args.include_path else unknown_olm_task(names)  # a folder of tasks may name its own olm*
    if typo is not None:
        raise unknown_task(typo, SHIPPED_NAMES)
    require_lm_eval("olm eval")
    go_offline()  # before lm-eval and datasets are imported
    from olm.eval.harness import OlmLM
    from olm.eval.run import evaluate, flat_metrics, resolve_tasks, summary_lines

    tasks = resolve_tasks(names, args.include_path)  # before the model is loaded: a bad name costs nothing
    _say_if_live(args.path)
    lm = OlmLM(path=args.path, device=args.device, batch_size=args.batch_size, dtype=args.dtype)
    results = evaluate(lm, tasks, limit=args.limit, bootstrap_iters=args.bootstrap_iters)
    for line in summary_lines(results):
        print(line)
    if args.out:
        import json

        record = {"path": str(args.path), "tasks": names, "limit": args.limit, "metrics": flat_metrics(results),
                  "results": results.get("results"), "n-samples": results.get("n-samples"),
                  "versions": results.get("versions")}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(out)  # written whole, after the evaluation succeeded
        print(f"wrote {out}")
    return 0


# corpus errors name the training config's keys; `olm data prepare` names its own arguments
PREPARE_KEYS = {"data.path": "input", "data.pattern": "--pattern", "data.text_field": "--text-field",
                "data.val_fraction": "--val-fraction", "data.tokenizer_vocab_size": "--vocab-size",
                "data.tokenizer_path": "--tokenizer-path"}


def cmd_data_prepare(args) -> int:
    from olm.data.prepare import prepare  # no Lightning import

    try:
        manifest = prepare(args.input, args.out, tokenizer=args.tokenizer, tokenizer_path=args.tokenizer_path,
                           vocab_size=args.vocab_size, format=args.format, pattern=args.pattern,
                           text_field=args.text_field, val_fraction=args.val_fraction,
                           shard_tokens=args.shard_tokens, workers=args.workers, progress=not args.quiet)
    except ValueError as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        for key, flag in PREPARE_KEYS.items():
            message = message.replace(key, flag)
        raise ConfigError(message) from None
    splits = manifest["splits"]
    shown = ", ".join(f"{name} {s['num_tokens']:,} tokens in {len(s['shards'])} shard(s)" for name, s in splits.items())
    print(f"wrote {args.out}: {shown} ({manifest['dtype']}, tokenizer {manifest['tokenizer']['name']} "
          f"{manifest['tokenizer']['identity']})")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (``error: olm compare: argument --test: ...``)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="olm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("components", help="list registered components with the parameters a config may set")
    p.add_argument("kind", nargs="?", help="only this kind (attention, norm, ffn, position, block, head, model, ...)")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser(
        "generate", help="sample text from a checkpoint, run dir or exported model dir",
        description="Sample text from a checkpoint, run dir or exported model dir. Past the model's context "
        "(max_seq_len), the window slides: each new token is predicted from the last max_seq_len - 1 tokens "
        "(a note on stderr says so).",
    )
    p.add_argument("--ckpt", required=True,
                   help="a .ckpt file, a run dir (its model/, else checkpoints/last.ckpt or the newest "
                   "*.ckpt), or a model dir written by Block.save")
    p.add_argument("--prompt", default="def ", help="text to continue (not empty)")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help=">= 0; may exceed the context: the window then slides over the last "
                   "max_seq_len - 1 tokens")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 is greedy")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k most likely tokens; >= 0, 0 keeps all")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="sample among the most likely tokens holding this much probability; in (0, 1], "
                   "1 keeps all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer dir (a run's tokenizer/) or a tokenizer.json or folder holding one "
                   "(default: the one saved with the model)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="compare run dirs by variant (runs that differ only in seed): statistics, "
                                       "verdicts, curves, ladder fits (docs/experiments.md)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run dirs, multirun dirs, or folders holding them")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="where report.md, report.html, report.json, the CSVs and the PNG plots go")
    p.add_argument("--metric", help="the metric that ranks the variants: val_loss, val_bpb, or any metric the runs "
                                    "logged (default: the experiment's compare.metric; auto = val_loss, or val_bpb "
                                    "when the tokenizers differ)")
    p.add_argument("--baseline", help="the variant the others are compared with, as its overrides "
                                      "(model.ff_multiplier=4) or its label in the report (default: the "
                                      "experiment's compare.baseline, else the first variant)")
    p.add_argument("--test", default="auto", choices=["auto", "t", "wilcoxon"],
                   help="auto/t: paired t when the variants share seeds, else Welch's t; wilcoxon: Wilcoxon "
                        "signed-rank (paired) or Mann-Whitney U")
    p.add_argument("--ci", default="t", choices=["t", "bootstrap"], help="95%% intervals: Student t or bootstrap")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction")
    p.add_argument("--detect", type=float, metavar="DELTA",
                   help="also report the seeds per variant needed to detect this difference (power 0.8)")
    p.add_argument("--x", default="tokens", choices=["steps", "tokens", "flops"], help="x-axis of the curves")
    p.add_argument("--target-compute", type=float, metavar="FLOPS",
                   help="ladders: predict each variant's loss, and the gap, at this training compute")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the ladder fits")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="evaluate a run dir, model dir or .ckpt on lm-eval tasks, offline "
                                    "(docs/eval.md)")
    p.add_argument("path", metavar="PATH", help="a run dir, an exported model dir, or a .ckpt file")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names; olm's own: "
                                                  "olm_next_line, olm_identifier, olm (both)")
    p.add_argument("--limit", type=int, help="at most this many items per task (default: all)")
    p.add_argument("--out", metavar="FILE", help="also write the metrics and lm-eval's results as JSON")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that has it, float32 otherwise")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs (lm-eval's format), e.g. with local data files; repeatable")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for the standard errors of non-mean metrics (0: none)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list the model zoo presets: family, parameter count, context length")
    p.add_argument("--family", help="only this family (gpt2, llama, mistral, qwen2, gemma2, phi3, olmo, opt, "
                                    "mixtral, stablelm; config: the config tree's own presets)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert between Hugging Face checkpoint dirs and olm model dirs (safetensors)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a local HF dir (config.json + *.safetensors, and its "
                        "tokenizer.json if any) -> olm model dir with its tokenizer/")
    source.add_argument("--to-hf", metavar="PATH", help="an olm run dir (its model/, else its last checkpoint), "
                        "model dir (written by Block.save) or .ckpt -> HF dir, with the model's tokenizer")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--family", help="HF family to export to (default: inferred from the model's components)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "keep"],
                   help="weights dtype on import (keep: as stored)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="prepare training data (docs/data.md)")
    data = p.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    p = data.add_parser("prepare", help="tokenize a corpus into token shards + manifest.json, for data.source=prepared",
                        description="Tokenize a corpus into shards of token ids and a manifest (docs/data.md, "
                        "'Prepared data'). Parallel, streaming, resumable: run the same command again after a kill.")
    p.add_argument("input", help="a text file or folder of text files, a .jsonl/.parquet/.arrow file, or a local "
                                 "Hugging Face dataset folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared dataset's folder (new, or an "
                                                                 "unfinished run of the same command)")
    p.add_argument("--tokenizer", choices=["byte", "bpe", "hf"],
                   help="byte (default), bpe (trained on the input's train split), hf (a tokenizer.json); "
                        "inferred from --tokenizer-path")
    p.add_argument("--tokenizer-path", metavar="PATH",
                   help="a tokenizer.json or folder, a saved olm tokenizer (a run's tokenizer/), or another "
                        "prepared dataset, whose tokenizer is then reused (sources of a mixture must share one)")
    p.add_argument("--vocab-size", type=int, default=4096, help="bpe: the vocabulary size to train")
    p.add_argument("--format", default="auto", choices=["auto", "text", "hf_dataset"],
                   help="auto: hf_dataset for .jsonl/.parquet/.arrow inputs, else text")
    p.add_argument("--pattern", default="**/*.txt", help="text: the files to read under a folder")
    p.add_argument("--text-field", default="text", help="hf_dataset: the column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share, split by hash (docs/data.md)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27,
                   help="tokens per shard (closed at the next document end); default 134217728")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all cores; 1: this process only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `olm components | head`: the reader has gone, which is not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
