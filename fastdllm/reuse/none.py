"""No reuse: every layer is computed at every forward pass."""
from __future__ import annotations

from dataclasses import dataclass

from fastdllm.reuse.base import REUSES, ReuseConfig, ReuseStrategy


@dataclass
class NoReuseConfig(ReuseConfig):
    name: str = "none"


@REUSES.register("none", NoReuseConfig)
class NoReuse(ReuseStrategy):
    pass
