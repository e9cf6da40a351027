"""eval.py with the compiled engine's STATIC_SHAPES set, to measure what specialised kernels cost and
save in an evaluation, whose batches bring new lengths (0 = every kernel with symbolic sizes):
    python3 experiments/002-gpu-engine/eval_static_shapes.py N [eval.py overrides ...]
Run from the repository root."""
import runpy
import sys

import fastdllm.engine

fastdllm.engine.STATIC_SHAPES = int(sys.argv.pop(1))
sys.argv[0] = "eval.py"
runpy.run_path("eval.py", run_name="__main__")
