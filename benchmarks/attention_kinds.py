"""Training speed of each attention kind on one GPU (or the CPU, for a smoke run): a whole olm LM's forward + backward + AdamW step, bf16 autocast.

One model shape for every kind (llama3_2_1b's width and heads by default, fewer layers so every kind fits), so the
differences are the attention's: MHA (32 KV heads), GQA (8), MQA (1), a sliding window, attention sinks on GQA,
local/global interleaving (5 sliding layers per global one, Gemma 3's pattern) and MLA (DeepSeek-V3's ranks scaled to
the width). Each kind: warm-up steps, then timed steps between CUDA events; reported are tokens/s (median of
repeats), the step time and the parameter count (MLA and MQA have fewer attention weights than MHA).

    python benchmarks/attention_kinds.py                       # seq 4096, batch 2, 8 layers of 2048 wide
    python benchmarks/attention_kinds.py --seq-len 2048 --batch-size 4 --layers 4

Needs torch and olm only (no Hydra, Lightning or W&B); no network.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kinds(args) -> dict[str, dict]:
    window = args.window
    local = {"attention": {"name": "sliding_window", "window": window, "num_kv_heads": 8}}
    return {
        "mha": {"attention": "mha"},
        "gqa (8 kv)": {"attention": {"name": "gqa", "num_kv_heads": 8}},
        "mqa": {"attention": "mqa"},
        f"sliding_window {window}": local,
        "gqa + sinks": {"attention": {"name": "gqa", "num_kv_heads": 8, "sinks": True}},
        "local x5 / global": {"attention": {"name": "gqa", "num_kv_heads": 8},
                              "block_overrides": [local] * 5 + [{}]},
        "mla": {"attention": dict(zip(("name", "kv_rank", "q_rank", "rope_dim", "nope_dim", "v_dim"),
                                      ("mla", *args.mla_dims)))},
    }


def measure(spec: dict, args) -> dict:
    import olm

    torch.manual_seed(0)
    config = dict(name="lm", vocab_size=args.vocab, embed_dim=args.width, num_heads=args.heads,
                  num_layers=args.layers, max_seq_len=args.seq_len, norm="rmsnorm", ffn="swiglu", **spec)
    device = torch.device(args.device)
    model = olm.build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
        rates.append(args.batch_size * args.seq_len / seconds)
    params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median = statistics.median(rates)
    return {"tokens_per_s": median, "step_ms": 1000 * args.batch_size * args.seq_len / median,
            "params": params, "spread": (min(rates), max(rates))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mla-dims", type=int, nargs=5, default=[512, 1536, 64, 128, 128],
                        metavar=("KV_RANK", "Q_RANK", "ROPE", "NOPE", "V"), help="MLA's sizes (DeepSeek-V3's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}, torch {torch.__version__}; {args.layers} layers x {args.width}, "
          f"{args.heads} heads, seq {args.seq_len}, batch {args.batch_size}, bf16 autocast, AdamW")
    print("| attention | tokens/s | step ms | params | vs mha |")
    print("|---|---|---|---|---|")
    rows, base = {}, None
    for name, spec in kinds(args).items():
        row = measure(spec, args)
        base = base or row["tokens_per_s"]
        rows[name] = row
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {row['step_ms']:.1f} | {row['params'] / 1e6:.1f}M | "
              f"{row['tokens_per_s'] / base:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
