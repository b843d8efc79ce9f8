"""Build a random-weight Llama for benchmarks, offline and deterministically: the ~5 M-parameter
default, (``--shape 108m``) a SmolLM-135M-shaped one (30 layers, hidden 576, intermediate 1536,
heads 9/3, our 4096-token vocab: 108.6 M parameters), or, for GPU runs, Qwen2.5-0.5B- and
TinyLlama-1.1B-shaped Llamas with their published vocabulary sizes (151936 and 32000; saved in bfloat16).
The tokenizer is always the 4096-token one trained here: the logit rows above it are suppressed like
eos, so the full-size lm_head is computed every step but never picks a token the tokenizer lacks.

The folder it writes loads with transformers' AutoModelForCausalLM / AutoTokenizer and with
`transformers serve`, and carries a chat template so OpenAI-style chat endpoints work.

The weights are random, but the end-of-sequence token is made (practically) impossible to
generate so that every benchmark request produces exactly `max_tokens` tokens:
  * embedding dimension 0 holds a positive constant for every token,
  * no layer writes to residual dimension 0 (row 0 of every o_proj / down_proj is zero),
  * so after the final RMSNorm dimension 0 is always positive, and the eos row of lm_head
    is `-EOS_SUPPRESSION` on dimension 0 and zero elsewhere: the eos logit is always very negative.

Usage: python -m loadtest.benchmarks.make_bench_model [OUTPUT_DIR] [--shape 5m|108m]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

DEFAULT_OUTPUT_DIR = Path(".bench/tiny-llama-5m")
# name -> (hidden, intermediate, layers, attention heads, kv heads)
SHAPES: dict[str, tuple[int, int, int, int, int]] = {
    "5m": (256, 688, 4, 4, 2),
    "108m": (576, 1536, 30, 9, 3),  # SmolLM-135M's shape with a 4096-token vocab
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2),  # Qwen2.5-0.5B's shape (as a Llama: no qkv bias, untied head)
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4),
}
# the model's vocabulary (lm_head rows) where it is larger than the tokenizer's
MODEL_VOCAB_SIZES = {"qwen2.5-0.5b": 151936, "tinyllama-1.1b": 32000}
# shapes saved in bfloat16 (the GPU-sized ones: half the bytes to write and load)
BFLOAT16_SHAPES = frozenset(MODEL_VOCAB_SIZES)
DEFAULT_SHAPE_DIRS = {"5m": DEFAULT_OUTPUT_DIR, "108m": Path(".bench/llama-108m"),
                      "qwen2.5-0.5b": Path(".bench/llama-qwen2.5-0.5b"),
                      "tinyllama-1.1b": Path(".bench/llama-tinyllama-1.1b")}
VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CORPUS_BYTE_BUDGET = 3_000_000
SEED = 1234
ANCHOR_VALUE = 0.05
EOS_SUPPRESSION = 1000.0
MAX_POSITIONS = 2048

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def iter_stdlib_sources(byte_budget: int = CORPUS_BYTE_BUDGET) -> Iterator[str]:
    """Yield the text of top-level stdlib .py files in sorted order until the budget is spent."""
    stdlib_dir = Path(os.path.dirname(os.__file__))
    spent = 0
    for source_path in sorted(stdlib_dir.glob("*.py")):
        if spent >= byte_budget:
            return
        text = source_path.read_text(encoding="utf-8", errors="replace")[: byte_budget - spent]
        spent += len(text)
        yield text


def train_tokenizer(output_dir: Path) -> int:
    """Train a byte-level BPE tokenizer, write tokenizer files, and return the eos token id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_stdlib_sources(), trainer=trainer)
    tokenizer.save(str(output_dir / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    assert eos_token_id is not None
    return eos_token_id


def suppress_eos(model: LlamaForCausalLM, eos_token_id: int, suppression: float = EOS_SUPPRESSION) -> None:
    """Rewire the random weights so the eos logit, and every logit above the tokenizer's vocabulary, is
    always strongly negative (see module doc)."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = ANCHOR_VALUE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        for row in (eos_token_id, slice(VOCAB_SIZE, None)):
            model.lm_head.weight[row, :] = 0.0
            model.lm_head.weight[row, 0] = -suppression


def check_eos_suppressed(model: LlamaForCausalLM, eos_token_id: int, batch: tuple[int, int] = (4, 512)) -> float:
    """Return the smallest gap between the best token the tokenizer knows (but eos) and the best
    suppressed one (eos, or any id above the tokenizer's vocabulary), on random inputs."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, VOCAB_SIZE, batch, generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    suppressed = torch.cat([logits[..., eos_token_id:eos_token_id + 1], logits[..., VOCAB_SIZE:]], dim=-1)
    suppressed_best = suppressed.max(dim=-1).values
    logits = logits[..., :VOCAB_SIZE].clone()
    logits[..., eos_token_id] = float("-inf")
    gap = (logits.max(dim=-1).values - suppressed_best).min().item()
    if gap <= 100.0:
        raise RuntimeError(f"eos suppression failed: logit gap only {gap:.1f}")
    return gap


def build_model(output_dir: Path, eos_token_id: int, shape: str = "5m") -> int:
    """Create, rewire and save the random Llama; return its parameter count."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=MODEL_VOCAB_SIZES.get(shape, VOCAB_SIZE),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # 30 random layers grow the residual stream, so the anchor dimension is smaller after the final norm.
    suppress_eos(model, eos_token_id, EOS_SUPPRESSION * (10 if layers > 8 else 1))
    gap = check_eos_suppressed(model, eos_token_id, (2, 128) if shape in BFLOAT16_SHAPES else (4, 512))
    print(f"eos logit is at least {gap:.1f} below the best token")
    model.generation_config = GenerationConfig(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if shape in BFLOAT16_SHAPES:
        model.to(torch.bfloat16)
    model.save_pretrained(output_dir, safe_serialization=True)
    return sum(parameter.numel() for parameter in model.parameters())


def verify_loads(output_dir: Path) -> None:
    """Reload the folder through the Auto classes and render the chat template once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    AutoModelForCausalLM.from_pretrained(output_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|assistant|>\n"), rendered


def build_bench_model(output_dir: Path = DEFAULT_OUTPUT_DIR, verify: bool = True, shape: str = "5m") -> Path:
    """Build the benchmark model folder and return its path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    eos_token_id = train_tokenizer(output_dir)
    print(f"tokenizer trained in {time.perf_counter() - started:.1f}s (eos id {eos_token_id})")
    parameter_count = build_model(output_dir, eos_token_id, shape)
    print(f"parameters: {parameter_count:,} ({parameter_count / 1e6:.2f} M)")
    if verify:
        verify_loads(output_dir)
    print(f"bench model written to {output_dir} in {time.perf_counter() - started:.1f}s")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", nargs="?", type=Path, default=None,
                        help="default: .bench/tiny-llama-5m or .bench/llama-108m")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="5m")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading through transformers")
    args = parser.parse_args()
    build_bench_model(args.output_dir or DEFAULT_SHAPE_DIRS[args.shape], verify=not args.no_verify, shape=args.shape)


if __name__ == "__main__":
    main()
