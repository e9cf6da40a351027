"""dLLM-Cache (arXiv 2506.06295): per-layer feature caching of the prompt and the response, refreshed
on two schedules, with an adaptive partial update of the response in between.

Every forward computes the whole sequence's residual stream, but per layer (through the model's
position hook, models.layers.PositionHook) only some positions run attention and feed-forward; the
others add the attention and feed-forward outputs cached for them. Per layer the cache keeps the
keys/values of every position (after rotary; the official code keeps them before rotary and rotates
on the fly, which is the same since a position's rotation never changes) and both branch outputs.

Forwards are counted per batch across blocks, n = 1, 2, ...; the prompt (every position before the
first block, left padding included) is refreshed when (n - 1) % kp == 0, the response (every position
after it, all blocks) when (n - 1) % kr == 0 (the official code's rule; the first forward refreshes
both). Per layer:
- both refreshed (and every layer at the first forward): everything is computed;
- response only: the response's queries/keys/values, attention and feed-forward; the prompt reuses;
- otherwise, with rou > 0: the value vectors of the whole response are recomputed and compared with
  the cached ones (cosine similarity per position); the floor(rou * response length) positions that
  changed most, per row, recompute queries, keys, attention and feed-forward, and the whole response
  gets the fresh values (the other positions keep stale keys, as published). When the prompt is
  refreshed too, its positions are computed with them. With rou = 0 the response reuses everything.
- `full_first_layer` (default true): layer 0 is always computed in full. The official code added
  this after publication ("fixed bug by enforcing layer_id==0 refresh all"): layer 0's input is the
  token embedding, which changes exactly at the positions just decoded, and a stale layer-0 output
  there would carry the [MASK] embedding's features into every later layer; the value test alone
  can miss them.
The schedule and every selection count are known on the host, so shapes are fixed per forward
(floor(rou * response length) rows per layer) and nothing is read back from the device.

Degenerate settings: kp=1 with kr=1 or rou=1 computes every position at every forward (= cache=none).
`positions` counts query positions summed over layers divided by the number of layers; the value
projection of the whole response at adaptive steps is not counted in it.
Batches share one schedule; the prompt is the padded prompt, and padded keys stay masked.
Published per-(task, model) kp/kr settings: conf/cache_preset/dllm/<dataset>-<model>.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastdllm.cache.base import CACHES, CacheConfig, CacheStrategy
from fastdllm.models.kv import PositionKV
from fastdllm.models.layers import LayerPlan
from fastdllm.registry import check


@dataclass
class DLLMCacheConfig(CacheConfig):
    name: str = "dllm"
    # Refresh the prompt's features every kp forwards, the response's every kr forwards.
    kp: int = 50
    kr: int = 2
    # Share of the response recomputed in between, chosen by value-vector change.
    rou: float = 0.25
    # Compute layer 0 in full at every forward (as the official code does).
    full_first_layer: bool = True

    def __post_init__(self) -> None:
        check(self.kp >= 1, "kp", self.kp, "must be >= 1")
        check(self.kr >= 1, "kr", self.kr, "must be >= 1")
        check(0 <= self.rou <= 1, "rou", self.rou, "must be in [0, 1]")


@CACHES.register("dllm", DLLMCacheConfig)
class DLLMCache(CacheStrategy):
    config: DLLMCacheConfig

    def begin_batch(self) -> None:
        self.forward = 0
        self.prompt_length: Optional[int] = None
        self.kv: Optional[PositionKV] = None
        # Per layer: the attention and feed-forward outputs [rows, L, d] last computed at each position.
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def block_logits(self, call, block_start, block_end, step):
        if self.prompt_length is None:
            # The loop's first forward of a batch is at its first block: the response starts there.
            self.prompt_length = block_start
            # Kept in place across the batch's forwards (call.buffer), as captured forwards need.
            self.kv = PositionKV(*call.kv_buffers("dllm"))
            shape = (call.rows, call.length, call.width)
            self.outputs = {layer: (call.buffer(("dllm", "attention", layer), shape, call.dtype),
                                    call.buffer(("dllm", "feed_forward", layer), shape, call.dtype))
                            for layer in range(call.num_layers)}
        self.forward += 1
        n, config = self.forward - 1, self.config
        self.refresh_prompt = n % config.kp == 0
        self.refresh_response = n % config.kr == 0
        length = call.length
        self.adaptive_count = int((length - self.prompt_length) * config.rou)
        rows = [self.rows_computed(layer, length) for layer in range(call.num_layers)]
        return call.predict(block_start, block_end, (0, length), kv_cache=self.kv, position_hook=self,
                            positions_computed=round(sum(rows) / call.num_layers))

    def layer_case(self, layer: int) -> tuple[bool, bool]:
        """(prompt computed in full, response computed in full) for this layer at this forward."""
        if self.forward == 1 or (layer == 0 and self.config.full_first_layer):
            return True, True
        return self.refresh_prompt, self.refresh_response

    def capture_key(self) -> tuple:
        """What a captured forward depends on beyond its shapes: every layer's case and the counts."""
        cases = tuple(self.layer_case(layer) for layer in range(len(self.outputs)))
        return cases, self.prompt_length, self.adaptive_count

    def state_tensors(self) -> list[torch.Tensor]:
        """The cached value vectors, which an adaptive layer compares before it overwrites them."""
        return list(self.kv.values.values())

    def rows_computed(self, layer: int, length: int) -> int:
        prompt, response = self.layer_case(layer)
        response_rows = length - self.prompt_length if response else self.adaptive_count
        return (self.prompt_length if prompt else 0) + response_rows

    def plan(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor, value_proj: nn.Module) -> LayerPlan:
        prompt, response = self.layer_case(layer)
        if prompt and response:
            return LayerPlan()
        P, device = self.prompt_length, hidden.device
        B, L, _ = hidden.shape
        if response:
            rows = torch.arange(P, L, device=device).expand(B, -1)
        else:
            rows = self.changed_values(layer, normed, value_proj)
            if prompt:
                rows = torch.cat([torch.arange(P, device=device).expand(B, -1), rows], dim=1)
        attention_out, feed_forward_out = self.outputs[layer]
        return LayerPlan(compute=rows, attention_out=attention_out, feed_forward_out=feed_forward_out)

    def changed_values(self, layer: int, normed: torch.Tensor, value_proj: nn.Module) -> torch.Tensor:
        """Positions [B, k] of the k response positions whose value vectors changed most (lowest
        cosine similarity to the cached ones); the whole response's cached values become the fresh ones."""
        P, k = self.prompt_length, self.adaptive_count
        B = normed.shape[0]
        if k == 0:
            return torch.empty(B, 0, dtype=torch.long, device=normed.device)
        cached = self.kv.values[layer]  # [B, kv_heads, L, head_dim]
        kv_heads, head_dim = cached.shape[1], cached.shape[-1]
        fresh = value_proj(normed[:, P:])  # [B, G, kv_heads * head_dim]
        old = cached[:, :, P:].transpose(1, 2).reshape(fresh.shape)
        similarity = F.cosine_similarity(fresh.float(), old.float(), dim=-1)
        cached[:, :, P:] = fresh.view(B, -1, kv_heads, head_dim).transpose(1, 2).to(cached.dtype)
        return similarity.topk(k, dim=-1, largest=False).indices.sort(-1).values + P

    def record(self, layer, attention_out, feed_forward_out, attention_weights):
        attention, feed_forward = self.outputs[layer]
        attention.copy_(attention_out)
        feed_forward.copy_(feed_forward_out)
