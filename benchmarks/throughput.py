"""Training throughput of olm presets: a plain PyTorch loop vs the Lightning Trainer with olm's module and callbacks,
and, as a same-card reference, Hugging Face transformers' implementation of the same shape in the plain loop.

All paths time full training steps (forward, backward, AdamW step, gradient clipping) after warm-up on synthetic
tokens, with the same optimizer, precision and compilation, and report tokens/s, MFU and peak memory.

MFU = tokens/s * flops_per_token / peak, with flops_per_token = 6 N + 12 L H Q T (olm/train/flops.py: N without
position tables; L layers, H heads of size Q, T sequence length) and the card's dense bf16 peak (989 TFLOP/s for
H100/H200 SXM).

    python benchmarks/throughput.py --presets gpt2_small llama_small --batch-sizes 32 16 --compile --out results/
    python benchmarks/throughput.py --device cpu --presets lm_tiny --batch-sizes 2 --steps 3 --warmup 1   # smoke test
    python benchmarks/throughput.py --presets gpt2_small --paths plain hf --compile   # olm vs transformers, same card

The ``hf`` path builds the transformers model that olm exports the preset to (GPT2LMHeadModel for gpt2_small,
LlamaForCausalLM for llama_small; SDPA attention, the preset's padded vocabulary), compiles its forward and the
cross-entropy as one function like olm's default, and steps it in the plain loop (needs the ``hf`` extra).

The ``nanogpt`` path loads ``model.py`` from a nanoGPT checkout (``--nanogpt-dir``; nanoGPT is not part of olm) and
builds its GPT in the preset's GPT-2 shape: its own optimizer groups, its forward's loss, ``torch.compile`` of the
whole model as nanoGPT's train.py does, in the same plain loop. nanoGPT's MLP uses the exact (erf) GELU where olm's
GPT-2 presets use the tanh form, as GPT-2 did; both are one fused elementwise kernel.

    python benchmarks/throughput.py --presets gpt2_small --paths plain lightning nanogpt --nanogpt-dir ../nanoGPT --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_config(preset: str, vocab_size: int, seq_len: int, overrides: list[str]) -> dict:
    """The model node of conf/model/<preset>.yaml, composed by Hydra as olm-train would."""
    from omegaconf import OmegaConf

    from olm.train.compose import compose

    cfg = compose([f"model={preset}", f"data.seq_len={seq_len}", f"data.vocab_size={vocab_size}", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def make_module(model_cfg: dict, args, compile: bool):
    from olm.train.config import AdamWConfig, SchedulerConfig, speed_config
    from olm.train.module import LMModule

    optim = AdamWConfig(lr=6e-4, weight_decay=0.1, betas=[0.9, 0.95], fused=True)  # fused AdamW on GPU and CPU
    speed = speed_config(dict(
        compile=compile, fused_loss=args.fused_loss, activation_checkpointing=args.activation_checkpointing,
        attention_backend=args.attention_backend, compile_mode=args.compile_mode, compile_scope=args.compile_scope,
        compile_options=parse_options(args.compile_options) or {},
        float8=False if args.float8 == "false" else args.float8, float8_head=args.float8_head,
    ))
    return LMModule(model_cfg, optim, SchedulerConfig(name="cosine", warmup_steps=10), speed,
                    max_steps=args.warmup + args.steps, log_every_n_steps=args.log_every)


def add_float8_arguments(parser: argparse.ArgumentParser) -> None:
    """--float8 and --float8-head, as olm-train's float8 and float8_head keys (read by make_module)."""
    parser.add_argument("--float8", default="false", choices=["false", "tensorwise", "rowwise"],
                        help="FP8 matmuls in the linear layers (torchao), as olm-train's float8 key")
    parser.add_argument("--float8-head", action="store_true", help="with --float8: the output head in FP8 too")


