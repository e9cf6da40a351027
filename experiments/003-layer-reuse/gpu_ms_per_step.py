"""ms per decoding step of reuse=layer at LLaDA-8B shapes (random weights, bfloat16), one process.

    python experiments/003-layer-reuse/gpu_ms_per_step.py OUTPUT.json

One token committed per step (vanilla, no threshold), so every setting runs the same steps; for
cache=none and cache=dual, batch 1 and 8, k = 0, 4, 8, 16 of the 32 layers skipped on refinement
steps (which=last), on engine=eager and engine=compiled. Ratios are to k=0 of the same cache, batch
and engine, measured in this run.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from fastdllm.bench import BenchConfig, random_workload
from fastdllm.cache import CACHES
from fastdllm.engine import build_engine
from fastdllm.generation import GENERATIONS
from fastdllm.loop import generate
from fastdllm.reuse import REUSES

GEN_LENGTH, BLOCK_LENGTH = 64, 32


def decode(work, batch: int, cache: str, k: int, device: str, engine=None):
    reuse = {"name": "layer", "k": k}
    return generate(
        work.model, work.prompts[:batch], gen_length=GEN_LENGTH,
        generation=GENERATIONS.build({"name": "vanilla", "gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH}),
        cache=CACHES.build({"name": cache}), reuse=REUSES.build(reuse),
        generators=[torch.Generator(device).manual_seed(i) for i in range(batch)], stop_ids=work.stop_ids,
        engine=engine,
    )


def main(output: str, device: str = "cuda", sizes: dict | None = None, repeats: int = 3) -> None:
    """`sizes`: config fields overriding LLaDA-8B's (a CPU smoke test uses a small model). Each setting
    is decoded once untimed, then `repeats` times in turn with the others (so drifting clocks or host
    load touch every setting alike); its row is the median."""
    config = BenchConfig(model=None, generation=None, reuse=None, dataset=None, random_weights=True, prompts=8,
                         dtype="bfloat16", prompt_length=64, sizes=sizes)
    work = random_workload(config, config.prompts, GEN_LENGTH, torch.bfloat16, torch.device(device))
    print(work.description, flush=True)
    engine = build_engine("compiled", work.model)
    engines = {"eager": None, "compiled": engine}
    settings = [(name, k) for name in engines for k in (0, 4, 8, 16)]
    rows = []
    for cache in ("none", "dual"):
        for batch in (1, 8):
            times: dict[tuple[str, int], list[float]] = {setting: [] for setting in settings}
            layer_positions = {}
            for round_ in range(repeats + 1):
                for name, k in settings:
                    out = decode(work, batch, cache, k, device, engines[name])
                    if round_ > 0:  # round 0 warms up: compilation, graph capture, kernel selection
                        times[name, k].append(1000 * out.seconds / max(out.nfe))
                    layer_positions[name, k] = out.layer_positions[0]
            for name, k in settings:
                ms = statistics.median(times[name, k])
                rows.append({"cache": cache, "batch": batch, "engine": name, "k": k, "ms_per_step": ms,
                             "ratio_to_k0": ms / statistics.median(times[name, 0]), "runs_ms": times[name, k],
                             "layer_positions_per_sample": layer_positions[name, k]})
                print(json.dumps(rows[-1]), flush=True)
            engine.clear()
    with open(output, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
