"""Shared by the reuse tests: tiny random 4-layer models of each family and a decode helper."""
from __future__ import annotations

import functools

import torch

from fastdllm.cache import CACHES
from fastdllm.forward import ModelCall
from fastdllm.models.tiny import build_tiny_model
from fastdllm.reuse import REUSES
from test_caches import GEN_LENGTH, PROMPTS, left_padded_call  # noqa: F401 (GEN_LENGTH: for the reuse tests)
from test_caches import decode as decode_tiny

FAMILIES = ["llada", "Dream"]
CACHE_NAMES = ["none", "prefix", "dual"]
BLOCK_LENGTH, LAYERS = 8, 4


@functools.cache
def tiny(family: str):
    layers = {"n_layers": LAYERS} if family == "llada" else {"num_hidden_layers": LAYERS}
    model, tokenizer = build_tiny_model(family, std=0.3, seed=1, **layers)
    return model.eval(), tokenizer


def decode(family, reuse: dict, cache: str = "none", prompts=PROMPTS, seed=0, **generation):
    """A decode with this module's 4-layer tiny model, reuse and cache given by their configs."""
    return decode_tiny(family, {"name": cache}, model=tiny(family), prompts=prompts, seed=seed, reuse=REUSES.build(reuse),
                       block_length=BLOCK_LENGTH, **generation)


@functools.cache
def reference(family, cache, threshold=None):
    return decode(family, {"name": "none"}, cache, threshold=threshold)



def steps_on_unchanged_tokens(family: str, cache: str, reuse: dict, steps: int = 3) -> list[tuple[torch.Tensor, int, int]]:
    """Steps 0..steps-1 of the second block, the tokens never changing: per step the logits, the
    positions and the layer-positions computed."""
    strategy, reuse_strategy = CACHES.build({"name": cache}), REUSES.build(reuse)
    call, prompt_length = partial_batch(family, reuse_strategy)
    strategy.begin_batch()
    reuse_strategy.begin_batch(num_layers=LAYERS)
    block_start = prompt_length + BLOCK_LENGTH
    out = []
    for step in range(steps):
        reuse_strategy.begin_step(block_start, block_start + BLOCK_LENGTH, step)
        call.positions = call.layer_positions = 0
        logits = strategy.block_logits(call, block_start, block_start + BLOCK_LENGTH, step)
        out.append((logits, call.positions, call.layer_positions))
    return out


def partial_batch(family: str, reuse) -> tuple[ModelCall, int]:
    """A ModelCall over PROMPTS (left-padded) followed by GEN_LENGTH mask tokens, and the prompt length."""
    return left_padded_call(*tiny(family), reuse=reuse)
