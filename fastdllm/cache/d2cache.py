"""d2Cache (Dual aDaptive Cache, arXiv 2509.23094): each step recomputes only a selection of positions
(embedding, projections, attention, feed-forward); every other position's keys/values come from the
cache, which the selected positions' fresh keys/values are scattered into.

The first forward of a batch computes every position. After it, each step selects:
1. masked positions, by certainty density: each masked position's last computed confidence (top-1
   probability) times the Gaussian density (width `sigma`) of decoded positions around it
   (generation.base.certainty_density; the prompt counts as decoded). The candidates run from the
   current block to the first block boundary holding at least `current_k` masked positions; the
   `current_k` best are taken, the current block's masked positions always among them (the loop
   needs their logits every step; published: a bias that does the same when current_k >=
   block_length, the default 32 = 32);
2. the positions committed at the previous step (their keys/values changed from [MASK]);
3. among all positions not yet selected (left padding excluded), those holding the top
   `rollout_p` share of attention importance (nucleus, at least one), by attention rollout of the
   previous forward: R <- normalize(A + I) R over the layers, A the head-mean attention of the
   rows computed (identity rows elsewhere), importance = column sums of R over real rows;
4. for Dream (logit shift), a masked position selects the position before it instead (whose
   logits predict it), so that the block is predicted; positions committed last step stay themselves;
5. with `inflate_w > 0`, every position between two selected ones at most `inflate_w` apart.
The confidences of the selected masked positions are updated from this step's logits at every
step (the published code means to but, by an operator-precedence slip, keeps the first step's).

Shapes: every row of the batch computes the same number of positions, the batch's largest
selection rounded up to a multiple of COUNT_STEP (16; at most the sequence), a row with fewer
repeating its last selected position (a repeated position recomputes the same values, so a row
decodes as it would alone; the published code tops up with more positions instead). Positions
computed count the repeats: they are computed. That count depends on the data, so d2cache reads one
integer per step back from the device: the visible exception to the fixed-shape rule
(prefix/dual/dllm read none); the rounding keeps the forward shapes, and so the captured graphs
under engine=compiled, few.

Attention weights (for the rollout) are computed only where used: in d2cache's forwards, by an
explicit softmax over the selected queries only (`LayerPlan.attention_weights`); every other cache
keeps the fused attention kernel, and with rollout_p = 0 or 1 (rollout unused) d2cache does too.
The rollout update touches only the computed rows of R (k L^2 per layer instead of L^3).

Certainty-prior guided decoding (the generation's `sigma`, default null = this cache's `sigma`;
generation.sigma=0 turns it off) orders commits by confidence times the same density, which
decodes roughly left to right. A threshold rule still compares the model's confidence (the published
code compares the weighted score, which at threshold 0.9 commits about one token per step; see
generation.vanilla.commit_most_confident).

Degenerate setting: rollout_p=1 selects every position at every step; with generation.sigma=0 it
decodes exactly as cache=none. Batched rows step in lockstep without a threshold rule and then
decode as alone; with a threshold, a row whose block is done keeps being refreshed while the others
finish theirs (as published).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastdllm.cache.base import CACHES, CacheConfig, CacheStrategy
from fastdllm.models.kv import PositionKV
from fastdllm.generation.base import certainty_density
from fastdllm.models.layers import LayerPlan
from fastdllm.registry import check


# The positions a step computes are padded (by repeating a row's last one) to a multiple of this.
COUNT_STEP = 16


@dataclass
class D2CacheConfig(CacheConfig):
    name: str = "d2cache"
    # Share of attention importance (rollout) whose positions are recomputed among the non-selected ones.
    rollout_p: float = 0.1
    # Masked positions recomputed per step, by certainty density.
    current_k: int = 32
    # Width of the Gaussian density of decoded positions (selection, and the decoding prior by default).
    sigma: float = 10.0
    # Fill gaps between selected positions at most this far apart (0 = off).
    inflate_w: int = 4

    def __post_init__(self) -> None:
        check(0 <= self.rollout_p <= 1, "rollout_p", self.rollout_p, "must be in [0, 1]")
        check(self.current_k >= 1, "current_k", self.current_k, "must be >= 1")
        check(self.sigma > 0, "sigma", self.sigma, "must be > 0")
        check(self.inflate_w >= 0, "inflate_w", self.inflate_w, "must be >= 0")


def nucleus(importance: torch.Tensor, candidates: torch.Tensor, share: float) -> torch.Tensor:
    """Among candidates [B, L], the fewest (at least one) highest-importance positions whose
    importance reaches `share` of the candidates' total; share 1 = every candidate."""
    if share >= 1:
        return candidates
    scores = importance.masked_fill(~candidates, 0)
    sorted_scores, order = scores.sort(-1, descending=True)
    cumulative = (sorted_scores / sorted_scores.sum(-1, keepdim=True).clamp_min(1e-12)).cumsum(-1)
    keep = cumulative <= share
    keep[:, 0] = True
    return torch.zeros_like(candidates).scatter(1, order, keep) & candidates


