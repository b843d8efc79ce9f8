"""Incremental detokenization: split UTF-8 characters and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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


# SentencePiece-style pieces: "▁" marks a word start, and a word decoded first loses its leading space.
METASPACE_PIECES = ["<unk>", "</s>", "▁Hello", "▁world", "!", "▁a.b.", "▁END", "E", "N", "N!"]


@pytest.fixture(scope="module")
def metaspace_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(METASPACE_PIECES)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.add_special_tokens([AddedToken("</s>", special=True)])
    return tokenizer


def piece_ids(*pieces: str) -> list[int]:
    return [METASPACE_PIECES.index(piece) for piece in pieces]


def detokenize(tokenizer: Tokenizer, prompt: list[str], generated: list[str], stop: tuple[str, ...] = ()
               ) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, piece_ids(*prompt), stop)
    deltas = []
    for token_id in piece_ids(*generated):
        detokenizer.append(token_id)
        deltas.append(detokenizer.take_delta(final=False))
    return deltas, detokenizer


def test_the_prompt_is_the_first_tokens_context(metaspace_tokenizer: Tokenizer) -> None:
    assert metaspace_tokenizer.decode(piece_ids("▁world")) == "world"
    deltas, _ = detokenize(metaspace_tokenizer, ["▁Hello"], ["▁world", "!"])
    assert deltas == [" world", "!"]


def test_special_tokens_are_skipped_and_keep_the_context(metaspace_tokenizer: Tokenizer) -> None:
    deltas, detokenizer = detokenize(metaspace_tokenizer, ["▁Hello"], ["</s>", "▁world", "!", "</s>", "!"])
    assert deltas == ["", " world", "!", "", "!"]
    assert detokenizer.text == " world!!"


def test_a_stop_string_at_the_very_start_is_caught(metaspace_tokenizer: Tokenizer) -> None:
    deltas, detokenizer = detokenize(metaspace_tokenizer, [], ["▁Hello"], stop=("Hel",))
    assert deltas == [""] and detokenizer.text == "" and detokenizer.stop_string_hit == "Hel"


def test_a_token_holding_a_stop_string_twice_is_cut_at_the_first(metaspace_tokenizer: Tokenizer) -> None:
    deltas, detokenizer = detokenize(metaspace_tokenizer, ["▁Hello"], ["▁a.b."], stop=(".",))
    assert deltas == [" a"] and detokenizer.stop_string_hit == "."


def test_the_earliest_stop_string_wins_and_a_tie_goes_to_the_first_listed(metaspace_tokenizer: Tokenizer) -> None:
    _, detokenizer = detokenize(metaspace_tokenizer, ["▁Hello"], ["▁world", "▁END"], stop=("END", "world"))
    assert detokenizer.text == " " and detokenizer.stop_string_hit == "world"
    _, detokenizer = detokenize(metaspace_tokenizer, ["▁Hello"], ["▁world", "▁END"], stop=("wor", "world"))
    assert detokenizer.text == " " and detokenizer.stop_string_hit == "wor"


def test_the_held_back_tail_is_released_at_the_end_or_at_a_stop(metaspace_tokenizer: Tokenizer) -> None:
    deltas, detokenizer = detokenize(metaspace_tokenizer, ["▁Hello"], ["▁world", "▁END"], stop=("END!",))
    assert deltas == [" world", " "]  # "END" could still become "END!"
    assert detokenizer.take_delta(final=True) == "END"
    assert detokenizer.take_delta(final=True) == ""

    deltas, detokenizer = detokenize(metaspace_tokenizer, [], ["E", "N", "N!"], stop=("N!",))
    # "EN" ends like the stop string begins, but once the stop string is found nothing more can follow
    assert deltas == ["E", "", "N"] and detokenizer.text == "EN"
