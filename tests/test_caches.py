"""Prefix and dual caches (Fast-dLLM) on tiny random models, CPU, float32.

- refresh_interval=1 decodes exactly as cache=none;
- a step between refreshes, run on the tokens the cache was recorded from, gives the logits of a
  full forward (the partial forward's positions, masks, logit shift and CFG batch are right);
- the positions computed per step are those predicted (prefix: block + suffix, dual: block only).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastdllm.cache import CACHES
from fastdllm.generation import GENERATIONS
from fastdllm.forward import ModelCall
from fastdllm.loop import generate
from fastdllm.models.tiny import build_tiny_model
from fastdllm.reuse import REUSES

FAMILIES = ["llada", "Dream"]
CACHE_NAMES = ["prefix", "dual"]
PROMPTS = ["12+3=", "hello world, 7*8 is", "a", "The quick brown fox jumps over"]
GEN_LENGTH = 16


@functools.cache
def tiny(family: str):
    """A tiny random model with weights large enough for peaked, position-dependent predictions
    (so the threshold rule commits several tokens per step) and random norm weights."""
    model, tokenizer = build_tiny_model(family, std=0.3, seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith("bias"):  # the RMSNorm scales
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    return model.eval(), tokenizer


def decode(family, cache: dict, *, model=None, prompts=PROMPTS, seed=0, reuse=None, engine=None, **generation):
    """Decode `prompts` with this module's tiny model of `family` (or `model`: (model, tokenizer));
    `reuse`: a ReuseStrategy (default reuse=none); `engine`: engine=compiled's, None = eager."""
    model, tokenizer = model or tiny(family)
    config = {"name": "vanilla", "gen_length": GEN_LENGTH, "block_length": 8} | generation
    return generate(
        model,
        [tokenizer(p)["input_ids"] for p in prompts],
        gen_length=GEN_LENGTH,
        generation=GENERATIONS.build(config),
        cache=CACHES.build(cache),
        reuse=reuse or REUSES.build({"name": "none"}),
        generators=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
        stop_ids=[model.config.eos_token_id],
        engine=engine,
    )


@functools.cache
def decode_without_cache(family, block_length, threshold):
    return decode(family, {"name": "none"}, block_length=block_length, threshold=threshold)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", CACHE_NAMES)
@pytest.mark.parametrize("block_length", [4, 8, 16])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_refresh_every_step_equals_no_cache(family, cache, block_length, threshold):
    reference = decode_without_cache(family, block_length, threshold)
    cached = decode(family, {"name": cache, "refresh_interval": 1}, block_length=block_length, threshold=threshold)
    assert torch.equal(cached.responses, reference.responses)
    assert cached.nfe == reference.nfe and cached.positions == reference.positions
    if threshold is not None:  # the threshold rule really committed several tokens at some step
        assert max(max(c) for c in reference.committed_per_step) > 1


def left_padded_call(model, tokenizer, responses=None, cfg_scale=0.0, reuse=None) -> tuple[ModelCall, int]:
    """A ModelCall over PROMPTS, left-padded, each followed by its row of `responses` [B, GEN_LENGTH]
    (default: all mask tokens), and the prompt length."""
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    prompt_length = max(map(len, prompts))
    length = prompt_length + GEN_LENGTH
    # Padding holds the end token, as in the decode loop.
    tokens = torch.full((len(prompts), length), model.config.eos_token_id)
    key_mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    prompt_mask = torch.zeros_like(key_mask)
    for i, prompt in enumerate(prompts):
        start = prompt_length - len(prompt)
        tokens[i, start:prompt_length] = torch.tensor(prompt)
        key_mask[i, start:] = prompt_mask[i, start:prompt_length] = True
    tokens[:, prompt_length:] = model.config.mask_token_id if responses is None else responses
    return ModelCall(model, tokens, key_mask, prompt_mask, cfg_scale, reuse or REUSES.build({"name": "none"})), prompt_length


