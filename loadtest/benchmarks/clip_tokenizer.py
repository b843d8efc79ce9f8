"""A CLIP BPE tokenizer made offline (no hub): every byte, plain and word-final, plus whole-word merges
for a few words. Enough for random-weight Stable-Diffusion-style folders in tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# The words the tokenizer knows whole; anything else falls back to single characters.
DEFAULT_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "painting", "the", "blurry", "ugly")


def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            characters.append(256 + shift)
            shift += 1
    return [chr(code) for code in characters]


def build_clip_tokenizer(path: Path, max_length: int, words: Sequence[str] = DEFAULT_WORDS) -> Path:
    """Save a ``CLIPTokenizer`` with ``model_max_length=max_length`` into ``path``."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in byte_alphabet():
        vocab.setdefault(symbol, len(vocab))
    for symbol in byte_alphabet():
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)
    tokenizer.save_pretrained(path)
    return Path(path)
