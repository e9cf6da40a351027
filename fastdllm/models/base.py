"""The model interface the decode loop and the strategies use, and the family registry.

A family (llada.py, dream.py, ...) subclasses DiffusionLM, names its config class, and registers
itself under the `model_type` its official config.json carries. Everything about reading and
writing the official checkpoint layout lives in loading.py and works for every family.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastdllm.models.layers import (BLOCK_VARIANTS, EAGER_KERNELS, KVCache, Kernels, PositionHook, ReusedLayers, fused_weights, gather_rows,
                                    hooked_transformer_layer, transformer_layer)

MODEL_FAMILIES: dict[str, type["DiffusionLM"]] = {}


def register_family(cls: type["DiffusionLM"]) -> type["DiffusionLM"]:
    MODEL_FAMILIES[cls.model_type] = cls
    return cls


class LayerRunner(Protocol):
    """Runs transformer layer `layer` on `hidden`, deciding on the host whether to compute it
    (`compute` runs it for real): a reuse strategy that engine=compiled cannot run (runs_compiled false)."""

    def __call__(self, layer: int, hidden: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class FamilyConfig(Protocol):
    """What every family's config exposes, whatever its config.json calls the fields."""

    vocab_size: int
    max_context: int
    head_dim: int
    rope_theta: float
    mask_token_id: int
    pad_token_id: int
    eos_token_id: int

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> "FamilyConfig": ...

    def to_json(self) -> dict[str, Any]: ...


def fields_from_json(config_cls: type, raw: dict[str, Any], required: dict[str, Any], family: str) -> dict[str, Any]:
    """The config.json fields `config_cls` knows. A setting of the original code base that this
    implementation does not cover (a key of `required` with another value) fails loudly instead of
    loading into the wrong architecture, and so does a missing field of `config_cls._ARCHITECTURE`
    (its default would describe another model, found later as a shape mismatch or not at all)."""
    for key in getattr(config_cls, "_ARCHITECTURE", ()):
        if raw.get(key) is None:
            raise ValueError(f"{family} config.json has no {key!r}; it defines the architecture and must be set")
    for key, value in required.items():
        if raw.get(key) is not None and raw[key] != value:
            raise ValueError(f"{family} config.json has {key}={raw[key]!r}; only {value!r} is supported")
    known = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in raw.items() if k in known and v is not None}


