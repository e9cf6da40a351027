"""The engine's compiled small kernels under each shape regime torch.compile can give them: specialised to
one shape (dynamic=False), or recompiled with the rows, the positions, the key/value length, or several of
them symbolic (what automatic dynamic shapes does once a dimension is seen to change). LLaDA-8B shapes,
bf16, timed as CUDA graphs of 32 calls. Run from the repository root:
    python3 experiments/002-gpu-engine/kernels_dynamic.py
"""
import importlib.util
import time
from pathlib import Path

import torch

from fastdllm import engine
from fastdllm.models.layers import rotary_cos_sin

spec = importlib.util.spec_from_file_location("kernels", Path(__file__).with_name("kernels.py"))
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
device, dtype = torch.device("cuda"), torch.bfloat16
heads = kv_heads = 32
d, ff, L = 128, 12288, 768
TARGETS = ((1, 32), (1, 768), (8, 160), (8, 768))


def inputs(name, rows, n, length=L):
    if name == "rotate_into":
        qkv = torch.randn(rows, n, (heads + 2 * kv_heads) * d, dtype=dtype, device=device)
        cos, sin = rotary_cos_sin(torch.arange(n, device=device).expand(rows, -1), d, 10000.0)
        keys = torch.zeros(rows, kv_heads, length, d, dtype=dtype, device=device)
        return (qkv, cos, sin, heads, kv_heads, keys, torch.zeros_like(keys), torch.arange(length - n, length, device=device), None)
    if name == "gate":
        return (torch.randn(rows, n, 2 * ff, dtype=dtype, device=device),)
    h = torch.randn(rows, n, heads * d, dtype=dtype, device=device)
    return (h, h, torch.ones(heads * d, dtype=dtype, device=device), 1e-5)


FUNCTIONS = {"rotate_into": engine.rotate_qkv_into, "gate": engine.silu_gate, "add_norm": engine.add_rms_norm}
# The shapes each regime is first called with (the last of them is where automatic dynamic recompiles).
PRIMING = {"static": [], "dynamic n": [(8, 768), (8, 160)], "dynamic rows": [(8, 768), (1, 768)],
           "dynamic rows and n": [(8, 768), (1, 32)], "dynamic=True": None}
for name, fn in FUNCTIONS.items():
    for regime, priming in PRIMING.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=False if regime == "static" else (True if regime == "dynamic=True" else None))
        start = time.perf_counter()
        for rows, n in priming or []:
            compiled(*inputs(name, rows, n))
        if regime.startswith("dynamic") and name == "rotate_into":  # the key/value buffers of another batch's length
            compiled(*inputs(name, 1, 32, length=L + 64))
        line = f"{name:12s} {regime:20s}"
        for rows, n in TARGETS:
            args = inputs(name, rows, n)
            line += f"  ({rows},{n}) {kernels.graph_us(lambda: compiled(*args)):7.1f} us"
        print(f"{line}   compile+time {time.perf_counter() - start:.1f} s", flush=True)
