"""Token-level reuse across denoising steps (`reuse=trim`, TRIM: recompute only the tokens that are not stable).

Per forward and layer, a position whose layer input changed by less than `tolerance` since the layer
last computed it keeps that layer's cached outputs (attention and feed-forward contributions, added
to the residual stream that still flows through every position) and its cached keys/values; the
other positions are recomputed, their keys/values refreshed. The change is the relative L2 distance
||h - h_then|| / ||h_then|| (`metric=l2`) or the cosine distance 1 - cos(h, h_then) (`metric=cosine`).

Work is chosen through the model's position hook (models.layers.PositionHook), so it composes with
cache=none|prefix|dual: the cache decides which span of positions a forward covers, trim which of
them are recomputed. The recomputed positions' keys/values are written into the cache's record
(prefix/dual) or, with cache=none, into one trim keeps itself; the others keep those last computed.
A block's first step, every `refresh_interval`-th step, and a full forward at which a cache records
keys/values compute everything.

What the input criterion cannot see: a position whose input is unchanged still attends to positions
that changed (the tokens just committed), so its true output moves while trim keeps the cached one;
and since reused positions keep their outputs, their inputs at later layers stay unchanged too.
Between refreshes, information from newly committed tokens reaches other positions only through
positions that are recomputed anyway (see experiments/004-trim for what that costs).

Fixed shapes: with `max_ratio`, every sample recomputes at most ceil(max_ratio * its real positions
in the span) positions, the most changed among those over the tolerance, and the batch computes a
fixed ceil(max_ratio * span) rows per layer (slots a sample does not need repeat its most changed
position): no host read. Without it, the count of positions over the tolerance is read on the host
once per layer (the batch's largest count is computed): the strategy then leaves the GPU fast path.
Either way every sample recomputes at least its most changed position, so a sample decodes the same
in any batch. `tolerance=0` recomputes every position (= reuse=none).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastdllm.models.kv import SequenceKV
from fastdllm.models.layers import LayerPlan
from fastdllm.registry import ConfigError, check
from fastdllm.reuse.base import REUSES, ReuseConfig, ReuseStrategy

log = logging.getLogger(__name__)

METRICS = ("l2", "cosine")


@dataclass
class PositionReuseConfig(ReuseConfig):
    # A position is reused while its change stays below this; 0 recomputes every position (= reuse=none).
    tolerance: float = 0.0
    # l2: ||new - old|| / ||old||; cosine: 1 - cos(new, old).
    metric: str = "l2"
    # Cap on the recomputed share of the positions a forward covers, as a fixed count per layer (GPU
    # fast path); null: no cap, the count over the tolerance is read on the host per layer.
    max_ratio: Optional[float] = None
    # Compute every position every N steps of a block; null: only at the block's first step.
    refresh_interval: Optional[int] = None

    def __post_init__(self) -> None:
        check(self.tolerance >= 0, "tolerance", self.tolerance, "must be >= 0")
        check(self.refresh_interval is None or self.refresh_interval >= 1, "refresh_interval",
              self.refresh_interval, "must be >= 1 or null")
        check(self.metric in METRICS, "metric", self.metric, f"choose one of {list(METRICS)}")
        check(self.max_ratio is None or 0 < self.max_ratio <= 1, "max_ratio", self.max_ratio, "must be in (0, 1] or null")


def change(new: torch.Tensor, old: torch.Tensor, metric: str) -> torch.Tensor:
    """Per position change [B, n] of new against old [B, n, d], in float32."""
    new, old = new.float(), old.float()
    if metric == "cosine":
        return 1 - F.cosine_similarity(new, old, dim=-1)
    return (new - old).norm(dim=-1) / old.norm(dim=-1).clamp_min(1e-12)


def write_rows(stored: torch.Tensor, fresh: torch.Tensor, rows: Optional[torch.Tensor]) -> None:
    """Copy fresh [R, n, d] into stored [R, n, d] in place at rows [R, k] (None: every row)."""
    if rows is None:
        stored.copy_(fresh)
    else:
        index = rows[..., None].expand(-1, -1, fresh.shape[-1])
        stored.scatter_(1, index, fresh.gather(1, index))


class PositionReuse(ReuseStrategy):
    """What trim and activation share: the span and real positions of each forward, when everything
    is computed, and the choice of the rows to recompute from a per-position change."""

    config: PositionReuseConfig

    def __init__(self, config: PositionReuseConfig):
        super().__init__(config)
        if config.max_ratio is None and config.tolerance > 0:
            log.warning(f"reuse={config.name} without max_ratio reads the count of changed positions on the host "
                        "once per layer: decoding leaves the GPU fast path")

    # Per-layer records over the whole sequence this strategy keeps ([rows, L, d] each, by name).
    records: tuple[str, ...] = ()

    def begin_batch(self, num_layers: int) -> None:
        self.refresh = True
        # Whether a forward of this batch has run (it computed and recorded every layer).
        self.recorded = False

    def begin_step(self, block_start: int, block_end: int, step: int) -> None:
        interval = self.config.refresh_interval
        self.refresh = step == 0 or (interval is not None and step % interval == 0)

    @property
    def reuses_nothing(self) -> bool:
        """The degenerate setting: every position is recomputed, so no hook is needed at all."""
        return self.config.tolerance == 0 and self.config.max_ratio in (None, 1.0)

    def begin_forward(self, call, start, end, *, records_kv, cache_hook=False):
        if cache_hook and not self.reuses_nothing:
            raise ConfigError(f"reuse={self.config.name} does not combine with a cache that chooses per layer which "
                              "positions are computed (cache=dllm|d2cache): use cache=none|prefix|dual")
        self.span = slice(start, end)
        self.length = call.length
        self.real = None if call.key_mask is None else call.key_mask[:, start:end]
        self.compute_all = self.refresh or records_kv or not self.recorded
        self.recorded = True
        # The records, kept in place (call.buffer): a block's first step computes every position its
        # refinement steps compute, so reads find them recorded (a batch's first forward need not
        # cover the sequence: a block-causal model's prefill covers the prompt's blocks).
        shape = (call.rows, call.length, call.width)
        self.kept = {name: [call.buffer((self.config.name, name, layer), shape, call.dtype) for layer in range(call.num_layers)]
                     for name in self.records}

    def capture_key(self) -> Optional[tuple]:
        """What a captured forward depends on beyond its shapes; None (no capture) where the count of
        positions to recompute is read on the host (no max_ratio)."""
        if self.config.max_ratio is None and self.config.tolerance > 0:
            return None
        return self.compute_all, self.span.start, self.span.stop, self.real is None

    def state_tensors(self) -> list[torch.Tensor]:
        """The records a forward reads before it overwrites them (put back after a capture's warm-up)."""
        return self.kept[self.records[0]]

    def begin_forward_at(self, positions):
        if self.reuses_nothing:
            return
        raise ConfigError(f"reuse={self.config.name} needs forwards over a contiguous span of positions; this cache "
                          "computes scattered positions: use cache=none|prefix|dual")

    def rows_to_compute(self, changed: torch.Tensor) -> Optional[torch.Tensor]:
        """Rows [R, k] (fixed k) to recompute given each row's change [R, n]; None: every row."""
        rows, n = changed.shape
        tolerance, ratio = self.config.tolerance, self.config.max_ratio
        if tolerance == 0 and (ratio is None or math.ceil(ratio * n) >= n):
            return None
        if ratio is None:
            count = (changed >= tolerance).sum(-1)
            k = int(count.max())  # the host read documented above
            if k == n and bool((count == n).all()):
                return None
        else:
            real = torch.ones_like(changed, dtype=torch.bool) if self.real is None else self.real.repeat(rows // self.real.shape[0], 1)
            # Left padding never takes a sample's slots; the cap counts the sample's real positions.
            changed = changed.masked_fill(~real, -torch.inf)
            cap = torch.ceil(ratio * real.sum(-1).float()).long()
            count = torch.minimum((changed >= tolerance).sum(-1), cap)
            k = math.ceil(ratio * n)
        k = max(k, 1)
        # Most changed first; stable, so that ties (unchanged positions) are broken in position order.
        order = changed.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        needed = torch.arange(k, device=changed.device) < count.clamp_min(1)[:, None]
        return torch.where(needed, order, order[:, :1])


@REUSES.register("trim", PositionReuseConfig)
class TrimReuse(PositionReuse):
    # Per layer, over the whole sequence: the input when each position was last computed, and the
    # attention and feed-forward outputs computed then.
    records = ("inputs", "attention", "feed_forward")

    def begin_batch(self, num_layers: int) -> None:
        super().begin_batch(num_layers)
        # With cache=none, trim keeps every layer's keys/values itself; prefix/dual keep theirs.
        self.own_kv: Optional[SequenceKV] = None

    def begin_forward(self, call, start, end, *, records_kv, cache_hook=False):
        super().begin_forward(call, start, end, records_kv=records_kv, cache_hook=cache_hook)
        if self.own_kv is None:
            self.own_kv = SequenceKV(call.length)
        self.own_kv.computing(start, end)

    def position_hook(self, kv_cache):
        if self.reuses_nothing:
            return None
        return self, self.own_kv if kv_cache is None else kv_cache

    def plan(self, layer, hidden, normed, value_proj) -> LayerPlan:
        inputs, attention, feed_forward = (self.kept[name][layer][:, self.span] for name in self.records)
        rows = None if self.compute_all else self.rows_to_compute(change(hidden, inputs, self.config.metric))
        self.pending = (hidden, rows)
        if rows is None:
            return LayerPlan()
        return LayerPlan(compute=rows, attention_out=attention, feed_forward_out=feed_forward)

    def record(self, layer, attention_out, feed_forward_out, attention_weights) -> None:
        hidden, rows = self.pending
        inputs, attention, feed_forward = (self.kept[name][layer][:, self.span] for name in self.records)
        write_rows(inputs, hidden, rows)
        attention.copy_(attention_out)
        feed_forward.copy_(feed_forward_out)
