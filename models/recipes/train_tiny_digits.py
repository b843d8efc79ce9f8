"""Train ``models/tiny-digits``: a class-conditional diffusion model of scikit-learn's digits at 16x16.

Command (from the repository root, with scikit-learn installed: `pip install -e ".[test]"`; about
20 min on one CPU thread, deterministic on CPU):

    .venv/bin/python -m models.recipes.train_tiny_digits

Data: the 1,797 bundled ``sklearn.datasets.load_digits`` images (8x8), upscaled to 16x16 (bilinear),
scaled to [-1, 1], augmented with random shifts of up to one pixel. Nothing is downloaded.
Model: diffusers ``UNet2DModel`` (16x16x1, 11 class embeddings: digits 0-9 and a null class 10 for
classifier-free guidance, labels dropped to the null class with probability ``LABEL_DROPOUT``).
Training: epsilon prediction, MSE, AdamW with warm-up and cosine decay, EMA weights (the ones saved).
Output: a ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) plus ``labels.json``
(``"0"``..``"9"``, null class 10, prompts also accepted as ``"digit 7"``) and ``training.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.recipes.digits_data import load_upscaled_digits

SEED = 0
TRAIN_STEPS = 2400
BATCH_SIZE = 128
PEAK_LEARNING_RATE = 1.5e-3
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.01
EMA_MAX_DECAY = 0.998
LABEL_DROPOUT = 0.12
MAX_SHIFT = 1
NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_OUTPUT = Path("models/tiny-digits")


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_DIGITS + 1,
    )


def build_scheduler():  # -> diffusers.DDPMScheduler
    from diffusers import DDPMScheduler

    # "trailing" spacing starts every sampler at t=999 (pure noise), which matters at 5-10 DDIM steps.
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         clip_sample=True, timestep_spacing="trailing")


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to MAX_SHIFT pixels in x and y, filling with the background value -1."""
    side = images.shape[-1]
    padded = F.pad(images, (MAX_SHIFT,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + side, dx:dx + side] for i, (dy, dx) in enumerate(offsets)])


def learning_rate(step: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
    return PEAK_LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema_unet: torch.nn.Module, unet: torch.nn.Module, step: int) -> None:
    decay = min(EMA_MAX_DECAY, (1 + step) / (10 + step))
    for ema_param, param in zip(ema_unet.parameters(), unet.parameters()):
        ema_param.lerp_(param, 1.0 - decay)


def batches(num_items: int, generator: torch.Generator):
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start:start + BATCH_SIZE]


def train(output: Path, steps: int) -> dict[str, float]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    images, labels = load_upscaled_digits()
    images = images * 2.0 - 1.0
    unet = build_unet().train()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=PEAK_LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    num_params = sum(p.numel() for p in unet.parameters())
    print(f"{num_params / 1e6:.2f} M parameters, {len(images)} images, {steps} steps of {BATCH_SIZE}", flush=True)

    started = time.monotonic()
    recent_losses: list[float] = []
    batch_indices = batches(len(images), generator)
    for step in range(steps):
        index = next(batch_indices)
        clean = random_shift(images[index], generator)
        classes = labels[index].clone()
        classes[torch.rand(len(classes), generator=generator) < LABEL_DROPOUT] = NULL_CLASS
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(clean),), generator=generator)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise
        loss = F.mse_loss(unet(noisy, timesteps, class_labels=classes).sample, noise)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        update_ema(ema_unet, unet, step)
        recent_losses = (recent_losses + [loss.item()])[-100:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - started
            print(f"step {step + 1}/{steps}  loss {sum(recent_losses) / len(recent_losses):.4f}  "
                  f"lr {learning_rate(step):.2e}  {elapsed / 60:.1f} min", flush=True)

    wall_minutes = (time.monotonic() - started) / 60
    save_pipeline(ema_unet, scheduler, output)
    summary = {"parameters": num_params, "train_steps": steps, "batch_size": BATCH_SIZE,
               "final_loss_last_100": sum(recent_losses) / len(recent_losses),
               "wall_minutes_one_thread": round(wall_minutes, 1), "seed": SEED}
    (output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_pipeline(unet: torch.nn.Module, scheduler, output: Path) -> None:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(output, safe_serialization=True)
    labels = {"labels": [str(digit) for digit in range(NUM_DIGITS)], "null_class": NULL_CLASS,
              "prompt_templates": ["{label}", "digit {label}"]}
    (output / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="optimizer steps (a smoke run: --steps 5)")
    args = parser.parse_args()
    print(json.dumps(train(args.output, args.steps)))


if __name__ == "__main__":
    main()
