"""Quality of the bundled masked-diffusion text model, in-process (no service): held-out ELBO and word-list shares.

Held-out ELBO. The held-out plays (the folder's ``heldout.txt``) are cut at line ends into chunks of at most
``max_position_embeddings - 1`` tokens, exactly as ``loadtest.quality.quality_text`` cuts them for the AR model; each chunk
is scored after an unmasked ``<|endoftext|>`` context token with ``--elbo-samples`` stratified masked copies
(seeded). bits per character = negative ELBO (nats, summed over chunks) / ln 2 / characters: an upper bound on
the model's negative log-likelihood, not an exact logprob.

Word-list share. For each prompt and seed, ``--max-tokens`` masked positions after ``<|endoftext|>`` + prompt
are denoised in ``steps`` steps (all samples of one step count batched together); the share is the fraction of
the generated words (``[a-z]+`` of the lowercased text, up to the first eos) found in
``models/tiny-shakespeare/words.txt``. The AR model (``models/tiny-shakespeare``, transformers) samples the same
prompts for comparison.

    .venv/bin/python -m loadtest.quality.quality_text_diffusion --out docs/mdlm_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from loadtest.quality.quality_text import DEFAULT_DATA_DIR, chunk_text
from models.recipes.shakespeare_texts import (fetch_texts_dir, read_heldout_names, read_text, split_train_heldout,
                                              words_of)
from service.text_diffusion.denoiser import DenoiseJob, final_token_ids, run_to_completion
from service.text_diffusion.loader import LoadedMaskedDiffusionLM, load_masked_diffusion_lm
from service.text_diffusion.masking import estimate_elbo
from service.text_diffusion.remasking import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare-mdlm"
AR_MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare"
WORDS_FILE = AR_MODEL_DIR / "words.txt"
PROMPTS = ["ROMEO:", "JULIET:", "KING LEAR:", "HAMLET:", "OTHELLO:", "PORTIA:", "FALSTAFF:", "CLEOPATRA:"]
SEEDS = [1, 2]
STEP_COUNTS = [4, 8, 16, 32, 64]
TARGET_BPC = 2.6
TARGET_WORD_SHARE = 0.85


def heldout_elbo(loaded: LoadedMaskedDiffusionLM, model_dir: Path, data_dir: Path, samples: int,
                 seed: int) -> dict[str, Any]:
    tokenizer = loaded.tokenizer
    _, heldout_files = split_train_heldout(fetch_texts_dir(data_dir), read_heldout_names(model_dir))
    chunks = [chunk for path in heldout_files
              for chunk in chunk_text(read_text(path), tokenizer, loaded.config.max_position_embeddings - 1)]
    total_nats, variance, tokens, characters = 0.0, 0.0, 0, 0
    for index, chunk in enumerate(chunks):
        estimate = estimate_elbo(loaded.model, tokenizer.encode(chunk).ids, samples, seed + index,
                                 context_ids=[loaded.eos_token_id], characters=len(chunk))
        total_nats += estimate.nats
        variance += estimate.standard_error_nats ** 2
        tokens += estimate.tokens
        characters += estimate.characters
    bits_per_character = total_nats / math.log(2) / characters
    return {"chunks": len(chunks), "tokens": tokens, "characters": characters, "samples_per_chunk": samples,
            "nats": total_nats, "bits_per_character": bits_per_character,
            "standard_error_bits_per_character": math.sqrt(variance) / math.log(2) / characters}


def word_share(texts: list[str], dictionary: set[str]) -> tuple[float, int]:
    words = [word for text in texts for word in words_of(text)]
    return (sum(word in dictionary for word in words) / len(words) if words else 0.0), len(words)


def distinct_share(texts: list[str]) -> float:
    """Mean over samples of distinct words / words: low when a sample repeats itself ("sir, sir, sir")."""
    shares = [len(set(words)) / len(words) for words in map(words_of, texts) if words]
    return sum(shares) / len(shares) if shares else 0.0


def diffusion_samples(loaded: LoadedMaskedDiffusionLM, steps: int, max_tokens: int, remasking: str,
                      sampling: SamplingParams, block_length: int | None) -> list[str]:
    jobs = [DenoiseJob.create([loaded.eos_token_id, *loaded.tokenizer.encode(prompt).ids], max_tokens, steps,
                              loaded.mask_token_id, remasking, block_length, sampling, seed)
            for prompt in PROMPTS for seed in SEEDS]
    run_to_completion(loaded.model, jobs, loaded.eos_token_id)
    return [loaded.tokenizer.decode(final_token_ids(job, loaded.eos_token_id)[0]) for job in jobs]


def ar_samples(max_tokens: int, temperature: float) -> list[str]:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(AR_MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(AR_MODEL_DIR / "tokenizer.json"))
    texts = []
    for prompt in PROMPTS:
        for seed in SEEDS:
            torch.manual_seed(seed)
            ids = torch.tensor([tokenizer.encode(prompt).ids])
            with torch.no_grad():
                output = model.generate(ids, do_sample=True, temperature=temperature, top_k=0,
                                        max_new_tokens=max_tokens, pad_token_id=0)
            generated = output[0, ids.shape[1]:].tolist()
            if 0 in generated:
                generated = generated[:generated.index(0)]
            texts.append(tokenizer.decode(generated))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--elbo-samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--remasking", default="low_confidence")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=STEP_COUNTS)
    parser.add_argument("--skip-elbo", action="store_true")
    parser.add_argument("--skip-ar", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_masked_diffusion_lm(args.model_dir, "cpu", torch.float32)
    dictionary = set(WORDS_FILE.read_text(encoding="utf-8").split())
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    result: dict[str, Any] = {"prompts": PROMPTS, "seeds": SEEDS, "max_tokens": args.max_tokens,
                              "remasking": args.remasking, "temperature": args.temperature, "top_p": args.top_p,
                              "block_length": args.block_length, "diffusion": [], "samples": {}}
    for steps in args.steps:
        started = time.perf_counter()
        texts = diffusion_samples(loaded, steps, args.max_tokens, args.remasking, sampling, args.block_length)
        share, words = word_share(texts, dictionary)
        seconds = time.perf_counter() - started
        distinct = distinct_share(texts)
        result["diffusion"].append({"steps": steps, "word_share": share, "words": words, "distinct_share": distinct,
                                    "seconds": seconds})
        result["samples"][f"steps_{steps}"] = texts[:4]
        print(f"diffusion  steps {steps:3d}: word share {share:.3f} ({words} words), distinct {distinct:.3f}, "
              f"{seconds:.1f} s for "
              f"{len(texts)} samples", flush=True)
    if not args.skip_ar:
        texts = ar_samples(args.max_tokens, args.temperature)
        share, words = word_share(texts, dictionary)
        result["ar"] = {"word_share": share, "words": words, "distinct_share": distinct_share(texts)}
        result["samples"]["ar"] = texts[:4]
        print(f"AR (transformers, temperature {args.temperature}): word share {share:.3f} ({words} words), "
              f"distinct {result['ar']['distinct_share']:.3f}", flush=True)
    if not args.skip_elbo:
        started = time.perf_counter()
        result["heldout_elbo"] = heldout_elbo(loaded, args.model_dir, args.data_dir, args.elbo_samples, seed=0)
        elbo = result["heldout_elbo"]
        print(f"held-out ELBO: {elbo['bits_per_character']:.4f} bits/char (+- {elbo['standard_error_bits_per_character']:.4f}"
              f" s.e.; {elbo['chunks']} chunks, {elbo['tokens']:,} tokens, {elbo['characters']:,} chars, "
              f"{elbo['samples_per_chunk']} samples per chunk, {time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
