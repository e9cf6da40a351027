"""The key/value containers every forward writes into and attends to.

`SequenceKV` holds every layer's keys/values over the whole sequence and is written span by span
(prefix/dual caches, block-causal block caches); `PositionKV` is written at any positions
(dllm, d2cache); `StaticKV` is the preallocated set of buffers engine=compiled lends a SequenceKV so
that captured CUDA graphs read and write fixed addresses.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_recorded(keys: dict[int, torch.Tensor], layer: int) -> None:
    if layer not in keys:
        raise RuntimeError(
            f"layer {layer} has no cached keys/values: it was skipped in the full forward that "
            "records them (a reuse strategy must compute every layer at a cache refresh)"
        )


class SequenceKV:
    """Every layer's keys/values over the whole sequence, [B, kv_heads, L, head_dim] each.

    A forward over the whole sequence records them; a forward over a span [start, end) writes its
    fresh keys/values into that slice in place (so the positions it recomputes are never stale) and
    attends to the whole sequence, which is what layers.attention expects of a KVCache.
    """

    def __init__(self, length: int, starts_empty: bool = False):
        self.length = length
        # Block-causal: filled span by span, never by one full forward; unwritten positions hold zeros
        # (attention never reads them: they lie in blocks after the current one, or in padding).
        self.starts_empty = starts_empty
        self.span = (0, length)
        self.fresh: Optional[torch.Tensor] = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def computing(self, start: int, end: int, fresh: Optional[torch.Tensor] = None) -> "SequenceKV":
        """Set the span the next forward computes; returns self to pass as the forward's kv_cache.
        fresh [B, end - start]: write only these positions, keep the others (per-sample spans)."""
        self.span = (start, end)
        self.fresh = fresh
        return self

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.span
        if rows is not None:  # some rows of the span (a position hook's plan)
            check_recorded(self.keys, layer)
            return scatter_positions(self.keys[layer], self.values[layer], rows + start, key, value)
        if (start, end) == (0, self.length):
            # The fresh tensors of a full forward are kept as they are, without a copy.
            self.keys[layer], self.values[layer] = key, value
            return key, value
        if layer not in self.keys:
            if not self.starts_empty:
                raise RuntimeError(
                    f"layer {layer} has no cached keys/values: it was skipped in the full forward that "
                    "records them (a reuse strategy must compute every layer at a cache refresh)"
                )
            shape = (*key.shape[:2], self.length, key.shape[-1])
            self.keys[layer], self.values[layer] = key.new_zeros(shape), value.new_zeros(shape)
        keys, values = self.keys[layer], self.values[layer]
        if self.fresh is not None:
            keep = ~self.fresh[:, None, :, None]
            key = torch.where(keep, keys[:, :, start:end], key)
            value = torch.where(keep, values[:, :, start:end], value)
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        return keys, values


def scatter_positions(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write key/value [B, kv_heads, m, head_dim] at sequence positions [B, m] in place."""
    index = positions[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
    keys.scatter_(2, index, key)
    values.scatter_(2, index, value)
    return keys, values


class PositionKV:
    """Every layer's keys/values over the whole sequence, written at any positions: the KVCache of
    strategies whose forwards compute scattered positions (d2cache) or some rows per layer (dllm).

    `writing(None)` (the default): the forward computes every position, in order; `writing(positions)`
    ([B, n] sequence indices, fixed n): it computes those. A forward over every position without
    `rows` records its keys/values as they are; otherwise the fresh keys/values (of all computed
    positions, or of the `rows` a hook's plan refreshes) are scattered in place.
    """

    def __init__(self):
        self.positions: Optional[torch.Tensor] = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def writing(self, positions: Optional[torch.Tensor]) -> "PositionKV":
        self.positions = positions
        return self

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None and rows is None:
            self.keys[layer], self.values[layer] = key, value
            return key, value
        check_recorded(self.keys, layer)
        positions = self.positions if rows is None else rows if self.positions is None else self.positions.gather(1, rows)
        return scatter_positions(self.keys[layer], self.values[layer], positions, key, value)


class StaticKV:
    """Preallocated [rows, kv_heads, length, head_dim] key and value buffers per layer; a forward
    writes its keys/values at the positions it computes and attends to the whole buffers."""

    def __init__(self, layers: int, rows: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
