"""Save a randomly initialised model of a family's released sizes (LLaDA-8B by default) in the official
checkpoint layout, with the family's character tokenizer padded to the released vocabulary, so that
evaluation processes load it from disk as users load a release:
    python3 experiments/007-multi-gpu/save_random_checkpoint.py DIR [family] [field=value ...]
field=value overrides a config.json field (e.g. n_layers=2 for a dry run). bf16, built on the GPU when
there is one."""
import dataclasses
import sys

import torch

from fastdllm.models.base import MODEL_FAMILIES
from fastdllm.models.loading import save_checkpoint
from fastdllm.models.tiny import build_char_tokenizer, random_model, special_token_ids

directory, family_name = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llada"
overrides = {key: int(value) for key, value in (arg.split("=", 1) for arg in sys.argv[3:])}
family = MODEL_FAMILIES[family_name]
config = family.config_class(**overrides)
tokenizer = build_char_tokenizer(family_name, vocab_size=config.vocab_size)
config = dataclasses.replace(config, **special_token_ids(family_name, tokenizer))
device = "cuda" if torch.cuda.is_available() else "cpu"
model = random_model(family, config, torch.bfloat16, device)
save_checkpoint(model, directory, tokenizer)
print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters of {family_name} to {directory}")
