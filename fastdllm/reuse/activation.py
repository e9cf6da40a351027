"""Activation reuse across denoising steps (`reuse=activation`).

Every position computes its attention at every forward; a position whose attention output changed
by less than `tolerance` (the metric of reuse=trim, against its attention output when its
feed-forward was last computed) reuses that feed-forward output instead of recomputing it. The
feed-forward is the larger half of a layer (LLaDA-8B: 3 x 4096 x 12288 weights against 4 x 4096^2
for attention), and the idea is that a stable attention output signals a stable layer.

Keys/values are computed for every position the forward covers, so it composes with any
cache=none|prefix|dual unchanged. Selection, fixed counts (`max_ratio`) and the host read without
it work as in reuse=trim; a block's first step and a cache's recording forward compute every
feed-forward. `tolerance=0` computes every feed-forward (= reuse=none). Layer-positions computed
count a position whose feed-forward is reused as half a layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdllm.models.layers import LayerPlan
from fastdllm.reuse.base import REUSES
from fastdllm.reuse.trim import PositionReuse, PositionReuseConfig, change, write_rows


@dataclass
class ActivationReuseConfig(PositionReuseConfig):
    name: str = "activation"


@REUSES.register("activation", ActivationReuseConfig)
class ActivationReuse(PositionReuse):
    # Per layer, over the whole sequence: each position's attention output when its feed-forward was
    # last computed, and that feed-forward output.
    records = ("attention", "feed_forward")

    def position_hook(self, kv_cache):
        return None if self.reuses_nothing else (self, kv_cache)

    def plan(self, layer, hidden, normed, value_proj) -> LayerPlan:
        self.rows = None
        if self.compute_all:
            return LayerPlan()
        attention, feed_forward = (self.kept[name][layer][:, self.span] for name in self.records)

        def feed_forward_rows(attention_out: torch.Tensor):
            self.rows = self.rows_to_compute(change(attention_out, attention, self.config.metric))
            return self.rows

        return LayerPlan(feed_forward_rows=feed_forward_rows, feed_forward_out=feed_forward)

    def record(self, layer, attention_out, feed_forward_out, attention_weights) -> None:
        attention, feed_forward = (self.kept[name][layer][:, self.span] for name in self.records)
        write_rows(attention, attention_out, self.rows)
        feed_forward.copy_(feed_forward_out)
