"""The one place where the scheduler and KV-cache tests build ``Sequence`` objects.

Sequence's constructor belongs to the engine and changes with it; every test goes
through ``make_sequence`` so that such a change is a one-line fix here.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, models

from service.ar.detokenize import IncrementalDetokenizer
from service.ar.sequence import SamplingParams, Sequence


@functools.cache
def _word_tokenizer() -> Tokenizer:
    # The scheduler and the KV cache never decode; the detokenizer only needs a real tokenizer object.
    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def make_sequence(request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                  seed: int = 0) -> Sequence:
    params = params or SamplingParams()
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        params=params,
        generator=torch.Generator().manual_seed(seed),
        detokenizer=IncrementalDetokenizer(_word_tokenizer(), prompt_token_ids, params.stop),
    )
