"""Sampling filters, penalties, seeds and logprobs on hand-made logits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from service.ar.sampling import (_apply_logit_bias, _apply_output_penalties, _apply_repetition_penalty,
                                 _filter_top_k_top_p_min_p, sample)
from service.ar.sequence import SamplingParams

NEG_INF = float("-inf")

# Probabilities 0.5 / 0.3 / 0.15 / 0.05, deliberately not in sorted order: token 1, 3, 0, 2.
SHUFFLED_PROBS = [0.15, 0.5, 0.05, 0.3]
SHUFFLED_LOGITS = [math.log(p) for p in SHUFFLED_PROBS]


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def kept_tokens(logits: list[float], **params: float) -> set[int]:
    """Token ids that survive the filters of one row, checking that survivors keep their logit."""
    row = torch.tensor([logits])
    filtered = _filter_top_k_top_p_min_p(row, [SamplingParams(**params)])[0]
    survivors = filtered != NEG_INF
    assert torch.equal(filtered[survivors], row[0][survivors])
    return set(survivors.nonzero().flatten().tolist())


# ---- filters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "expected"), [
    (1, {1}), (2, {1, 3}), (3, {1, 3, 0}), (4, {0, 1, 2, 3}), (10, {0, 1, 2, 3}), (0, {0, 1, 2, 3}),
])
def test_top_k_keeps_the_k_most_likely_tokens(top_k: int, expected: set[int]) -> None:
    assert kept_tokens(SHUFFLED_LOGITS, top_k=top_k) == expected


@pytest.mark.parametrize(("top_p", "expected"), [
    (0.45, {1}),           # 0.5 alone reaches 0.45
    (0.75, {1, 3}),        # 0.5 falls short, 0.5 + 0.3 reaches it
    (0.85, {1, 3, 0}),     # 0.8 falls short, 0.95 reaches it
    (0.97, {1, 3, 0, 2}),
    (1.0, {1, 3, 0, 2}),
])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p(top_p: float, expected: set[int]) -> None:
    assert kept_tokens(SHUFFLED_LOGITS, top_p=top_p) == expected


@pytest.mark.parametrize(("top_p", "num_kept"), [(0.25, 1), (0.5, 2), (0.75, 3), (0.9, 4)])
def test_top_p_at_an_exact_mass_boundary_stops_at_the_token_that_reaches_it(top_p: float, num_kept: int) -> None:
    # Four equal logits: every cumulative mass (0.25, 0.5, 0.75, 1) is exact in float32.
    assert len(kept_tokens([0.0, 0.0, 0.0, 0.0], top_p=top_p)) == num_kept


def test_top_p_of_one_keeps_even_tokens_below_float_resolution() -> None:
    # The tail's mass (about 1e-9 each) vanishes in a float32 cumulative sum, which reaches 1.0 early.
    logits = [10.0] + [-10.0] * 7
    assert kept_tokens(logits, top_p=1.0, top_k=8) == set(range(8))
    assert kept_tokens(logits, top_p=0.999) == {0}


@pytest.mark.parametrize(("min_p", "expected"), [
    (0.35, {1, 3}),        # threshold 0.175: 0.15 and 0.05 go
    (0.2, {1, 3, 0}),      # threshold 0.1
    (0.05, {1, 3, 0, 2}),  # threshold 0.025
    (0.0, {1, 3, 0, 2}),
])
def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability(min_p: float, expected: set[int]) -> None:
    assert kept_tokens(SHUFFLED_LOGITS, min_p=min_p) == expected


def test_min_p_keeps_a_token_exactly_at_the_threshold() -> None:
    assert kept_tokens([0.0, -1.0, 0.0, -5.0], min_p=1.0) == {0, 2}


def test_filters_combine_and_the_most_likely_token_always_survives() -> None:
    assert kept_tokens(SHUFFLED_LOGITS, top_k=3, top_p=0.75) == {1, 3}
    assert kept_tokens(SHUFFLED_LOGITS, top_k=3, min_p=0.2, top_p=0.97) == {1, 3, 0}
    assert kept_tokens(SHUFFLED_LOGITS, top_p=0.01, min_p=1.0, top_k=1) == {1}


def test_the_filter_builds_its_tensors_on_the_logits_device() -> None:
    # On the meta device any helper tensor left on the CPU raises, as it would on CUDA.
    logits = torch.empty((2, 5), device="meta")
    params = [SamplingParams(top_k=2, top_p=0.5, min_p=0.1), SamplingParams(top_p=0.9)]
    filtered = _filter_top_k_top_p_min_p(logits, params)
    assert filtered.device.type == "meta" and filtered.shape == (2, 5)


def test_each_row_is_filtered_with_its_own_parameters() -> None:
    logits = torch.tensor([SHUFFLED_LOGITS, SHUFFLED_LOGITS, SHUFFLED_LOGITS, [4.0, 3.0, 2.0, 1.0]])
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.75), SamplingParams(min_p=0.2),
              SamplingParams(top_k=2, top_p=1.0)]
    filtered = _filter_top_k_top_p_min_p(logits, params)
    kept = [set((row != NEG_INF).nonzero().flatten().tolist()) for row in filtered]
    assert kept == [{1}, {1, 3}, {1, 3, 0}, {0, 1}]


# ---- repetition penalty ----------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 0.0], [2.0, -2.0, 0.5, -0.5, 0.0]])
    _apply_repetition_penalty(logits, rows=[1], penalties=[2.0], seen_token_ids=[[0, 1, 1, 2, 3, 4]])
    assert logits.tolist() == [[2.0, -2.0, 0.5, -0.5, 0.0], [1.0, -4.0, 0.25, -1.0, 0.0]]


def test_repetition_penalty_with_nothing_seen_changes_nothing() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.5]])
    _apply_repetition_penalty(logits, rows=[0], penalties=[2.0], seen_token_ids=[[]])
    assert logits.tolist() == [[2.0, -2.0, 0.5]]
    result = sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=3.0)], generators(0), [[]])
    assert result.token_ids == [0]


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_sign() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0], [-1.0, -1.5, -3.0], [-1.0, -1.5, -3.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0, repetition_penalty=1.0)]
    result = sample(logits, params, generators(0, 1, 2), seen_token_ids=[[0], [0], [0]])
    # row 0: 3 -> 1.5 < 2; row 1: -1 -> -2 < -1.5; row 2: penalty 1 leaves the argmax alone.
    assert result.token_ids == [1, 1, 0]


def test_repetition_penalty_leaves_the_callers_logits_and_the_reported_logprobs_alone() -> None:
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    original = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=4.0, logprobs=1)]
    result = sample(logits, params, generators(0), seen_token_ids=[[0]])
    assert torch.equal(logits, original)
    raw = original.log_softmax(dim=-1)[0]
    assert result.token_ids == [1]
    assert result.logprobs == [(raw[1].item(), [(0, raw[0].item())])]


# ---- greedy, temperature, seeds ----------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_and_draw_no_random_numbers() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, -3.0, 0.0, 2.9]])
    row_generators = generators(5, 6)
    states_before = [g.get_state() for g in row_generators]
    result = sample(logits, [SamplingParams(temperature=0.0, top_k=2)] * 2, row_generators, [[], []])
    assert result.token_ids == [1, 0]
    assert result.logprobs == [None, None]
    assert all(torch.equal(g.get_state(), before) for g, before in zip(row_generators, states_before))


def exponential_race(logits: list[float], temperature: float, kept: set[int], seed: int) -> int:
    """The documented draw: argmax(p / E), E = -log(U), U from the row's generator, one per vocab entry."""
    scaled = torch.tensor(logits) / temperature
    scaled[[i for i in range(len(logits)) if i not in kept]] = NEG_INF
    probs = scaled.softmax(dim=-1)
    uniform = torch.rand(len(logits), generator=torch.Generator().manual_seed(seed))
    return int((probs / -uniform.log()).argmax())


