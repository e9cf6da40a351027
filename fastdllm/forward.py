"""One forward pass as the strategies see it: `ModelCall`, the model within one batch.

A cache strategy asks `call.predict` (a span of positions) or `call.predict_at` (scattered
positions) for logits; the call runs the family's one forward (models/) eagerly or through
engine=compiled, applies the logit shift and classifier-free guidance, and counts forward passes,
positions and layer-positions computed, so that every strategy is counted the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch

from fastdllm.engine import CompiledEngine
from fastdllm.models.base import DiffusionLM
from fastdllm.models.kv import SequenceKV
from fastdllm.models.layers import KVCache, LayerPlan, PositionHook, ReusedLayers
from fastdllm.reuse.base import ReuseStrategy


class ForwardShape(NamedTuple):
    """What one forward computed, for the bench's floor: its rows, the positions each layer ran over
    (the mean over layers where a position hook chooses per layer), the positions with logits, the
    sequence length, and how many of the model's layers it ran."""

    rows: int
    positions: float
    logits: int
    length: int
    layers: int
    num_layers: int


class ModelCall:
    """The model as strategies see it within one batch: the current tokens, their positions and padding.

    `predict` computes a span of positions and returns the logits that predict a block, handling
    the family's logit shift and classifier-free guidance, and counts what it computed.
    """

    def __init__(self, model: DiffusionLM, tokens: torch.Tensor, key_mask: torch.Tensor, prompt_mask: torch.Tensor,
                 cfg_scale: float, reuse: ReuseStrategy, engine: Optional[CompiledEngine] = None,
                 attention_block: Optional[int] = None, sub_block_length: Optional[int] = None):
        self.model = model
        embedding, blocks, _, _ = model.parts()
        self.num_layers, self.width, self.dtype = len(blocks), embedding.weight.shape[1], embedding.weight.dtype
        # engine=compiled runs the forwards it supports; None runs DiffusionLM.forward (engine=eager).
        self.engine = engine
        self.tokens = tokens
        self.length = tokens.shape[1]
        self.cfg_scale = cfg_scale
        self.kept: dict[tuple, torch.Tensor] = {}
        # None when nothing is padded: attention then needs no mask (decided once per batch, since
        # reading a GPU tensor's value in every layer would stall the device). Kept in a buffer, so
        # that strategies reading it inside a captured forward read this batch's.
        self.key_mask = None if bool(key_mask.all()) else self.buffer(("key_mask",), key_mask.shape, key_mask.dtype).copy_(key_mask)
        self.prompt_mask = prompt_mask
        # Absolute positions, 0 at each sample's first prompt token (left padding does not shift them).
        self.position_ids = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
        self.reuse = reuse
        self.shift = model.logit_shift
        # Block-causal families: the block size of their attention mask (the loop lays the batch out so
        # that every sample's blocks start at the same columns); None: bidirectional attention.
        self.attention_block = attention_block
        # The sub-block length (the block length when blocks have no sub-blocks), and, set by the loop
        # before each step, the positions of the block [B, block_length] this step may commit (each
        # sample's current sub-block).
        self.sub_block_length = sub_block_length
        self.decoding: Optional[torch.Tensor] = None
        self.forwards = 0
        self.positions = 0
        # (rows, positions computed, positions with logits, sequence length) of every forward of the batch.
        self.forward_shapes: list[ForwardShape] = []
        self.layer_positions = 0
        self.hooked = False

    def buffer(self, name: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-initialised tensor a strategy keeps across the batch's forwards and updates in place.
        Under engine=compiled it is the engine's, the same for every batch of this shape, so that the
        captured graphs that read and write it stay valid (it is then not zeroed again per batch)."""
        if self.engine is not None:
            return self.engine.buffer(self.rows, self.length, name, shape, dtype)
        if (name, shape, dtype) not in self.kept:
            self.kept[(name, shape, dtype)] = torch.zeros(shape, dtype=dtype, device=self.tokens.device)
        return self.kept[(name, shape, dtype)]

    @property
    def rows(self) -> int:
        """Rows of every forward of the batch: the samples, twice with classifier-free guidance."""
        return self.tokens.shape[0] * (2 if self.cfg_scale > 0 else 1)

    def kv_buffers(self, name: str) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Key and value buffers [rows, kv_heads, L, head_dim] for every layer (self.buffer's, so kept
        in place under engine=compiled): the storage of a models.kv.PositionKV."""
        parts = self.model.parts()[1][0].parts()
        shape = (self.rows, parts.kv_heads, self.length, parts.q_proj.out_features // parts.heads)
        return ({layer: self.buffer((name, "keys", layer), shape, self.dtype) for layer in range(self.num_layers)},
                {layer: self.buffer((name, "values", layer), shape, self.dtype) for layer in range(self.num_layers)})

    def attention_mask(self, queries: torch.Tensor, keys: tuple[int, int], first: Optional[int] = None
                       ) -> Optional[torch.Tensor]:
        """What the queries at columns `queries` ([n], or [B, n]) may attend among the key columns
        [keys[0], keys[1]): the key mask (bidirectional), or the block-causal mask [B or 1, 1, n, keys].
        `first`: the first query column of a span (a host value)."""
        key_start, key_end = keys
        key_mask = self.key_mask
        if key_mask is not None and (key_start, key_end) != (0, self.length):
            key_mask = key_mask[:, key_start:key_end]
        size = self.attention_block
        if size is None or (first is not None and (key_end - 1) // size <= first // size):
            return key_mask  # bidirectional, or every key lies in the first query's block or before it
        query_columns = queries[..., :, None]
        key_columns = torch.arange(key_start, key_end, device=queries.device)
        mask = key_columns // size <= query_columns // size
        if key_mask is not None:
            # A padding query sees only itself: a query with no key at all would make attention NaN.
            mask = mask & key_mask[:, None, :] | (key_columns == query_columns)
        return mask.unsqueeze(-3) if mask.dim() == 3 else mask[None, None]

    @torch.no_grad()
    def predict(self, block_start: int, block_end: int, compute: tuple[int, int],
                kv_cache: Optional[KVCache] = None, *, position_hook: Optional[PositionHook] = None,
                positions_computed: Optional[int] = None) -> torch.Tensor:
        """Run the model over positions compute=(start, end) and return logits [B, block_end -
        block_start, V] predicting the block's tokens. Keys/values outside the span come from kv_cache.
        A position_hook chooses per layer which of them are computed (models.layers.PositionHook);
        its strategy then says how many positions that amounts to (`positions_computed`)."""
        start, end = compute
        first, last = block_start - self.shift, block_end - self.shift
        # The block's positions predicted from inside the span; block-causal families may compute part
        # of a block (a sub-block, or the block without the position before it) and get logits 0 for the rest.
        lo, hi = max(first, start), min(last, end)
        covers = 0 <= start <= first and last <= end <= self.length
        if not (covers or (self.attention_block is not None and 0 <= start and lo < hi and end <= self.length)):
            raise ValueError(f"computing positions [{start}, {end}) cannot predict block [{block_start}, {block_end})")
        # A forward over the whole sequence with a key/value cache records every layer's keys/values.
        records_kv = kv_cache is not None and (start, end) == (0, self.length)
        self.reuse.begin_forward(self, start, end, records_kv=records_kv, cache_hook=position_hook is not None)
        key_mask = self.attention_mask(torch.arange(start, end, device=self.tokens.device),
                                       (0, self.length) if kv_cache is not None else (start, end), first=start)
        logits = self._forward(lambda t: t[:, start:end], key_mask, kv_cache, position_hook, slice(lo - start, hi - start),
                               start)
        self.positions += end - start if positions_computed is None else positions_computed
        if (lo, hi) != (first, last):
            block = logits.new_zeros(logits.shape[0], last - first, logits.shape[-1])
            block[:, lo - first : hi - first] = logits
            logits = block
        return logits

    @torch.no_grad()
    def predict_at(self, positions: torch.Tensor, logits_rows: torch.Tensor, kv_cache: KVCache, *,
                   position_hook: Optional[PositionHook] = None) -> torch.Tensor:
        """Run the model over the given positions [B, n] (increasing along each row; kv_cache places
        their keys/values and holds the others') and return the logits [B, m, V] at rows
        `logits_rows` [B, m] of them (the caller applies the logit shift)."""
        self.reuse.begin_forward_at(positions)
        key_mask = self.attention_mask(positions, (0, self.length))
        logits = self._forward(lambda t: t.gather(1, positions), key_mask, kv_cache, position_hook, logits_rows)
        self.positions += positions.shape[1]
        return logits

    def _forward(self, select: Callable[[torch.Tensor], torch.Tensor], key_mask: Optional[torch.Tensor],
                 kv_cache: Optional[KVCache], position_hook: Optional[PositionHook],
                 logits_for: slice | torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        """The model over the positions `select` takes from a [B, L] tensor under `key_mask`, with CFG
        and the mask token never predicted; counts the forward. `start`: the first column of a span
        (None: scattered positions, which the engine does not run)."""
        ids, positions = select(self.tokens), select(self.position_ids)
        if self.cfg_scale > 0:
            # The unconditional copy sees the prompt as mask tokens; both run as one batch.
            unconditional = self.tokens.masked_fill(self.prompt_mask, self.model.config.mask_token_id)
            ids = torch.cat([ids, select(unconditional)])
            positions = positions.repeat(2, 1)
            if key_mask is not None and key_mask.shape[0] > 1:
                key_mask = key_mask.repeat(2, *[1] * (key_mask.dim() - 1))
            if isinstance(logits_for, torch.Tensor):
                logits_for = logits_for.repeat(2, 1)
        reuse_hook = self.reuse.position_hook(kv_cache)
        if reuse_hook is not None:  # begin_forward refused a cache with a position hook of its own
            position_hook, kv_cache = reuse_hook
        self.hooked = position_hook is not None
        on_host = not self.reuse.runs_compiled()  # the strategy decides per layer on the host: run_layer
        reused = ReusedLayers() if on_host else self.reuse.reused_layers()
        rows, n = ids.shape
        contributions = {layer: self.buffer(("contribution", layer), (rows, self.length, self.width), self.dtype)
                         for layer in reused.layers}
        # The sequence columns a span's keys/values and contributions are written at.
        columns = None if start is None else torch.arange(start, start + n, device=ids.device)
        fresh = kv_cache.fresh if isinstance(kv_cache, SequenceKV) else None
        if self.hooked:
            position_hook = CountingHook(position_hook, self)
        options = dict(kv_cache=kv_cache, logits_for=logits_for, columns=columns, fresh=fresh,
                       position_hook=position_hook, reused=reused, contributions=contributions)
        if self.engine is not None and not on_host and self.engine.supports(kv_cache):
            logits = self.engine.forward(ids, positions, key_mask, **options)
        else:
            logits = self.model(ids, positions, key_mask, layer_runner=self.run_layer if on_host else None, **options)
        layers = self.num_layers - (len(reused.layers) if reused.skipping else 0)
        if self.hooked:
            self.layer_positions += position_hook.counted
            computed = position_hook.counted / self.num_layers
        else:
            # Every layer not skipped runs over every computed position (run_layer counts on the host path).
            self.layer_positions += 0 if on_host else n * layers
            computed = n
        self.forward_shapes.append(ForwardShape(rows, computed, logits.shape[1], self.length, layers, self.num_layers))
        logits = logits[..., : self.model.config.vocab_size]
        if self.cfg_scale > 0:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + (self.cfg_scale + 1) * (conditional - unconditional)
        # The mask token is never a prediction: committing it would leave a position masked but counted as decoded.
        logits[..., self.model.config.mask_token_id] = -torch.inf
        self.forwards += 1
        return logits

    def run_layer(self, layer: int, hidden: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The reuse strategy's layer runner, counting the positions each real layer computation runs
        over (shapes are host values, so counting costs no device read); with a position hook, the
        CountingHook counts the positions its plans compute instead."""

        def counted(x: torch.Tensor) -> torch.Tensor:
            if not self.hooked:
                self.layer_positions += x.shape[1]
            return compute(x)

        return self.reuse.run_layer(layer, hidden, counted)


class CountingHook:
    """A PositionHook passed through, counting in `counted` the positions each layer's plan computes;
    a position whose attention runs but whose feed-forward is reused counts half (rounded down per
    layer). Plans are made as the forward is traced, so under CUDA graphs the engine keeps the count
    of the captured forward and sets it again at each replay."""

    def __init__(self, hook: PositionHook, call: ModelCall):
        self.hook, self.call = hook, call
        self.counted = 0

    def capture_key(self):
        """What distinguishes this forward's graph (the hook's own key, None: it cannot be captured)."""
        return getattr(self.hook, "capture_key", lambda: None)()

    def state_tensors(self) -> list[torch.Tensor]:
        """The tensors the hook updates in place during a forward."""
        return list(getattr(self.hook, "state_tensors", lambda: [])())

    def plan(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor, value_proj) -> LayerPlan:
        plan = self.hook.plan(layer, hidden, normed, value_proj)
        attention_rows = hidden.shape[1] if plan.compute is None else plan.compute.shape[1]
        if plan.feed_forward_rows is None:
            self.counted += attention_rows
            return plan
        choose = plan.feed_forward_rows

        def counted(attention_out: torch.Tensor) -> Optional[torch.Tensor]:
            rows = choose(attention_out)
            self.counted += (attention_rows + (attention_rows if rows is None else rows.shape[1])) // 2
            return rows

        return dataclasses.replace(plan, feed_forward_rows=counted)

    def record(self, layer, attention_out, feed_forward_out, attention_weights) -> None:
        self.hook.record(layer, attention_out, feed_forward_out, attention_weights)
