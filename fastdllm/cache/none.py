"""No cache: every step recomputes the whole sequence (the reference every cache is tested against)."""
from __future__ import annotations

from dataclasses import dataclass

from fastdllm.cache.base import CACHES, CacheConfig, CacheStrategy


@dataclass
class NoCacheConfig(CacheConfig):
    name: str = "none"


@CACHES.register("none", NoCacheConfig)
class NoCache(CacheStrategy):
    def block_logits(self, call, block_start, block_end, step):
        return call.predict(block_start, block_end, compute=(0, call.length))
