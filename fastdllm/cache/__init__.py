"""Cache strategies, one module each, registered under `cache=<name>`."""
from fastdllm.cache.base import CACHES, CacheConfig, CacheStrategy
from fastdllm.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["CACHES", "CacheConfig", "CacheStrategy"]
