"""Our paged-attention Llama/GPT-2 against transformers on the same tiny random checkpoints."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.ar.loader import LoadedCausalLM, load_causal_lm
from service.runtime.registry import detect_paradigm
from service.ar.models import MODEL_CLASSES, CausalLM, UnsupportedModelError, WeightLoadingError, create_model
from service.ar.models.attention import SequenceSlice, build_forward_batch
from service.ar.models.layers import RMSNorm, RotaryEmbedding, rope_inverse_frequencies, rope_parameters_from_config
from tests.fixtures.tiny_models import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    build_tiny_gpt2,
    build_tiny_llama,
    build_tokenizer,
)

CPU = torch.device("cpu")
BLOCK_SIZE = 4
ATOL = 1e-4
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "llama_mha": {"builder": "llama"},
    "llama_gqa_llama3_rope": {"builder": "llama", "num_kv_heads": 2, "rope_scaling": LLAMA3_SCALING},
    "llama_gqa_tied_sharded": {"builder": "llama", "num_kv_heads": 1, "tie": True, "max_shard_size": "60KB"},
    "llama_attention_bias": {"builder": "llama", "attention_bias": True, "seed": 1},
    "qwen2_gqa_tied": {"builder": "llama", "flavor": "qwen2", "num_kv_heads": 2, "tie": True, "seed": 2},
    "mistral_gqa": {"builder": "llama", "flavor": "mistral", "num_kv_heads": 2, "seed": 3},
    "gpt2": {"builder": "gpt2"},
}
CHUNKED_VARIANTS = ["llama_gqa_llama3_rope", "qwen2_gqa_tied", "gpt2"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    folders = {}
    for name, options in VARIANTS.items():
        options = dict(options)
        builder = build_tiny_gpt2 if options.pop("builder") == "gpt2" else build_tiny_llama
        folders[name] = builder(root / name, **options)
    return folders


@functools.cache
def _loaded(path: Path) -> LoadedCausalLM:
    return load_causal_lm(path, CPU, torch.float32)


@functools.cache
def _reference_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def _reference_logits(path: Path, token_ids: list[int]) -> torch.Tensor:
    return _reference_model(path)(torch.tensor([token_ids])).logits[0].float()


class PagedRunner:
    """A block pool with shuffled block ids, per-sequence block tables and a step runner."""

    def __init__(self, model: CausalLM, num_blocks: int = 64, seed: int = 0) -> None:
        self.model = model
        generator = torch.Generator().manual_seed(seed)
        num_slots = num_blocks * BLOCK_SIZE
        shape = (model.num_kv_heads, num_slots, model.head_dim)
        some_parameter = next(model.parameters())
        self.device = some_parameter.device
        # Garbage, not zeros, in unused slots: masking must keep them out entirely.
        self.kv_caches = [
            tuple(
                (100 * torch.randn(shape, generator=generator)).to(self.device, some_parameter.dtype)
                for _ in range(2)
            )
            for _ in range(model.num_layers)
        ]
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[str, list[int]] = {}

    def piece(self, sequence: str, new_token_ids: list[int], start_position: int) -> SequenceSlice:
        table = self.block_tables.setdefault(sequence, [])
        needed_blocks = -(-(start_position + len(new_token_ids)) // BLOCK_SIZE)
        while len(table) < needed_blocks:
            table.append(self.free_blocks.pop())
        return SequenceSlice(new_token_ids, start_position, list(table))

    @torch.no_grad()
    def step(self, slices: list[SequenceSlice]) -> list[torch.Tensor]:
        """Run one packed forward; returns the logits of each slice's new tokens."""
        batch = build_forward_batch(slices, BLOCK_SIZE, self.device)
        logits = self.model.compute_logits(self.model(batch, self.kv_caches))
        assert logits.dtype == torch.float32
        return list(logits.cpu().split(batch.query_lens))


def _token_ids(count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(1, 512) for _ in range(count)]


# ---------------------------------------------------------------- logits equivalence


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_prefill_matches_transformers(model_dirs: dict[str, Path], variant: str) -> None:
    path = model_dirs[variant]
    prompt = _token_ids(37, seed=11)
    runner = PagedRunner(_loaded(path).model)

    (logits,) = runner.step([runner.piece("a", prompt, 0)])

    reference = _reference_logits(path, prompt)
    assert reference.abs().max() > 1.0  # the random model is not trivially flat
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", CHUNKED_VARIANTS)
def test_chunked_prefill_matches_transformers(model_dirs: dict[str, Path], variant: str) -> None:
    path = model_dirs[variant]
    prompt = _token_ids(29, seed=12)
    reference = _reference_logits(path, prompt)
    runner = PagedRunner(_loaded(path).model, seed=1)

    for start, stop in [(0, 9), (9, 22), (22, 29)]:
        (logits,) = runner.step([runner.piece("a", prompt[start:stop], start)])
        torch.testing.assert_close(logits, reference[start:stop], atol=ATOL, rtol=0)


