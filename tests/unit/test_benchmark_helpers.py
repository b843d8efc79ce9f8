"""Small pieces of the benchmarks that decide what a run reports."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.benchmarks.bench_ar import stricter_limit
from loadtest.benchmarks.bench_diffusion import Scenario, throughput_ratios
from loadtest.clients.diffusion_load import DIGIT_LABELS


def test_the_matmul_limit_keeps_the_faster_of_its_two_measurements() -> None:
    before = {16: {"output_tok_s": 500.0, "run": "before"}, 32: {"output_tok_s": 900.0, "run": "before"}}
    after = {16: {"output_tok_s": 620.0, "run": "after"}, 32: {"output_tok_s": 850.0, "run": "after"}}
    merged = stricter_limit(before, after)
    assert merged[16] == {"output_tok_s": 620.0, "run": "after", "repeat_output_tok_s": [500.0, 620.0]}
    assert merged[32] == {"output_tok_s": 900.0, "run": "before", "repeat_output_tok_s": [900.0, 850.0]}
    assert stricter_limit(before, {})[16] == {**before[16], "repeat_output_tok_s": [500.0]}


def scenario_for(model_path: Path) -> Scenario:
    return Scenario(model_path=model_path, concurrency=2, requests=4, min_steps=10, max_steps=10, seed=0,
                    warmup_requests=0, serial_warmup_requests=0, threads=0, repeats=1, startup_timeout_s=1.0)


def test_diffusion_requests_use_the_models_own_labels(tmp_path: Path) -> None:
    (tmp_path / "labels.json").write_text(json.dumps({"labels": ["0", "1", "2"], "null_class": 3}))
    assert [request.prompt for request in scenario_for(tmp_path).plan()] == ["0", "1", "2", "0"]
    assert scenario_for(tmp_path / "missing").labels == DIGIT_LABELS


def test_served_diffusion_is_compared_with_the_faster_raw_layout() -> None:
    """The tuner may serve on every core, so served/best-raw divides by the faster raw loop, not the pinned one."""
    results = {"raw": {"images_per_s": 10.0}, "raw-all-cores": {"images_per_s": 12.5},
               "served": {"images_per_s": 11.0}}
    ratios = throughput_ratios(results)
    assert ratios["served/raw"] == 1.1 and ratios["served/best-raw"] == 0.88
    assert "served/best-raw" not in throughput_ratios({"raw": {"images_per_s": 10.0}, "served": {"images_per_s": 9.0}})


def test_benchmarks_read_the_layout_switches_off_the_series_the_service_exports() -> None:
    from prometheus_client import generate_latest

    from loadtest.benchmarks.server_metrics import cpu_layout_switches_in, switches_between
    from service.runtime import metrics

    before = cpu_layout_switches_in(generate_latest(metrics.REGISTRY).decode())
    assert before is not None
    metrics.record_cpu_layout("all-cores", 2, switched=True)
    metrics.record_cpu_layout("pinned", 1, switched=True)
    after = cpu_layout_switches_in(generate_latest(metrics.REGISTRY).decode())
    assert switches_between(before, after) == 2
    assert switches_between(None, after) is None
    assert cpu_layout_switches_in("# a peer's metrics\nrequests_total 3\n") is None
    assert cpu_layout_switches_in('{"detail":"Not Found"}') is None  # transformers serve has no /metrics


def test_the_median_run_keeps_every_runs_layout_switches() -> None:
    from loadtest.benchmarks.bench_ar import median_run

    runs = [{"output_tok_s": 300.0, "cpu_layout_switches": 0.0}, {"output_tok_s": 200.0, "cpu_layout_switches": 6.0},
            {"output_tok_s": 250.0, "cpu_layout_switches": 0.0}]
    chosen = median_run(runs)
    assert chosen["output_tok_s"] == 250.0
    assert chosen["repeat_output_tok_s"] == [300.0, 200.0, 250.0]
    assert chosen["repeat_cpu_layout_switches"] == [0.0, 6.0, 0.0]
    assert "repeat_cpu_layout_switches" not in median_run([{"output_tok_s": 1.0}])  # a system that never reports them


def test_gpu_sized_bench_models_never_pick_a_token_above_the_tokenizer() -> None:
    """The Qwen/TinyLlama-shaped models keep their published vocabulary (the full lm_head is computed) but the
    4096-token tokenizer: every row above it is suppressed like eos, so greedy decoding stays inside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loadtest.benchmarks.make_bench_model import VOCAB_SIZE, check_eos_suppressed, suppress_eos

    config = LlamaConfig(vocab_size=VOCAB_SIZE + 904, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = torch.randint(0, VOCAB_SIZE, (8, 6))

    def best_tokens() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=prompts).logits.argmax(dim=-1)

    assert (best_tokens() >= VOCAB_SIZE).any()  # random rows above the tokenizer do win without the rewiring
    suppress_eos(model, eos_token_id=0)
    assert check_eos_suppressed(model, eos_token_id=0, batch=(2, 16)) > 100
    chosen = best_tokens()
    assert (chosen < VOCAB_SIZE).all() and (chosen != 0).all()


