"""What tokenization and detokenization cost, to decide where they run (README, "Where tokenization runs").

    .venv/bin/python -m loadtest.benchmarks.tokenizer_cost [--tokens-per-second 3800]
"""

from __future__ import annotations

import argparse
import time

from tokenizers import Tokenizer

from service.ar.detokenize import IncrementalDetokenizer

TOKENIZER = "models/tiny-shakespeare/tokenizer.json"
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
OUTPUT = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; " * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-second", type=float, default=3800.0, help="served rate at 32 streams")
    parser.add_argument("--tokens-per-request", type=int, default=64)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(TOKENIZER)
    repeats = 2000
    started = time.perf_counter()
    for _ in range(repeats):
        prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=True).ids
    encode_s = (time.perf_counter() - started) / repeats
    output_ids = tokenizer.encode(OUTPUT).ids[:args.tokens_per_request]
    repeats = 200
    started = time.perf_counter()
    for _ in range(repeats):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, ())
        for token in output_ids:
            detokenizer.append(token)
            detokenizer.take_delta(final=False)
    detokenize_s = (time.perf_counter() - started) / (repeats * len(output_ids))
    requests_per_second = args.tokens_per_second / args.tokens_per_request
    print(f"| step | cost | share of one core at {args.tokens_per_second:.0f} tokens/s |")
    print("|---|---|---|")
    print(f"| encode a {len(prompt_ids)}-token prompt | {encode_s * 1e6:.1f} us/request | "
          f"{100 * encode_s * requests_per_second:.2f} % |")
    print(f"| incremental detokenization | {detokenize_s * 1e6:.1f} us/token | "
          f"{100 * detokenize_s * args.tokens_per_second:.1f} % |")


if __name__ == "__main__":
    main()
