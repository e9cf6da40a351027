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

    def buffers(self, layer: int, key_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """This layer's whole-sequence buffers, which the forward writes its span into in place; None
        at a full forward that records fresh keys/values (kept as they are, without a copy)."""
        if layer in self.keys:
            return self.keys[layer], self.values[layer]
        if self.span == (0, self.length):
            return None
        if not self.starts_empty:
            check_recorded(self.keys, layer)
        rows, kv_heads, _, head_dim = key_shape
        return self._allocate(layer, (rows, kv_heads, self.length, head_dim), dtype, device)

    def _allocate(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
        self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)
        return self.keys[layer], self.values[layer]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values handed over rather than written in place: a full forward's fresh ones (kept), or
        some `rows` of the span (a position hook's plan), or a span (a position hook's forward)."""
        start, end = self.span
        if rows is not None:
            check_recorded(self.keys, layer)
            return scatter_positions(self.keys[layer], self.values[layer], rows + start, key, value)
        if (start, end) == (0, self.length) and layer not in self.keys:
            self.keys[layer], self.values[layer] = key, value
            return key, value
        if layer not in self.keys:
            if not self.starts_empty:
                check_recorded(self.keys, layer)
            self._allocate(layer, (*key.shape[:2], self.length, key.shape[-1]), key.dtype, key.device)
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
    `rows` copies its keys/values into the buffers; otherwise the fresh keys/values (of all computed
    positions, or of the `rows` a hook's plan refreshes) are scattered in place. The buffers
    ([B, kv_heads, L, head_dim] per layer, ModelCall.kv_buffers) are only ever written in place, so
    that a captured forward reads and writes the same tensors at every replay.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.positions: Optional[torch.Tensor] = None
        self.keys, self.values = keys, values

    def buffers(self, layer, key_shape, dtype, device) -> None:
        return None  # written by scattering (update)

    def writing(self, positions: Optional[torch.Tensor]) -> "PositionKV":
        self.positions = positions
        return self

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None and rows is None:
            self.keys[layer].copy_(key)
            self.values[layer].copy_(value)
            return self.keys[layer], self.values[layer]
        positions = self.positions if rows is None else rows if self.positions is None else self.positions.gather(1, rows)
        return scatter_positions(self.keys[layer], self.values[layer], positions, key, value)


class StaticKV:
    """Preallocated [rows, kv_heads, length, head_dim] key and value buffers per layer; a forward
    writes its keys/values at the positions it computes and attends to the whole buffers."""

    def __init__(self, layers: int, rows: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (rows, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
