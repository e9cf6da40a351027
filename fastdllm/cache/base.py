"""The cache interface: what must be recomputed at each step, and what is kept from earlier steps.

The loop asks `block_logits(call, block_start, block_end, step)` once per step for the logits that
predict the current block. A strategy answers with one or more `call.predict(...)`, choosing which
span of positions the model computes and which keys/values (a KVCache) it attends to for the rest.
For block-causal families (Fast-dLLM v2) the loop also asks `finish_block(...)` once a block (or the
prompt's complete blocks) is final.

The fast path (engine=compiled, fastdllm/engine.py) captures each forward shape once as a CUDA graph
and replays it. A strategy stays on it when:
- its spans have few distinct shapes: the same (start, end) length for every step of a block and,
  best, of every block (a dual cache's block span is one graph for the whole decode; a prefix span
  changes once per block); pad or top-k variable position sets to fixed counts;
- its key/value cache is `cache.kv.SequenceKV` (the engine keeps its keys/values in preallocated
  buffers and writes the computed span in place), one alive per batch at a time, refreshed by a full
  forward or, for a block-causal family, filled span by span from empty (`starts_empty`), a per-sample
  `fresh` mask choosing which of the span's positions each row writes; another KVCache type runs its
  forwards eager, with a one-line notice;
- it reads nothing from the device on the host inside a step (no `.item()`, `.tolist()`,
  `bool(tensor)`, `.nonzero()`, boolean-mask indexing): its decisions are Python integers known
  from the step number, or tensors that stay on the device. Where the shape of a forward itself
  depends on the data (the v2 sub-block cache's span in a batch), read it in one transfer per step.

Per layer and per position (dLLM-Cache, d2Cache, token trimming): pass `position_hook=` to
`call.predict` (a span) or `call.predict_at` (any positions [B, n], e.g. a top-k selection). The
hook (`fastdllm.models.layers.PositionHook`) is asked by every layer for a `LayerPlan`:
- `compute` [B, k]: rows of the layer input whose queries, attention and feed-forward run;
- `refresh` [B, m]: rows whose keys/values are recomputed and handed to the kv_cache as
  `update(layer, k, v, rows=refresh)` (`cache.kv.SequenceKV` and `PositionKV` place them and keep
  every other position's; None = the `compute` rows);
- `attention_out`, `feed_forward_out` [B, n, d]: the cached branch outputs for the other rows;
- `attention_weights`: whether the layer also returns head-mean attention probabilities;
and after the layer gets `record(layer, attention_out, feed_forward_out, weights)` with the full
branch outputs, to keep for later forwards. The residual stream flows through every row, and the
layer math stays in the model files. Index counts are fixed per step (pad by repeating a row) and
nothing is read back to the host. For example, recompute only `rows` of a full-length forward:

    class RowsOnly:  # with a kv cache recorded by an earlier full forward (cache.kv.PositionKV)
        def plan(self, layer, hidden, normed, value_proj):
            a, f = self.outputs[layer]
            return LayerPlan(compute=self.rows, attention_out=a, feed_forward_out=f)
        def record(self, layer, attention_out, feed_forward_out, weights):
            self.outputs[layer] = (attention_out, feed_forward_out)

    call.predict(block_start, block_end, (0, call.length), kv_cache=kv, position_hook=hook,
                 positions_computed=...)   # how many positions this amounts to, for the counters
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import MISSING

from fastdllm.registry import Registry

if TYPE_CHECKING:
    from fastdllm.forward import ModelCall

CACHES = Registry("cache")


@dataclass
class CacheConfig:
    name: str = MISSING


class CacheStrategy(ABC):
    # Width of the certainty prior the decoding uses when generation.sigma is null (0 = off).
    certainty_prior_sigma: float = 0.0

    def __init__(self, config: CacheConfig):
        self.config = config

    def begin_batch(self) -> None:
        """Forget everything kept for the previous batch."""

    @abstractmethod
    def block_logits(self, call: "ModelCall", block_start: int, block_end: int, step: int) -> torch.Tensor:
        """Logits [B, block_end - block_start, V] predicting the current block at `step` of the
        block (0 = its first step)."""

    def finish_block(self, call: "ModelCall", block_start: int, block_end: int) -> torch.Tensor:
        """Block-causal families: positions [block_start, block_end) are final (a decoded block, or the
        prompt's complete blocks). Return the logits [B, 1, V] predicting position block_end (the next
        block's first token); a cache keeps their keys/values, which later blocks never change.
        Without a cache: recompute the whole sequence."""
        return call.predict(block_end, block_end + 1, compute=(0, call.length))
