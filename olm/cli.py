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
