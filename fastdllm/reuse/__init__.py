"""Reuse strategies, one module each, registered under `reuse=<name>`."""
from fastdllm.reuse.base import REUSES, ReuseConfig, ReuseStrategy
from fastdllm.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["REUSES", "ReuseConfig", "ReuseStrategy"]
