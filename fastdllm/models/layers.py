"""The pieces of the one forward (DiffusionLM.forward): norms, rotary embedding, attention, SwiGLU,
and the per-position hook interface of the strategies that choose what a layer computes.

The families differ in parameter names and config fields, not in this math, so each family file
(llada.py, dream.py, ...) names its modules under common names (`BlockParts`). The forward runs its
small kernels through a `Kernels` table: the plain functions below eagerly, the same functions
compiled under engine=compiled (fastdllm/engine.py), so there is one implementation of the math.
The q/k/v and the gate/up projections run as one matrix product each (`FusedWeights`: the
parameters become views into one fused matrix, so names, checkpoints and training are unchanged).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(Protocol):
    """What attention asks of a key/value cache: given this layer's fresh keys/values for the
    positions being computed, return the keys/values of the whole sequence, in sequence order.

    A layer run under a PositionHook whose plan refreshes only some rows also passes `rows` [B, m]:
    the fresh keys/values are those of these rows of the computed positions (only then)."""

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def buffers(self, layer: int, key_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The whole-sequence key/value buffers [B, kv_heads, L, d] this forward writes its keys/values
        into in place, at the forward's `columns` (the rotation and the write are one kernel when
        compiled); None: hand them to `update` instead."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (as the released models do), then cast back before the affine weight.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm, as one kernel when compiled: (h + delta, rms_norm(h + delta))."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


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


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection [B, n, (heads + 2 kv_heads) d] into rotated q [B, heads, n, d],
    rotated k and v [B, kv_heads, n, d]."""
    B, n, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.view(B, n, heads + 2 * kv_heads, head_dim).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def rotate_qkv_into(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                    fresh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rotate_qkv, writing k and v into the whole-sequence buffers at columns `index` in the same
    kernel when compiled; returns q. fresh [B, n]: write only those positions of each row, keep the others."""
    q, k, v = rotate_qkv(qkv, cos, sin, heads, kv_heads)
    if fresh is not None:
        keep = ~fresh[:, None, :, None]
        k = torch.where(keep, keys.index_select(2, index), k)
        v = torch.where(keep, values.index_select(2, index), v)
    keys.index_copy_(2, index, k)
    values.index_copy_(2, index, v)
    return q


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def no_backend_choice(q: torch.Tensor) -> ContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Kernels:
    """The small kernels the one forward calls. Eager: these functions as written; engine=compiled
    replaces them with torch.compile'd copies of the same functions (one fused kernel each) and
    chooses attention backends per query shape."""

    norm: Callable = rms_norm
    add_norm: Callable = add_rms_norm
    rotary: Callable = rotary_cos_sin
    rotate: Callable = rotate_qkv
    rotate_into: Callable = rotate_qkv_into
    gate: Callable = silu_gate
    # Called with the queries [B, heads, n, d]: the context the attention kernel runs in.
    attention_backends: Callable[[torch.Tensor], ContextManager] = no_backend_choice


EAGER_KERNELS = Kernels()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of the computed queries over every key of the sequence.

    q: [B, heads, n, d]; k, v: [B, kv_heads, L, d] (rotary applied). key_mask: [B, L] bool, True
    where a key may be attended (False on left padding), or a full [B or 1, 1, n, L] bool mask per
    query (block-causal families, training masks), or None when nothing is padded.
    """
    mask = key_mask if key_mask is None or key_mask.dim() == 4 else key_mask[:, None, None, :]
    # Grouped-query attention without materialising the repeated key/value heads.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# What the one forward implements beyond a plain pre-norm block: biases on the q/k/v projections
# (Dream, Qwen2) are read from the modules themselves; a family lists the variants it uses.
BLOCK_VARIANTS = frozenset({"qkv_bias"})


class BlockParts(NamedTuple):
    """A pre-norm block's modules under common names (each family names them its own way): what
    the one forward (`transformer_layer`) computes with."""

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


class FusedWeights:
    """One block's weights as the forward multiplies with them: q/k/v as one matrix (and bias), gate/up
    as one. Built once per block; the parameters become views into the fused matrices, so nothing is
    duplicated and parameter names, checkpoints and optimizers see the same tensors. Where the views
    are gone (the module was moved to another device or dtype) they are fused again; while gradients
    are recorded (training) the fused matrices are concatenated afresh so that gradients reach the
    parameters."""

    def __init__(self, parts: BlockParts):
        self.parts = parts
        self.qkv, self.gate_up = (parts.q_proj, parts.k_proj, parts.v_proj), (parts.gate, parts.up)
        self.qkv_weight = fuse_rows(self.qkv, "weight")
        biases = [p.bias for p in self.qkv]
        self.qkv_bias = None if all(b is None for b in biases) else fuse_rows(self.qkv, "bias")
        self.gate_up_weight = fuse_rows(self.gate_up, "weight")

    def current(self) -> bool:
        """Whether the parameters still view the fused matrices (a host-side check, no device read)."""
        return (self.parts.q_proj.weight.data_ptr() == self.qkv_weight.data_ptr()
                and self.parts.gate.weight.data_ptr() == self.gate_up_weight.data_ptr()
                and self.parts.q_proj.weight.dtype == self.qkv_weight.dtype)

    def projections(self) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(q/k/v weight, q/k/v bias or None, gate/up weight) to multiply with."""
        if torch.is_grad_enabled():
            bias = None if self.qkv_bias is None else torch.cat([p.bias for p in self.qkv])
            return (torch.cat([p.weight for p in self.qkv]), bias, torch.cat([p.weight for p in self.gate_up]))
        return self.qkv_weight, self.qkv_bias, self.gate_up_weight


def fuse_rows(linears: tuple[nn.Linear, ...], name: str) -> torch.Tensor:
    """Concatenate the linears' `name` parameters along the output rows, and make each parameter a
    view into the result: one matrix product computes all of them, and no memory is duplicated."""
    parts = [getattr(linear, name) for linear in linears]
    fused = torch.cat([p.detach() for p in parts])
    offset = 0
    for part in parts:
        rows = part.shape[0]
        part.data = fused[offset: offset + rows]
        offset += rows
    return fused


def fused_weights(block: nn.Module) -> FusedWeights:
    """The block's FusedWeights, built on first use (and again if its parameters moved)."""
    weights = block.__dict__.get("_fused_weights")
    if weights is None or not weights.current():
        weights = block.__dict__["_fused_weights"] = FusedWeights(block.parts())
    return weights


class ReusedLayers(NamedTuple):
    """The layers a reuse strategy reuses at the next forward (reuse=layer). The forward keeps each
    such layer's residual contribution (its output minus its input) per column of the sequence: a
    forward that computes the layer records it at the computed columns, one that skips it adds it."""

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
    pending: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    parts: BlockParts,
    weights: FusedWeights,
    *,
    layer: int,
    key_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
    columns: Optional[torch.Tensor],
    fresh: Optional[torch.Tensor],
    kernels: Kernels,
    query_rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm layer over h + pending [B, n, d]: + attention(attn_norm), then + swiglu(mlp_norm).
    Returns (h, feed-forward output): the caller adds the second, in the kernel of the next norm.
    `pending` is what the previous layer left to add (None: nothing). Keys/values go to the kv_cache:
    in place at `columns` [n] (fresh [B, n]: only those positions per row) when it lends buffers.
    `query_rows` [m]: run queries, attention and feed-forward for those rows only (the last layer,
    whose other outputs nothing reads)."""
    qkv_weight, qkv_bias, gate_up_weight = weights.projections()
    if pending is None:
        x = kernels.norm(h, parts.attn_norm.weight, parts.attn_norm.eps)
    else:
        h, x = kernels.add_norm(h, pending, parts.attn_norm.weight, parts.attn_norm.eps)
    rows, n, _ = h.shape
    qkv = F.linear(x, qkv_weight, qkv_bias)
    head_dim = qkv.shape[-1] // (parts.heads + 2 * parts.kv_heads)
    buffers = None if kv_cache is None else kv_cache.buffers(layer, (rows, parts.kv_heads, n, head_dim), h.dtype, h.device)
    if buffers is None:
        q, k, v = kernels.rotate(qkv, cos, sin, parts.heads, parts.kv_heads)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
    else:
        k, v = buffers
        q = kernels.rotate_into(qkv, cos, sin, parts.heads, parts.kv_heads, k, v, columns, fresh)
    if query_rows is not None:
        q, h = q.index_select(2, query_rows), h.index_select(1, query_rows)
        if key_mask is not None and key_mask.dim() == 4:  # a mask per query
            key_mask = key_mask.index_select(2, query_rows)
    with kernels.attention_backends(q):
        a = attention(q, k, v, key_mask)
    attention_out = F.linear(a.transpose(1, 2).reshape(rows, q.shape[2], -1), parts.out_proj.weight, parts.out_proj.bias)
    h, x = kernels.add_norm(h, attention_out, parts.mlp_norm.weight, parts.mlp_norm.eps)
    return h, F.linear(kernels.gate(F.linear(x, gate_up_weight)), parts.down.weight)


def hooked_transformer_layer(
    h: torch.Tensor,
    pending: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    parts: BlockParts,
    weights: FusedWeights,
    *,
    layer: int,
    key_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
    kernels: Kernels,
    position_hook: PositionHook,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformer_layer where the hook's plan decides per row what is computed (see PositionHook)."""
    attn_norm, q_proj, k_proj, v_proj, out_proj, ff_norm, gate, up, down, heads, kv_heads = parts
    _, _, gate_up_weight = weights.projections()
    if pending is None:
        normed = kernels.norm(h, attn_norm.weight, attn_norm.eps)
    else:
        h, normed = kernels.add_norm(h, pending, attn_norm.weight, attn_norm.eps)
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
    weights_out = None
    if plan.attention_weights:
        a, weights_out = attention_with_weights(q, k, v, key_mask)
    else:
        with kernels.attention_backends(q):
            a = attention(q, k, v, key_mask)
    B, _, k_rows, head_dim = q.shape
    attention_out = scatter_rows(plan.attention_out, rows, out_proj(a.transpose(1, 2).reshape(B, k_rows, heads * head_dim)))
    h = h + attention_out
    if plan.feed_forward_rows is not None:
        rows = plan.feed_forward_rows(attention_out)
    x = kernels.norm(gather_rows(h, rows), ff_norm.weight, ff_norm.eps)
    feed_forward_out = scatter_rows(plan.feed_forward_out, rows, F.linear(kernels.gate(F.linear(x, gate_up_weight)), down.weight))
    position_hook.record(layer, attention_out, feed_forward_out, weights_out)
    return h, feed_forward_out
