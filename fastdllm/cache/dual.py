"""Dual cache (Fast-dLLM): between refreshes, keep the keys/values before and after the current block
and recompute only the block, its fresh keys/values replacing the block's slice in place.

Block-causal families (Fast-dLLM v2's sub-block cache, `use_block_cache`): the finished blocks are
kept exactly; a sample recomputes its whole current block at the block's first step, at a refresh,
and when the first token of its current sub-block is still masked (that token is predicted from the
position before the sub-block); otherwise only its current sub-block, attending to the block's other
keys/values as last computed. Samples of a batch may sit in different sub-blocks: the step computes
the span covering every sample's positions and writes each sample's keys/values only where that
sample would compute alone, so a batch decodes every sample as it decodes alone (batch 1 computes
exactly the published span). Sizing that span reads its two bounds from the device, once per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdllm.cache.base import CACHES
from fastdllm.cache.kv import KVCacheConfig, KVCacheStrategy


@dataclass
class DualCacheConfig(KVCacheConfig):
    name: str = "dual"


@CACHES.register("dual", DualCacheConfig)
class DualCache(KVCacheStrategy):
    def span(self, call, block_start, block_end):
        # The block's own positions (its tokens change every step) plus, with a logit shift, the
        # `shift` positions before it that predict its first tokens.
        return block_start - call.shift, block_end

    def block_causal_span(self, call, block_start, block_end, step):
        interval = self.config.refresh_interval
        refresh = step == 0 or (interval is not None and step % interval == 0)
        decoding = call.decoding
        active = decoding.any(-1)
        length = call.sub_block_length
        sub_start = block_start + decoding.float().argmax(-1).div(length, rounding_mode="floor").long() * length
        first_masked = call.tokens.gather(1, sub_start[:, None])[:, 0] == call.model.config.mask_token_id
        whole = first_masked | refresh
        fresh_start = torch.where(whole, block_start, sub_start)
        fresh_end = torch.where(whole, block_end, sub_start + length)
        # The span's bounds decide the forward's shape: one host read per step, for both.
        start, end = torch.stack([fresh_start.masked_fill(~active, block_end).min(),
                                  fresh_end.masked_fill(~active, block_start).max()]).tolist()
        columns = torch.arange(start, end, device=decoding.device)[None, :]
        fresh = (columns >= fresh_start[:, None]) & (columns < fresh_end[:, None]) & active[:, None]
        return start, end, fresh
