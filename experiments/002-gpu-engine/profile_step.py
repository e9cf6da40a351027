"""Where a compiled step's time goes, at LLaDA-8B shapes (bf16, random weights, batch 1, prompt 512 +
256): graph-replay time of the full and the dual-span forward, of their matrix products alone, of the
selection that follows a forward, and the kernel table of one dual-span forward (profiler, no graph).
Run from the repository root: python3 experiments/002-gpu-engine/profile_step.py [family] [batch]."""
import sys

import torch
import torch.nn.functional as F

from fastdllm.bench import timed
from fastdllm.models.kv import SequenceKV
from fastdllm.engine import CompiledEngine
from fastdllm.generation import GENERATIONS
from fastdllm.models.base import MODEL_FAMILIES
from fastdllm.models.tiny import random_model

family = MODEL_FAMILIES[sys.argv[1] if len(sys.argv) > 1 else "llada"]
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
device, dtype, length, block = torch.device("cuda"), torch.bfloat16, 768, 32
model = random_model(family, family.config_class(), dtype, device)
engine = CompiledEngine(model)
ids = torch.randint(1000, (batch, length), device=device)
positions = torch.arange(length, device=device).expand(batch, -1)
kv = SequenceKV(length)
shift = model.logit_shift
span = (512 - shift, 512 + block)
full = lambda: engine.forward(ids, positions, kv_cache=kv.computing(0, length), logits_for=slice(512 - shift, 512 + block - shift))
full()
part = lambda: engine.forward(ids[:, span[0]:span[1]], positions[:, span[0]:span[1]], kv_cache=kv.computing(*span),
                              logits_for=slice(0, block))
print(f"graph replay, full forward ({batch}x{length}): {1000 * timed(full, 20):.2f} ms")
full()
print(f"graph replay, dual span ({batch}x{span[1] - span[0]}): {1000 * timed(part, 50):.2f} ms")

# The matrix products alone, as one graph per shape.
def products(n):
    x = torch.randn(batch, n, model.config.head_dim * engine.blocks[0].heads, dtype=dtype, device=device)
    ff = torch.randn(batch, n, engine.blocks[0].down_weight.shape[1], dtype=dtype, device=device)
    def run():
        for b in engine.blocks:
            F.linear(x, b.qkv_weight, b.qkv_bias); F.linear(x, b.out_weight); F.linear(x, b.gate_up_weight); F.linear(ff, b.down_weight)
        F.linear(x[:, :block], engine.head)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return 1000 * timed(graph.replay, 20)
print(f"matrix products only, graph: span {span[1] - span[0]}: {products(span[1] - span[0]):.2f} ms; full {length}: {products(length):.2f} ms")

logits = part()
generation = GENERATIONS.build({"name": "vanilla", "gen_length": 256, "steps": 64})
masked = torch.ones(batch, block, dtype=torch.bool, device=device)
quota = torch.full((batch,), 4, device=device)
generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
print(f"selection (vanilla, low_confidence, float64 softmax): {1000 * timed(lambda: generation.select(logits, masked, quota, generators), 50):.3f} ms")

engine.graphs = False
for name, forward in (("dual span", part), ("full forward", full)):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    print(f"kernels of one {name} (no graph):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))

# Attention alone per backend, at the dual span and the full forward's shapes.
from torch.nn.attention import SDPBackend, sdpa_kernel

heads, head_dim = engine.blocks[0].heads, model.config.head_dim
k = torch.randn(batch, engine.blocks[0].kv_heads, length, head_dim, dtype=dtype, device=device)
for n in (block, length):
    q = torch.randn(batch, heads, n, head_dim, dtype=dtype, device=device)
    times = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                times.append(f"{backend.name} {1000 * timed(lambda: F.scaled_dot_product_attention(q, k, k, enable_gqa=heads != k.shape[1]), 50) * 1000:.1f} us")
        except RuntimeError:
            times.append(f"{backend.name} n/a")
    print(f"attention, {n} queries over {length} keys: " + ", ".join(times))
