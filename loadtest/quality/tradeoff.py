"""The AR-vs-diffusion tradeoff, measured live through one server that serves the three bundled models.

    .venv/bin/python -m loadtest.quality.tradeoff --serve              # starts the server on the bundled models
    .venv/bin/python -m loadtest.quality.tradeoff --url http://127.0.0.1:8000

Writes ``docs/tradeoff.md`` (tables and the seed's comparison as measured numbers), ``docs/tradeoff.json`` and
three small PNGs. On the same prompts and the same held-out text:

* latency vs output length: AR pays one step per token; diffusion text pays its step count, each step one
  forward over the whole sequence;
* quality vs steps for diffusion text (share of generated words found in the training word list, and the
  held-out ELBO in bits per character) against AR's exact bits per character and word share;
* throughput at 16 concurrent requests for each paradigm, and digits' accuracy vs steps beside it.

An ELBO is a bound and a perplexity is exact: the AR number is the exact negative log-likelihood, the
diffusion number an upper bound on it; they bound the same quantity from different sides, and only the
comparison as a bound is fair (a diffusion model's true likelihood may be better than its ELBO says).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from tokenizers import Tokenizer

from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from loadtest.quality.quality_digits import evaluate_digit_quality
from loadtest.quality.quality_text import chunk_text, service_chunk_logprob
from models.recipes.shakespeare_texts import fetch_texts_dir, read_heldout_names, read_text, split_train_heldout, words_of

REPO_ROOT = Path(__file__).resolve().parents[2]
AR_MODEL, TEXT_DIFFUSION_MODEL, IMAGE_MODEL = "tiny-shakespeare", "tiny-shakespeare-mdlm", "tiny-digits"
PROMPTS = ["ROMEO:", "JULIET:", "KING LEAR:", "HAMLET:", "First Citizen:", "PORTIA:", "OTHELLO:", "MACBETH:"]
DATA_DIR = Path(tempfile.gettempdir()) / "genserve-shakespeare"


def post(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/generate", json=body)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def word_share(texts: list[str], dictionary: set[str]) -> float:
    words = [word for text in texts for word in words_of(text)]
    return sum(word in dictionary for word in words) / len(words) if words else 0.0


def distinct_share(texts: list[str]) -> float:
    """Distinct words over words, per sample, averaged: low when a sample repeats itself ("sir, sir, sir")."""
    shares = [len(set(words)) / len(words) for words in (words_of(text) for text in texts) if words]
    return sum(shares) / len(shares) if shares else 0.0


def latency_vs_length(client: httpx.Client, lengths: list[int], diffusion_steps: list[int],
                      repeats: int) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"tokens": length}
        ar = [post(client, {"model": AR_MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": length,
                            "ignore_eos": True, "temperature": 0.8, "seed": i})[0] for i in range(repeats)]
        row["autoregressive_s"] = statistics.median(ar)
        for steps in diffusion_steps:
            times = [post(client, {"model": TEXT_DIFFUSION_MODEL, "prompt": PROMPTS[i % len(PROMPTS)],
                                   "max_tokens": length, "steps": steps, "seed": i})[0] for i in range(repeats)]
            row[f"diffusion_{steps}_steps_s"] = statistics.median(times)
        rows.append(row)
        print(f"latency {row}", flush=True)
    return rows


def heldout_chunks(tokenizer: Tokenizer, max_tokens: int, count: int) -> list[str]:
    names = read_heldout_names(REPO_ROOT / "models" / AR_MODEL)
    _, files = split_train_heldout(fetch_texts_dir(DATA_DIR), names)
    chunks = [chunk for path in files for chunk in chunk_text(read_text(path), tokenizer, max_tokens)]
    stride = max(1, len(chunks) // count)
    return chunks[::stride][:count]


def likelihoods(url: str, chunks: list[str], elbo_samples: int) -> dict[str, float]:
    """AR's exact bits/char and diffusion text's ELBO bits/char (an upper bound) on the same chunks."""
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(4) as pool:
        ar = list(pool.map(lambda chunk: service_chunk_logprob(client, AR_MODEL, chunk)[0], chunks))
        elbos = list(pool.map(lambda item: post(client, {
            "model": TEXT_DIFFUSION_MODEL, "prompt": item[1], "max_tokens": 0, "prompt_elbo": True,
            "elbo_samples": elbo_samples, "seed": item[0]})[1]["prompt_elbo"], enumerate(chunks)))
    characters = sum(len(chunk) for chunk in chunks)
    return {"characters": characters, "chunks": len(chunks),
            "autoregressive_bits_per_char": -sum(ar) / math.log(2) / characters,
            "diffusion_elbo_bits_per_char": sum(e["nats"] for e in elbos) / math.log(2) / characters}


def quality_vs_steps(client: httpx.Client, steps_list: list[int], samples: int, tokens: int,
                     dictionary: set[str]) -> tuple[list[dict[str, Any]], float, dict[str, str]]:
    rows = []
    examples: dict[str, str] = {}
    for steps in steps_list:
        texts = [post(client, {"model": TEXT_DIFFUSION_MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                               "steps": steps, "seed": i})[1]["text"] for i in range(samples)]
        rows.append({"steps": steps, "word_share": word_share(texts, dictionary), "distinct_share": distinct_share(texts)})
        examples[f"diffusion, {steps} steps"] = texts[0]
        print(f"quality {rows[-1]}", flush=True)
    ar_texts = [post(client, {"model": AR_MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                              "temperature": 0.8, "seed": i})[1]["text"] for i in range(samples)]
    examples["autoregressive"] = ar_texts[0]
    rows.append({"steps": "autoregressive", "word_share": word_share(ar_texts, dictionary),
                 "distinct_share": distinct_share(ar_texts)})
    return rows, word_share(ar_texts, dictionary), examples


def throughput(url: str, bodies: list[dict[str, Any]], concurrency: int, unit: str) -> float:
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        answers = list(pool.map(lambda body: post(client, body)[1], bodies))
        wall = time.perf_counter() - started
    if unit == "images":
        return sum(len(answer["images"]) for answer in answers) / wall
    return sum(answer["usage"]["completion_tokens"] for answer in answers) / wall


def plot(result: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=90)
    lengths = [row["tokens"] for row in result["latency"]]
    axis.plot(lengths, [row["autoregressive_s"] for row in result["latency"]], "o-", label="autoregressive")
    for key in result["latency"][0]:
        if key.startswith("diffusion_"):
            axis.plot(lengths, [row[key] for row in result["latency"]], "s--",
                      label=f"diffusion, {key.split('_')[1]} steps")
    axis.set(xlabel="output tokens", ylabel="latency (s)", xscale="log", yscale="log", title="latency vs length")
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.minorticks_off()
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "tradeoff_latency.png")
    files.append("tradeoff_latency.png")

    figure, left = plt.subplots(figsize=(5, 3.2), dpi=90)
    diffusion_rows = [row for row in result["quality"] if row["steps"] != "autoregressive"]
    steps = [row["steps"] for row in diffusion_rows]
    left.plot(steps, [row["word_share"] for row in diffusion_rows], "s-", label="diffusion text: word share")
    left.plot(steps, [row["distinct_share"] for row in diffusion_rows], "s:", color="C1", alpha=0.6,
              label="diffusion text: distinct-word share")
    left.axhline(result["ar_word_share"], color="C0", linestyle=":", label="autoregressive: word share")
    if result.get("digits"):
        left.plot([row["steps"] for row in result["digits"]], [row["accuracy"] for row in result["digits"]], "^-",
                  color="C2", label="digits: accuracy")
    left.set(xlabel="denoising steps", ylabel="share", xscale="log", ylim=(0, 1.05), title="quality vs steps")
    left.set_xticks(steps, [str(step) for step in steps])
    left.minorticks_off()
    left.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out_dir / "tradeoff_quality.png")
    files.append("tradeoff_quality.png")

    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=90)
    names = list(result["throughput"])
    axis.bar(range(len(names)), [result["throughput"][name] for name in names], color=["C0", "C1", "C1", "C2"])
    axis.set_xticks(range(len(names)), [name.replace(" ", "\n", 1) for name in names], fontsize=7)
    axis.set(ylabel="tokens/s (text), images/s (digits)", title="16 concurrent requests")
    figure.tight_layout()
    figure.savefig(out_dir / "tradeoff_throughput.png")
    files.append("tradeoff_throughput.png")
    plt.close("all")
    return files


def report(result: dict[str, Any]) -> str:
    likelihood = result["likelihood"]
    lines = ["# Autoregressive vs diffusion, measured live", "",
             f"One server, the three bundled models, this machine; `{result['command']}`. "
             f"Measured {result['date']}.", "",
             "## The tradeoff in numbers", "",
             "| | autoregressive text (`tiny-shakespeare`) | diffusion text (`tiny-shakespeare-mdlm`) |",
             "|---|---|---|"]
    latency = result["latency"]
    longest = latency[-1]
    diffusion_keys = [key for key in longest if key.startswith("diffusion_")]
    lines.append(f"| sequential steps | one per token: {longest['tokens']} for {longest['tokens']} tokens, "
                 f"{longest['autoregressive_s']:.2f} s | the step count, whatever the length: "
                 + ", ".join(f"{key.split('_')[1]} steps {longest[key]:.2f} s" for key in diffusion_keys) + " |")
    lines.append("| parallelism within a sample | none: token t needs token t-1 | every step predicts all "
                 f"{longest['tokens']} positions in one forward |")
    diffusion_rows = [row for row in result["quality"] if row["steps"] != "autoregressive"]
    lines.append(f"| quality scaling | fixed by the model: word share {result['ar_word_share']:.3f} | grows with "
                 "steps: " + ", ".join(f"{row['steps']}: {row['word_share']:.3f}" for row in diffusion_rows) + " |")
    lines.append(f"| likelihood | exact: {likelihood['autoregressive_bits_per_char']:.3f} bits/char | a bound "
                 f"(ELBO): <= {likelihood['diffusion_elbo_bits_per_char']:.3f} bits/char |")
    lines += ["", "An ELBO is a bound, a perplexity is exact. The AR figure is the model's exact negative "
              "log-likelihood; the diffusion figure is an upper bound on its model's. They bound the same "
              "quantity from different sides, so the only fair reading is as a bound: the diffusion model is at "
              "most that bad, and may be better.", "",
              f"Held-out text: {likelihood['chunks']} chunks of the held-out plays, {likelihood['characters']} "
              "characters, the same chunks for both.", "",
              "## Latency vs output length (one request at a time)", "",
              "![latency](tradeoff_latency.png)", "",
              "| tokens | autoregressive s | " + " | ".join(f"diffusion {k.split('_')[1]} steps s" for k in diffusion_keys)
              + " |", "|---" * (2 + len(diffusion_keys)) + "|"]
    for row in latency:
        lines.append(f"| {row['tokens']} | {row['autoregressive_s']:.3f} | "
                     + " | ".join(f"{row[k]:.3f}" for k in diffusion_keys) + " |")
    lines += ["", "## Quality vs steps", "", "![quality](tradeoff_quality.png)", "",
              f"{result['quality_tokens']}-token samples, {result['quality_samples']} per step count, prompts "
              f"{', '.join(PROMPTS)}; word share = generated words found in `models/tiny-shakespeare/words.txt`.", "",
              "Distinct share = distinct words over words per sample: a sample that repeats itself (\"Ay, sir, sir, sir, "
              "my lord\") scores high on word share and low here; low-confidence remasking at many steps does that.", "",
              "| steps | word share | distinct-word share |", "|---|---|---|"]
    lines += [f"| {row['steps']} | {row['word_share']:.3f} | {row['distinct_share']:.3f} |" for row in result["quality"]]
    if result.get("digits"):
        lines += ["", "Digits (`tiny-digits`, DDIM, guidance 1.25), classifier accuracy vs steps:", "",
                  "| steps | accuracy | s/image |", "|---|---|---|"]
        lines += [f"| {row['steps']} | {row['accuracy']:.3f} | {row['seconds_per_image']:.4f} |"
                  for row in result["digits"]]
    lines += ["", "## Throughput at 16 concurrent requests", "", "![throughput](tradeoff_throughput.png)", "",
              "| system | rate |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in result["throughput"].items()]
    lines += ["", "## Samples", ""]
    lines += [f"- **{name}**: {text[:200]!r}" for name, text in result["examples"].items()]
    return "\n".join(lines) + "\n"


@contextmanager
def serving(args: argparse.Namespace) -> Iterator[str]:
    if not args.serve:
        yield args.url
        return
    port = find_free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
    with managed_server(command, "/ready", port, "genserve") as server:
        yield server.base_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--serve", action="store_true", help="start a server on the bundled models")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--lengths", default="16,32,64,128,240",
                        help="output tokens; the diffusion model's 256 positions hold the prompt, its context token and these")
    parser.add_argument("--diffusion-steps", default="16,64")
    parser.add_argument("--quality-steps", default="4,8,16,32,64")
    parser.add_argument("--quality-samples", type=int, default=16)
    parser.add_argument("--heldout-chunks", type=int, default=40)
    parser.add_argument("--elbo-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digit-images", type=int, default=50)
    args = parser.parse_args()
    ints = lambda text: [int(part) for part in text.split(",")]  # noqa: E731
    dictionary = set((REPO_ROOT / "models" / AR_MODEL / "words.txt").read_text(encoding="utf-8").split())
    tokenizer = Tokenizer.from_file(str(REPO_ROOT / "models" / AR_MODEL / "tokenizer.json"))
    with serving(args) as url, httpx.Client(base_url=url, timeout=600) as client:
        served = {m["name"] for m in client.get("/models").json()["models"]}
        missing = {AR_MODEL, TEXT_DIFFUSION_MODEL, IMAGE_MODEL} - served
        if missing:
            raise SystemExit(f"the server at {url} does not serve {sorted(missing)}")
        result: dict[str, Any] = {"command": "python -m loadtest.quality.tradeoff" + (" --serve" if args.serve else ""),
                                  "date": time.strftime("%Y-%m-%d")}
        result["latency"] = latency_vs_length(client, ints(args.lengths), ints(args.diffusion_steps), args.repeats)
        result["quality"], result["ar_word_share"], result["examples"] = quality_vs_steps(
            client, ints(args.quality_steps), args.quality_samples, 64, dictionary)
        result["quality_tokens"], result["quality_samples"] = 64, args.quality_samples
        result["likelihood"] = likelihoods(url, heldout_chunks(tokenizer, 200, args.heldout_chunks), args.elbo_samples)
        print(f"likelihood {result['likelihood']}", flush=True)
        text_bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 64, "seed": i} for i in range(48)]
        result["throughput"] = {
            "autoregressive tokens/s": throughput(url, [{**b, "model": AR_MODEL, "ignore_eos": True} for b in text_bodies],
                                                  16, "tokens"),
            "diffusion text 16 steps tokens/s": throughput(
                url, [{**b, "model": TEXT_DIFFUSION_MODEL, "steps": 16} for b in text_bodies], 16, "tokens"),
            "diffusion text 64 steps tokens/s": throughput(
                url, [{**b, "model": TEXT_DIFFUSION_MODEL, "steps": 64} for b in text_bodies], 16, "tokens"),
            "digits 25 steps images/s": throughput(
                url, [{"model": IMAGE_MODEL, "prompt": str(i % 10), "steps": 25, "seed": i} for i in range(48)],
                16, "images"),
        }
        print(f"throughput {result['throughput']}", flush=True)
        digits = evaluate_digit_quality(url, IMAGE_MODEL, tuple(ints(args.quality_steps)),
                                        images_per_step=args.digit_images, guidance_scale=1.25)
        result["digits"] = digits["rows"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(result, args.out_dir)
    (args.out_dir / "tradeoff.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "tradeoff.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
