"""Where results go besides the run directory: `logger=none` or `logger=wandb` (offline by default)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from fastdllm.registry import Registry, check

LOGGERS = Registry("logger")


@dataclass
class LoggerConfig:
    name: str = MISSING


class Logger:
    def __init__(self, config: LoggerConfig):
        self.config = config

    def log_run(self, run_dir: Path, config: dict[str, Any], results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        """Record one finished run (called on the main process only)."""


@dataclass
class NoLoggerConfig(LoggerConfig):
    name: str = "none"


LOGGERS.register("none", NoLoggerConfig)(Logger)


WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "fastdllm"
    entity: Optional[str] = None
    # offline: the run is stored in the run directory (wandb sync uploads it later); no network needed.
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check(self.mode in WANDB_MODES, "mode", self.mode, f"choose one of {list(WANDB_MODES)}")


@LOGGERS.register("wandb", WandbConfig)
class WandbLogger(Logger):
    config: WandbConfig

    def log_run(self, run_dir, config, results, samples):
        import wandb

        # An explicit WANDB_MODE in the environment wins, as wandb users expect.
        mode = os.environ.get("WANDB_MODE", self.config.mode)
        run = wandb.init(
            project=self.config.project,
            entity=self.config.entity,
            mode=mode,
            dir=str(run_dir),
            config=config,
            tags=list(self.config.tags),
            name=run_dir.name,
        )
        scalars = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        run.summary.update(scalars)
        run.log(scalars)
        run.log({"results": wandb.Table(columns=list(scalars), data=[list(scalars.values())])})
        if samples:
            columns = [k for k in samples[0] if not isinstance(samples[0][k], (list, dict))]
            run.log({"samples": wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])})
        run.finish()
