"""The per-layer, per-position hook (models.layers.PositionHook) on tiny random models, float32.

- a hook that computes every row gives the forward without a hook, bit for bit;
- on unchanged tokens, recomputing a random subset of rows per layer (the other rows reusing the
  branch outputs and keys/values of a full forward) gives the full forward's logits, also with left
  padding, a subset that differs per layer and row, a refresh set different from the computed one,
  and attention weights asked for (explicit softmax instead of the fused kernel);
- the attention weights handed to `record` are the head-mean softmax of the computed queries.
"""
from __future__ import annotations

import pytest
import torch

from fastdllm.models.kv import PositionKV, SequenceKV
from fastdllm.models.layers import LayerPlan
from fastdllm.models.tiny import build_tiny_model

FAMILIES = ["llada", "Dream"]


class RandomRows:
    """Layer by layer, `count` random rows per sample recompute (and refresh `extra` more rows'
    keys/values); all other rows reuse what the first, full forward recorded."""

    def __init__(self, count: int, extra: int = 0, weights: bool = False, seed: int = 0):
        self.count, self.extra, self.weights = count, extra, weights
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recorded_weights: dict[int, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def plan(self, layer, hidden, normed, value_proj):
        if layer not in self.outputs:
            return LayerPlan(attention_weights=self.weights)
        B, n, _ = hidden.shape
        order = torch.stack([torch.randperm(n, generator=self.generator) for _ in range(B)])
        rows = order[:, : self.count].sort(-1).values
        refresh = order[:, : self.count + self.extra] if self.extra else None
        attention_out, feed_forward_out = self.outputs[layer]
        return LayerPlan(compute=rows, refresh=refresh, attention_out=attention_out,
                         feed_forward_out=feed_forward_out, attention_weights=self.weights)

    def record(self, layer, attention_out, feed_forward_out, weights):
        self.outputs[layer] = (attention_out, feed_forward_out)
        if weights is not None:
            self.recorded_weights[layer] = weights


def inputs(model, pad: int):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(40, (2, 12), generator=generator)
    key_mask = torch.ones_like(ids, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
    return ids, positions, (key_mask if pad else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_computing_every_row_is_the_plain_forward(family):
    model, _ = build_tiny_model(family, std=0.3, seed=1)
    ids, positions, key_mask = inputs(model, pad=3)

    class Everything:
        def plan(self, layer, hidden, normed, value_proj):
            return LayerPlan()

        def record(self, *args):
            pass

    with torch.no_grad():
        assert torch.equal(model(ids, positions, key_mask, position_hook=Everything()), model(ids, positions, key_mask))


def position_kv(model, ids: torch.Tensor) -> PositionKV:
    """A PositionKV with zeroed buffers for every layer of `model` over the batch `ids`."""
    blocks = model.parts()[1]
    parts = blocks[0].parts()
    shape = (ids.shape[0], parts.kv_heads, ids.shape[1], parts.q_proj.out_features // parts.heads)
    return PositionKV({i: torch.zeros(shape) for i in range(len(blocks))}, {i: torch.zeros(shape) for i in range(len(blocks))})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_kind", ["position", "sequence"])
@pytest.mark.parametrize("count,extra,weights,pad", [(4, 0, False, 0), (5, 3, False, 3), (1, 0, True, 3), (12, 0, True, 0)])
def test_recomputing_a_subset_reproduces_the_full_forward(family, kv_kind, count, extra, weights, pad):
    model, _ = build_tiny_model(family, std=0.3, seed=1)
    ids, positions, key_mask = inputs(model, pad)
    kv = position_kv(model, ids) if kv_kind == "position" else SequenceKV(ids.shape[1])
    hook = RandomRows(count, extra, weights)
    with torch.no_grad():
        full = model(ids, positions, key_mask, kv_cache=kv, position_hook=hook)
        reference = model(ids, positions, key_mask)
        torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)
        for _ in range(2):
            partial = model(ids, positions, key_mask, kv_cache=kv, position_hook=hook)
            torch.testing.assert_close(partial, reference, rtol=1e-4, atol=1e-4)
    if weights:
        for w in hook.recorded_weights.values():
            assert w.shape[:2] == (2, count) and w.shape[-1] == 12
            torch.testing.assert_close(w.sum(-1), torch.ones(2, count))
            if pad:  # padded keys get no attention
                assert (w[1, :, :pad] == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_subset_of_a_span_with_a_dual_style_cache(family):
    """A span forward (as cache=dual's steps) recomputing only some of the span's rows: the rows
    are placed at span start + row, and the span's logits equal the full forward's."""
    model, _ = build_tiny_model(family, std=0.3, seed=1)
    ids, positions, key_mask = inputs(model, pad=3)
    kv = SequenceKV(ids.shape[1])
    with torch.no_grad():
        reference = model(ids, positions, key_mask, kv_cache=kv)
        hook = RandomRows(2)
        hook.outputs = {}
        span = kv.computing(6, 10)
        model(ids[:, 6:10], positions[:, 6:10], key_mask, kv_cache=span, position_hook=hook)  # records the span's outputs
        partial = model(ids[:, 6:10], positions[:, 6:10], key_mask, kv_cache=span, position_hook=hook)
    torch.testing.assert_close(partial, reference[:, 6:10], rtol=1e-4, atol=1e-4)


def test_a_partial_plan_without_kv_cache_fails_loudly():
    model, _ = build_tiny_model("llada", std=0.3, seed=1)
    ids, positions, _ = inputs(model, pad=0)
    hook = RandomRows(4)
    hook.outputs = {i: (None, None) for i in range(2)}
    with pytest.raises(ValueError, match="needs a kv_cache"), torch.no_grad():
        model(ids, positions, position_hook=hook)
