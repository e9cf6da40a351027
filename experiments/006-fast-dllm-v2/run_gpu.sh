#!/usr/bin/env bash
# Fast-dLLM v2 at Qwen2.5-7B shapes (the family config's defaults), random bf16 weights, random
# prompts of 64 ids (two whole blocks), gen_length 256, block 32, sub-blocks of 8, a fixed schedule of
# 1, 2 or 4 tokens per denoising step (generation=vanilla steps = 256 / k; each block adds one
# block-end forward, so tokens per forward are slightly below k), batch 1 and 4, cache=prefix (exact)
# and dual (the sub-block cache), engine=compiled (the CUDA default), beside the autoregressive
# baseline (transformers' Qwen2 at Qwen2.5-7B shapes, static cache, compiled) measured in the same run.
# Run from the repository root; writes one JSON, one Markdown table and one log per stage into
# ${OUT:-.}. STAGES picks a subset (default: all):
#   k4 k2 k1   k tokens per step (k4 also runs the autoregressive baseline at batch 1 and 4)
#   large      4 tokens per step at batch 8 and 32, caches none/prefix/dual (where the step turns compute-bound)
#   fp32       float32 at full width, 4 layers, batch 2, caches none/prefix/dual: same_as_eager must be 1.0
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-.}
common=(random_weights=true family=Fast_dLLM_Qwen dtype=bfloat16 prompt_length=64 generation=vanilla
        generation.gen_length=256 generation.block_length=32 generation.sub_block_length=8
        'caches=[{name: prefix}, {name: dual}]' prompts=4 'batch_sizes=[1,4]')
bench() { name=$1; shift; python3 -m fastdllm.bench "$@" output_json="$out/$name.json" output_markdown="$out/$name.md" 2>&1 | tee "$out/$name.log"; }
for stage in ${STAGES:-k4 k2 k1 large fp32}; do
  case $stage in
    k4) bench v2_k4 "${common[@]}" generation.steps=64 ar_baseline=true 'ar_batch_sizes=[1,4]' ;;
    k2) bench v2_k2 "${common[@]}" generation.steps=128 ;;
    k1) bench v2_k1 "${common[@]}" generation.steps=256 ;;
    large) bench v2_large "${common[@]}" generation.steps=64 'caches=[{name: none}, {name: prefix}, {name: dual}]' \
             'batch_sizes=[8,32]' prompts=32 check_eager=false ;;
    fp32) bench v2_fp32 "${common[@]}" dtype=float32 'sizes={num_hidden_layers: 4}' generation.steps=64 \
            'caches=[{name: none}, {name: prefix}, {name: dual}]' 'batch_sizes=[2]' prompts=2 ;;
  esac
done
