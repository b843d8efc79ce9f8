"""`make mutation`: run mutmut over the engine-core modules and write docs/mutation.md.

The modules and the tests that run against their mutants are `[tool.mutmut]` in pyproject.toml
(only_mutate, pytest_add_cli_args_test_selection). Mutants known to be equivalent (no test can
tell them from the original) are listed, with the reason, in tools/mutation/equivalent.txt and
left out of the score.

    python tools/mutation/run.py                  # fresh run (deletes mutants/), then the report
    python tools/mutation/run.py --resume         # continue or re-check an earlier run
    python tools/mutation/run.py --report-only    # rewrite the report from mutants/
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT_FILE = Path("tools/mutation/equivalent.txt")
REPORT_FILE = Path("docs/mutation.md")
RUN_SECONDS_FILE = Path("mutants/run_seconds.txt")
PLANTED_FILE = Path("mutants/planted.md")

DETECTED = ("killed", "timeout", "segfault", "caught by type check")
UNDETECTED = ("survived", "no tests", "suspicious")


@dataclass
class ModuleResult:
    path: str
    statuses: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut status

    def names(self, *statuses: str) -> list[str]:
        return sorted((n for n, s in self.statuses.items() if s in statuses), key=mutant_sort_key)


def mutant_sort_key(name: str) -> tuple[str, int]:
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else -1


def mutmut_config() -> dict:
    return tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]


def load_equivalents() -> dict[str, str]:
    equivalents = {}
    for line in EQUIVALENT_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        equivalents[name] = reason.strip()
    return equivalents


def run_mutmut(max_children: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # forked torch + a thread pool hangs
    mutmut = Path(sys.executable).parent / "mutmut"
    started = time.monotonic()
    subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], env=env, check=True)
    seconds = time.monotonic() - started
    RUN_SECONDS_FILE.write_text(f"{seconds:.0f}\n")
    return seconds


def run_planted_check() -> None:
    result = subprocess.run([sys.executable, "tools/mutation/planted.py", "--markdown"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(result.stdout, end="")
    PLANTED_FILE.write_text(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"a planted mutant survived or the check failed:\n{result.stderr}")


def collect() -> list[ModuleResult]:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    results = []
    for module in mutmut_config()["only_mutate"]:
        data = SourceFileMutationData(path=Path(module))
        data.load()
        result = ModuleResult(module)
        result.statuses = {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
        results.append(result)
    return results


def diff_of(name: str, module: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines = get_diff_for_mutant(name, path=Path(module)).splitlines()
    return "\n".join(lines[2:])  # drop the ---/+++ header: the section names the file


def score(detected: int, scored: int) -> str:
    return f"{100 * detected / scored:.1f} %" if scored else "n/a"


def write_report(results: list[ModuleResult], equivalents: dict[str, str], max_children: int) -> list[str]:
    run_seconds = RUN_SECONDS_FILE.read_text().strip() if RUN_SECONDS_FILE.exists() else "?"
    config = mutmut_config()
    problems: list[str] = []
    known = {name for result in results for name in result.statuses}
    problems += [f"`{name}` is listed as equivalent but no such mutant exists (renumbered?)"
                 for name in equivalents if name not in known]

    rows, totals = [], collections.Counter()
    for result in results:
        counts = collections.Counter(
            "equivalent" if name in equivalents else status for name, status in result.statuses.items())
        detected = sum(counts[s] for s in DETECTED)
        undetected = sum(counts[s] for s in UNDETECTED)
        unchecked = len(result.statuses) - detected - undetected - counts["equivalent"]
        if unchecked:
            problems.append(f"{result.path}: {unchecked} mutants were not checked (interrupted run?)")
        for name in result.names(*DETECTED):
            if name in equivalents:
                problems.append(f"`{name}` is listed as equivalent but was {result.statuses[name]}")
        rows.append(f"| `{result.path}` | {len(result.statuses)} | {counts['killed']} | {counts['timeout']} | "
                    f"{undetected} | {counts['equivalent']} | {score(detected, detected + undetected)} |")
        totals.update(counts)
        totals["all"] += len(result.statuses)
    total_detected = sum(totals[s] for s in DETECTED)
    total_undetected = sum(totals[s] for s in UNDETECTED)

    out = [
        "# Mutation testing",
        "",
        f"`make mutation` on {datetime.date.today().isoformat()}: mutmut {version('mutmut')}, "
        f"{max_children} worker processes, run time {run_seconds} s. Each mutant is one small change to one "
        "function (an operator, a constant, a dropped argument...); it is *killed* when at least one of the "
        "module's direct unit tests fails on it. Timeouts count as killed.",
        "",
        "Tests run against the mutants: " + ", ".join(f"`{t}`" for t in config["pytest_add_cli_args_test_selection"])
        + ". Score = (killed + timeout) / (mutants - equivalent).",
        "",
        "| module | mutants | killed | timeout | survived | equivalent | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        f"| **all** | {totals['all']} | {totals['killed']} | {totals['timeout']} | {total_undetected} | "
        f"{totals['equivalent']} | **{score(total_detected, total_detected + total_undetected)}** |",
        "",
        "To add a module: append it to `only_mutate` and its tests to `pytest_add_cli_args_test_selection` in "
        "`[tool.mutmut]` (pyproject.toml), run `make mutation`, and list its equivalent mutants in "
        f"`{EQUIVALENT_FILE}`.",
        "",
    ]
    if PLANTED_FILE.exists():
        out += [PLANTED_FILE.read_text().rstrip(), ""]
    if problems:
        out += ["## Problems with this run", "", *[f"- {p}" for p in problems], ""]

    out += ["## Surviving mutants", ""]
    survivors = [(result, name) for result in results for name in result.names(*UNDETECTED)
                 if name not in equivalents]
    if not survivors:
        out += ["None.", ""]
    for result, name in survivors:
        out += [f"### `{name}` ({result.statuses[name]})", "", "```diff", diff_of(name, result.path), "```", ""]

    scored_equivalents = [equivalents[name] for name in known if name in equivalents]
    cuda_only = sum(reason.startswith("[cuda-only]") for reason in scored_equivalents)
    float32 = sum(reason.startswith("[float32]") for reason in scored_equivalents)
    out += ["## Equivalent mutants", "",
            f"No test can tell these {len(scored_equivalents)} from the original code; they are excluded from the "
            f"score. {cuda_only} are marked [cuda-only]: they change a tensor's device, which only a CUDA run could "
            f"tell ({len(scored_equivalents) - cuda_only} remain equivalent on any device). {float32} are marked "
            "[float32]: they drop a dtype argument whose default is the float32 the code is given.", ""]
    for result in results:
        for name in sorted(set(result.statuses) & set(equivalents), key=mutant_sort_key):
            out += [f"### `{name}`", "", equivalents[name], "", "```diff", diff_of(name, result.path), "```", ""]
    REPORT_FILE.write_text("\n".join(out))
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", action="store_true", help="keep mutants/ and its results")
    parser.add_argument("--report-only", action="store_true", help="only rewrite docs/mutation.md")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    args = parser.parse_args()
    os.chdir(REPO_ROOT)
    if not args.report_only:
        if not args.resume:
            shutil.rmtree("mutants", ignore_errors=True)
        run_mutmut(args.max_children)
        run_planted_check()
    problems = write_report(collect(), load_equivalents(), args.max_children)
    print(f"wrote {REPORT_FILE}")
    for problem in problems:
        print("problem:", problem)


if __name__ == "__main__":
    main()