def _check_mixed_batch(
    model: CausalLM, reference: Any, atol: float, rtol: float
) -> None:
    """Prefill three sequences, then decode two while prefilling one and continuing another.

    ``reference(token_ids)`` gives the expected logits of a whole sequence.
    """
    sequences = {"a": _token_ids(11, 21), "b": _token_ids(6, 22), "c": _token_ids(7, 23), "d": _token_ids(13, 24)}
    runner = PagedRunner(model, seed=2)

    # Step 1: three prefills of different lengths ("d" only its first chunk).
    first = runner.step([
        runner.piece("a", sequences["a"][:10], 0),
        runner.piece("b", sequences["b"][:5], 0),
        runner.piece("d", sequences["d"][:4], 0),
    ])
    # Step 2: decodes first, then a fresh prefill and a continued chunk.
    second = runner.step([
        runner.piece("a", sequences["a"][10:], 10),
        runner.piece("b", sequences["b"][5:], 5),
        runner.piece("c", sequences["c"], 0),
        runner.piece("d", sequences["d"][4:], 4),
    ])

    references = {name: reference(tokens) for name, tokens in sequences.items()}
    expected_first = [references["a"][:10], references["b"][:5], references["d"][:4]]
    expected_second = [references["a"][10:], references["b"][5:], references["c"], references["d"][4:]]
    for actual, expected in zip(first + second, expected_first + expected_second, strict=True):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("variant", CHUNKED_VARIANTS)
def test_mixed_decode_and_prefill_batch_matches_transformers(model_dirs: dict[str, Path], variant: str) -> None:
    path = model_dirs[variant]
    _check_mixed_batch(_loaded(path).model, functools.partial(_reference_logits, path), ATOL, 0)


