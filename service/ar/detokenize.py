"""Incremental, UTF-8-safe detokenization with stop-string holdback.

Byte-level BPE can split one character across tokens, and SentencePiece-style
tokenizers decode a token differently depending on what precedes it. So each new
token is decoded together with a few tokens of context (``prefix_offset`` ..
``read_offset``), and text is released only once it no longer ends in a partial
character (U+FFFD). Text that could be the start of a stop string is held back
until it is known not to be one, so no part of a stop string is ever emitted.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # decoded output so far, cut at a stop string once one is found
        self._emitted = 0
        self.stop_string_hit: str | None = None

    def append(self, token_id: int) -> None:
        """Add one generated token; sets ``stop_string_hit`` when a stop string completes."""
        if self.stop_string_hit is not None:
            return
        self._token_ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._token_ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full_text = decode(self._token_ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return  # nothing new yet, or a character still incomplete
        new_text = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        search_from = max(0, len(self.text) - max((len(s) for s in self._stop), default=0) + 1)
        self.text += new_text
        self._check_stop(search_from)

    def _check_stop(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self.text.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is not None:
            self.text = self.text[:best[0]]
            self.stop_string_hit = best[1]

    def _holdback(self) -> int:
        """Length of the longest tail of ``text`` that could still grow into a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def take_delta(self, final: bool) -> str:
        """Text that is safe to send now. ``final`` releases the held-back tail."""
        end = len(self.text) if final or self.stop_string_hit is not None else len(self.text) - self._holdback()
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
