"""Generation strategies, one module each, registered under `generation=<name>`."""
from fastdllm.generation.base import GENERATIONS, GenerationConfig, GenerationStrategy
from fastdllm.registry import import_submodules

import_submodules(__name__, __path__)

__all__ = ["GENERATIONS", "GenerationConfig", "GenerationStrategy"]
