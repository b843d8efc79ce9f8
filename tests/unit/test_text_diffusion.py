"""Masked-diffusion text: schedule, ELBO estimator, remasking rules, batched denoiser, folder loader, bundled model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer

from service.text_diffusion.denoiser import (MASK_PLACEHOLDER, DenoiseJob, denoise_step, final_token_ids, render_text,
                                             run_to_completion)
from service.text_diffusion.loader import (MASK_TOKEN, is_masked_diffusion_folder, load_masked_diffusion_lm,
                                           save_masked_diffusion_lm)
from service.text_diffusion.masking import (elbo_weight, estimate_elbo, mask_probability, mask_tokens,
                                            masked_diffusion_loss, stratified_times)
from service.text_diffusion.model import MaskedDiffusionConfig, MaskedDiffusionLM, initialize_for_training
from service.text_diffusion.remasking import (SamplingParams, choose_positions, filter_logits, plan_steps,
                                              sample_tokens)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MDLM = REPO_ROOT / "models" / "tiny-shakespeare-mdlm"
AR_TOKENIZER = REPO_ROOT / "models" / "tiny-shakespeare" / "tokenizer.json"
TOY_VOCAB = 13
TOY_MASK = TOY_VOCAB - 1


def toy_model(vocab_size: int = TOY_VOCAB, mask_token_id: int = TOY_MASK, seed: int = 0,
              std: float = 0.2) -> MaskedDiffusionLM:
    config = MaskedDiffusionConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   mask_token_id=mask_token_id, eos_token_id=0)
    model = MaskedDiffusionLM(config)
    initialize_for_training(model, seed, std=std)  # a large std: confident yet varied predictions
    return model.eval().requires_grad_(False)


def exact_negative_elbo(model: MaskedDiffusionLM, token_ids: list[int], context_ids: list[int] = ()) -> float:
    """Direct computation for the linear schedule: sum over mask sets M of C(M) * (|M|-1)! (L-|M|)! / L!.

    (1/t) t^m (1-t)^(L-m) integrates over (0, 1) to B(m, L-m+1); C(M) is the masked positions' cross-entropy.
    The context tokens are never masked nor scored.
    """
    length, offset = len(token_ids), len(context_ids)
    clean = torch.tensor([*context_ids, *token_ids])
    total = 0.0
    for size in range(1, length + 1):
        weight = math.factorial(size - 1) * math.factorial(length - size) / math.factorial(length)
        for subset in itertools.combinations(range(offset, offset + length), size):
            noisy = clean.clone()
            noisy[list(subset)] = model.config.mask_token_id
            log_probabilities = model(noisy[None]).float().log_softmax(-1)[0]
            total += weight * -sum(float(log_probabilities[i, clean[i]]) for i in subset)
    return total


# ---------------------------------------------------------------- schedule and ELBO

def test_linear_schedule_and_weight() -> None:
    times = torch.tensor([0.01, 0.25, 1.0])
    torch.testing.assert_close(mask_probability(times), times)
    torch.testing.assert_close(elbo_weight(times), 1 / times)


def test_stratified_times_have_one_draw_per_stratum() -> None:
    times = stratified_times(50, torch.Generator().manual_seed(3))
    assert times.shape == (50,)
    assert all(i / 50 <= float(t) <= (i + 1) / 50 for i, t in enumerate(times))
    torch.testing.assert_close(times, stratified_times(50, torch.Generator().manual_seed(3)))


def test_mask_tokens_masks_with_probability_t_and_only_maskable_positions() -> None:
    ids = torch.arange(2000).remainder(TOY_MASK).reshape(2, 1000)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :100] = False
    noisy, masked = mask_tokens(ids, torch.tensor([0.2, 0.7]), TOY_MASK, torch.Generator().manual_seed(0), maskable)
    assert not masked[:, :100].any()
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), TOY_MASK))
    assert torch.equal(noisy[~masked], ids[~masked])
    shares = masked[:, 100:].float().mean(dim=1)
    assert abs(float(shares[0]) - 0.2) < 0.05 and abs(float(shares[1]) - 0.7) < 0.05


def test_loss_sample_equals_direct_cross_entropy_over_masked_positions() -> None:
    model = toy_model()
    ids = torch.randint(0, TOY_MASK, (3, 9), generator=torch.Generator().manual_seed(1))
    times = torch.tensor([0.3, 0.6, 0.9])
    losses = masked_diffusion_loss(model, ids, times, torch.Generator().manual_seed(5))
    noisy, masked = mask_tokens(ids, times, TOY_MASK, torch.Generator().manual_seed(5))
    log_probabilities = model(noisy).log_softmax(-1)
    for row in range(3):
        positions = masked[row].nonzero().squeeze(-1)
        expected = -log_probabilities[row, positions, ids[row, positions]].sum() / times[row]
        torch.testing.assert_close(losses[row], expected)


def test_elbo_estimate_matches_the_exact_bound_on_a_toy_model() -> None:
    model = toy_model()
    token_ids = [3, 7, 1, 9]
    exact = exact_negative_elbo(model, token_ids)
    estimate = estimate_elbo(model, token_ids, samples=4000, seed=0, characters=8, batch_size=1000)
    assert abs(estimate.nats - exact) < 4 * estimate.standard_error_nats + 1e-3, (estimate, exact)
    assert estimate.standard_error_nats < 0.05 * exact
    assert estimate.bits_per_character == pytest.approx(estimate.nats / math.log(2) / 8)
    assert estimate_elbo(model, token_ids, samples=64, seed=11) == estimate_elbo(model, token_ids, samples=64, seed=11)


def test_elbo_with_context_matches_the_exact_bound_and_scores_only_the_text() -> None:
    model = toy_model()
    exact = exact_negative_elbo(model, [3, 7, 1], context_ids=[5, 2])
    estimate = estimate_elbo(model, [3, 7, 1], samples=3000, seed=1, context_ids=[5, 2], batch_size=1000)
    assert estimate.tokens == 3
    assert abs(estimate.nats - exact) < 4 * estimate.standard_error_nats + 1e-3, (estimate, exact)
    assert abs(exact - exact_negative_elbo(model, [3, 7, 1])) > 4 * estimate.standard_error_nats  # context matters


# ---------------------------------------------------------------- remasking

def test_plan_counts_split_evenly_and_follow_blocks() -> None:
    assert [plan.count for plan in plan_steps(10, 4)] == [3, 3, 2, 2]
    assert [plan.count for plan in plan_steps(64, 64)] == [1] * 64
    blocked = plan_steps(10, 5, block_length=4)  # blocks [0,4) [4,8) [8,10); steps 2, 2, 1
    assert [(plan.block_start, plan.block_end, plan.count) for plan in blocked] == [
        (0, 4, 2), (0, 4, 2), (4, 8, 2), (4, 8, 2), (8, 10, 2)]
    assert sum(plan.count for plan in plan_steps(5, 8)) == 5
    with pytest.raises(ValueError):
        plan_steps(10, 2, block_length=4)
    with pytest.raises(ValueError):
        plan_steps(10, 0)


def test_low_confidence_picks_the_most_confident_and_random_is_seeded() -> None:
    confidence = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5])
    assert choose_positions("low_confidence", confidence, 2, torch.Generator()).tolist() == [1, 3]
    assert choose_positions("low_confidence", torch.tensor([0.5, 0.5, 0.5]), 2, torch.Generator()).tolist() == [0, 1]
    first = choose_positions("random", confidence, 3, torch.Generator().manual_seed(4))
    assert first.tolist() == choose_positions("random", confidence, 3, torch.Generator().manual_seed(4)).tolist()
    assert len(set(first.tolist())) == 3
    picks = {tuple(choose_positions("random", confidence, 2, torch.Generator().manual_seed(s)).tolist())
             for s in range(40)}
    assert len(picks) > 3
    with pytest.raises(ValueError):
        choose_positions("entropy", confidence, 1, torch.Generator())


def test_sampling_filters() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all() and torch.isfinite(filter_logits(logits, 2, 1.0)[0, :2]).all()
    probabilities = logits.softmax(-1)[0]
    nucleus = filter_logits(logits, 0, float(probabilities[0]) + 0.01)
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    tokens, confidence = sample_tokens(logits, SamplingParams(temperature=0), torch.Generator())
    assert tokens.tolist() == [0] and float(confidence) == pytest.approx(float(probabilities[0]))
    tokens, confidence = sample_tokens(logits.expand(200, -1), SamplingParams(temperature=1.0, top_k=2),
                                       torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    renormalised = logits[0, :2].softmax(-1)
    torch.testing.assert_close(confidence, renormalised[tokens])


def test_each_step_reveals_the_planned_count_in_block_order() -> None:
    model = toy_model()
    job = DenoiseJob.create([1, 2, 3], max_tokens=12, steps=6, mask_token_id=TOY_MASK, remasking="random",
                            block_length=4, seed=3)
    revealed_before = 0
    for plan in job.plan:
        denoise_step(model, [job])
        generated = job.generated_ids
        revealed = int((generated != TOY_MASK).sum())
        assert revealed - revealed_before == plan.count
        assert all(plan.block_start <= offset < plan.block_end for offset in job.revealed_last_step)
        # everything before the current block is revealed; nothing after it is
        assert (generated[:plan.block_start] != TOY_MASK).all() and (generated[plan.block_end:] == TOY_MASK).all()
        revealed_before = revealed
    assert job.finished and job.masked_count == 0
    assert job.tokens[:3].tolist() == [1, 2, 3]


def test_low_confidence_step_reveals_the_most_confident_predictions() -> None:
    model = toy_model()
    job = DenoiseJob.create([4, 5], max_tokens=8, steps=4, mask_token_id=TOY_MASK, remasking="low_confidence",
                            sampling=SamplingParams(temperature=0), seed=0)
    logits = model(job.tokens[None])[0, 2:].clone()
    logits[:, TOY_MASK] = float("-inf")
    confidence, predicted = logits.softmax(-1).max(-1)
    denoise_step(model, [job])
    expected = sorted(torch.topk(confidence, 2).indices.tolist())
    assert job.revealed_last_step == expected
    assert job.generated_ids[expected].tolist() == predicted[expected].tolist()


def test_a_seeded_job_gives_the_same_text_alone_and_amid_others() -> None:
    model = toy_model()

    def subject() -> DenoiseJob:
        return DenoiseJob.create([1, 2, 3, 4], max_tokens=10, steps=5, mask_token_id=TOY_MASK,
                                 remasking="low_confidence", sampling=SamplingParams(temperature=1.0, top_p=0.95),
                                 seed=42)

    alone = subject()
    run_to_completion(model, [alone])

    amid = subject()
    others = [DenoiseJob.create([5] * prompt, max_tokens=tokens, steps=steps, mask_token_id=TOY_MASK,
                                remasking=rule, block_length=block, seed=seed)
              for prompt, tokens, steps, rule, block, seed in
              [(1, 30, 12, "random", None, 1), (7, 3, 3, "low_confidence", None, 2), (2, 16, 8, "random", 4, 3)]]
    batch = [others[0], amid, others[1]]
    denoise_step(model, batch)
    denoise_step(model, batch)
    batch.append(others[2])  # joins mid-way
    while not amid.finished:
        denoise_step(model, batch)
        batch = [job for job in batch if not job.finished] + ([amid] if amid.finished else [])
    assert amid.generated_ids.tolist() == alone.generated_ids.tolist()
    assert alone.masked_count == 0 and len(set(alone.generated_ids.tolist())) >= 3

    different_seed = DenoiseJob.create([1, 2, 3, 4], max_tokens=10, steps=5, mask_token_id=TOY_MASK, seed=43)
    run_to_completion(model, [different_seed])
    assert different_seed.generated_ids.tolist() != alone.generated_ids.tolist()


def test_padding_does_not_change_a_row() -> None:
    model = toy_model()
    short = torch.tensor([[1, 2, TOY_MASK, 4]])
    padded = torch.tensor([[1, 2, TOY_MASK, 4, 0, 0, 0]])
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(model(padded, mask)[:, :4], model(short), atol=1e-5, rtol=1e-5)


def test_job_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        DenoiseJob.create([1], max_tokens=8, steps=4, mask_token_id=TOY_MASK, remasking="greedy")
    with pytest.raises(ValueError):
        DenoiseJob.create([1], max_tokens=8, steps=0, mask_token_id=TOY_MASK)
    with pytest.raises(ValueError):
        DenoiseJob.create([1], max_tokens=8, steps=1, mask_token_id=TOY_MASK, block_length=2)
    with pytest.raises(ValueError):
        DenoiseJob.create([1, 2], max_tokens=63, steps=4, mask_token_id=TOY_MASK, max_positions=64)
    DenoiseJob.create([1], max_tokens=63, steps=4, mask_token_id=TOY_MASK, max_positions=64)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)


# ---------------------------------------------------------------- folder format

def small_tokenizer_with_mask() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(AR_TOKENIZER))
    tokenizer.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    return tokenizer


def test_loader_round_trip(tmp_path: Path) -> None:
    tokenizer = small_tokenizer_with_mask()
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    model = toy_model(vocab_size=tokenizer.get_vocab_size(), mask_token_id=mask_id, std=0.05)
    save_masked_diffusion_lm(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "genserve_mdlm" and config["architectures"] == ["MaskedDiffusionLM"]
    assert is_masked_diffusion_folder(tmp_path)
    assert not is_masked_diffusion_folder(REPO_ROOT / "models" / "tiny-shakespeare")
    assert not is_masked_diffusion_folder(tmp_path / "missing")

    loaded = load_masked_diffusion_lm(tmp_path, "cpu", torch.float32)
    assert loaded.mask_token_id == mask_id and loaded.eos_token_id == 0
    ids = torch.tensor([tokenizer.encode("ROMEO: what").ids + [mask_id, mask_id]])
    torch.testing.assert_close(loaded.model(ids), model(ids))
    assert loaded.tokenizer.encode("a [MASK] b").ids.count(mask_id) == 1

    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not is_masked_diffusion_folder(tmp_path)
    with pytest.raises(ValueError):
        load_masked_diffusion_lm(tmp_path)


def test_render_text_shows_masked_positions() -> None:
    tokenizer = small_tokenizer_with_mask()
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    words = tokenizer.encode(" the king").ids
    job = DenoiseJob.create([], max_tokens=len(words) + 1, steps=1, mask_token_id=mask_id)
    job.tokens[:len(words)] = torch.tensor(words)
    assert render_text(job, tokenizer) == " the king" + MASK_PLACEHOLDER
    job.tokens[len(words)] = 0
    assert final_token_ids(job, eos_token_id=0) == (words, "stop")


# ---------------------------------------------------------------- the bundled model

@pytest.mark.skipif(not (BUNDLED_MDLM / "model.safetensors").is_file(), reason="bundled model not trained yet")
def test_bundled_model_samples_and_scores() -> None:
    loaded = load_masked_diffusion_lm(BUNDLED_MDLM, "cpu", torch.float32)
    assert (BUNDLED_MDLM / "model.safetensors").stat().st_size <= 16_000_000
    prompt = loaded.tokenizer.encode("ROMEO:").ids
    job = DenoiseJob.create([loaded.eos_token_id, *prompt], max_tokens=32, steps=16,
                            mask_token_id=loaded.mask_token_id, seed=0)
    run_to_completion(loaded.model, [job])
    assert job.masked_count == 0
    assert MASK_PLACEHOLDER not in render_text(job, loaded.tokenizer)
    text = "Thou art a villain, and I will tell thee so."
    estimate = estimate_elbo(loaded.model, loaded.tokenizer.encode(text).ids, samples=16, seed=0,
                             context_ids=[loaded.eos_token_id], characters=len(text))
    assert math.isfinite(estimate.nats) and 0 < estimate.bits_per_character < 8
