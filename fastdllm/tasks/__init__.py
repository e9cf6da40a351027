"""Evaluation tasks; each module registers one data set under `dataset=<name>`."""
from fastdllm.tasks.base import TASKS, DatasetConfig, Example, Task
from fastdllm.tasks import gsm8k  # noqa: F401  (registers dataset=gsm8k)

__all__ = ["TASKS", "DatasetConfig", "Example", "Task"]