def partly_decoded_call(family, cfg_scale=0.0, seed=3):
    """A left-padded batch of PROMPTS whose response is half decoded (random tokens), as a
    ModelCall, and the prompt length."""
    model, tokenizer = tiny(family)
    generator = torch.Generator().manual_seed(seed)
    responses = []
    for _ in PROMPTS:
        response = torch.randint(len(tokenizer), (GEN_LENGTH,), generator=generator)
        masked = torch.rand(GEN_LENGTH, generator=generator) < 0.5
        responses.append(response.masked_fill(masked, model.config.mask_token_id))
    return left_padded_call(model, tokenizer, torch.stack(responses), cfg_scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", CACHE_NAMES)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_step_between_refreshes_matches_full_forward(family, cache, cfg_scale):
    """On unchanged tokens, the kept keys/values are exact, so a cached step must reproduce the
    full forward's logits for every block (left-padded batch, optional CFG doubling the batch)."""
    call, prompt_length = partly_decoded_call(family, cfg_scale)
    length = call.length
    strategy = CACHES.build({"name": cache})
    strategy.begin_batch()
    for block_start in range(prompt_length, length, 4):
        block_end = block_start + 4
        full = strategy.block_logits(call, block_start, block_end, step=0)
        for step in (1, 2):
            cached = strategy.block_logits(call, block_start, block_end, step=step)
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4, equal_nan=True)


def steps_per_block(committed: list[int], block_length: int) -> list[int]:
    """How many steps each block took, read from the tokens committed at each step."""
    steps, done = [], 0
    for count in committed:
        if done % block_length == 0:
            steps.append(0)
        steps[-1] += 1
        done += count
    return steps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", CACHE_NAMES)
@pytest.mark.parametrize("refresh_interval", [None, 3])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_positions_computed_fall_as_predicted(family, cache, refresh_interval, threshold):
    model, tokenizer = tiny(family)
    block_length, shift = 4, model.logit_shift
    out = decode(family, {"name": cache, "refresh_interval": refresh_interval}, block_length=block_length, threshold=threshold)
    prompt_length = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    length = prompt_length + GEN_LENGTH
    for i in range(len(PROMPTS)):
        expected = 0
        for block, steps in enumerate(steps_per_block(out.committed_per_step[i], block_length)):
            block_start = prompt_length + block * block_length
            for step in range(steps):
                if step % (refresh_interval or steps + 1) == 0:
                    expected += length  # refresh: the whole sequence
                elif cache == "prefix":
                    expected += length - (block_start - shift)  # block + suffix
                else:
                    expected += block_length + shift  # block only
        assert out.positions[i] == expected
        assert out.nfe[i] == len(out.committed_per_step[i])
        # Every response token is decoded, each exactly once.
        assert sum(out.committed_per_step[i]) == GEN_LENGTH
    assert not (out.responses == model.config.mask_token_id).any()
    reference = decode_without_cache(family, block_length, threshold)
    assert sum(out.positions) < sum(reference.positions)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_prompts_padded_to_a_bucket_decode_the_same(family, cache):
    """Padding the prompts to a multiple of a bucket (what a GPU run does, so that batches share graphs)
    changes no token: padding is masked out and positions start at each prompt's first token."""
    model, tokenizer = tiny(family)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outputs = []
    for pad_to in (1, 16):
        outputs.append(generate(model, prompts, gen_length=GEN_LENGTH,
                                generation=GENERATIONS.build({"name": "vanilla", "gen_length": GEN_LENGTH, "block_length": 8}),
                                cache=CACHES.build({"name": cache}), reuse=REUSES.build({"name": "none"}),
                                generators=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                                stop_ids=[model.config.eos_token_id], pad_to=pad_to))
    unpadded, padded = outputs
    assert torch.equal(padded.responses, unpadded.responses) and padded.nfe == unpadded.nfe
    assert padded.forward_shapes[0].length % 16 == 0 and padded.forward_shapes[0].length > unpadded.forward_shapes[0].length
