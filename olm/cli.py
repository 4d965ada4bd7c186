"""`olm`: utility commands around the registry, runs and checkpoints (training itself is `olm-train`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olm.registry import ConfigError


def cmd_components(args) -> int:
    from olm import registry

    for kind in [args.kind] if args.kind else registry.kinds():
        print(f"{kind}:")
        for entry in registry.entries(kind):
            print(f"  {registry.describe(entry)}")
    return 0


def load_model_and_tokenizer(ckpt: str):
    """A model (and its tokenizer when known) from an exported model dir, a run dir, or a Lightning .ckpt file."""
    from olm.nn import Block

    path = Path(ckpt)
    tokenizer = None
    if path.is_dir():
        model_dir = path / "model" if (path / "model" / "config.json").is_file() else path
        model = Block.load(model_dir)
        if (model_dir / "tokenizer").is_dir():
            from olm.data import load_tokenizer

            tokenizer = load_tokenizer(model_dir / "tokenizer")
        return model, tokenizer
    from olm.nn.structure import Block as _Block
    from olm.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    meta = state.get("olm") or {}
    if "model_config" not in meta:
        raise ConfigError(f"checkpoint {str(path)!r} has no olm model config; was it written by olm-train?")
    model = _Block.from_config(meta["model_config"])
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    run_tokenizer = path.parent.parent / "model" / "tokenizer"
    if run_tokenizer.is_dir():
        from olm.data import load_tokenizer

        tokenizer = load_tokenizer(run_tokenizer)
    return model, tokenizer


def cmd_generate(args) -> int:
    import torch

    from olm.generate import generate

    model, tokenizer = load_model_and_tokenizer(args.ckpt)
    if tokenizer is None:
        from olm.data import ByteTokenizer

        tokenizer = ByteTokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prompt = torch.tensor(tokenizer.encode(args.prompt), device=device)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_compare(args) -> int:
    from olm.compare import write_report

    report = write_report(args.dirs, args.out, fmt=args.format, metric=args.metric)
    print(report["table"])
    print(f"\nwrote {', '.join(str(p) for p in report['files'])}")
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def cmd_models(args) -> int:
    from olm.zoo import PRESETS, count_parameters

    print(f"{'preset':<14} {'family':<8} {'params':>8} {'published':>10} {'context':>8}  source")
    for name, preset in PRESETS.items():
        if args.family and preset.family != args.family:
            continue
        config = preset.config()
        published = _count(preset.published_params) if preset.published_params else "-"
        print(f"{name:<14} {preset.family:<8} {_count(count_parameters(config)):>8} {published:>10} "
              f"{config['max_seq_len']:>8}  {preset.source or 'toy size for tests'}")
    return 0


def cmd_convert(args) -> int:
    import torch

    from olm.nn import Block
    from olm.zoo import from_hf, to_hf

    if args.from_hf:
        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        from_hf(args.from_hf, dtype=dtype).save(args.out)
    else:
        to_hf(Block.load(args.to_hf), args.out, family=args.family)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("components", help="list registered components with their parameters")
    p.add_argument("kind", nargs="?", help="only this kind (attention, norm, ffn, position, block, head, model, ...)")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("generate", help="sample text from a checkpoint, run dir or exported model dir")
    p.add_argument("--ckpt", required=True, help="a .ckpt file, a run dir, or a model dir written by Block.save")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="compare run dirs (a multirun dir expands to its jobs): table and plots")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run dirs, multirun dirs, or folders holding them")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="where report.md and the PNG plots go")
    p.add_argument("--format", default="md", choices=["md", "csv", "json"],
                   help="also write the table as report.csv or report.json (report.md is always written)")
    p.add_argument("--metric", default="val_loss", choices=["val_loss", "val_bpb"], help="metric that picks the best run")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="list the model zoo presets: family, parameter count, context length")
    p.add_argument("--family", help="only this family (gpt2, llama, mistral, qwen2, gemma2, phi3, olmo, opt, mixtral)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert between Hugging Face checkpoint dirs and olm model dirs (safetensors)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a local HF dir (config.json + *.safetensors) -> olm model dir")
    source.add_argument("--to-hf", metavar="DIR", help="an olm model dir (written by Block.save) -> HF dir")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--family", help="HF family to export to (default: inferred from the model's components)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "keep"],
                   help="weights dtype on import (keep: as stored)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