class DiffusionLM(nn.Module):
    """A masked-diffusion language model.

    forward() is the one implementation of the transformer math (embed, rotary, pre-norm layers,
    final norm, output head), shared by every family (they differ in their modules' names and
    config fields) and by both engines: eager calls it as it is, engine=compiled runs it with
    compiled kernels and captures it as CUDA graphs. It computes the hidden states of the given
    positions; attention covers the whole sequence: with a kv_cache, the keys/values of positions
    outside the computed ones come from the cache (see layers.KVCache).
    """

    model_type: ClassVar[str]
    config_class: ClassVar[type]
    # Position i's token is predicted by the logits at position i - logit_shift
    # (0 for LLaDA; 1 for the families trained from autoregressive checkpoints, e.g. Dream).
    logit_shift: ClassVar[int] = 0
    # Tokens that end an answer, looked up in the tokenizer when present.
    stop_token_strings: ClassVar[tuple[str, ...]] = ()
    # transformers class that reads the release's tokenizer files when it has no tokenizer.json.
    tokenizer_class: ClassVar[Optional[str]] = None
    # Block-causal attention at inference (block diffusion, e.g. Fast-dLLM v2): a query sees the keys
    # of its own block and of earlier ones, blocks of generation.block_length counted from each
    # sample's first prompt token. False: fully bidirectional (LLaDA, Dream).
    block_causal: ClassVar[bool] = False

    # Block variants the family uses beyond a plain pre-norm LLaMA block (models.layers.BLOCK_VARIANTS
    # lists those the one forward implements; another is refused when the model is built).
    variants: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: FamilyConfig):
        super().__init__()
        unknown = self.variants - BLOCK_VARIANTS
        if unknown:
            raise ValueError(f"{type(self).__name__} declares block variants {sorted(unknown)} that the forward does not "
                             f"implement (it implements {sorted(BLOCK_VARIANTS)})")
        self.config = config

    @classmethod
    def complete_config(cls, config: FamilyConfig, checkpoint: Path) -> None:
        """Fill the config fields a release keeps outside config.json (e.g. a mask token that only
        its tokenizer defines); called when a checkpoint is read."""

    def parts(self) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, torch.Tensor]:
        """The family's modules under their official names: token embedding, layers (each called as
        layer(h, cos, sin, layer=i, key_mask=..., kv_cache=...)), final norm, output matrix [vocab, d]."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        logits_for: slice | torch.Tensor = slice(None),
        *,
        columns: Optional[torch.Tensor] = None,
        fresh: Optional[torch.Tensor] = None,
        position_hook: Optional[PositionHook] = None,
        reused: ReusedLayers = ReusedLayers(),
        contributions: Optional[dict[int, torch.Tensor]] = None,
        layer_runner: Optional[LayerRunner] = None,
        kernels: Kernels = EAGER_KERNELS,
    ) -> torch.Tensor:
        """input_ids, position_ids: [B, n] for the computed positions (a span, or any positions in
        increasing order with a kv_cache that places them); key_mask: [B, L] over the whole
        sequence (True = real token), or a full attention mask [B or 1, 1, n, L] (True = may attend;
        block-causal families). Returns float logits [B, m, vocab] for the computed positions
        `logits_for` (a slice, row indices [m], or per-sample rows [B, m]; all n by default): the
        output head is the widest matrix, so it runs only where logits are used.

        columns [n]: the sequence columns of a span's positions, where a kv_cache that lends buffers
        writes their keys/values (fresh [B, n]: only those of each row) and where `contributions`
        are kept. reused: layers whose residual contribution (output minus input) per column is kept
        in `contributions` {layer: [B, L, d]}: recorded by a forward that computes them, added instead
        of computing them when `reused.skipping`. position_hook: chooses per layer which rows are
        computed and which reuse earlier outputs (layers.PositionHook). layer_runner: a host-side
        decision per layer (eager only). kernels: the small kernels (eager or compiled)."""
        embedding, layers, final_norm, head = self.parts()
        h = F.embedding(input_ids, embedding.weight)
        cos, sin = kernels.rotary(position_ids, self.config.head_dim, self.config.rope_theta)
        n = input_ids.shape[1]
        if isinstance(logits_for, slice):
            logits_for = torch.arange(*logits_for.indices(n), device=input_ids.device)
        # Past its keys/values, nothing reads the last layer's outputs but the output head: it runs its
        # queries, attention and feed-forward only for the positions whose logits are used, unless a
        # hook or a reuse strategy needs its outputs at every position.
        last = len(layers) - 1
        trim_last = (logits_for.dim() == 1 and logits_for.shape[0] < n and position_hook is None
                     and layer_runner is None and last not in reused.layers)
        # What the previous layer adds to h (its feed-forward output, or a kept contribution), added in
        # the kernel of the next norm; None: h is the next layer's input.
        pending = None
        for i, layer in enumerate(layers):
            if i in reused.layers and reused.skipping:
                h = h if pending is None else h + pending
                pending = contributions[i].index_select(1, columns)
                continue
            parts, weights = layer.parts(), fused_weights(layer)
            query_rows = logits_for if trim_last and i == last else None

            def run(x, pending_x, i=i, parts=parts, weights=weights, query_rows=query_rows):
                if position_hook is not None:
                    return hooked_transformer_layer(x, pending_x, cos, sin, parts, weights, layer=i, key_mask=key_mask,
                                                    kv_cache=kv_cache, kernels=kernels, position_hook=position_hook)
                return transformer_layer(x, pending_x, cos, sin, parts, weights, layer=i, key_mask=key_mask,
                                         kv_cache=kv_cache, columns=columns, fresh=fresh, kernels=kernels,
                                         query_rows=query_rows)

            if layer_runner is None and i not in reused.layers:
                h, pending = run(h, pending)
                continue
            # The layer's output is needed whole: by the runner, or to record its contribution.
            h = h if pending is None else h + pending
            pending = None
            if layer_runner is not None:
                h = layer_runner(i, h, lambda x, run=run: torch.add(*run(x, None)))
            else:
                layer_input = h
                h = torch.add(*run(h, None))
                contributions[i].index_copy_(1, columns, h - layer_input)
        # Only the positions whose logits are used go through the final norm and the output head.
        if not trim_last:
            h = gather_rows(h, logits_for) if logits_for.dim() == 2 else h.index_select(1, logits_for)
            if pending is not None:
                pending = gather_rows(pending, logits_for) if logits_for.dim() == 2 else pending.index_select(1, logits_for)
        if pending is not None:
            h = h + pending
        return F.linear(kernels.norm(h, final_norm.weight, final_norm.eps), head).float()