def parse_options(items: list[str]) -> dict:
    """["bucket_cap_mb=100", "gradient_as_bucket_view=true"] -> {"bucket_cap_mb": 100, ...} (values read as YAML)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"option {item!r} is not KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def synthetic_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n, batch_size, seq_len + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_step(module, loss_of, optimizer, batches, device: str):
    """step(i): one full training step on batch i (mod len) in bf16 autocast on GPU: loss, backward, clipping to
    1.0, AdamW. ``loss_of(x, y)`` is the module's loss, or a DDP wrapper around it."""
    def step(i):
        x, y = batches[i % len(batches)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def device_batches(batch_size: int, vocab_size: int, args, n: int = 4, seed: int = 0) -> list:
    batches = synthetic_batches(n, batch_size, args.seq_len, vocab_size, seed=seed)
    return [(x.to(args.device), y.to(args.device)) for x, y in batches]


def time_steps(step, args) -> tuple[float, torch.Tensor]:
    """Seconds for ``args.steps`` calls of step(i) after ``args.warmup`` untimed ones, and the last loss."""
    for i in range(args.warmup):
        step(i)
    sync(args.device)
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync(args.device)
    return time.perf_counter() - start, loss.detach()


def time_model(model, loss_of, optimizer, model_cfg: dict, batch_size: int, args) -> dict:
    """Seconds for the timed steps of ``model`` in the plain loop, and the last loss."""
    batches = device_batches(batch_size, model_cfg["vocab_size"], args)
    model.train()
    seconds, loss = time_steps(training_step(model, loss_of, optimizer, batches, args.device), args)
    return {"seconds": seconds, "final_loss": float(loss)}


def meta_model(model_cfg: dict):
    """The preset's olm model on the meta device: shapes and parameter counts, no memory."""
    import olm
    from olm.nn.structure import meta_device

    with meta_device():
        return olm.build_model(model_cfg)


def plain_loop(model_cfg, batch_size, args) -> dict:
    """The reference: the same module's loss and optimizer, stepped by hand."""
    module = make_module(model_cfg, args, args.compile).to(args.device)
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    return {**time_model(module, module.loss, optimizer, model_cfg, batch_size, args), "module": module}


def hf_model(model_cfg: dict):
    """The transformers model of the same shape as the olm preset (the family olm exports it to), randomly
    initialised, with the preset's padded vocabulary and SDPA attention."""
    import transformers

    from olm.zoo.families import infer_family

    model = meta_model(model_cfg)
    family = infer_family(model)
    config = transformers.AutoConfig.for_model(family.model_type, **family.to_hf(model))
    config.vocab_size = model.embedding.token.num_embeddings  # padded, as olm trains it (50304 for GPT-2)
    config.use_cache = False
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def hf_loop(model_cfg, batch_size, args) -> dict:
    """transformers' model of the same shape in the plain loop: AdamW (fused on GPU; decay on matrices but not on
    embeddings, as olm), bf16 autocast, clipping; with --compile, forward and loss compiled as one function."""
    import torch.nn.functional as F

    from olm.train.config import AdamWConfig
    from olm.train.optim import parameter_groups

    model = hf_model(model_cfg).to(args.device)
    optimizer = torch.optim.AdamW(parameter_groups(model, AdamWConfig(weight_decay=0.1)), lr=6e-4, betas=(0.9, 0.95),
                                  fused=args.device == "cuda" or None)

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    if args.compile:
        loss_of = torch.compile(loss_of)
    return {**time_model(model, loss_of, optimizer, model_cfg, batch_size, args), "module": None,
            "params": sum(p.numel() for p in model.parameters())}


def nanogpt_model(model_cfg: dict, nanogpt_dir: str, device):
    """nanoGPT's GPT (``model.py`` of a nanoGPT checkout) in the preset's GPT-2 shape, and its config; SystemExit if
    the preset is not a GPT-2 shape or the checkout builds another parameter count (``device="meta"`` to check)."""
    import importlib.util

    from olm.zoo.families import infer_family

    olm_model = meta_model(model_cfg)
    family = infer_family(olm_model).model_type
    if family != "gpt2":
        raise SystemExit(f"--paths nanogpt: nanoGPT builds GPT-2 shapes only; {model_cfg['name']!r} is a {family} model")
    source = Path(nanogpt_dir) / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_model", source)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    config = nanogpt.GPTConfig(block_size=model_cfg["max_seq_len"], vocab_size=olm_model.embedding.token.num_embeddings,
                               n_layer=model_cfg["num_layers"], n_head=model_cfg["num_heads"],
                               n_embd=model_cfg["embed_dim"], dropout=0.0, bias=bool(model_cfg["bias"]))
    with torch.device(device):
        model = nanogpt.GPT(config)
    count, expected = sum(p.numel() for p in model.parameters()), olm_model.num_parameters()
    if count != expected:  # e.g. a fork whose GPTConfig defaults to other norms or activations
        raise SystemExit(f"--nanogpt-dir: {source} built {count:,} parameters, not the {expected:,} of "
                         f"{model_cfg['name']!r}'s GPT-2 shape; point to an unmodified nanoGPT checkout")
    return model, config


