"""LLaDA (LLaDA-8B-Base / -Instruct and tiny models of the same layout).

OLMo-derived, LLaMA-style pre-norm blocks, fully bidirectional attention. Parameter and config
names are those of the released checkpoint (`model.transformer.blocks.<i>.q_proj.weight`, `d_model`,
...), so the official safetensors shards load into this module unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from fastdllm.models.base import DiffusionLM, fields_from_json, register_family
from fastdllm.models.layers import BlockParts, RMSNorm


@dataclass
class LLaDAConfig:
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: Optional[int] = 126464
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081

    # Settings of the OLMo code base that this implementation does not cover; a checkpoint that
    # uses other values fails loudly instead of loading into the wrong architecture.
    _REQUIRED = {
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "include_bias": False,
        "rope": True,
        "alibi": False,
        "scale_logits": False,
        "input_emb_norm": False,
        "attention_layer_norm": False,
    }
    # Fields config.json must hold: the defaults above are the 8B model's, right for no other checkpoint.
    _ARCHITECTURE = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "rope_theta", "max_sequence_length")

    @property
    def max_context(self) -> int:
        return self.max_sequence_length

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def output_size(self) -> int:
        return self.embedding_size or self.vocab_size

    @classmethod
    def tiny(cls, **overrides: Any) -> "LLaDAConfig":
        """A few-layer model of this layout (tests, the embedded default); `overrides` set any field."""
        fields_ = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, max_sequence_length=1024, rope_theta=10000.0)
        fields_.update(overrides)
        fields_.setdefault("embedding_size", fields_.get("vocab_size"))
        return cls(**fields_)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        if raw.get("include_qkv_bias"):
            raise ValueError("LLaDA config.json has include_qkv_bias=true; only bias-free projections are supported")
        return cls(**fields_from_json(cls, raw, cls._REQUIRED, "LLaDA"))

    def to_json(self) -> dict[str, Any]:
        out = {"model_type": "llada", "architectures": ["LLaDAModelLM"], **asdict(self)}
        out.update(self._REQUIRED)
        out.update(
            include_qkv_bias=False,
            layer_norm_with_affine=True,
            rope_full_precision=True,
            n_kv_heads=self.kv_heads,
            embedding_size=self.output_size,
        )
        return out


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, kv_dim = config.d_model, config.kv_heads * config.head_dim
        self.config = config
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)  # down

    def parts(self) -> BlockParts:
        return BlockParts(self.attn_norm, self.q_proj, self.k_proj, self.v_proj, self.attn_out, self.ff_norm,
                          self.ff_proj, self.up_proj, self.ff_out, self.config.n_heads, self.config.kv_heads)



@register_family
class LLaDAModelLM(DiffusionLM):
    model_type = "llada"
    config_class = LLaDAConfig
    logit_shift = 0
    stop_token_strings = ("<|eot_id|>", "<|endoftext|>")

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.output_size, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
            }
        )
        if not config.weight_tying:
            transformer["ff_out"] = nn.Linear(config.d_model, config.output_size, bias=False)
        # Nested as in the release so parameter names read `model.transformer.<...>`.
        self.model = nn.Module()
        self.model.transformer = transformer

    def parts(self):
        t = self.model.transformer
        head = t["wte"].weight if self.config.weight_tying else t["ff_out"].weight
        return t["wte"], t["blocks"], t["ln_f"], head
