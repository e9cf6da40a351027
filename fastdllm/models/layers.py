"""Building blocks shared by the model families: RMSNorm, rotary embedding, attention, SwiGLU.

The families differ in parameter names and config fields, not in this math, so each family file
(llada.py, dream.py, ...) wires these blocks under its own official names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(Protocol):
    """What attention asks of a key/value cache: given this layer's fresh keys/values for the
    positions being computed, return the keys/values of the whole sequence, in sequence order.

    A layer run under a PositionHook whose plan refreshes only some rows also passes `rows` [B, m]:
    the fresh keys/values are those of these rows of the computed positions (only then)."""

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as the released models do), then cast back before the affine weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, n, head_dim] in float32 for absolute positions [B, n] (rotate-half layout)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, n, head_dim] in float32 and cast back to its dtype."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int,
    key_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
    attn_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bidirectional attention of the computed queries over every key of the sequence.

    q: [B, heads, n, d]; k, v: [B, kv_heads, n, d] for the computed positions (rotary applied).
    key_mask: [B, L] bool, True where a key may be attended (False on left padding), or a full
    [B or 1, 1, n, L] bool mask per query (block-causal families, training masks), or None when
    nothing is padded.
    attn_bias: optional [B or 1, 1, n, L] bool mask for families that are not fully bidirectional.
    """
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v)
    mask = key_mask if key_mask is None or key_mask.dim() == 4 else key_mask[:, None, None, :]
    if attn_bias is not None:
        mask = attn_bias if mask is None else mask & attn_bias
    # Grouped-query attention without materialising the repeated key/value heads.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class BlockParts(NamedTuple):
    """A pre-norm block's modules under common names (each family names them its own way): what
    `transformer_layer` and the compiled engine (fastdllm/engine.py) compute with."""

    attn_norm: RMSNorm
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    out_proj: nn.Linear
    mlp_norm: RMSNorm
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    heads: int
    kv_heads: int


