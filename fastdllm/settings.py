"""The validated configuration of one evaluation: every group of the composed Hydra config checked
against its schema, before anything is read or loaded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fastdllm.cache import CACHES
from fastdllm.config import ModelConfig, RunConfig
from fastdllm.generation import GENERATIONS
from fastdllm.loggers import LOGGERS
from fastdllm.registry import check_known_keys
from fastdllm.reuse import REUSES
from fastdllm.tasks import TASKS
from fastdllm.tasks.code_tasks import grant_code_eval

GROUPS = ("model", "cache", "generation", "reuse", "dataset", "logger")


@dataclass
class Settings:
    """The validated configuration: one dataclass per group (their checks have run)."""

    run: RunConfig
    model: ModelConfig
    cache: Any
    generation: Any
    reuse: Any
    dataset: Any
    logger: Any


def validate(cfg: DictConfig) -> Settings:
    """Check every group against its schema; raise ConfigError naming the key and what is allowed."""
    # Hydra lets `+key=value` add keys that no schema has; they would be ignored silently.
    check_known_keys(cfg.keys(), RunConfig, "")
    check_known_keys(cfg.model.keys(), ModelConfig, "model")
    model_node = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model)
    run_fields = {k: v for k, v in cfg.items() if k not in GROUPS}
    run = RunConfig(**OmegaConf.to_container(OmegaConf.create(run_fields), resolve=True))
    settings = Settings(
        run=run,
        model=OmegaConf.to_object(model_node),
        cache=CACHES.to_config(cfg.cache),
        generation=GENERATIONS.to_config(cfg.generation),
        reuse=REUSES.to_config(cfg.reuse),
        dataset=grant_code_eval(TASKS.to_config(cfg.dataset), run.allow_code_eval),
        logger=LOGGERS.to_config(cfg.logger),
    )
    settings.generation.check_lengths(gen_length_of(settings))
    return settings


def gen_length_of(settings: Settings) -> int:
    return settings.generation.response_length(settings.dataset.gen_length)
