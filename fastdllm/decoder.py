"""The one builder: model, tokenizer, strategies and engine from a configuration, for every front door.

eval.py, the bench, the chat, the web UI, the lm-eval bridge and training's evaluation all decode
through a `Decoder`, so each gets the same engine choice (engine=compiled on a GPU by default) and
reports the same fields (`engine_report`: results.json's engine, engine_fallbacks, warmup_seconds).

Building comes in two parts because front doors keep models longer than strategies:
- `load(path, revision, dtype, device, engine)` reads the checkpoint and builds the engine once per
  model (a `LoadedModel`; the engine keeps its captured graphs and buffers with it);
- `Decoder(loaded, generation, cache, reuse)` adds the strategies, cheap to rebuild per request.
`build(...)` does both.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fastdllm.cache import CACHES
from fastdllm.engine import CompiledEngine, build_engine, unsupported
from fastdllm.generation import GENERATIONS
from fastdllm.loop import BatchOutput, Step, generate, stop_token_ids
from fastdllm.models import load_model, load_tokenizer, resolve_checkpoint
from fastdllm.models.base import DiffusionLM
from fastdllm.reuse import REUSES


# On a GPU, prompts are left-padded to a multiple of this many tokens (bidirectional families): an
# evaluation's batches then share a few sequence lengths, and engine=compiled keeps its captured graphs
# and buffers from batch to batch instead of capturing them again for every new length. Padding is
# masked out of attention, so a sample decodes as it does alone; its positions count as computed.
GPU_LENGTH_BUCKET = 64


@dataclass
class LoadedModel:
    """A model ready to decode: weights, tokenizer, stop tokens, and the engine that runs its forwards."""

    model: DiffusionLM
    tokenizer: Any
    stop_ids: list[int]
    device: torch.device
    # The engine asked for (eager, compiled, auto) and the one built (None: eager).
    requested_engine: str = "eager"
    engine: Optional[CompiledEngine] = None
    # Why engine=compiled (asked for, or auto on a GPU) was not built, if it was not.
    refused: Optional[str] = None
    # One decode at a time per model: the engine's buffers and graphs belong to the model (a chat's
    # or the web UI's threads wait for each other).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, model: DiffusionLM, tokenizer: Any = None, engine: str = "auto",
           stop_ids: Optional[list[int]] = None) -> "LoadedModel":
        """Wrap a model built elsewhere (the bench's random weights, a model being trained)."""
        device = next(model.parameters()).device
        stop_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
        wants_compiled = engine == "compiled" or (engine == "auto" and device.type == "cuda")
        refused = unsupported(model) if wants_compiled else None
        return cls(model, tokenizer, stop_ids, device, engine, build_engine(engine, model), refused)


def load(path: str, revision: Optional[str], dtype: str, device: torch.device, engine: str = "auto") -> LoadedModel:
    """Read the checkpoint at `path` (a local directory or a hub id) and build its engine."""
    checkpoint: Path = resolve_checkpoint(path, revision)
    model = load_model(checkpoint, getattr(torch, dtype), device)
    return LoadedModel.of(model, load_tokenizer(checkpoint), engine)


@dataclass
class Decoder:
    """A loaded model with its generation, cache and reuse strategies: what every front door decodes with."""

    loaded: LoadedModel
    generation: Any
    cache: Any
    reuse: Any
    # Fallbacks already reported by earlier decoders sharing the engine are not this one's.
    _fallbacks_before: int = field(default=0, init=False)

    @classmethod
    def of(cls, loaded: LoadedModel, generation: Any, cache: Any, reuse: Any) -> "Decoder":
        """Strategies from their configs (dataclasses or mappings with a `name`)."""
        return cls(loaded, GENERATIONS.build(generation), CACHES.build(cache), REUSES.build(reuse))

    def __post_init__(self) -> None:
        engine = self.loaded.engine
        self._fallbacks_before = 0 if engine is None else len(engine.fallbacks)

    @property
    def model(self) -> DiffusionLM:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        return self.loaded.stop_ids

    def generate(self, prompts: list[list[int]], *, gen_length: int, generators: list[torch.Generator],
                 on_step: Optional[Callable[[Step], None]] = None) -> BatchOutput:
        pad_to = GPU_LENGTH_BUCKET if self.loaded.device.type == "cuda" else 1
        with self.loaded.lock:
            return generate(self.model, prompts, gen_length=gen_length, generation=self.generation, cache=self.cache,
                            reuse=self.reuse, generators=generators, stop_ids=self.stop_ids, engine=self.loaded.engine,
                            on_step=on_step, pad_to=pad_to)

    def engine_report(self) -> dict[str, Any]:
        """Which engine ran, what ran off its fast path and why, and the seconds spent capturing graphs
        (and compiling their kernels) rather than decoding: results.json's engine fields."""
        engine, fallbacks = self.loaded.engine, []
        if self.loaded.refused is not None:
            fallbacks.append(f"{self.loaded.refused}: the model runs eager")
        if engine is not None and not engine.graphs:
            fallbacks.append(f"engine=compiled on {engine.device.type}: the forward runs without compiled kernels or CUDA graphs")
        if engine is not None:
            fallbacks += engine.fallbacks[self._fallbacks_before:]
        return {
            "engine": "eager" if engine is None else "compiled",
            "engine_graphs": engine is not None and engine.graphs,
            "engine_fallbacks": fallbacks,
            "warmup_seconds": 0.0 if engine is None else round(engine.warmup_seconds, 3),
        }


def build(path: str, revision: Optional[str], *, dtype: str, device: torch.device, engine: str, generation: Any,
          cache: Any, reuse: Any) -> Decoder:
    """Load the model and build every strategy: the whole decoder of a configuration."""
    return Decoder.of(load(path, revision, dtype, device, engine), generation, cache, reuse)

