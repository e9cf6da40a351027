"""Evaluation tasks, one module each, registered under `dataset=<name>`."""
from fastdllm.registry import import_submodules
from fastdllm.tasks.base import TASKS, DatasetConfig, Example, Task

import_submodules(__name__, __path__)

__all__ = ["TASKS", "DatasetConfig", "Example", "Task"]
