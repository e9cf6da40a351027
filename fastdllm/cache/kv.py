"""The keys/values that prefix and dual caching keep between forward passes, and the refresh schedule
they share. Both are one strategy, `KVCacheStrategy`, that differs only in which span of positions a
step between refreshes recomputes (`span`).

Block-causal families (Fast-dLLM v2): a finished block's keys/values never change, so they are
written once (`finish_block`) and kept, exactly; no step recomputes anything before the current
block, and nothing after it is visible. prefix recomputes the current block at every step (exact:
equal to cache=none); dual is the published sub-block cache (`block_causal_span`).
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from fastdllm.cache.base import CacheConfig, CacheStrategy
from fastdllm.models.kv import SequenceKV
from fastdllm.registry import check

if TYPE_CHECKING:
    from fastdllm.forward import ModelCall


@dataclass
class KVCacheConfig(CacheConfig):
    # Recompute the whole sequence (and rebuild the cache) every N steps of a block; null = only at
    # each block's first step (Fast-dLLM). 1 recomputes everything every step (= cache=none).
    refresh_interval: Optional[int] = None

    def __post_init__(self) -> None:
        check(self.refresh_interval is None or self.refresh_interval >= 1, "refresh_interval",
              self.refresh_interval, "must be >= 1 or null")


class KVCacheStrategy(CacheStrategy):
    """A full forward at each refresh records every layer's keys/values; the steps in between
    recompute only `span` and take the keys/values of every other position from that record."""

    config: KVCacheConfig

    def begin_batch(self) -> None:
        self.kv: Optional[SequenceKV] = None

    @abstractmethod
    def span(self, call: "ModelCall", block_start: int, block_end: int) -> tuple[int, int]:
        """Positions [start, end) a step between refreshes recomputes."""

    def block_causal_span(self, call: "ModelCall", block_start: int, block_end: int, step: int
                          ) -> tuple[int, int, Optional[torch.Tensor]]:
        """Block-causal families: the span a step computes, and which of its positions each sample
        refreshes (None: all). Default: the current block, whose keys/values the step rewrites."""
        return block_start, block_end, None

    def sequence_kv(self, call: "ModelCall") -> SequenceKV:
        if self.kv is None:
            self.kv = SequenceKV(call.length, starts_empty=True)
        return self.kv

    def finish_block(self, call, block_start, block_end):
        kv = self.sequence_kv(call).computing(block_start, block_end)
        return call.predict(block_end, block_end + 1, compute=(block_start, block_end), kv_cache=kv)

    def block_logits(self, call, block_start, block_end, step):
        if call.attention_block is not None:
            start, end, fresh = self.block_causal_span(call, block_start, block_end, step)
            kv = self.sequence_kv(call).computing(start, end, fresh)
            return call.predict(block_start, block_end, compute=(start, end), kv_cache=kv)
        interval = self.config.refresh_interval
        if step == 0 or (interval is not None and step % interval == 0):
            self.kv = SequenceKV(call.length)
            return call.predict(block_start, block_end, compute=(0, call.length), kv_cache=self.kv)
        start, end = self.span(call, block_start, block_end)
        return call.predict(block_start, block_end, compute=(start, end), kv_cache=self.kv.computing(start, end))