def test_the_sd_benchmark_runs_served_raw_and_serial_on_a_tiny_model(tmp_path: Path) -> None:
    """bench_sd end to end on the CPU (``--shape tiny``), so the GPU pass meets no surprise: every system
    answers every request, and the JSON names the model sizes and the device."""
    from loadtest.benchmarks import bench_sd

    json_out = tmp_path / "sd.json"
    bench_sd.main(["--shape", "tiny", "--device", "cpu", "--model-path", str(tmp_path / "sd-tiny"),
                   "--concurrency", "2", "--requests", "4", "--serial-requests", "2", "--min-steps", "2",
                   "--max-steps", "3", "--json-out", str(json_out)])
    report = json.loads(json_out.read_text())
    assert report["skipped"] == {}
    for system in ("served", "raw", "serial"):
        result = report["results"][system]
        assert result["errors"] == 0 and result["images_per_s"] > 0
    assert report["results"]["served"]["images"] == report["results"]["raw"]["images"] == 4
    assert set(report["ratios"]) == {"served/raw", "served/serial", "raw/serial"}
    assert report["scenario"]["parameters"]["unet"] > 0 and report["environment"]["device_name"]


def test_a_decode_layer_runs_four_fused_matmuls_and_counts_its_kernels() -> None:
    """decode_ops' per-layer count: q/k/v and gate/up stay fused (4 matmuls, not 7), views and same-dtype
    casts launch nothing, and every layer writes its K and V into the pool once."""
    import torch

    from loadtest.benchmarks.decode_ops import VIEW_OPS, decode_forward_ops

    two, four = decode_forward_ops(2, torch.device("cpu")), decode_forward_ops(4, torch.device("cpu"))
    per_layer = {name: (four[name] - two[name]) // 2 for name in four}
    assert per_layer["linear"] == 4 and per_layer["index_copy_"] == 2
    assert "to (no-op)" in VIEW_OPS and per_layer.get("to (no-op)", 0) > 0
    assert 20 < sum(count for name, count in per_layer.items() if name not in VIEW_OPS) < sum(per_layer.values())


def test_the_ar_ratios_put_genserves_ttft_p99_over_the_peers() -> None:
    from loadtest.benchmarks.bench_ar import throughput_ratios

    results = {"genserve": {"output_tok_s": 600.0, "ttft_ms_p99": 50.0},
               "transformers-serve": {"output_tok_s": 200.0, "ttft_ms_p99": 200.0}}
    ratios = throughput_ratios(results)
    assert ratios["genserve/transformers-serve"] == 3.0
    assert ratios["ttft-p99 genserve/transformers-serve"] == 0.25  # below 1: genserve's is the lower
    assert "ttft-p99 genserve/transformers-serve" not in throughput_ratios({"genserve": results["genserve"]})
