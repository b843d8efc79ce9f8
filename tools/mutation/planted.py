"""Plant the AR-core bugs of issue 8 one at a time, run the direct unit tests, restore the file.

Each bug is a realistic one-line change that once passed the whole suite; each must now make at
least one test fail. Exit status 1 if any survives. `--markdown` prints a table for docs/mutation.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/unit/test_sampling.py", "tests/unit/test_kv_cache.py", "tests/unit/test_scheduler.py"]

# (what the bug does, file, original text, planted text); each original occurs exactly once
PLANTED_BUGS = [
    ("top-p keeps one token too few (`cumulative` instead of `cumulative - p`)", "service/ar/sampling.py",
     "remove |= (cumulative - sorted_probs) >= top_p[:, None]", "remove |= cumulative > top_p[:, None]"),
    ("repetition penalty divides negative logits too", "service/ar/sampling.py",
     "values / penalty, values * penalty)", "values / penalty, values / penalty)"),
    ("prefix-cache block hash not chained to the previous block", "service/ar/kv_cache.py",
     'hashlib.blake2b(previous or b"", digest_size=16)', 'hashlib.blake2b(b"", digest_size=16)'),
    ("a prefix-hit block is not taken off the free list", "service/ar/kv_cache.py",
     "                self._free.pop(block_id, None)\n", "                pass\n"),
    ("running sequences ignore the per-step token budget", "service/ar/scheduler.py",
     "            num_new = min(seq.num_uncomputed_tokens, budget)\n            while",
     "            num_new = seq.num_uncomputed_tokens\n            while"),
]


def run_tests() -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    names = [line.split(" ")[1].split("::")[-1].split("[")[0] for line in result.stdout.splitlines()
             if line.startswith("FAILED")]
    return list(dict.fromkeys(names))  # one entry per test function, in order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if run_tests():
        print("the tests fail without any planted bug", file=sys.stderr)
        return 1
    rows = []
    survived = 0
    for description, path, original_text, planted_text in PLANTED_BUGS:
        file = REPO_ROOT / path
        original = file.read_text()
        if original.count(original_text) != 1:
            print(f"{path}: the code to plant '{description}' into has changed", file=sys.stderr)
            return 1
        file.write_text(original.replace(original_text, planted_text))
        try:
            failing = run_tests()
        finally:
            file.write_text(original)
        survived += not failing
        rows.append((description, path, failing))
    if args.markdown:
        print("## Issue 8's planted bugs\n")
        print("Planted by hand one at a time (`tools/mutation/planted.py`); the tests that fail on each:\n")
        print("| bug | file | failing tests |\n|---|---|---|")
        for description, path, failing in rows:
            shown = ", ".join(f"`{name}`" for name in failing[:3]) + (f" and {len(failing) - 3} more"
                                                                         if len(failing) > 3 else "")
            print(f"| {description} | `{path}` | {shown or '**none: survived**'} |")
    else:
        for description, path, failing in rows:
            print(f"{'killed' if failing else 'SURVIVED'}: {description} ({path}): {len(failing)} failing tests")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
