"""The reuse interface: a strategy may skip or reuse transformer layers (or tokens) during refinement.

The model calls `run_layer(layer, hidden, compute)` for every layer of every forward; `compute`
runs the layer for real. The loop tells the strategy where it is with `begin_step` (each decoding
step) and `begin_forward` (each forward pass of the step) first.

The fast path (engine=compiled, fastdllm/engine.py) replays each forward as one CUDA graph and calls
no Python per layer: it runs a strategy's forwards only if `runs_compiled()` says so, which by default
means the strategy leaves `run_layer` as is; the others run eager, with a one-line notice. A strategy
that skips whole layers declares them instead: `reused_layers()` says, on the host before each forward,
which layers the engine keeps a residual contribution of and whether this forward adds it in place of
computing them (reuse=layer). Other decisions stay on the fast path when made per step or per block in
`begin_step` (host side, before the forward) and expressed as tensors of fixed shape that the forward
reads (e.g. top-k positions padded to a fixed count), never by reading device values on the host
(`.item()`, `.tolist()`, `bool(tensor)`, `.nonzero()`) inside a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from omegaconf import MISSING

from fastdllm.models.layers import KVCache, PositionHook, ReusedLayers
from fastdllm.registry import Registry

if TYPE_CHECKING:
    from fastdllm.forward import ModelCall

REUSES = Registry("reuse")


@dataclass
class ReuseConfig:
    name: str = MISSING


class ReuseStrategy:
    def __init__(self, config: ReuseConfig):
        self.config = config

    def begin_batch(self, num_layers: int) -> None:
        """Forget everything kept for the previous batch; the model has `num_layers` layers."""

    def begin_step(self, block_start: int, block_end: int, step: int) -> None:
        """Called before the forward passes of each decoding step."""

    def begin_forward(self, call: "ModelCall", start: int, end: int, *, records_kv: bool, cache_hook: bool = False
                      ) -> None:
        """Called before each forward pass: it computes positions [start, end) of the call's `length`
        positions; `records_kv`: it is the full forward at which a key/value cache records every layer;
        `cache_hook`: the cache chooses per layer which positions are computed (a position hook).
        `call.key_mask` [B, L]: the real (not left-padding) positions, None when nothing is padded;
        `call.buffer(...)`: tensors to keep across forwards (allocate them here, never inside the forward)."""

    def begin_forward_at(self, positions: torch.Tensor) -> None:
        """Called instead of begin_forward before a forward over scattered positions [B, n]."""

    def position_hook(self, kv_cache: Optional[KVCache]) -> Optional[tuple[PositionHook, KVCache]]:
        """A strategy that chooses per layer which positions are computed returns its hook
        (models.layers.PositionHook) and the key/value cache the forward then uses (it may wrap or
        replace `kv_cache`, the cache strategy's); None: no hook."""
        return None

    def run_layer(self, layer: int, hidden: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return compute(hidden)

    def runs_compiled(self) -> bool:
        """Whether engine=compiled can run this strategy's forwards, which never call `run_layer`: true
        when `run_layer` is left as is, or when `reused_layers` expresses what it does."""
        return type(self).run_layer is ReuseStrategy.run_layer

    def reused_layers(self) -> ReusedLayers:
        """Called after begin_forward on engine=compiled: the layers reused and whether the next forward skips them."""
        return ReusedLayers()
