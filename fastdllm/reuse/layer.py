"""Layer reuse across denoising steps (`reuse=layer`).

During the refinement steps of a block, `k` transformer layers are not computed: each adds instead
the residual contribution (its output minus its input) it added when it was last computed, at the
same positions. A block's first step computes every layer and records those contributions; so does
every `refresh_interval`-th step and every full forward at which a key/value cache (cache=prefix|dual)
records the keys/values of every layer. The hypothesis behind it (DeepCache, Delta-DiT): late layers
refine representations that change little from one denoising step to the next.

With cache=prefix|dual, a skipped layer writes no keys/values either: the keys/values of its
positions stay those of the step that last computed it, which at a cache refresh is every position.

`adaptive_tolerance` (TeaCache-style) skips a layer only while the relative change of its input,
accumulated step by step since the layer was last computed, stays below the tolerance; the change
is measured per batch row and each row uses the computed or the reused output accordingly, so a
sample decodes the same in any batch. Deciding whether to run the layer at all reads one flag per
candidate layer per refinement step on the host: with it, the strategy leaves the GPU fast path.

Without adaptive_tolerance (k, which, layers, refresh_interval only) the skipped layers and whether a
forward skips them are known on the host before it (`reused_layers`): the one forward keeps the
contributions in buffers of the decode (ModelCall.buffer, the engine's under engine=compiled) and
adds them, on either engine; `run_layer`, which keeps them in `self.delta`, serves adaptive_tolerance.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastdllm.registry import ConfigError, check
from fastdllm.models.layers import ReusedLayers
from fastdllm.reuse.base import REUSES, ReuseConfig, ReuseStrategy

log = logging.getLogger(__name__)

WHICH = ("last", "first", "middle")


@dataclass
class LayerReuseConfig(ReuseConfig):
    name: str = "layer"
    # Layers not computed during refinement steps; 0 computes every layer (= reuse=none).
    k: int = 0
    # Which k layers: the last ones, the first ones, or those around the middle.
    which: str = "last"
    # Explicit layer indices (0-based) instead of k and which; null: use k and which.
    layers: Optional[list[int]] = None
    # Recompute the skipped layers every N steps of a block; null: only at the block's first step.
    refresh_interval: Optional[int] = None
    # Skip a layer only while its input's accumulated relative change since it was last computed
    # stays below this (TeaCache-style; reads a flag on the host per layer and step); null: always skip.
    adaptive_tolerance: Optional[float] = None

    def __post_init__(self) -> None:
        check(self.k >= 0, "k", self.k, "must be >= 0")
        check(self.which in WHICH, "which", self.which, f"choose one of {list(WHICH)}")
        if self.layers is not None:
            check(self.k == 0, "k", self.k, "leave k at 0 when reuse.layers lists the skipped layers")
            check(all(i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers), "layers",
                  self.layers, "must be distinct layer indices >= 0")
        check(self.refresh_interval is None or self.refresh_interval >= 1, "refresh_interval",
              self.refresh_interval, "must be >= 1 or null")
        check(self.adaptive_tolerance is None or self.adaptive_tolerance >= 0, "adaptive_tolerance",
              self.adaptive_tolerance, "must be >= 0 or null")

    def skipped_layers(self, num_layers: int) -> frozenset[int]:
        """The layers skipped during refinement steps, for a model of `num_layers` layers."""
        if self.layers is not None:
            if max(self.layers, default=-1) >= num_layers:
                raise ConfigError(f"reuse.layers={self.layers} is invalid: the model has layers 0..{num_layers - 1}")
            return frozenset(self.layers)
        if self.k > num_layers:
            raise ConfigError(f"reuse.k={self.k} is invalid: the model has {num_layers} layers")
        first = {"first": 0, "last": num_layers - self.k, "middle": (num_layers - self.k) // 2}[self.which]
        return frozenset(range(first, first + self.k))


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """||new - old|| / ||old|| per batch row, over all positions and features, in float32."""
    new, old = new.float().flatten(1), old.float().flatten(1)
    return (new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)


@REUSES.register("layer", LayerReuseConfig)
class LayerReuse(ReuseStrategy):
    config: LayerReuseConfig

    def __init__(self, config: LayerReuseConfig):
        super().__init__(config)
        if config.adaptive_tolerance is not None:
            log.warning("reuse.adaptive_tolerance reads one flag per layer and step on the host: "
                        "decoding leaves the GPU fast path")

    def begin_batch(self, num_layers: int) -> None:
        self.skipped = self.config.skipped_layers(num_layers)
        # Per skipped layer, over the whole sequence [rows, L, d]: the residual contribution when last
        # computed; with adaptive_tolerance also the input at the last step, and the accumulated change [rows].
        self.delta: dict[int, torch.Tensor] = {}
        self.last_input: dict[int, torch.Tensor] = {}
        self.change: dict[int, torch.Tensor] = {}
        self.refinement = False

    def begin_step(self, block_start: int, block_end: int, step: int) -> None:
        interval = self.config.refresh_interval
        self.refinement = step > 0 and (interval is None or step % interval != 0)

    def begin_forward(self, call, start, end, *, records_kv, cache_hook=False):
        if cache_hook and self.skipped:
            raise ConfigError("reuse=layer does not combine with a cache that chooses per layer which positions are "
                              "computed (cache=dllm|d2cache): a skipped layer would leave its per-layer features stale; "
                              "use cache=none|prefix|dual")
        self.span = slice(start, end)
        self.length = call.length
        self.skipping = self.refinement and not records_kv

    def begin_forward_at(self, positions):
        if self.skipped:
            raise ConfigError("reuse=layer needs forwards over a contiguous span of positions; this cache computes "
                              "scattered positions: use cache=none|prefix|dual")

    def runs_compiled(self) -> bool:
        return self.config.adaptive_tolerance is None

    def reused_layers(self) -> ReusedLayers:
        # Nothing skipped (k=0): one graph for every forward, not one per skipping/recording.
        return ReusedLayers(self.skipped, self.skipping and bool(self.skipped))

    def run_layer(self, layer: int, hidden: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """With adaptive_tolerance only (otherwise the forward itself keeps and adds the contributions,
        see reused_layers)."""
        if layer not in self.skipped:
            return compute(hidden)
        if not self.skipping:
            output = compute(hidden)
            self._record(layer, hidden, output)
            return output
        reused = hidden + self.delta[layer][:, self.span]
        change = self.change[layer] + relative_change(hidden, self.last_input[layer][:, self.span])
        self.last_input[layer][:, self.span] = hidden
        stale = change >= self.config.adaptive_tolerance
        if not bool(stale.any()):  # the host read adaptive_tolerance is documented to cost
            self.change[layer] = change
            return reused
        output = compute(hidden)
        self.delta[layer][:, self.span] = torch.where(stale[:, None, None], output - hidden, self.delta[layer][:, self.span])
        self.change[layer] = change.masked_fill(stale, 0.0)
        return torch.where(stale[:, None, None], output, reused)

    def _record(self, layer: int, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Keep the layer's contribution (and input) at the computed positions. A block's first step
        computes every position a refinement step of that block computes (the whole sequence, or for
        block-causal models the block), so every later span finds its positions recorded."""
        if layer not in self.delta:
            rows, _, width = hidden.shape
            self.delta[layer] = hidden.new_zeros(rows, self.length, width)
            self.last_input[layer] = hidden.new_zeros(rows, self.length, width)
            self.change[layer] = hidden.new_zeros(rows, dtype=torch.float32)
        self.delta[layer][:, self.span] = output - hidden
        self.last_input[layer][:, self.span] = hidden
        self.change[layer].zero_()