def inflate(selected: torch.Tensor, window: int) -> torch.Tensor:
    """Also select every position lying between two selected ones at most `window` apart."""
    B, L = selected.shape
    index = torch.arange(L, device=selected.device).expand(B, L)
    previous = torch.where(selected, index, -1).cummax(-1).values
    following = torch.where(selected, index, L).flip(-1).cummin(-1).values.flip(-1)
    return selected | ((following - previous <= window) & (previous >= 0) & (following < L))


def search_window(masked: torch.Tensor, block_offset: int, block_length: int, count: int) -> torch.Tensor:
    """Response positions [B, G] from the current block up to the first block boundary that holds
    at least `count` masked positions (all of the response's end if none does)."""
    B, G = masked.shape
    index = torch.arange(G, device=masked.device)
    before = torch.cat([masked.new_zeros(B, 1, dtype=torch.long), masked.long().cumsum(-1)], dim=1)  # masked in [0, j)
    own_block_start = (index - block_offset).clamp_min(0) // block_length * block_length + block_offset
    masked_before_block = before[:, own_block_start] - before[:, block_offset : block_offset + 1]
    return (index >= block_offset) & (masked_before_block < count)


@CACHES.register("d2cache", D2CacheConfig)
class D2Cache(CacheStrategy):
    config: D2CacheConfig

    @property
    def certainty_prior_sigma(self) -> float:
        return self.config.sigma

    def begin_batch(self) -> None:
        self.kv: Optional[PositionKV] = None
        self.prompt_length: Optional[int] = None
        # Per batch row, over the response: last computed confidence, and what was masked at the last forward.
        self.confidence: Optional[torch.Tensor] = None
        self.masked_before: Optional[torch.Tensor] = None
        # Attention rollout [B(x2 with CFG), L, L] of the running forward, and its importance [B, L].
        self.rollout: Optional[torch.Tensor] = None
        self.importance: Optional[torch.Tensor] = None

    @property
    def uses_rollout(self) -> bool:
        return 0 < self.config.rollout_p < 1

    def block_logits(self, call, block_start, block_end, step):
        masked = call.tokens == call.model.config.mask_token_id
        if self.prompt_length is None:
            return self.first_forward(call, masked, block_start, block_end)
        P = self.prompt_length
        response_masked = masked[:, P:]
        picks, valid, selected = self.select(call, response_masked, block_start, block_end)
        selected_count = selected.sum(-1, keepdim=True)
        # The one host read of a step (see the module docstring), rounded up to a multiple of
        # COUNT_STEP so that few forward shapes recur (each is one captured graph under engine=compiled).
        count = min(call.length, -(-int(selected_count.max()) // COUNT_STEP) * COUNT_STEP)
        ordered = torch.where(selected, torch.arange(call.length, device=selected.device), 2 * call.length)
        positions = ordered.sort(-1).values[:, :count]
        positions = torch.where(positions < call.length, positions, positions.gather(1, selected_count - 1))
        # The rows whose logits predict the picked masked positions (a picked position's predictor is selected).
        rows = torch.searchsorted(positions, picks - call.shift).clamp_max(count - 1)
        self.begin_forward(call, positions)
        logits = call.predict_at(positions, rows, self.kv, position_hook=self)
        self.finish_forward(call, response_masked)
        confidence = logits.softmax(-1).amax(-1)
        self.confidence.scatter_(1, picks - P, torch.where(valid, confidence, self.confidence.gather(1, picks - P)))
        block = torch.arange(block_start, block_end, device=picks.device).expand(picks.shape[0], -1)
        in_picks = torch.searchsorted(picks, block.contiguous()).clamp_max(picks.shape[1] - 1)
        return logits.gather(1, in_picks[..., None].expand(-1, -1, logits.shape[-1]))

    def first_forward(self, call, masked, block_start, block_end):
        """Every position computed; the whole response's logits give the first confidences."""
        P = self.prompt_length = block_start  # the loop's first forward of a batch is at its first block
        # Kept in place across the batch's forwards (call.buffer), as captured forwards need.
        self.kv = PositionKV(*call.kv_buffers("d2cache"))
        self.rollout = (call.buffer(("d2cache", "rollout"), (call.rows, call.length, call.length), torch.float32)
                        if self.uses_rollout else None)
        self.begin_forward(call, None)
        logits = call.predict(P, call.length, (0, call.length), kv_cache=self.kv, position_hook=self)
        self.finish_forward(call, masked[:, P:])
        self.confidence = logits.softmax(-1).amax(-1)
        return logits[:, block_start - P : block_end - P]

    def select(self, call, masked: torch.Tensor, block_start: int,
               block_end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The masked positions picked by certainty density [B, k] (sequence positions, increasing; a
        fixed count, so `valid` [B, k] marks the real picks) and every position selected [B, L]."""
        config, P = self.config, self.prompt_length
        B, G = masked.shape
        offset, block_length = block_start - P, block_end - block_start
        k = min(max(config.current_k, block_length), G)
        window = search_window(masked, offset, block_length, config.current_k)
        score = self.confidence * certainty_density(~masked, config.sigma)
        in_block = torch.zeros_like(masked)
        in_block[:, offset : offset + block_length] = True
        # Scores are in [0, 1]: +2 puts the block first; non-candidates fall behind every candidate.
        priority = torch.where(masked & window, score + 2 * in_block, -1.0)
        picked = priority.topk(k, dim=-1).indices.sort(-1).values
        valid = masked.gather(1, picked) & window.gather(1, picked)
        picks = picked + P
        # A picked position is predicted from `shift` positions before it (Dream: the one before).
        selected = torch.zeros(B, P + G, dtype=torch.bool, device=masked.device).scatter(1, picks - call.shift, valid)
        selected[:, P:] |= self.masked_before & ~masked  # committed at the previous step
        real = call.key_mask if call.key_mask is not None else torch.ones_like(selected)
        if config.rollout_p > 0:
            selected |= nucleus(self.importance, ~selected & real, config.rollout_p)
        if config.inflate_w > 0:
            selected = inflate(selected, config.inflate_w) & real
        # A row with nothing to compute (its response done) still computes one position: shapes stay rectangular.
        nothing = ~selected.any(-1, keepdim=True)
        selected |= torch.zeros_like(selected).scatter(1, picks[:, :1] - call.shift, nothing)
        return picks, valid, selected

    def begin_forward(self, call, positions: Optional[torch.Tensor]) -> None:
        """Point the key/value writes at the positions computed (the CFG copy too; in a buffer per
        count, which a captured forward reads) and reset the rollout."""
        self.positions = None
        if positions is not None:
            rows = positions.repeat(2, 1) if call.cfg_scale > 0 else positions
            self.positions = call.buffer(("d2cache", "positions"), rows.shape, rows.dtype).copy_(rows)
        self.kv.writing(self.positions)
        if self.uses_rollout:
            self.rollout.copy_(torch.eye(call.length, device=self.rollout.device).expand_as(self.rollout))

    def capture_key(self) -> tuple:
        """What a captured forward depends on beyond its shapes: whether it computes every position."""
        return self.positions is None, self.uses_rollout

    def state_tensors(self) -> list[torch.Tensor]:
        """The rollout, which every layer's record updates from its own value."""
        return [] if self.rollout is None else [self.rollout]

    def finish_forward(self, call, masked: torch.Tensor) -> None:
        self.masked_before = masked
        if self.uses_rollout:
            # Column sums over real rows of the conditional batch.
            rows = self.rollout[: call.tokens.shape[0]]
            if call.key_mask is not None:
                rows = rows * call.key_mask[:, :, None]
            self.importance = rows.sum(1)

    def plan(self, layer, hidden, normed, value_proj):
        return LayerPlan(attention_weights=self.uses_rollout)

    def record(self, layer, attention_out, feed_forward_out, attention_weights):
        if attention_weights is None:
            return
        # normalize(A + I) has rows (a_i + e_i) / 2 for the computed rows i and e_i elsewhere.
        B, L = self.rollout.shape[:2]
        positions = self.positions if self.positions is not None else torch.arange(L, device=self.rollout.device).expand(B, -1)
        index = positions[..., None].expand(-1, -1, L)
        updated = 0.5 * (attention_weights @ self.rollout + self.rollout.gather(1, index))
        self.rollout.scatter_(1, index, updated)
