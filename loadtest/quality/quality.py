"""Rerun the quality evaluation of both bundled models through one running service, and print the tables.

    python -m loadtest.quality.quality              # starts `python -m service` (the bundled defaults) for the run
    python -m loadtest.quality.quality --url http://127.0.0.1:8000

Text: held-out bits per character of tiny-shakespeare from /generate prompt logprobs, and the same through
transformers (loadtest/quality/quality_text.py). Images: tiny-digits accuracy by a scikit-learn classifier and seconds
per image at 5-100 DDIM steps (loadtest/quality/quality_digits.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from loadtest.benchmarks.hf_serve import find_free_port, managed_server
from loadtest.quality.quality_digits import evaluate_digit_quality
from loadtest.quality.quality_text import evaluate_text_quality, format_report


@contextmanager
def bundled_service(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    port = find_free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"]
    with managed_server(command, "/ready", port, "tiny-shakespeare") as server:
        yield server.base_url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running service (default: start one on the bundled models)")
    parser.add_argument("--images-per-step", type=int, default=100)
    args = parser.parse_args(argv)
    from loadtest.quality.digits_report import markdown_table

    with bundled_service(args.url) as url:
        print("## tiny-shakespeare\n")
        print(format_report(evaluate_text_quality(url, "tiny-shakespeare")))
        print("\n## tiny-digits\n")
        print(markdown_table(evaluate_digit_quality(url, "tiny-digits", images_per_step=args.images_per_step)))


if __name__ == "__main__":
    main()