def _check_greedy_generation(path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Our greedy loop (prefill, then one decode per step) emits what ``generate`` emits."""
    from transformers import AutoModelForCausalLM

    loaded = load_causal_lm(path, device, dtype)
    prompt = loaded.tokenizer.encode("def read_file(path): return open(path).read()").ids
    max_new_tokens = 24
    runner = PagedRunner(loaded.model, seed=3)

    generated: list[int] = []
    (logits,) = runner.step([runner.piece("a", prompt, 0)])
    while True:
        token = int(logits[-1].argmax())
        generated.append(token)
        if token in loaded.eos_token_ids or len(generated) == max_new_tokens:
            break
        (logits,) = runner.step([runner.piece("a", [token], len(prompt) + len(generated) - 1)])

    reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.no_grad():
        output = reference_model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=max_new_tokens, do_sample=False
        )
    assert generated == output[0, len(prompt):].tolist()
    assert len(set(generated)) > 5  # generation did not collapse, so the comparison means something


@pytest.mark.parametrize("variant", ["llama_gqa_llama3_rope", "gpt2"])
def test_greedy_generation_matches_transformers_generate(model_dirs: dict[str, Path], variant: str) -> None:
    _check_greedy_generation(model_dirs[variant], CPU, torch.float32)


def _check_against_transformers_in(path: Path, device: torch.device, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(path, device, dtype).model
    assert all(p.dtype == dtype and p.device.type == device.type for p in model.parameters())
    reference_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    @torch.no_grad()
    def reference(token_ids: list[int]) -> torch.Tensor:
        return reference_model(torch.tensor([token_ids], device=device)).logits[0].float().cpu()

    # Low precision: same rounding points as transformers, but kernels may differ.
    exact = dtype == torch.float32
    _check_mixed_batch(model, reference, atol=1e-3 if exact else 0.1, rtol=0 if exact else 0.02)


@pytest.mark.parametrize("variant", ["llama_gqa_llama3_rope", "qwen2_gqa_tied", "gpt2"])
def test_bfloat16_close_to_transformers_bfloat16(model_dirs: dict[str, Path], variant: str) -> None:
    """``--dtype auto`` serves AR models in bf16 on CPUs with bf16 matmuls: the same logits as HF's bf16."""
    _check_against_transformers_in(model_dirs[variant], CPU, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["llama_gqa_llama3_rope", "qwen2_gqa_tied", "gpt2"])
def test_cuda_matches_transformers(model_dirs: dict[str, Path], variant: str, dtype: torch.dtype) -> None:
    _check_against_transformers_in(model_dirs[variant], torch.device("cuda"), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["llama_gqa_llama3_rope", "gpt2"])
def test_cuda_greedy_generation_matches_transformers_generate(model_dirs: dict[str, Path], variant: str) -> None:
    _check_greedy_generation(model_dirs[variant], torch.device("cuda"), torch.float32)


# ---------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_is_loaded_from_index(model_dirs: dict[str, Path]) -> None:
    path = model_dirs["llama_gqa_tied_sharded"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert not (path / "model.safetensors").exists()
    assert len(set(index["weight_map"].values())) > 1
    model = _loaded(path).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_checkpoint_without_transformer_prefix_and_with_mask_buffers(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    source = model_dirs["gpt2"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(source / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors")

    prompt = _token_ids(12, seed=14)
    runner = PagedRunner(load_causal_lm(tmp_path, CPU, torch.float32).model)
    (logits,) = runner.step([runner.piece("a", prompt, 0)])
    torch.testing.assert_close(logits, _reference_logits(source, prompt), atol=ATOL, rtol=0)


def _copy_llama_with_tensors(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    save_file(tensors, target / "model.safetensors")


def test_missing_tensor_is_reported(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = model_dirs["llama_mha"]
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _copy_llama_with_tensors(source, tmp_path, tensors)
    # gate and up share one fused matmul: the message says which half the checkpoint had
    with pytest.raises(WeightLoadingError, match=r"missing tensors: model\.layers\.1\.mlp\.gate_up_proj\.weight "
                                                 r"\(only model\.layers\.1\.mlp\.gate_proj\.weight found\)"):
        load_causal_lm(tmp_path, CPU, torch.float32)
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    _copy_llama_with_tensors(source, tmp_path, tensors)
    with pytest.raises(WeightLoadingError, match=r"missing tensors: model\.layers\.1\.mlp\.gate_up_proj\.weight$"):
        load_causal_lm(tmp_path, CPU, torch.float32)


def test_a_fused_projection_is_filled_from_its_checkpoint_tensors_in_order(model_dirs: dict[str, Path]) -> None:
    tensors = load_file(model_dirs["llama_mha"] / "model.safetensors")
    model = load_causal_lm(model_dirs["llama_mha"], CPU, torch.float32).model
    layer = model.model.layers[1]
    expected_qkv = torch.cat([tensors[f"model.layers.1.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")])
    expected_gate_up = torch.cat([tensors[f"model.layers.1.mlp.{name}.weight"] for name in ("gate_proj", "up_proj")])
    assert torch.equal(layer.self_attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(layer.mlp.gate_up_proj.weight, expected_gate_up)


def test_unexpected_tensor_is_reported(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = model_dirs["llama_mha"]
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    _copy_llama_with_tensors(source, tmp_path, tensors)
    with pytest.raises(WeightLoadingError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm"):
        load_causal_lm(tmp_path, CPU, torch.float32)


def test_shape_mismatch_is_reported(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = model_dirs["llama_mha"]
    tensors = load_file(source / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(32)
    _copy_llama_with_tensors(source, tmp_path, tensors)
    with pytest.raises(WeightLoadingError, match=r"model\.norm\.weight.*\(32,\).*\(64,\)"):
        load_causal_lm(tmp_path, CPU, torch.float32)


def test_broken_folders_raise_clear_errors(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere", CPU, torch.float32)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(tmp_path, CPU, torch.float32)

    source = model_dirs["llama_mha"]
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_causal_lm(tmp_path, CPU, torch.float32)

    index = {"weight_map": {"model.norm.weight": "shard-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="shard-1.safetensors"):
        load_causal_lm(tmp_path, CPU, torch.float32)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_causal_lm(tmp_path, CPU, torch.float32)


def test_detect_paradigm(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    assert detect_paradigm(model_dirs["gpt2"]) == "autoregressive"
    with pytest.raises(ValueError, match="neither"):
        detect_paradigm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    assert detect_paradigm(tmp_path) == "diffusion"


# ---------------------------------------------------------------- loader metadata


def test_loader_metadata(model_dirs: dict[str, Path]) -> None:
    loaded = _loaded(model_dirs["llama_mha"])
    assert loaded.eos_token_ids == {EOS_TOKEN_ID}
    assert loaded.bos_token_id is None
    assert (loaded.bos_token, loaded.eos_token) == (None, EOS_TOKEN)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.max_model_len == 256
    assert loaded.name_or_path == str(model_dirs["llama_mha"])


def test_eos_sources_are_merged_and_jinja_template_wins(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = model_dirs["llama_mha"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["eos_token_id"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")

    loaded = load_causal_lm(tmp_path, CPU, torch.float32)
    assert loaded.eos_token_ids == {EOS_TOKEN_ID, 5, 6, 7}
    assert loaded.chat_template == "{{ messages[0]['content'] }}"


# ---------------------------------------------------------------- configs and registry


def test_registry_maps_architectures_and_model_types() -> None:
    for key in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "llama", "qwen2", "mistral"):
        assert MODEL_CLASSES[key].__name__ == "LlamaForCausalLM"
    assert MODEL_CLASSES["GPT2LMHeadModel"].__name__ == "GPT2LMHeadModel"
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        create_model({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, CPU, torch.float32)
    assert issubclass(UnsupportedModelError, ValueError)


def _meta_llama(**overrides: Any) -> CausalLM:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
    }
    config.update(overrides)
    return create_model(config, torch.device("meta"), torch.float32)


def test_config_options_shape_the_model() -> None:
    model = _meta_llama(num_key_value_heads=2, head_dim=16)
    assert (model.num_kv_heads, model.head_dim, model.num_layers, model.vocab_size) == (2, 16, 1, 100)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (64 + 2 * 32, 32)  # q, k, v fused

    qwen2 = _meta_llama(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=2)
    attention = qwen2.model.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.o_proj.bias is None

    mistral = _meta_llama(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32)
    assert mistral.max_position_embeddings == 32  # sliding window not implemented: context capped


def test_rope_parameters_accept_old_and_new_config_layouts() -> None:
    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_parameters_from_config(old) == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}
    new = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    assert rope_parameters_from_config(new) == {"rope_type": "default", "rope_theta": 1e6}
    assert rope_parameters_from_config({}) == {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        rope_inverse_frequencies({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, 16)


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}],
)
def test_rope_frequencies_match_transformers(scaling: dict[str, Any] | None) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = 128
    hf_config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        rope_theta=500000.0,
        rope_scaling=dict(scaling) if scaling else None,
    )
    parameters = rope_parameters_from_config({"rope_theta": 500000.0, "rope_scaling": scaling})
    ours = rope_inverse_frequencies(parameters, head_dim)
    if scaling is None:
        expected = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, CPU)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


# ---------------------------------------------------------------- tokenizer fixture


def test_tiny_tokenizer_loads_everywhere_and_splits_multibyte_characters(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "naïve café 日本 def f(x): return x"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    # Each non-ASCII character spans several tokens, none of which decodes to it alone.
    single_token_texts = [tokenizer.decode([token]) for token in ids]
    assert "é" not in single_token_texts and "日" not in single_token_texts

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.eos_token_id == EOS_TOKEN_ID
    assert hf_tokenizer(text)["input_ids"] == ids
    rendered = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "user: hi\nassistant:"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rotary_are_bit_identical_to_transformers_llama(dtype: torch.dtype) -> None:
    """The fused norm and the sign-folded rotary embedding round exactly where HF's Llama rounds."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(3)
    hidden = (torch.randn(37, 96, generator=generator) * 4).to(dtype)
    weight = (torch.randn(96, generator=generator) + 1).to(dtype)
    ours = RMSNorm(96, 1e-5, CPU, dtype)
    reference = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        reference.weight.copy_(weight)
        assert torch.equal(ours(hidden), reference(hidden))

    head_dim, positions = 32, torch.arange(5, 42)
    rotary = RotaryEmbedding(rope_inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, head_dim),
                             64, CPU)
    cos, signed_sin = rotary.cos_sin(positions, dtype)
    angles = positions[:, None].float() * rope_inverse_frequencies(
        {"rope_type": "default", "rope_theta": 10000.0}, head_dim)[None]
    hf_cos = torch.cat((angles, angles), dim=-1).cos().to(dtype)[None]
    hf_sin = torch.cat((angles, angles), dim=-1).sin().to(dtype)[None]
    query = torch.randn(37, 4, head_dim, generator=generator).to(dtype)
    key = torch.randn(37, 2, head_dim, generator=generator).to(dtype)
    hf_query, hf_key = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], hf_cos, hf_sin)
    assert torch.equal(RotaryEmbedding.apply(query, cos, signed_sin), hf_query[0].transpose(0, 1))
    assert torch.equal(RotaryEmbedding.apply(key, cos, signed_sin), hf_key[0].transpose(0, 1))
