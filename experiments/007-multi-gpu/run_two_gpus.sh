#!/usr/bin/env bash
# Issue 14 on the two-GPU device kind: `accelerate launch --multi_gpu --num_processes 2 eval.py` against one
# GPU, at LLaDA-8B shapes (random bf16 weights saved once in the official layout, loaded by every process
# as users load a release) on real GSM8K rows. Run from the repository root; results go to ${OUT:-.}/two-gpus.
#   save     write the checkpoint to $MODEL (skipped when it exists)
#   runs     cache none/dual x batch 1/8: `python eval.py` (one GPU) and the two-process launch
#   kill     a two-process run (dual, batch 1) whose rank-1 process is killed with SIGKILL once
#            $KILL_AFTER (16) samples are written, then resumed with resume=true
#   summary  per run: samples, distinct ids, outputs equal to the one-GPU run, tokens/s per process and
#            summed over processes, scaling against one GPU (summary.txt)
# STAGES picks some (default: all, in this order). A CPU dry run of the whole script:
#   DEVICE=cpu SIZES="n_layers=2 d_model=64 n_heads=4 mlp_hidden_size=128" LIMIT=16 KILL_AFTER=4 GEN="generation.gen_length=64 generation.steps=64" \
#     MODEL=/tmp/random-llada bash experiments/007-multi-gpu/run_two_gpus.sh
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-.}/two-gpus
model=${MODEL:-/tmp/random-llada-8b}
device=${DEVICE:-cuda}
launch2=${LAUNCH2:-accelerate launch --multi_gpu --num_processes 2}
stages=${STAGES:-save runs kill summary}
gen=${GEN:-generation.gen_length=256 generation.block_length=32 generation.steps=64}
mkdir -p "$out"
# Fixed tokens per step (no threshold): random weights rarely pass one, and every run commits alike.
args=(model=llada-inst model.path="$model" dataset=gsm8k dataset.path="${DATA:-../shared/data/gsm8k/test.jsonl}"
      limit="${LIMIT:-64}" device="$device" dtype=bfloat16 generation.threshold=null $gen progress=false)
for stage in $stages; do
  case $stage in
    save) [ -f "$model/config.json" ] || python3 experiments/007-multi-gpu/save_random_checkpoint.py "$model" llada ${SIZES:-} ;;
    runs) for cache in none dual; do
            for batch in 1 8; do
              run=(cache=$cache batch_size=$batch)
              python3 eval.py "${args[@]}" "${run[@]}" output_dir="$out/one_${cache}_b$batch" > "$out/one_${cache}_b$batch.log" 2>&1
              $launch2 eval.py "${args[@]}" "${run[@]}" output_dir="$out/two_${cache}_b$batch" > "$out/two_${cache}_b$batch.log" 2>&1
            done
          done ;;
    kill) dir="$out/two_dual_b1_killed"
          rm -rf "$dir"
          # setsid: the launcher and its workers form one process group, killed whole if rank 1's death leaves them hanging.
          setsid $launch2 eval.py "${args[@]}" cache=dual batch_size=1 output_dir="$dir" > "$out/killed.log" 2>&1 &
          leader=$!
          for _ in $(seq 1500); do
            [ "$(cat "$dir/samples.jsonl" 2>/dev/null | wc -l)" -ge "${KILL_AFTER:-16}" ] && break
            sleep 0.2
          done
          # The rank-1 worker: the process of this run whose environment says LOCAL_RANK=1.
          for pid in $(pgrep -f "output_dir=$dir" || true); do
            if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx LOCAL_RANK=1; then kill -KILL "$pid"; echo "killed rank 1 (pid $pid)"; fi
          done | tee "$out/kill.txt"
          for _ in $(seq 300); do kill -0 "$leader" 2>/dev/null || break; sleep 0.2; done
          kill -KILL -- -"$leader" 2>/dev/null || true
          wait "$leader" 2>/dev/null || true
          echo "samples written before the kill: $(wc -l < "$dir/samples.jsonl")" | tee -a "$out/kill.txt"
          $launch2 eval.py "${args[@]}" cache=dual batch_size=1 output_dir="$dir" resume=true > "$out/resume.log" 2>&1 ;;
    summary) python3 experiments/007-multi-gpu/compare_runs.py "$out" | tee "$out/summary.txt" ;;
  esac
done
