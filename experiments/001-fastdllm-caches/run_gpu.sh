#!/usr/bin/env bash
# The GPU table: LLaDA-8B shapes (the LLaDA config's defaults), random bf16 weights, random prompts of
# 256 ids, gen_length 256, block 32, a fixed schedule of 1 or 4 tokens per step (no threshold).
# Run from the repository root; writes one JSON per configuration into ${OUT:-.}; extra arguments
# are passed on to every run (e.g. a smaller 'sizes={...}' to try the script on a CPU).
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
common=(random_weights=true family=llada dtype=bfloat16 prompt_length=256 generation.gen_length=256 generation.block_length=32)
python3 -m fastdllm.bench "${common[@]}" generation.steps=256 prompts=4 batch_size=1 output_json="${OUT:-.}/steps256_b1.json" "$@"
python3 -m fastdllm.bench "${common[@]}" generation.steps=64 prompts=4 batch_size=1 output_json="${OUT:-.}/steps64_b1.json" "$@"
python3 -m fastdllm.bench "${common[@]}" generation.steps=64 prompts=8 batch_size=8 output_json="${OUT:-.}/steps64_b8.json" "$@"
