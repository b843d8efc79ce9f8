"""The bundled text model ``models/tiny-shakespeare``: it loads in transformers and in our loader with the same
logits, and the real server streams coherent text from it (mostly words of the training plays, no byte soup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.recipes.shakespeare_texts import words_of
from service.ar.loader import load_causal_lm
from service.ar.models.attention import SequenceSlice, build_forward_batch
from tests.integration.server import running_server, stream_events

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models" / "tiny-shakespeare"
EOS_TOKEN = "<|endoftext|>"
SAMPLE_TEXT = "KING LEAR.\nO, reason not the need! Our basest beggars\nAre in the poorest thing superfluous."
MIN_DICTIONARY_FRACTION = 0.7

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(),
                                reason="models/tiny-shakespeare is not bundled")


@torch.no_grad()
def paged_logits(token_ids: list[int]) -> torch.Tensor:
    """Our engine's model, loaded by our loader, on one prefill of ``token_ids`` into a fresh paged KV cache."""
    model = load_causal_lm(MODEL_DIR, torch.device("cpu"), torch.float32).model
    block_size = 16
    num_blocks = -(-len(token_ids) // block_size)
    cache_shape = (model.num_kv_heads, num_blocks * block_size, model.head_dim)
    kv_caches = [(torch.zeros(cache_shape), torch.zeros(cache_shape)) for _ in range(model.num_layers)]
    batch = build_forward_batch([SequenceSlice(token_ids, 0, list(range(num_blocks)))], block_size,
                                torch.device("cpu"))
    return model.compute_logits(model(batch, kv_caches))


def test_loads_in_transformers_and_in_our_loader_with_equal_logits() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    reference_model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    loaded = load_causal_lm(MODEL_DIR, torch.device("cpu"), torch.float32)

    token_ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    assert token_ids == loaded.tokenizer.encode(SAMPLE_TEXT).ids
    assert tokenizer.decode(token_ids) == SAMPLE_TEXT
    eos_token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token == EOS_TOKEN and loaded.eos_token_ids == {eos_token_id}
    assert reference_model.generation_config.eos_token_id == eos_token_id
    assert loaded.max_model_len == reference_model.config.max_position_embeddings
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Speak."}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.startswith(EOS_TOKEN) and "Speak." in rendered

    with torch.no_grad():
        reference = reference_model(torch.tensor([token_ids])).logits[0].float()
    torch.testing.assert_close(paged_logits(token_ids), reference, atol=1e-4, rtol=1e-4)


def test_bundled_files_are_small_and_list_the_heldout_plays() -> None:
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 16_000_000
    assert (MODEL_DIR / "words.txt").stat().st_size < 300_000
    heldout = (MODEL_DIR / "heldout.txt").read_text().split()
    assert len(heldout) >= 2 and all(name.endswith("_gut.txt") for name in heldout)
    assert json.loads((MODEL_DIR / "config.json").read_text())["model_type"] == "llama"


def test_server_streams_coherent_text(tmp_path: Path) -> None:
    dictionary = set((MODEL_DIR / "words.txt").read_text(encoding="utf-8").split())
    body = {"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 60, "temperature": 0.8, "seed": 2,
            "ignore_eos": True}
    with running_server({"shakespeare": MODEL_DIR}, tmp_path) as server, server.client() as client:
        events = stream_events(client, body)

    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "length"
    text = "".join(event.data["text"] for event in events[:-1])
    assert text == events[-1].data["text"]
    assert "\ufffd" not in text
    words = words_of(text)
    assert len(words) >= 15, text
    known = sum(word in dictionary for word in words)
    assert known / len(words) >= MIN_DICTIONARY_FRACTION, text
