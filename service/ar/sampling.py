"""Batched sampling with per-request generators.

All logits processing is vectorized over the batch. The random draw is the
exponential-race form of categorical sampling (``argmax(p / E)``, ``E = -log U ~ Exp(1)``),
with each row's noise drawn from that request's own ``torch.Generator``. A row's
token therefore depends only on its own logits and its own seed, never on what
else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.ar.params import SamplingParams


@dataclass
class SampledTokens:
    token_ids: list[int]
    # per row: (logprob of the chosen token, top-n [(token, logprob)]) when asked for, else None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    # rows whose logits were not finite after processing (a NaN from the model, an overflowing penalty):
    # their token is meaningless and the request must fail, not receive it
    invalid_rows: list[int]


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[int], penalties: list[float],
                              seen_token_ids: list[list[int]]) -> None:
    for row, penalty, seen in zip(rows, penalties, seen_token_ids):
        ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
        values = logits[row, ids]
        logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_output_penalties(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                            output_token_ids: list[list[int]]) -> None:
    """OpenAI's presence and frequency penalties: ``logit -= frequency * count + presence * (count > 0)``."""
    for row, p, output in zip(rows, params, output_token_ids):
        if not output:
            continue
        ids, counts = torch.tensor(output, dtype=torch.long, device=logits.device).unique(return_counts=True)
        logits[row, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def _apply_logit_bias(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
    for row, p in zip(rows, params):
        ids = torch.tensor([token for token, _ in p.logit_bias], dtype=torch.long, device=logits.device)
        biases = torch.tensor([bias for _, bias in p.logit_bias], dtype=logits.dtype, device=logits.device)
        logits[row].index_add_(0, ids, biases)


def _filter_top_k_top_p_min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    device = logits.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    # top_p 1 is "off": an unreachable threshold, since a float32 cumulative sum can hit 1.0 before the tail
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=device,
                         dtype=logits.dtype)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=logits.dtype)
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    remove = ranks >= top_k[:, None]
    sorted_probs = sorted_logits.softmax(dim=-1)
    cumulative = sorted_probs.cumsum(dim=-1)
    # drop a token once the mass before it already reaches top_p: the smallest set reaching top_p survives
    remove |= (cumulative - sorted_probs) >= top_p[:, None]
    remove |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    remove[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_index, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           seen_token_ids: list[list[int]], num_prompt_tokens: list[int] | None = None) -> SampledTokens:
    """``logits`` [B, V] float32 -> one token per row. ``seen_token_ids[i]`` is row i's prompt + output;
    its first ``num_prompt_tokens[i]`` are the prompt (presence/frequency penalties skip them)."""
    batch_size = logits.shape[0]
    want_logprobs = [p.logprobs is not None for p in params]
    raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None

    penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    output_penalized = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if penalized or output_penalized or biased:
        logits = logits.clone()
    if penalized:
        _apply_repetition_penalty(logits, penalized, [params[i].repetition_penalty for i in penalized],
                                  [seen_token_ids[i] for i in penalized])
    if output_penalized:
        prompt_lengths = num_prompt_tokens or [0] * batch_size
        _apply_output_penalties(logits, output_penalized, [params[i] for i in output_penalized],
                                [seen_token_ids[i][prompt_lengths[i]:] for i in output_penalized])
    if biased:
        _apply_logit_bias(logits, biased, [params[i] for i in biased])

    # -inf is a legal logit (a masked token); NaN or +inf is not, and would turn the softmax into NaN
    invalid = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1)
    invalid_rows = invalid.nonzero().flatten().tolist() if bool(invalid.any()) else []
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        row_index = torch.tensor(random_rows, device=logits.device)
        row_params = [params[i] for i in random_rows]
        temperatures = torch.tensor([p.temperature for p in row_params], device=logits.device,
                                    dtype=logits.dtype)
        scaled = logits.index_select(0, row_index) / temperatures[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in row_params):
            scaled = _filter_top_k_top_p_min_p(scaled, row_params)
        probs = scaled.softmax(dim=-1)
        overflowed = probs.isnan().any(dim=-1)
        if bool(overflowed.any()):
            invalid_rows = sorted(set(invalid_rows) | {random_rows[i] for i in overflowed.nonzero().flatten().tolist()})
        uniform = torch.empty_like(probs)
        for position, row in enumerate(random_rows):
            torch.rand(probs.shape[-1], generator=generators[row], out=uniform[position])
        exponential = uniform.log_().neg_()  # -log(U) ~ Exp(1); much faster than exponential_ per row
        chosen = chosen.index_copy(0, row_index, (probs / exponential).argmax(dim=-1))

    token_ids = chosen.tolist()
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * batch_size
    if raw_logprobs is not None:
        max_n = max(p.logprobs or 0 for p in params)
        chosen_logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        top_values, top_ids = (raw_logprobs.topk(max_n, dim=-1) if max_n else (None, None))
        top_values_list = top_values.tolist() if top_values is not None else None
        top_ids_list = top_ids.tolist() if top_ids is not None else None
        for row, p in enumerate(params):
            if p.logprobs is None:
                continue
            top = []
            if p.logprobs and top_ids_list is not None and top_values_list is not None:
                top = list(zip(top_ids_list[row][:p.logprobs], top_values_list[row][:p.logprobs]))
            logprobs[row] = (chosen_logprobs[row], top)
    return SampledTokens(token_ids, logprobs, invalid_rows)