def nanogpt_loop(model_cfg, batch_size, args) -> dict:
    """nanoGPT's GPT (``model.py`` of a nanoGPT checkout, --nanogpt-dir) of the preset's GPT-2 shape, stepped as
    nanoGPT's train.py does: its own AdamW groups (fused on GPU), the loss its forward returns, ``torch.compile`` of
    the whole model, bf16 autocast and clipping in the same plain loop."""
    model, config = nanogpt_model(model_cfg, args.nanogpt_dir, args.device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), args.device)
    forward = torch.compile(model) if args.compile else model

    def loss_of(x, y):
        return forward(x, y)[1]

    return {**time_model(model, loss_of, optimizer, model_cfg, batch_size, args), "module": None,
            "params": sum(p.numel() for p in model.parameters()), "reference_config": dataclasses.asdict(config)}


class _StepTimer:
    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def hook(self, trainer):
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()


def lightning_loop(model_cfg, batch_size, args, callbacks=(), extra_steps: int = 0) -> dict:
    """olm's LMModule in the Lightning Trainer, with olm's throughput callback and logging interval, as olm-train
    runs it (plus ``callbacks``, and ``extra_steps`` beyond warm-up and timed steps)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from olm.train.callbacks import ThroughputMonitor

    module = make_module(model_cfg, args, args.compile)
    timer = _StepTimer(args.warmup, args.device)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.hook(trainer)

        def on_train_end(self, trainer, pl_module):
            sync(args.device)
            timer.end = time.perf_counter()

    import os

    from olm.train.strategies import resolve_strategy

    rank = int(os.environ.get("LOCAL_RANK", 0))  # each DDP rank gets its own synthetic tokens
    # one epoch holds every step, so that no new DataLoader iterator starts inside a timed or profiled window
    batches = synthetic_batches(args.warmup + args.steps + extra_steps, batch_size, args.seq_len, model_cfg["vocab_size"],
                                seed=rank)
    loader = DataLoader(batches, batch_size=None, pin_memory=args.device == "cuda")
    strategy = args.strategy
    if strategy == "ddp" and (args.gradient_compression != "none" or args.ddp_options):
        strategy = {"name": "ddp", "gradient_compression": args.gradient_compression, **parse_options(args.ddp_options)}
    strategy = resolve_strategy(strategy)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=args.devices, strategy=strategy,
        precision="bf16-mixed" if args.device == "cuda" else "32-true",
        max_steps=args.warmup + args.steps + extra_steps, log_every_n_steps=args.log_every, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[ThroughputMonitor(args.seq_len, batch_size, args.log_every), Timer(), *callbacks],
    )
    trainer.fit(module, train_dataloaders=loader)
    if not trainer.is_global_zero:
        sys.exit(0)  # rank 0 reports
    return {"seconds": timer.end - timer.start, "final_loss": None, "module": module, "world_size": trainer.world_size}


def run_case(preset: str, batch_size: int, path: str, args) -> dict:
    from olm.train.flops import flops_per_token, peak_flops

    model_cfg = model_config(preset, args.vocab_size, args.seq_len, args.override)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = {"plain": plain_loop, "lightning": lightning_loop, "hf": hf_loop,
              "nanogpt": nanogpt_loop}[path](model_cfg, batch_size, args)
    module = result.pop("module")
    world_size = result.get("world_size", 1)
    tokens_per_sec = world_size * args.steps * batch_size * args.seq_len / result["seconds"]
    full_model = meta_model(model_cfg)  # unsharded shapes: under FSDP module.model holds only this rank's shard
    fpt = flops_per_token(full_model, args.seq_len)
    peak = peak_flops(torch.cuda.get_device_name()) if args.device == "cuda" else None
    row = {
        "preset": preset, "path": path, "batch_size": batch_size, "seq_len": args.seq_len,
        "params": result.get("params", full_model.num_parameters()), "tokens_per_sec": round(tokens_per_sec),
        "world_size": world_size, "strategy": str(args.strategy),
        "mfu": round(tokens_per_sec * fpt / (peak * world_size), 4) if peak else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
        "step_ms": round(1000 * result["seconds"] / args.steps, 2),
        "compile": args.compile, "fused_loss": str(args.fused_loss), "fused_ce_used": module is not None and module._fused_ce is not None,
        "activation_checkpointing": args.activation_checkpointing, "attention_backend": args.attention_backend,
        "float8": args.float8, "float8_head": args.float8_head,
        "compile_mode": args.compile_mode, "compile_scope": args.compile_scope if args.compile else None,
        "compile_options": " ".join(args.compile_options) or None,
        "gradient_compression": args.gradient_compression if world_size > 1 else None,
        "ddp_options": " ".join(args.ddp_options) if world_size > 1 else None,
        "flops_per_token": fpt,
    }
    if "reference_config" in result:
        row["reference_config"] = result["reference_config"]
    del module
    return row


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"card: {meta['device']}; torch {meta['torch']}; date {meta['date']}; command: `{meta['command']}`", "",
             "| preset | path | GPUs | batch/GPU | params | tokens/s | MFU | peak mem GiB/GPU | step ms | compile | fused CE | SDPA | act. ckpt | float8 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['preset']} | {r['path']} | {r['world_size']} | {r['batch_size']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_sec']:,} "
                     f"| {mfu} | {r['peak_mem_gib']} | {r['step_ms']} | {r['compile']} | {r['fused_ce_used']} "
                     f"| {r['attention_backend']} | {r['activation_checkpointing']} "
                     f"| {r['float8']}{' + head' if r['float8_head'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["gpt2_small"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--paths", nargs="+", default=["plain", "lightning"], choices=["plain", "lightning", "hf", "nanogpt"],
                        help="hf: transformers' model of the same shape; nanogpt: nanoGPT's model (GPT-2 presets, "
                             "needs --nanogpt-dir); both as same-card references")
    parser.add_argument("--nanogpt-dir", default=None, help="a nanoGPT checkout (its model.py) for --paths nanogpt")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50257, help="padded by the preset (GPT-2: to 50304)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    parser.add_argument("--compile-scope", default="model", choices=["model", "blocks"])
    parser.add_argument("--compile-options", nargs="*", default=[], help="inductor options, e.g. coordinate_descent_tuning=true")
    parser.add_argument("--gradient-compression", default="none", choices=["none", "bf16", "fp16"], help="DDP only")
    parser.add_argument("--ddp-options", nargs="*", default=[], help="trainer.strategy keys for DDP, e.g. bucket_cap_mb=100")
    parser.add_argument("--fused-loss", default="false", type=lambda v: {"true": True, "false": False}.get(v, v))
    parser.add_argument("--activation-checkpointing", action="store_true")
    add_float8_arguments(parser)
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"])
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. model.num_layers=2")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (or CPU processes) for the lightning path")
    parser.add_argument("--strategy", default="auto", help="auto, ddp, fsdp (lightning path)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=None, help="directory for throughput.json and throughput.md")
    args = parser.parse_args(argv)
    olm_only = {"--fused-loss": args.fused_loss is not False, "--activation-checkpointing": args.activation_checkpointing,
                "--attention-backend": args.attention_backend != "auto", "--compile-mode": args.compile_mode != "default",
                "--compile-scope": args.compile_scope != "model", "--compile-options": bool(args.compile_options),
                "--float8": args.float8 != "false", "--float8-head": args.float8_head,
                "--devices": args.devices > 1, "--strategy": args.strategy != "auto"}
    references = [p for p in args.paths if p in ("hf", "nanogpt")]
    if references and any(olm_only.values()):
        parser.error(f"--paths {' '.join(references)} times the reference model as it is; "
                     f"{', '.join(k for k, v in olm_only.items() if v)} apply to olm's paths only: time it in a run without them")
    if ("nanogpt" in args.paths) != (args.nanogpt_dir is not None):
        parser.error("--paths nanogpt and --nanogpt-dir go together: nanoGPT is not part of olm, point to a checkout")
    if "nanogpt" in args.paths:  # before anything is timed
        if not (Path(args.nanogpt_dir) / "model.py").is_file():
            parser.error(f"--nanogpt-dir: {Path(args.nanogpt_dir) / 'model.py'} not found; pass the directory of a nanoGPT checkout")
        for preset in args.presets:
            nanogpt_model(model_config(preset, args.vocab_size, args.seq_len, args.override), args.nanogpt_dir, "meta")
    torch.set_float32_matmul_precision("high")

    rows = []
    for preset in args.presets:
        for batch_size in args.batch_sizes:
            for path in args.paths:
                row = run_case(preset, batch_size, path, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'x86'})",
            "torch": torch.__version__, "date": date.today().isoformat(),
            "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.devices > 1:
        meta["device"] += f" x{args.devices}"
    print(to_markdown(rows, meta))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (args.out / "throughput.md").write_text(to_markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
