"""A benchmark report a person reads at a glance, measured against a running genserve server.

Scenarios, each over a list of concurrencies: AR only, diffusion only, and mixed (both loads at once);
then AR latency vs output length and diffusion latency vs step count at one concurrency. Before and
after every run it reads the server's ``/metrics``; the histogram deltas give server-side p50/p99
(interpolated within buckets, like Prometheus' histogram_quantile), shown beside the client's figures.
Writes ``README.md`` (tables), ``report.json`` and small PNG plots into ``--out``.

Usage:
  python -m service --model bench=.bench/tiny-llama-5m --model digits=.bench/digits-1m &
  python -m loadtest.benchmarks.report --url http://127.0.0.1:8000 --out docs/benchmarks
  python -m loadtest.benchmarks.report --url http://127.0.0.1:8000 --concurrency 1,8 --quick --out /tmp/report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.clients.diffusion_load import request_plan, run_image_load
from loadtest.clients.loadgen import run_load

AR = "autoregressive"
DIFFUSION = "diffusion"
# (metric, paradigm) pairs the report reads, and what each is called in its tables
SERVER_HISTOGRAMS = {
    "ttft": ("genserve_time_to_first_token_seconds", AR),
    "itl": ("genserve_inter_token_latency_seconds", AR),
    "ar_e2e": ("genserve_request_duration_seconds", AR),
    "diffusion_e2e": ("genserve_request_duration_seconds", DIFFUSION),
    "diffusion_queue": ("genserve_queue_wait_seconds", DIFFUSION),
    "denoise_step": ("genserve_denoise_step_seconds", DIFFUSION),
}


# ---------------------------------------------------------------------------- server-side histograms


Buckets = dict[float, float]  # upper bound -> cumulative count


def read_histograms(url: str) -> dict[str, Buckets]:
    """Cumulative bucket counts of each SERVER_HISTOGRAMS entry, summed over models and outcomes."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    histograms: dict[str, Buckets] = {key: {} for key in SERVER_HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            for key, (metric, paradigm) in SERVER_HISTOGRAMS.items():
                if sample.name == f"{metric}_bucket" and sample.labels.get("paradigm") == paradigm:
                    bound = float(sample.labels["le"])
                    histograms[key][bound] = histograms[key].get(bound, 0.0) + sample.value
    return histograms


