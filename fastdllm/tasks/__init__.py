"""Evaluation tasks; each module registers one data set under `dataset=<name>`."""
from fastdllm.tasks.base import TASKS, DatasetConfig, Example, Task

__all__ = ["TASKS", "DatasetConfig", "Example", "Task"]
