"""Shared fixtures: tiny models saved in the official layout, and helpers to drive the loop."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K_PATH = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_llada_dir(tmp_path_factory) -> Path:
    from fastdllm.models.tiny import build_tiny_model

    directory = tmp_path_factory.mktemp("tiny-llada")
    # std 0.5 makes the random logits peaked enough that confidences differ clearly between positions.
    build_tiny_model("llada", directory, seed=1, std=0.5)
    return directory


@pytest.fixture(scope="session")
def tiny_llada(tiny_llada_dir):
    from fastdllm.models import load_model, load_tokenizer

    return load_model(tiny_llada_dir, torch.float32), load_tokenizer(tiny_llada_dir)


def run_generate(model, tokenizer, prompts, *, gen_length=32, cache=None, reuse=None, seed=0, engine=None, **generation):
    """Decode `prompts` (strings) with the project's loop; strategies built through the registries."""
    from fastdllm.cache import CACHES
    from fastdllm.generation import GENERATIONS
    from fastdllm.loop import generate, stop_token_ids
    from fastdllm.reuse import REUSES

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return generate(
        model,
        ids,
        gen_length=gen_length,
        generation=GENERATIONS.build({"name": "vanilla", **generation}),
        cache=CACHES.build(cache or {"name": "none"}),
        reuse=REUSES.build(reuse or {"name": "none"}),
        generators=[torch.Generator().manual_seed(seed + i) for i in range(len(ids))],
        stop_ids=stop_token_ids(model, tokenizer),
        engine=engine,
    )


PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many?",
    "What is 12 + 30?",
    "Sara reads 5 pages a day for 6 days.",
]
