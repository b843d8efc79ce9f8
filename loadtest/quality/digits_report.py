"""The digits quality result as a markdown table, a PNG plot (accuracy and s/image vs steps) and a sample grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

GRID_SCALE = 2  # pixels per generated pixel in the sample grid


def markdown_table(result: dict[str, Any], header: bool = True) -> str:
    lines = [] if not header else [
        f"Model `{result['model']}`, {result['scheduler'].upper()} sampler, guidance scale "
        f"{result['guidance_scale']}, {result['images_per_step']} images per step count (balanced labels, "
        f"fixed seeds), prompts `{result['prompt_template']}`; classifier held-out accuracy on real digits "
        f"{result['classifier_heldout_accuracy']:.1%}. Seconds per image: wall time of one step count's "
        f"requests, all in flight together, over the number of images.",
        "",
    ]
    lines += ["| steps | accuracy | s/image | images |", "|---:|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['steps']} | {row['accuracy']:.1%} | {row['seconds_per_image']:.4f} | {row['images']} |")
    return "\n".join(lines) + "\n"


def save_plot(result: dict[str, Any], path: Path, others: list[dict[str, Any]] = ()) -> None:
    """Accuracy (left axis) and s/image (right axis) vs steps; ``others``: accuracy at other guidance scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["steps"] for row in result["rows"]]
    accuracy = [100 * row["accuracy"] for row in result["rows"]]
    seconds = [row["seconds_per_image"] for row in result["rows"]]
    figure, accuracy_axis = plt.subplots(figsize=(5.0, 3.2), dpi=90)
    accuracy_axis.plot(steps, accuracy, "o-", color="tab:blue", label=f"accuracy, guidance {result['guidance_scale']}")
    for other, color in zip(others, ("tab:cyan", "tab:purple", "tab:olive", "tab:gray")):
        accuracy_axis.plot(steps, [100 * row["accuracy"] for row in other["rows"]], ".:", color=color,
                           label=f"accuracy, guidance {other['guidance_scale']}")
    accuracy_axis.set_xscale("log")
    accuracy_axis.set_xticks(steps, [str(step) for step in steps])
    accuracy_axis.set_xlabel(f"{result['scheduler'].upper()} steps")
    accuracy_axis.set_ylabel("recognised as requested digit (%)", color="tab:blue")
    accuracy_axis.set_ylim(0, 104)
    seconds_axis = accuracy_axis.twinx()
    seconds_axis.plot(steps, seconds, "s--", color="tab:red", label="s/image")
    seconds_axis.set_ylabel("seconds per image", color="tab:red")
    seconds_axis.set_ylim(0, max(seconds) * 1.15)
    accuracy_axis.legend(loc="lower left", fontsize=7)
    accuracy_axis.set_title(f"{result['model']}: quality and speed vs steps", fontsize=10)
    accuracy_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_sample_grid(digits: list[int], images: list[np.ndarray], path: Path, per_digit: int = 10) -> None:
    """One row per digit, up to ``per_digit`` images each, 1-pixel gaps, upscaled GRID_SCALE times."""
    side = images[0].shape[0]
    cell = side + 1
    grid = np.full((10 * cell + 1, per_digit * cell + 1), 128, dtype=np.uint8)
    filled = [0] * 10
    for digit, image in zip(digits, images):
        column = filled[digit]
        if column >= per_digit:
            continue
        filled[digit] += 1
        top, left = 1 + digit * cell, 1 + column * cell
        grid[top:top + side, left:left + side] = image[..., 0]
    picture = Image.fromarray(grid, mode="L")
    picture.resize((picture.width * GRID_SCALE, picture.height * GRID_SCALE), Image.NEAREST).save(path, optimize=True)