@pytest.mark.parametrize(("temperature", "filters", "kept"), [
    (1.0, {}, {0, 1, 2, 3}),
    (0.3, {}, {0, 1, 2, 3}),
    (2.5, {}, {0, 1, 2, 3}),
    (0.7, {"top_k": 2}, {1, 3}),
    (1.5, {"top_p": 0.85}, {1, 3, 0}),
    (1.0, {"min_p": 0.35}, {1, 3}),
    (1.0, {"top_k": 1}, {1}),
])
def test_random_rows_follow_the_exponential_race_on_the_scaled_filtered_distribution(
        temperature: float, filters: dict[str, float], kept: set[int]) -> None:
    seeds = list(range(40))
    logits = torch.tensor([SHUFFLED_LOGITS] * len(seeds))
    params = [SamplingParams(temperature=temperature, **filters)] * len(seeds)
    result = sample(logits, params, generators(*seeds), [[] for _ in seeds])
    expected = [exponential_race(SHUFFLED_LOGITS, temperature, kept, seed) for seed in seeds]
    assert result.token_ids == expected
    assert set(result.token_ids) <= kept and (len(set(result.token_ids)) > 1 or kept == {1})


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draw_frequencies_match_the_tempered_softmax(temperature: float) -> None:
    num_draws = 4000
    row = [1.0, 0.0, -1.0]
    logits = torch.tensor([row] * num_draws)
    result = sample(logits, [SamplingParams(temperature=temperature)] * num_draws,
                    generators(*range(num_draws)), [[] for _ in range(num_draws)])
    frequencies = torch.bincount(torch.tensor(result.token_ids), minlength=3).double() / num_draws
    expected = torch.tensor(row, dtype=torch.float64).div(temperature).softmax(dim=-1)
    # Four standard deviations of a frequency over 4000 draws is at most 0.032.
    assert (frequencies - expected).abs().max().item() < 0.032


