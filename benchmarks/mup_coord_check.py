"""muP's coordinate check as a plot: mean |activation| per layer against width, standard vs muP.

    python benchmarks/mup_coord_check.py --out docs/img/mup_coord_check.png

Trains a 2-layer LM (4 heads, byte vocabulary) at widths 32 to 512 for a few AdamW steps on one fixed batch
(olm.train.mup.coordinate_check, 2 seeds) and draws, for each layer, the size before each step against width.
Flat lines mean the layer's updates do not grow with width, the property muP's learning-rate transfer rests on.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from olm.train.config import AdamWConfig  # noqa: E402
from olm.train.mup import LAYERS, coordinate_check  # noqa: E402

MODEL = dict(name="lm", vocab_size=256, num_heads=4, num_layers=2, max_seq_len=32, ff_multiplier=2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/mup_coord_check.png")
    parser.add_argument("--widths", default="32,64,128,256,512")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    optim = AdamWConfig(lr=args.lr, weight_decay=0.0)
    results = {
        "standard": coordinate_check({**MODEL, "parametrization": "standard"}, widths, optim, steps=args.steps),
        f"muP (base width {widths[0]})": coordinate_check(
            {**MODEL, "parametrization": "mup", "mup_base_width": widths[0]}, widths, optim, steps=args.steps),
    }
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(4 * len(LAYERS), 7), sharex=True)
    for row, (title, sizes) in enumerate(results.items()):
        for col, layer in enumerate(LAYERS):
            ax = axes[row][col]
            for step in range(args.steps):
                ax.plot(widths, [sizes[w][layer][step] for w in widths], marker="o", label=f"step {step}",
                        color=plt.cm.viridis(step / max(1, args.steps - 1)))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}: {layer}", fontsize=10)
            if row == 1:
                ax.set_xlabel("width (embed_dim)")
            if col == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Coordinate check: AdamW lr {args.lr:g}, {args.steps} steps, 2 seeds")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    for title, sizes in results.items():
        last = {layer: [round(sizes[w][layer][-1], 4) for w in widths] for layer in LAYERS}
        print(title, "size before the last step, by width", widths, last)


if __name__ == "__main__":
    main()
