"""Items per second of olm's lm-eval model on olm_next_line (4 log-likelihood requests per item), batched or not.

    python benchmarks/eval_throughput.py --model gpt2_small --batch-sizes 1,16,64 --items 500

The model has the preset's shape at GPT-2's vocabulary (gpt2_small: 124M parameters) and random weights; the text
is byte-tokenized (ids below 256), which changes nothing of the cost per token. Requests are built from the task's
JSONL as lm-eval builds them (context, " " + choice with the task's empty delimiter), and scored through
``OlmLM.loglikelihood``, the path lm-eval's evaluator takes; lm-eval's task loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_small")
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import olm
    from lm_eval.api.instance import Instance

    from olm.data import ByteTokenizer
    from olm.eval.harness import OlmLM
    from olm.eval.tasks import shipped_tasks_dir
    from olm.zoo import preset_config

    torch.manual_seed(0)
    model = olm.build_model({**preset_config(args.model), "vocab_size": args.vocab_size, "max_seq_len": 1024})
    items = [json.loads(line) for line in (shipped_tasks_dir() / "olm_next_line.jsonl").read_text().splitlines()]
    items = items[: args.items]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(item["context"], choice), idx=i)
                for item in items for i, choice in enumerate(item["choices"])]
    device = torch.device(args.device)
    print(f"{args.model}: {model.num_parameters() / 1e6:.1f}M parameters, {len(items)} items "
          f"({len(requests)} requests), {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        lm = OlmLM(model=model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32),
                   tokenizer=ByteTokenizer(), device=str(device), batch_size=batch_size)
        lm.loglikelihood(requests[: 4 * batch_size], disable_tqdm=True)  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = lm.loglikelihood(requests, disable_tqdm=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"batch {batch_size:4d}: {len(items) / seconds:8.1f} items/s ({len(requests) / seconds:8.1f} "
              f"requests/s, {seconds:.2f} s; first score {scores[0][0]:.3f})")


if __name__ == "__main__":
    main()