def self_attention(
    x: torch.Tensor,
    q_proj: nn.Linear,
    k_proj: nn.Linear,
    v_proj: nn.Linear,
    out_proj: nn.Linear,
    *,
    heads: int,
    kv_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer: int,
    key_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
) -> torch.Tensor:
    """Project x [B, n, d] to rotated queries/keys and values, attend, project back; the families
    pass their own (officially named) projections."""
    B, n, _ = x.shape
    head_dim = q_proj.out_features // heads
    q = q_proj(x).view(B, n, heads, head_dim).transpose(1, 2)
    k = k_proj(x).view(B, n, kv_heads, head_dim).transpose(1, 2)
    v = v_proj(x).view(B, n, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    a = attention(q, k, v, layer=layer, key_mask=key_mask, kv_cache=kv_cache)
    return out_proj(a.transpose(1, 2).reshape(B, n, heads * head_dim))


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """The feed-forward of every family: down(silu(gate(x)) * up(x))."""
    return down(F.silu(gate(x)) * up(x))


class ReusedLayers(NamedTuple):
    """What engine=compiled does at the next forward with the layers a strategy reuses. The engine
    keeps each such layer's residual contribution (its output minus its input) per position of the
    sequence: a forward that computes the layer records it at the computed positions."""

    # The layers whose contribution is kept.
    layers: frozenset[int] = frozenset()
    # The forward adds the kept contributions instead of computing these layers (which then write no keys/values).
    skipping: bool = False


# ----------------------------------------------------------------- per-position layer hook


@dataclass
class LayerPlan:
    """What one layer computes, chosen by a PositionHook. Index tensors hold rows of the layer's
    input `hidden` [B, n, d] (row = position within the forward's computed span), a fixed count per
    row of the batch (pad by repeating a row: a repeated row computes the same values twice).

    - `compute` [B, k]: rows whose queries, attention and feed-forward are computed; None = every row.
    - `refresh` [B, m]: rows whose keys/values are projected and handed to
      `kv_cache.update(layer, k, v, rows=refresh)`, which places them and returns the keys/values
      of the whole sequence (cache.kv.SequenceKV and PositionKV do); None = the `compute` rows.
    - `attention_out`, `feed_forward_out` [B, n, d]: the branch outputs (before the residual add)
      used for the rows not computed; required when `compute` is not None.
    - `attention_weights`: also compute the head-mean attention probabilities of the computed
      queries [B, k, L] (explicit softmax instead of the fused kernel: only where asked).
    - `feed_forward_rows`: called with the attention output [B, n, d] (all rows), returns the rows
      [B, j] whose feed-forward is computed (None = the `compute` rows); `feed_forward_out` then
      holds the feed-forward outputs of the others. None: the feed-forward runs on the `compute` rows.
    """

    compute: Optional[torch.Tensor] = None
    refresh: Optional[torch.Tensor] = None
    attention_out: Optional[torch.Tensor] = None
    feed_forward_out: Optional[torch.Tensor] = None
    attention_weights: bool = False
    feed_forward_rows: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None


class PositionHook(Protocol):
    """Per layer and per position, what a forward recomputes and what it takes from earlier forwards.

    The layer (see `transformer_layer`) calls, with h its input [B, n, d]:
      plan = hook.plan(layer, h, attn_norm(h), v_proj)      # v_proj: the layer's value projection,
                                                            # for strategies that select by values
      q at plan.compute rows; k, v at plan.refresh rows; K, V = kv_cache.update(layer, k, v, rows=plan.refresh)
      a = out_proj(attention(q, K, V)) scattered into plan.attention_out  -> A [B, n, d]
      h = h + A
      f = feed_forward(ff_norm(h)) at plan.compute rows, scattered into plan.feed_forward_out -> F
      hook.record(layer, A, F, weights)                     # weights: [B, k, L] or None
      return h + F
    The residual stream flows through every row; only the branch outputs are reused. Shapes are
    fixed by the plan's index counts, and the layer reads nothing back to the host.

    Example: recompute only `rows` [B, k] and reuse the branch outputs of the last full forward
    (kv: a cache.kv.PositionKV or SequenceKV, which keeps every other row's keys/values).

        class Reuse:
            def __init__(self): self.outputs, self.rows = {}, None
            def plan(self, layer, hidden, normed, value_proj):
                if self.rows is None:                     # full forward: compute and record all
                    return LayerPlan()
                attention_out, feed_forward_out = self.outputs[layer]
                return LayerPlan(compute=self.rows, attention_out=attention_out, feed_forward_out=feed_forward_out)
            def record(self, layer, attention_out, feed_forward_out, weights):
                self.outputs[layer] = (attention_out, feed_forward_out)

        logits = model(ids, positions, key_mask, kv_cache=kv, position_hook=hook)
    """

    def plan(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor, value_proj: nn.Module) -> LayerPlan: ...

    def record(self, layer: int, attention_out: torch.Tensor, feed_forward_out: torch.Tensor,
               attention_weights: Optional[torch.Tensor]) -> None: ...


def gather_rows(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, n, ...] at rows [B, k] -> [B, k, ...]; rows None = all."""
    if rows is None:
        return x
    index = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(*rows.shape, *x.shape[2:])
    return x.gather(1, index)


def scatter_rows(base: Optional[torch.Tensor], rows: Optional[torch.Tensor], fresh: torch.Tensor) -> torch.Tensor:
    """A copy of base [B, n, d] with rows [B, k] replaced by fresh [B, k, d]; rows None = fresh itself."""
    if rows is None:
        return fresh
    return base.scatter(1, rows[..., None].expand(-1, -1, base.shape[-1]), fresh.to(base.dtype))


def attention_with_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """attention() computed explicitly, also returning the head-mean probabilities [B, q_len, L]
    (key_mask as attention() takes it: [B, L], or [B or 1, 1, q_len, L] per query).
    Query heads are grouped over their key/value head instead of repeating the keys/values."""
    B, heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.float().view(B, kv_heads, heads // kv_heads, n, head_dim)
    scores = grouped @ k.float()[:, :, None].transpose(-1, -2) / head_dim**0.5  # [B, kv_heads, groups, n, L]
    if key_mask is not None:
        mask = key_mask[:, None] if key_mask.dim() == 4 else key_mask[:, None, None, None, :]
        scores = scores.masked_fill(~mask, -torch.inf)
    probs = scores.softmax(-1)
    out = (probs.to(v.dtype) @ v[:, :, None]).view(B, heads, n, head_dim)
    return out, probs.mean((1, 2))


def project_heads(x: torch.Tensor, proj: nn.Linear, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                  rotate: bool = True) -> torch.Tensor:
    """proj(x) [B, n, heads * head_dim] as [B, heads, n, head_dim], rotary applied when `rotate`."""
    B, n, _ = x.shape
    out = proj(x).view(B, n, heads, -1).transpose(1, 2)
    return apply_rotary(out, cos, sin) if rotate else out


def transformer_layer(
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    parts: BlockParts,
    *,
    layer: int,
    key_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
    position_hook: Optional[PositionHook] = None,
) -> torch.Tensor:
    """One pre-norm layer, h + attention(attn_norm(h)), then + swiglu(mlp_norm(h)), with the family's
    modules under common names (`parts`). With a position_hook, the hook's plan decides per row what
    is computed (see PositionHook); without one, every row is."""
    attn_norm, q_proj, k_proj, v_proj, out_proj, ff_norm, gate, up, down, heads, kv_heads = parts

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, gate, up, down)

    if position_hook is None:
        h = h + self_attention(attn_norm(h), q_proj, k_proj, v_proj, out_proj, heads=heads, kv_heads=kv_heads,
                               cos=cos, sin=sin, layer=layer, key_mask=key_mask, kv_cache=kv_cache)
        return h + feed_forward(ff_norm(h))
    normed = attn_norm(h)
    plan = position_hook.plan(layer, h, normed, v_proj)
    rows, refresh = plan.compute, plan.refresh if plan.refresh is not None else plan.compute
    if refresh is not None and kv_cache is None:
        raise ValueError("a plan that refreshes a subset of rows needs a kv_cache holding the other keys/values")
    x_rows = gather_rows(normed, rows)
    cos_rows, sin_rows = gather_rows(cos, rows), gather_rows(sin, rows)
    q = project_heads(x_rows, q_proj, heads, cos_rows, sin_rows)
    if refresh is rows:
        x_kv, cos_kv, sin_kv = x_rows, cos_rows, sin_rows
    else:
        x_kv, cos_kv, sin_kv = gather_rows(normed, refresh), gather_rows(cos, refresh), gather_rows(sin, refresh)
    k = project_heads(x_kv, k_proj, kv_heads, cos_kv, sin_kv)
    v = project_heads(x_kv, v_proj, kv_heads, cos_kv, sin_kv, rotate=False)
    if kv_cache is not None:
        k, v = kv_cache.update(layer, k, v) if refresh is None else kv_cache.update(layer, k, v, rows=refresh)
    if key_mask is not None and key_mask.dim() == 4 and rows is not None:
        # A per-query mask (block-causal families): the computed rows' own lines of it.
        batch_rows, count = rows.shape
        key_mask = key_mask.expand(batch_rows, -1, -1, -1).gather(
            2, rows[:, None, :, None].expand(batch_rows, 1, count, key_mask.shape[-1]))
    weights = None
    if plan.attention_weights:
        a, weights = attention_with_weights(q, k, v, key_mask)
    else:
        a = attention(q, k, v, layer=layer, key_mask=key_mask, kv_cache=None)
    B, _, k_rows, head_dim = q.shape
    attention_out = scatter_rows(plan.attention_out, rows, out_proj(a.transpose(1, 2).reshape(B, k_rows, heads * head_dim)))
    h = h + attention_out
    if plan.feed_forward_rows is not None:
        rows = plan.feed_forward_rows(attention_out)
    feed_forward_out = scatter_rows(plan.feed_forward_out, rows, feed_forward(ff_norm(gather_rows(h, rows))))
    position_hook.record(layer, attention_out, feed_forward_out, weights)
    return h + feed_forward_out
