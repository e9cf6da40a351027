"""Dual cache (Fast-dLLM): between refreshes, keep the keys/values before and after the current block
and recompute only the block, its fresh keys/values replacing the block's slice in place."""
from __future__ import annotations

from dataclasses import dataclass

from fastdllm.cache.base import CACHES
from fastdllm.cache.kv import KVCacheConfig, KVCacheStrategy


@dataclass
class DualCacheConfig(KVCacheConfig):
    name: str = "dual"


@CACHES.register("dual", DualCacheConfig)
class DualCache(KVCacheStrategy):
    def span(self, call, block_start, block_end):
        # The block's own positions (its tokens change every step) plus, with a logit shift, the
        # `shift` positions before it that predict its first tokens.
        return block_start - call.shift, block_end
