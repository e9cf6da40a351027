"""Tiny models of each family, saved in the official layout: for tests, and as the start of training;
and randomly initialised models of any size (benchmarks, experiments).

The tokenizer is character-level (built with the `tokenizers` library) and carries the family's
special tokens and chat template, so the loaders and prompts treat it exactly like a released one.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fastdllm.models.base import MODEL_FAMILIES, DiffusionLM
from fastdllm.models.loading import save_checkpoint

# Printable ASCII plus newline covers the arithmetic task, GSM8K text and code prompts.
ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")

# Qwen's ChatML turns, and the same with Qwen's default system prompt (Dream-Instruct, Fast-dLLM v2).
CHATML_TURNS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + CHATML_TURNS
)

# Per family: special tokens (the first ones are given the roles named) and the chat template of
# the released instruct tokenizer, so a tiny model is prompted exactly as the 8B one.
TOKENIZER_SPECS: dict[str, dict[str, Any]] = {
    "llada": {
        "special": ["<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "roles": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "mask_token": "<|mdm_mask|>"},
        "chat_template": (
            "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
            "{{ message['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
        ),
    },
    "Dream": {
        "special": ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"],
        "roles": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "mask_token": "<|mask|>"},
        "chat_template": CHATML,
    },
    # Qwen2.5-Instruct's roles (end of turn = EOS, <|endoftext|> = pad) plus Fast-dLLM v2's |<MASK>|.
    # ChatML without the default system prompt: 45 tokens less per row of a character tokenizer,
    # recomputed at every step of a tiny model's decoding (the 7B release's template adds it).
    "Fast_dLLM_Qwen": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"],
        "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "|<MASK>|"},
        "chat_template": CHATML_TURNS,
    },
}


def build_char_tokenizer(model_type: str, vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """The family's special tokens and the characters of ALPHABET; with `vocab_size`, padded with reserved
    tokens to that many ids, so that a random model of a released vocabulary decodes every id it predicts
    (as text nothing encodes to)."""
    spec = TOKENIZER_SPECS[model_type]
    tokens = spec["special"] + ["<unk>"] + list(ALPHABET)
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size={vocab_size}: the {model_type} character tokenizer needs at least {len(tokens)} ids")
        tokens += [f"<|reserved_{i}|>" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(spec["special"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **spec["roles"])
    tokenizer.chat_template = spec["chat_template"]
    return tokenizer


def special_token_ids(model_type: str, tokenizer) -> dict[str, int]:
    """The config fields that name the character tokenizer's mask, end and padding tokens."""
    roles = TOKENIZER_SPECS[model_type]["roles"]
    return {f"{role}_id": tokenizer.convert_tokens_to_ids(roles[role]) for role in ("mask_token", "eos_token", "pad_token")}


def init_weights(model: DiffusionLM, std: float = 0.02, seed: int = 0) -> DiffusionLM:
    """GPT-style initialisation: normal(0, std) matrices, unit norm weights, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        with torch.no_grad():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # the RMSNorm scales
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def random_model(family: type[DiffusionLM], config: Any, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> DiffusionLM:
    """A model of any size with PyTorch's default initialisation, built without allocating and then
    materialised in `dtype` on `device` and initialised there: peak memory is the model itself, and an
    8B model takes seconds on a GPU (the benchmark's random weights)."""
    with torch.device("meta"):
        model = family(config)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model.eval().requires_grad_(False)


def build_tiny_model(model_type: str, directory: str | Path | None = None, seed: int = 0, std: float = 0.02, **sizes: Any):
    """A randomly initialised model of `model_type` with the character tokenizer; saved in the
    official layout when `directory` is given. `sizes` override the family config's fields."""
    tokenizer = build_char_tokenizer(model_type)
    family = MODEL_FAMILIES[model_type]
    config = family.config_class.tiny(vocab_size=len(tokenizer), **special_token_ids(model_type, tokenizer), **sizes)
    model = init_weights(family(config), std=std, seed=seed)
    if directory is not None:
        save_checkpoint(model, directory, tokenizer)
    return model, tokenizer