def test_a_rows_token_depends_only_on_its_own_logits_and_seed() -> None:
    row = [0.2, 0.1, 0.0, -0.1, -0.2]
    params = SamplingParams(temperature=1.0)
    alone = [sample(torch.tensor([row]), [params], generators(seed), [[]]).token_ids[0] for seed in range(12)]
    batched = []
    for seed in range(12):
        logits = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0], row, [0.0, 0.0, 0.0, 0.0, 9.0]])
        mixed = [SamplingParams(temperature=0.0), params, SamplingParams(temperature=0.5, top_k=2)]
        batched.append(sample(logits, mixed, generators(100 + seed, seed, 200 + seed), [[], [], []]).token_ids[1])
    assert batched == alone
    assert len(set(alone)) > 2


def test_each_draw_advances_the_generator_by_one_uniform_per_vocab_entry() -> None:
    generator = torch.Generator().manual_seed(3)
    sample(torch.zeros((1, 7)), [SamplingParams(temperature=1.0)], [generator], [[]])
    reference = torch.Generator().manual_seed(3)
    torch.rand(7, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


# ---- logprobs ----------------------------------------------------------------------------------------


def test_logprobs_and_top_alternatives_equal_a_direct_log_softmax() -> None:
    logits = torch.randn((4, 9), generator=torch.Generator().manual_seed(11)) * 3
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.6, logprobs=1, repetition_penalty=1.5)]
    result = sample(logits, params, generators(1, 2, 3, 4), [[], [], [], [0, 1, 2]])

    reference = torch.log_softmax(logits.double(), dim=-1)
    assert result.token_ids[0] == int(logits[0].argmax()) and result.token_ids[2] == int(logits[2].argmax())
    assert result.logprobs[2] is None
    for row, num_top in [(0, 3), (1, 0), (3, 1)]:
        entry = result.logprobs[row]
        assert entry is not None
        chosen_logprob, top = entry
        token = result.token_ids[row]
        assert chosen_logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        expected_ids = reference[row].argsort(descending=True)[:num_top].tolist()
        assert [token_id for token_id, _ in top] == expected_ids
        assert [value for _, value in top] == pytest.approx(reference[row, expected_ids].tolist(), abs=1e-5)
    # the greedy row's chosen token is its first alternative, with the same value
    assert result.logprobs[0][1][0] == (result.token_ids[0], result.logprobs[0][0])


def test_zero_top_logprobs_everywhere_still_reports_the_chosen_tokens_logprob() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    result = sample(logits, [SamplingParams(temperature=0.0, logprobs=0)] * 2, generators(0, 1), [[], []])
    expected = logits.log_softmax(dim=-1)
    assert result.token_ids == [2, 0]
    assert result.logprobs == [(expected[0, 2].item(), []), (expected[1, 0].item(), [])]