def histogram_delta(before: Buckets, after: Buckets) -> Buckets:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def histogram_quantile(buckets: Buckets, quantile: float) -> float | None:
    """The ``quantile`` of cumulative ``buckets``, linear within the bucket it falls in; None if empty.
    A quantile in the +Inf bucket is reported as the largest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = quantile * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def server_percentiles(before: dict[str, Buckets], after: dict[str, Buckets]) -> dict[str, float | None]:
    """``{key}_p50_ms`` / ``{key}_p99_ms`` / ``{key}_count`` of what happened between the two reads."""
    figures: dict[str, float | None] = {}
    for key in SERVER_HISTOGRAMS:
        delta = histogram_delta(before[key], after[key])
        for quantile in (0.5, 0.99):
            value = histogram_quantile(delta, quantile)
            figures[f"{key}_p{round(quantile * 100)}_ms"] = None if value is None else value * 1000
        figures[f"{key}_count"] = max(delta.values(), default=0.0)
    return figures


# ---------------------------------------------------------------------------- scenarios


@dataclass
class Plan:
    url: str
    ar_model: str | None
    diffusion_model: str | None
    concurrencies: list[int]
    max_tokens: int
    prompt_len: int
    steps: int
    output_lengths: list[int]
    step_counts: list[int]
    sweep_concurrency: int
    requests_per_client: int
    prompts: tuple[str, ...]
    request_counter: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def requests_for(self, concurrency: int) -> int:
        return max(8, self.requests_per_client * concurrency)

    def next_index(self, count: int) -> int:
        """A fresh request-number range, so no AR prompt repeats (no prefix-cache hits across runs)."""
        first = self.request_counter
        self.request_counter += count
        return first


async def ar_load(plan: Plan, concurrency: int, max_tokens: int) -> dict[str, Any]:
    requests = plan.requests_for(concurrency)
    result = await run_load(plan.url, api="genserve", concurrency=concurrency, requests=requests,
                            max_tokens=max_tokens, prompt_len=plan.prompt_len, model=plan.ar_model, label="ar",
                            first_request_index=plan.next_index(requests))
    return result.to_dict()


async def diffusion_load(plan: Plan, concurrency: int, steps: int) -> dict[str, Any]:
    requests = plan.requests_for(concurrency)
    images = request_plan(requests, steps, steps, seed=plan.next_index(requests), labels=plan.prompts)
    result = await run_image_load(plan.url, label="diffusion", model=plan.diffusion_model, plan=images,
                                  concurrency=concurrency)
    return result.to_dict()


def measured(plan: Plan, scenario: str, concurrency: int, loads: dict[str, Callable[[], Awaitable[dict]]],
             **extra: Any) -> dict[str, Any]:
    """Run ``loads`` at the same time between two /metrics reads; one report row."""
    async def run_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(load() for load in loads.values())))

    before = read_histograms(plan.url)
    started = time.perf_counter()
    results = dict(zip(loads, asyncio.run(run_all()), strict=True))
    wall_s = time.perf_counter() - started
    row = {"scenario": scenario, "concurrency": concurrency, "wall_s": wall_s, **extra, "client": results,
           "server": server_percentiles(before, read_histograms(plan.url))}
    plan.rows.append(row)
    errors = sum(result.get("errors", 0) for result in results.values())
    print(f"  {scenario:<22} c={concurrency:<3} {describe(results)} errors={errors} ({wall_s:.1f}s)", flush=True)
    return row


def describe(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    if "ar" in results:
        parts.append(f"{results['ar']['output_tok_s']:.0f} tok/s")
    if "diffusion" in results:
        parts.append(f"{results['diffusion']['images_per_s']:.1f} img/s")
    return ", ".join(parts)


def run_scenarios(plan: Plan) -> None:
    has_ar, has_diffusion = plan.ar_model is not None, plan.diffusion_model is not None
    for concurrency in plan.concurrencies:
        if has_ar:
            measured(plan, "ar", concurrency, {"ar": lambda c=concurrency: ar_load(plan, c, plan.max_tokens)})
        if has_diffusion:
            measured(plan, "diffusion", concurrency,
                     {"diffusion": lambda c=concurrency: diffusion_load(plan, c, plan.steps)})
        if has_ar and has_diffusion:
            measured(plan, "mixed", concurrency, {"ar": lambda c=concurrency: ar_load(plan, c, plan.max_tokens),
                                                  "diffusion": lambda c=concurrency: diffusion_load(plan, c, plan.steps)})
    if has_ar:
        for length in plan.output_lengths:
            measured(plan, "ar_output_length", plan.sweep_concurrency,
                     {"ar": lambda n=length: ar_load(plan, plan.sweep_concurrency, n)}, max_tokens=length)
    if has_diffusion:
        for steps in plan.step_counts:
            measured(plan, "diffusion_steps", plan.sweep_concurrency,
                     {"diffusion": lambda s=steps: diffusion_load(plan, plan.sweep_concurrency, s)}, steps=steps)


# ---------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rows_of(rows: Iterable[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["scenario"] == scenario]


def ar_table(rows: list[dict[str, Any]], key_title: str = "clients", key: str = "concurrency") -> list[str]:
    lines = [f"| {key_title} | tok/s | TTFT p50 / p99 (client) | TTFT p50 / p99 (server) | ITL p50 / p99 (client) "
             "| ITL p50 / p99 (server) | e2e p50 / p99 (client) | e2e p50 / p99 (server) | errors |",
             "|---:|---:|---|---|---|---|---|---|---:|"]
    for row in rows:
        client, server = row["client"]["ar"], row["server"]
        lines.append(
            f"| {row[key]} | {fmt(client['output_tok_s'])} "
            f"| {fmt(client['ttft_ms_p50'])} / {fmt(client['ttft_ms_p99'])} "
            f"| {fmt(server['ttft_p50_ms'])} / {fmt(server['ttft_p99_ms'])} "
            f"| {fmt(client['itl_ms_p50'])} / {fmt(client['itl_ms_p99'])} "
            f"| {fmt(server['itl_p50_ms'])} / {fmt(server['itl_p99_ms'])} "
            f"| {fmt(client['e2e_ms_p50'], 0)} / {fmt(client['e2e_ms_p99'], 0)} "
            f"| {fmt(server['ar_e2e_p50_ms'], 0)} / {fmt(server['ar_e2e_p99_ms'], 0)} | {client['errors']} |")
    return lines


def diffusion_table(rows: list[dict[str, Any]], key_title: str = "clients", key: str = "concurrency") -> list[str]:
    lines = [f"| {key_title} | images/s | image-steps/s | e2e p50 / p99 (client) | e2e p50 / p99 (server) "
             "| queue p50 / p99 (server) | denoise step p50 / p99 (server) | errors |",
             "|---:|---:|---:|---|---|---|---|---:|"]
    for row in rows:
        client, server = row["client"]["diffusion"], row["server"]
        lines.append(
            f"| {row[key]} | {fmt(client['images_per_s'], 2)} | {fmt(client['image_steps_per_s'])} "
            f"| {fmt(client['e2e_p50_s'] * 1000, 0)} / {fmt(client['e2e_p99_s'] * 1000, 0)} "
            f"| {fmt(server['diffusion_e2e_p50_ms'], 0)} / {fmt(server['diffusion_e2e_p99_ms'], 0)} "
            f"| {fmt(server['diffusion_queue_p50_ms'], 0)} / {fmt(server['diffusion_queue_p99_ms'], 0)} "
            f"| {fmt(server['denoise_step_p50_ms'])} / {fmt(server['denoise_step_p99_ms'])} | {client['errors']} |")
    return lines


def write_markdown(plan: Plan, meta: dict[str, Any], out: Path, plots: list[str]) -> None:
    lines = ["# genserve benchmark report", "",
             f"Measured {meta['timestamp']} against `{plan.url}` ({meta['machine']}); models: AR `{plan.ar_model}`, "
             f"diffusion `{plan.diffusion_model}`. Closed-loop clients, {plan.requests_per_client} requests per "
             f"client per run (at least 8), AR {plan.max_tokens} tokens per request (greedy, ~{plan.prompt_len}-word "
             f"prompts, none shared), diffusion {plan.steps} steps per request. Client figures are what the load "
             "generator saw; server figures are p50/p99 of the server's own histograms (`/metrics`, read before and "
             "after each run, interpolated within buckets, so they are as coarse as the buckets). Latencies in ms.",
             "", f"Command: `{meta['command']}`", ""]
    for plot in plots:
        lines.append(f"![{plot}]({plot})")
    lines.append("")
    if rows_of(plan.rows, "ar"):
        lines += ["## AR only", "", *ar_table(rows_of(plan.rows, "ar")), ""]
    if rows_of(plan.rows, "diffusion"):
        lines += ["## Diffusion only", "", *diffusion_table(rows_of(plan.rows, "diffusion")), ""]
    if rows_of(plan.rows, "mixed"):
        lines += ["## Mixed (AR and diffusion clients at the same time, each at the concurrency shown)", "",
                  "AR side:", "", *ar_table(rows_of(plan.rows, "mixed")), "",
                  "Diffusion side:", "", *diffusion_table(rows_of(plan.rows, "mixed")), ""]
    if rows_of(plan.rows, "ar_output_length"):
        lines += [f"## AR latency vs output length ({plan.sweep_concurrency} clients)", "",
                  *ar_table(rows_of(plan.rows, "ar_output_length"), "max_tokens", "max_tokens"), ""]
    if rows_of(plan.rows, "diffusion_steps"):
        lines += [f"## Diffusion latency vs step count ({plan.sweep_concurrency} clients)", "",
                  *diffusion_table(rows_of(plan.rows, "diffusion_steps"), "steps", "steps"), ""]
    (out / "README.md").write_text("\n".join(lines))


def make_plots(plan: Plan, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(figure: Any, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out / name, dpi=72)
        plt.close(figure)
        written.append(name)

    def series(rows: list[dict[str, Any]], key: str, paradigm: str, field_name: str, scale: float = 1.0) -> tuple:
        points = [(row[key], row["client"][paradigm][field_name]) for row in rows
                  if row["client"][paradigm].get(field_name) is not None]
        return [x for x, _ in points], [y * scale for _, y in points]

    def server_series(rows: list[dict[str, Any]], key: str, field_name: str) -> tuple:
        points = [(row[key], row["server"][field_name]) for row in rows if row["server"].get(field_name) is not None]
        return [x for x, _ in points], [y for _, y in points]

    ar_rows, diffusion_rows, mixed = rows_of(plan.rows, "ar"), rows_of(plan.rows, "diffusion"), rows_of(plan.rows, "mixed")
    if ar_rows or diffusion_rows:
        figure, axes = plt.subplots(1, 2, figsize=(8, 3))
        for rows, style, label in ((ar_rows, "o-", "alone"), (mixed, "s--", "mixed")):
            if rows:
                axes[0].plot(*series(rows, "concurrency", "ar", "output_tok_s"), style, label=label)
        for rows, style, label in ((diffusion_rows, "o-", "alone"), (mixed, "s--", "mixed")):
            if rows:
                axes[1].plot(*series(rows, "concurrency", "diffusion", "images_per_s"), style, label=label)
        axes[0].set(title="AR throughput", xlabel="clients", ylabel="output tok/s")
        axes[1].set(title="Diffusion throughput", xlabel="clients", ylabel="images/s")
        for axis in axes:
            axis.set_xscale("log", base=2)
            axis.legend(fontsize=8)
            axis.grid(alpha=0.3)
        save(figure, "throughput.png")
    if ar_rows:
        figure, axes = plt.subplots(1, 2, figsize=(8, 3))
        for axis, (client_field, server_field, title) in zip(axes, (("ttft_ms", "ttft", "TTFT"),
                                                                     ("itl_ms", "itl", "inter-token latency"))):
            for quantile, style in (("p50", "o-"), ("p99", "s-")):
                axis.plot(*series(ar_rows, "concurrency", "ar", f"{client_field}_{quantile}"), style,
                          label=f"client {quantile}")
                axis.plot(*server_series(ar_rows, "concurrency", f"{server_field}_{quantile}_ms"), style[0] + ":",
                          label=f"server {quantile}")
            axis.set(title=f"AR {title}", xlabel="clients", ylabel="ms")
            axis.set_xscale("log", base=2)
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
        save(figure, "ar_latency.png")
    if diffusion_rows:
        figure, axis = plt.subplots(figsize=(4.5, 3))
        for quantile, style in (("p50", "o-"), ("p99", "s-")):
            axis.plot(*series(diffusion_rows, "concurrency", "diffusion", f"e2e_{quantile}_s", 1000), style,
                      label=f"client {quantile}")
            axis.plot(*server_series(diffusion_rows, "concurrency", f"diffusion_e2e_{quantile}_ms"), style[0] + ":",
                      label=f"server {quantile}")
        axis.set(title=f"Diffusion latency ({plan.steps} steps)", xlabel="clients", ylabel="ms")
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        save(figure, "diffusion_latency.png")
    length_rows, step_rows = rows_of(plan.rows, "ar_output_length"), rows_of(plan.rows, "diffusion_steps")
    if length_rows or step_rows:
        figure, axes = plt.subplots(1, 2, figsize=(8, 3))
        for quantile, style in (("p50", "o-"), ("p99", "s-")):
            if length_rows:
                axes[0].plot(*series(length_rows, "max_tokens", "ar", f"e2e_ms_{quantile}"), style,
                             label=f"e2e {quantile}")
            if step_rows:
                axes[1].plot(*series(step_rows, "steps", "diffusion", f"e2e_{quantile}_s", 1000), style,
                             label=f"e2e {quantile}")
        axes[0].set(title=f"AR latency vs output length ({plan.sweep_concurrency} clients)", xlabel="max_tokens",
                    ylabel="ms")
        axes[1].set(title=f"Diffusion latency vs steps ({plan.sweep_concurrency} clients)", xlabel="steps",
                    ylabel="ms")
        for axis in axes:
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
        save(figure, "latency_sweeps.png")
    return written


def discover_models(url: str) -> dict[str, dict[str, Any]]:
    """name -> the server's description of it (paradigm, labels, ...)."""
    listing = httpx.get(f"{url}/models", timeout=30).json()
    return {entry["name"]: entry for entry in listing.get("models", [])}


