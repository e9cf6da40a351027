#!/usr/bin/env bash
# Experiment 008: one forward for every strategy (issue 20). From the repository root; Markdown, JSON and
# logs go to ${OUT:-.}. STAGES picks a subset (default: all):
#   tests    every cache x reuse x family, compiled under real CUDA graphs == eager, float32 (pytest)
#   fp32     LLaDA-8B width, 4 layers, float32, batch 2: dllm, d2cache, dual + trim/activation; same_as_eager
#   batch1   LLaDA-8B shapes, bf16, batch 1: none, dual, dllm, d2cache on engine=compiled (+ eager check)
#   batch32  the same caches at batch 32, compiled; then dllm and d2cache at batch 32 on engine=eager
#   reuse    dual with reuse=trim and reuse=activation (tolerance 0.05, max_ratio 0.5) at batch 1 and 32
#   eval     eval.py on a saved LLaDA-8B-shape checkpoint, 64 GSM8K rows (DATA=test.jsonl), batch 8, dual,
#            4 tokens/step: engine=compiled, then engine=eager, in one run
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-.}
stages=${STAGES:-"tests fp32 batch1 batch32 reuse eval"}
common=(random_weights=true dtype=bfloat16 prompt_length=512 generation.gen_length=256 generation.block_length=32
        generation.steps=64 family=llada)
caches='caches=[{name: none},{name: dual},{name: dllm},{name: d2cache}]'
bench() { name=$1; shift; python3 -m fastdllm.bench "$@" output_json="$out/$name.json" output_markdown="$out/$name.md" 2>&1 | tee "$out/$name.log"; }
for stage in $stages; do
  case $stage in
    tests) python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_strategies.py -k cuda_graphs 2>&1 | tee "$out/tests.log" ;;
    fp32) bench fp32 "${common[@]}" dtype=float32 'sizes={n_layers: 4}' 'batch_sizes=[2]' prompts=2 \
            'caches=[{name: dual},{name: dllm},{name: d2cache}]'
          for reuse in trim activation; do
            bench "fp32_$reuse" "${common[@]}" dtype=float32 'sizes={n_layers: 4}' 'batch_sizes=[2]' prompts=2 \
              'caches=[{name: dual}]' reuse=$reuse reuse.tolerance=0.05 reuse.max_ratio=0.5
          done ;;
    batch1) bench batch1 "${common[@]}" "$caches" 'batch_sizes=[1]' prompts=2 ;;
    batch32) bench batch32 "${common[@]}" "$caches" 'batch_sizes=[32]' prompts=32 check_eager=false
             bench batch32_eager "${common[@]}" 'caches=[{name: dllm},{name: d2cache}]' 'batch_sizes=[32]' prompts=32 \
               engine=eager check_eager=false ;;
    reuse) for reuse in trim activation; do
             bench "reuse_$reuse" "${common[@]}" 'caches=[{name: dual}]' 'batch_sizes=[1,32]' prompts=32 check_eager=false \
               reuse=$reuse reuse.tolerance=0.05 reuse.max_ratio=0.5
           done ;;
    eval) checkpoint=/tmp/llada-8b-shape
          [ -f $checkpoint/config.json ] || python3 experiments/007-multi-gpu/save_random_checkpoint.py $checkpoint llada
          args=(model.path=$checkpoint model.name=llada-8b-shape dataset=gsm8k "dataset.path=${DATA:?DATA=gsm8k test.jsonl}"
                limit=64 batch_size=8 cache=dual generation=vanilla generation.gen_length=256 generation.block_length=32
                generation.steps=64 dtype=bfloat16 device=cuda progress=false)
          for engine in compiled eager; do
            python3 eval.py "${args[@]}" engine=$engine output_dir="$out/eval_$engine" 2>&1 | tee "$out/eval_$engine.log"
          done
          python3 - "$out" <<'PY' | tee "$out/eval_summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {e: json.loads((out / f"eval_{e}" / "results.json").read_text()) for e in ("compiled", "eager")}
for engine, r in runs.items():
    print(f"{engine}: tokens/s (all) {r['tokens_per_s_all']:.1f}, warm-up {r['warmup_seconds']} s, latency p95 "
          f"{r['latency_p95_s']:.2f} s, fallbacks {r['engine_fallbacks']}")
print(f"compiled / eager tokens/s: {runs['compiled']['tokens_per_s_all'] / runs['eager']['tokens_per_s_all']:.2f}x")
samples = {e: [json.loads(l) for l in (out / f"eval_{e}" / "samples.jsonl").read_text().splitlines()] for e in runs}
batches = sorted({(s["latency_s"], s["warmup_s"]) for s in samples["compiled"]})
print("compiled batches (latency s, warm-up s):", [(round(a, 2), b) for a, b in batches])
same = sum(a["output"] == b["output"] for a, b in zip(samples["compiled"], samples["eager"]))
print(f"identical outputs compiled vs eager: {same}/{len(samples['eager'])}")
PY
          ;;
  esac
done
