"""Dream (Dream-v0-Base-7B / -Instruct-7B and tiny models of the same layout).

Qwen2.5 architecture (pre-RMSNorm blocks, q/k/v projections with bias, grouped-query attention,
rotate-half rotary, SwiGLU) with bidirectional attention. Parameter and config names are those of
the released checkpoint (`model.layers.<i>.self_attn.q_proj.weight`, `hidden_size`, ...), so the
official safetensors shards load into this module unchanged.

Dream was initialised from the autoregressive Qwen2.5 and keeps its convention: the logits at
position i - 1 predict token i (`logit_shift = 1`); the decode loop applies the shift.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from fastdllm.models.base import DiffusionLM, fields_from_json, register_family
from fastdllm.models.layers import BlockParts, RMSNorm


@dataclass
class DreamConfig:
    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    bos_token_id: int = 151643
    eos_token_id: int = 151643

    # The family's name in error messages (Fast-dLLM v2 reuses this config).
    _FAMILY = "Dream"
    # Settings of the Qwen2 code base that this implementation does not cover; a checkpoint that
    # uses other values fails loudly instead of loading into the wrong architecture.
    _REQUIRED = {
        "hidden_act": "silu",
        "use_sliding_window": False,
        "rope_scaling": None,
    }
    # Fields config.json must hold: the defaults above are the 7B model's, right for no other checkpoint.
    _ARCHITECTURE = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "rope_theta", "max_position_embeddings",
    )

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self._FAMILY} config: num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}, "
                f"and num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads"
            )

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> "DreamConfig":
        """A few-layer model of this layout (tests, training from scratch); `overrides` set any field."""
        fields_ = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=1024,
            rope_theta=10000.0,
        )
        fields_.update(overrides)
        # The released tokenizer uses <|endoftext|> as bos, eos and pad alike.
        fields_.setdefault("bos_token_id", fields_.get("eos_token_id", cls.eos_token_id))
        return cls(**fields_)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "DreamConfig":
        head_dim = raw.get("head_dim")
        if head_dim is not None and head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
            raise ValueError(
                f"{cls._FAMILY} config.json has head_dim={head_dim}; only hidden_size / num_attention_heads is supported"
            )
        return cls(**fields_from_json(cls, raw, cls._REQUIRED, cls._FAMILY))

    def to_json(self) -> dict[str, Any]:
        return {"model_type": "Dream", "architectures": ["DreamModel"], **asdict(self), **self._REQUIRED}


class DreamAttention(nn.Module):
    """The attention projections under their official names; the math is DiffusionLM.forward's."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.config = config
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DreamMLP(config)

    def parts(self) -> BlockParts:
        attn, mlp, config = self.self_attn, self.mlp, self.self_attn.config
        return BlockParts(self.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                          self.post_attention_layernorm, mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                          config.num_attention_heads, config.num_key_value_heads)



@register_family
class DreamModel(DiffusionLM):
    model_type = "Dream"
    config_class = DreamConfig
    logit_shift = 1
    variants = frozenset({"qkv_bias"})
    stop_token_strings = ("<|im_end|>", "<|endoftext|>")
    # The release ships vocab.json/merges.txt for a remote DreamTokenizer, which is Qwen2's byte-level BPE.
    tokenizer_class = "Qwen2Tokenizer"

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        # Nested as in the release so parameter names read `model.<...>` and `lm_head.weight`.
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Tied checkpoints store no lm_head.weight: the output head is the embedding matrix.
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def parts(self):
        m = self.model
        head = m.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return m.embed_tokens, m.layers, m.norm, head
