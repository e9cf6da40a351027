"""Prefix cache (Fast-dLLM): between refreshes, keep the keys/values before the current block and
recompute the block and everything after it."""
from __future__ import annotations

from dataclasses import dataclass

from fastdllm.cache.base import CACHES
from fastdllm.cache.kv import KVCacheConfig, KVCacheStrategy


@dataclass
class PrefixCacheConfig(KVCacheConfig):
    name: str = "prefix"


@CACHES.register("prefix", PrefixCacheConfig)
class PrefixCache(KVCacheStrategy):
    def span(self, call, block_start, block_end):
        # With a logit shift the block is predicted from the positions `shift` earlier, whose hidden
        # states depend on the block's tokens: they are recomputed too, and the kept prefix ends there.
        return block_start - call.shift, call.length