def first_of(models: dict[str, dict[str, Any]], paradigm: str) -> str | None:
    return next((name for name, entry in models.items() if entry.get("paradigm") == paradigm), None)


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--ar-model", default=None, help="default: the first AR model in /models ('' = none)")
    parser.add_argument("--diffusion-model", default=None, help="default: the first diffusion model ('' = none)")
    parser.add_argument("--concurrency", default="1,4,16,32", help="comma list of client counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16, help="approximate AR prompt length in words")
    parser.add_argument("--steps", type=int, default=20, help="denoise steps per diffusion request")
    parser.add_argument("--output-lengths", default="16,64,128", help="max_tokens sweep")
    parser.add_argument("--step-counts", default="10,25,50", help="diffusion step-count sweep")
    parser.add_argument("--sweep-concurrency", type=int, default=8, help="clients during the two sweeps")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--prompts", default=None, help="comma list of diffusion prompts to cycle (default: the "
                        "model's class labels from /models, else the empty prompt)")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured requests of each paradigm first")
    parser.add_argument("--render-only", type=Path, default=None,
                        help="re-write README.md and the plots from this report.json (no load; give the same "
                             "scenario flags as the run that wrote it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_only is not None:
        saved = json.loads(args.render_only.read_text())
        plan = Plan(url=saved["url"], ar_model=saved["ar_model"], diffusion_model=saved["diffusion_model"],
                    concurrencies=int_list(args.concurrency), max_tokens=args.max_tokens, prompt_len=args.prompt_len,
                    steps=args.steps, output_lengths=int_list(args.output_lengths),
                    step_counts=int_list(args.step_counts), sweep_concurrency=args.sweep_concurrency,
                    requests_per_client=args.requests_per_client, prompts=(), rows=saved["rows"])
        args.out.mkdir(parents=True, exist_ok=True)
        write_markdown(plan, saved, args.out, make_plots(plan, args.out))
        print(f"re-rendered {args.out / 'README.md'}")
        return
    models = discover_models(args.url)
    diffusion_model = first_of(models, DIFFUSION) if args.diffusion_model is None else args.diffusion_model or None
    labels = models.get(diffusion_model or "", {}).get("labels") or [""]
    plan = Plan(url=args.url.rstrip("/"),
                ar_model=first_of(models, AR) if args.ar_model is None else args.ar_model or None,
                diffusion_model=diffusion_model,
                concurrencies=int_list(args.concurrency), max_tokens=args.max_tokens, prompt_len=args.prompt_len,
                steps=args.steps, output_lengths=int_list(args.output_lengths), step_counts=int_list(args.step_counts),
                sweep_concurrency=args.sweep_concurrency, requests_per_client=args.requests_per_client,
                prompts=tuple(args.prompts.split(",")) if args.prompts is not None else tuple(labels))
    if plan.ar_model is None and plan.diffusion_model is None:
        raise SystemExit(f"{args.url} serves no model this report can load")
    print(f"report against {plan.url}: AR {plan.ar_model}, diffusion {plan.diffusion_model}", flush=True)
    if args.warmup:
        warm = Plan(**{**plan.__dict__, "rows": [], "requests_per_client": 1})
        if plan.ar_model:
            asyncio.run(ar_load(warm, args.warmup, plan.max_tokens))
        if plan.diffusion_model:
            asyncio.run(diffusion_load(warm, args.warmup, plan.steps))
        plan.request_counter = warm.request_counter
    run_scenarios(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"timestamp": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, {platform.system()}",
            "command": "python -m loadtest.benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])}
    plots = make_plots(plan, args.out)
    write_markdown(plan, meta, args.out, plots)
    saved = {**meta, "url": plan.url, "ar_model": plan.ar_model, "diffusion_model": plan.diffusion_model,
             "rows": plan.rows}
    (args.out / "report.json").write_text(json.dumps(saved, indent=1) + "\n")
    print(f"wrote {args.out / 'README.md'}, report.json and {', '.join(plots)}")


if __name__ == "__main__":
    main()
