"""Incremental detokenization: split UTF-8 characters and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from service.ar.detokenize import IncrementalDetokenizer
from tests.fixtures.tiny_models import build_tokenizer

TEXT = "naïve café → 日本語 ✓ done. Ünïcödé 🙂 end"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def stream(tokenizer: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    prompt = tokenizer.encode("prompt: ").ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, stop)
    deltas = []
    for token_id in tokenizer.encode(text).ids:
        detokenizer.append(token_id)
        deltas.append(detokenizer.take_delta(final=False))
        if detokenizer.stop_string_hit:
            break
    deltas.append(detokenizer.take_delta(final=True))
    return deltas, detokenizer


def test_multibyte_characters_split_across_tokens_are_never_broken(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "fixture should split characters into bytes"
    deltas, detokenizer = stream(tokenizer, TEXT)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == TEXT == detokenizer.text


@pytest.mark.parametrize("stop", ["日本", "done.", "→ 日", "ë", "never there"])
def test_stop_strings_are_cut_and_never_emitted(tokenizer: Tokenizer, stop: str) -> None:
    deltas, detokenizer = stream(tokenizer, TEXT, (stop, "zzz"))
    expected = TEXT.split(stop)[0]
    assert "".join(deltas) == expected == detokenizer.text
    assert (detokenizer.stop_string_hit == stop) == (stop in TEXT)
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert stop not in emitted or stop not in TEXT


def test_text_that_might_start_a_stop_string_is_held_back(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], ("END!",))
    for token_id in tokenizer.encode("abc EN").ids:
        detokenizer.append(token_id)
    assert detokenizer.take_delta(final=False) == "abc "
    for token_id in tokenizer.encode("Dx").ids:
        detokenizer.append(token_id)
    assert detokenizer.take_delta(final=False) == "ENDx"
