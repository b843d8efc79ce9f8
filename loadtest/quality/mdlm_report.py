"""Plot the masked-diffusion text model's training curve and word-list share vs steps (one small PNG).

    .venv/bin/python -m loadtest.quality.mdlm_report --training models/tiny-shakespeare-mdlm/training.json \
        --quality docs/mdlm_quality.json --out docs/mdlm_training.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def save_plot(training: dict, quality: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if quality else 1
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.0), dpi=80, squeeze=False)
    curve_axis = axes[0][0]
    steps = [point["step"] for point in training["curve"]]
    curve_axis.plot(steps, [point["train_nats_per_token"] for point in training["curve"]], "o-", markersize=3,
                    label="train (last 200 steps)")
    curve_axis.plot(steps, [point["heldout_nats_per_token"] for point in training["curve"]], "s-", markersize=3,
                    label="held-out (32 windows)")
    curve_axis.set_xlabel("training step")
    curve_axis.set_ylabel("negative ELBO, nats per token")
    curve_axis.set_title("tiny-shakespeare-mdlm training", fontsize=9)
    curve_axis.grid(alpha=0.3)
    curve_axis.legend(fontsize=7)
    if quality:
        share_axis = axes[0][1]
        rows = quality["diffusion"]
        share_axis.plot([row["steps"] for row in rows], [row["word_share"] for row in rows], "o-",
                        label=f"diffusion ({quality['remasking']})")
        if "ar" in quality:
            share_axis.axhline(quality["ar"]["word_share"], color="tab:red", linestyle="--", label="AR (tiny-shakespeare)")
        share_axis.axhline(0.85, color="gray", linestyle=":", label="target 0.85")
        share_axis.set_xscale("log")
        share_axis.minorticks_off()
        share_axis.set_xticks([row["steps"] for row in rows], [str(row["steps"]) for row in rows])
        share_axis.set_xlabel(f"denoising steps ({quality['max_tokens']} tokens)")
        share_axis.set_ylabel("share of words in words.txt")
        share_axis.set_ylim(0, 1.02)
        share_axis.set_title(f"samples, temperature {quality['temperature']}", fontsize=9)
        share_axis.grid(alpha=0.3)
        share_axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training", type=Path, required=True)
    parser.add_argument("--quality", type=Path, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    training = json.loads(args.training.read_text())
    quality = json.loads(args.quality.read_text()) if args.quality else None
    save_plot(training, quality, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