# ---- presence / frequency penalties, logit bias, non-finite rows ------------------------------------


def test_output_penalties_subtract_frequency_times_count_plus_presence_from_output_tokens_only() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    penalized = logits.clone()
    _apply_output_penalties(penalized, [0], [params], [[3, 1, 3, 3]])
    # token 3: 4 - (0.25 * 3 + 0.5); token 1: 2 - (0.25 + 0.5); the others untouched
    assert penalized.tolist() == [[1.0, 1.25, 3.0, 2.75, 5.0]]
    unchanged = logits.clone()
    _apply_output_penalties(unchanged, [0], [params], [[]])
    assert torch.equal(unchanged, logits)
    two_rows = torch.zeros(2, 3)
    _apply_output_penalties(two_rows, [0, 1], [params, params], [[], [2]])  # a row with no output yet goes first
    assert two_rows.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, -0.75]]


def test_sample_applies_output_penalties_after_the_prompt_and_to_the_named_rows_only() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9], [0.0, 3.0, 2.9]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.2), SamplingParams(temperature=0.0)]
    seen = [[1, 2, 1], [1, 1]]  # row 0: prompt [1], output [2, 1]; row 1: no penalties
    result = sample(logits, params, generators(0, 1), seen, num_prompt_tokens=[1, 1])
    assert result.token_ids == [1, 1]  # both penalised by 0.2: 2.8 vs 2.7
    only_prompt = sample(logits, params, generators(0, 1), [[1, 2], [1]], num_prompt_tokens=[1, 1])
    assert only_prompt.token_ids == [1, 1]
    frequency = [SamplingParams(temperature=0.0, frequency_penalty=0.1)]
    assert sample(logits[:1], frequency, generators(0), [[1, 1, 2]], num_prompt_tokens=[1]).token_ids == [1]
    assert sample(logits[:1], frequency, generators(0), [[2, 1, 1]], num_prompt_tokens=[0]).token_ids == [2]
    assert sample(logits[:1], frequency, generators(0), [[1, 1, 2]]).token_ids == [2]  # no prompt: all output
    assert torch.equal(logits, torch.tensor([[0.0, 3.0, 2.9], [0.0, 3.0, 2.9]]))  # the caller's logits untouched


def test_logit_bias_adds_to_each_named_token_of_its_own_row() -> None:
    logits = torch.zeros(2, 4)
    _apply_logit_bias(logits, [1], [SamplingParams(logit_bias=((2, 1.5), (0, -100.0)))])
    assert logits.tolist() == [[0.0, 0.0, 0.0, 0.0], [-100.0, 0.0, 1.5, 0.0]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias=((3, 0.5),))]
    base = torch.tensor([[1.0, 0.0, 0.0, 0.8], [1.0, 0.0, 0.0, 0.8]])
    assert sample(base, params, generators(0, 1), [[], []]).token_ids == [0, 3]
    assert base[1, 3] == 0.8


def test_rows_with_nan_or_positive_infinity_are_reported_invalid() -> None:
    logits = torch.tensor([[0.0, 1.0, NEG_INF], [0.0, float("nan"), 1.0], [float("inf"), 0.0, 0.0], [2.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0.0)] * 4
    result = sample(logits, params, generators(0, 1, 2, 3), [[]] * 4)
    assert result.invalid_rows == [1, 2]
    assert result.token_ids[0] == 1 and result.token_ids[3] == 0
    assert sample(logits[[0, 3]], params[:2], generators(0, 1), [[], []]).invalid_rows == []


def test_a_penalty_that_overflows_to_infinity_makes_its_row_invalid() -> None:
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    params = [SamplingParams(temperature=1.0, logit_bias=((0, 3e38), (0, 3e38))), SamplingParams(temperature=1.0)]
    result = sample(logits, params, generators(0, 1), [[], []])
    assert result.invalid_rows == [0]
    # finite logits, but the temperature scales them past float32: the softmax is NaN
    tempered = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.0)]
    assert sample(torch.tensor([[-3e38, 3e38], [-3e38, 3e38]]), tempered, generators(0, 1), [[], []]).invalid_rows == [0]
