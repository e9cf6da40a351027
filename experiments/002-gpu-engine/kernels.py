"""The compiled engine's small kernels in isolation, at LLaDA-8B and Dream-7B shapes (bf16): rotary with the
key/value write, the SiLU gate, and attention of a short query span, each against alternatives, timed as
CUDA graphs of 32 calls (one per layer) so launch gaps do not count. The generated Triton code of the
rotary kernel is printed when run with TORCH_LOGS=output_code. Each function is compiled once with torch.compile's
defaults: the first shape it is called with gets kernels specialised to it, later shapes (and the Dream
rows, whose head counts differ) kernels with symbolic sizes; kernels_dynamic.py separates the two.
Run from the repository root:
    python3 experiments/002-gpu-engine/kernels.py [attention|products]
(`attention`: only SDPA's backends, each forced, at the spans a decode attends with; `products`: only a
layer's matrix products with the default BLAS library and with cuBLASLt.)
"""
import torch
import torch.nn.functional as F

from fastdllm import engine
from fastdllm.models.layers import rotary_cos_sin

device, dtype = torch.device("cuda"), torch.bfloat16
LAYERS = 32
SHAPES = {"llada": dict(heads=32, kv_heads=32, head_dim=128, ff=12288), "dream": dict(heads=28, kv_heads=4, head_dim=128, ff=18944)}


def graph_us(fn) -> float:
    """Microseconds per call of fn, replayed as one graph of LAYERS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / LAYERS)
    return sorted(times)[len(times) // 2]


# ---- rotary + key/value write: alternatives to engine.rotate_qkv_into
def then_copy(rotate):
    """`rotate` (compiled, q and k only) followed by the key/value writes as separate index_copy_ kernels."""
    def rotate_and_copy(qkv, cos, sin, heads, kv_heads, keys, values, index):
        q, k, v = rotate(qkv, cos, sin, heads, kv_heads)
        keys.index_copy_(2, index, k)
        values.index_copy_(2, index, v)
        return q
    return rotate_and_copy


def rotate_halves(qkv, cos, sin, heads, kv_heads):
    """Rotation on the two halves of each head (no concatenation of a rotated copy)."""
    B, n, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    x = qkv.view(B, n, heads + 2 * kv_heads, d)
    qk, v = x[:, :, :heads + kv_heads].float(), x[:, :, heads + kv_heads:]
    x1, x2 = qk[..., : d // 2], qk[..., d // 2:]
    c, s = cos[:, :, None, : d // 2], sin[:, :, None, : d // 2]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(qkv.dtype)
    q, k = rotated.transpose(1, 2).split([heads, kv_heads], dim=1)
    return q, k, v.transpose(1, 2)


rotate_then_copy = then_copy(torch.compile(engine.rotate_qkv))
halves_then_copy = then_copy(torch.compile(rotate_halves))
rotate_into = torch.compile(engine.rotate_qkv_into)
compiled_gate = torch.compile(engine.silu_gate)
compiled_norm = torch.compile(engine.add_rms_norm)


# ---- attention of a short span: keys split into chunks, merged by log-sum-exp
def split_key_attention(q, k, v, chunks: int):
    """q [B, H, n, d] over k, v [B, Hk, L, d] with the keys in `chunks` pieces as extra heads (a view),
    each group of H/Hk query heads folded into the query axis, merged by each piece's log-sum-exp."""
    B, H, n, d = q.shape
    Hk, L = k.shape[1], k.shape[2]
    g = H // Hk
    kc = k.view(B, Hk * chunks, L // chunks, d)
    vc = v.view(B, Hk * chunks, L // chunks, d)
    qc = q.view(B, Hk, 1, g * n, d).expand(B, Hk, chunks, g * n, d).reshape(B, Hk * chunks, g * n, d)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qc, kc, vc)[:2]
    return merge(out.view(B, Hk, chunks, g * n, d), lse.view(B, Hk, chunks, g * n)).view(B, H, n, d)


@torch.compile
def merge(out, lse):
    weights = torch.softmax(lse, dim=2)[..., None]
    return (out.float() * weights).sum(2).to(out.dtype)


def attention_backends():
    """SDPA's backends, each forced, for the spans a decode attends with (in graphs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for family, s in SHAPES.items():
        heads, kv_heads, d = s["heads"], s["kv_heads"], s["head_dim"]
        for rows, n, L in ((1, 32, 768), (8, 32, 768), (8, 160, 768), (1, 768, 768), (8, 768, 768)):
            q = torch.randn(rows, heads, n, d, dtype=dtype, device=device)
            k = torch.randn(rows, kv_heads, L, d, dtype=dtype, device=device)
            v = torch.randn_like(k)
            gqa = heads != kv_heads
            line = f"{family} rows={rows} attention {n}x{L}: default {graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)):.1f} us"
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel(backend):
                        us = graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
                    line += f", {backend.name} {us:.1f} us"
                except RuntimeError:
                    line += f", {backend.name} n/a"
            print(line, flush=True)


def products():
    """A layer's matrix products (fused q/k/v, output, fused gate/up, down) at LLaDA-8B shapes, with the
    BLAS library torch prefers by default and with cuBLASLt."""
    width, ff = 4096, 12288
    weights = [torch.randn(rows, cols, dtype=dtype, device=device) for rows, cols in
               ((3 * width, width), (width, width), (2 * ff, width), (width, ff))]
    for n in (32, 160, 768):
        x, y = torch.randn(n, width, dtype=dtype, device=device), torch.randn(n, ff, dtype=dtype, device=device)
        line = f"products of one layer, {n} positions:"
        for library in ("default", "cublaslt"):
            if library != "default":
                torch.backends.cuda.preferred_blas_library(library)
            each = [graph_us(lambda w=w: F.linear(y if w.shape[1] == ff else x, w)) for w in weights]
            line += f" {library} " + " + ".join(f"{t:.1f}" for t in each) + f" = {sum(each):.1f} us;"
        torch.backends.cuda.preferred_blas_library("default")
        print(line, flush=True)


def main():
    torch.manual_seed(0)
    for family, s in SHAPES.items():
        heads, kv_heads, d, ff = s["heads"], s["kv_heads"], s["head_dim"], s["ff"]
        for rows, n, L in ((1, 32, 768), (1, 768, 768), (8, 160, 768), (8, 768, 768)):
            qkv = torch.randn(rows, n, (heads + 2 * kv_heads) * d, dtype=dtype, device=device)
            cos, sin = rotary_cos_sin(torch.arange(n, device=device).expand(rows, -1), d, 10000.0)
            keys = torch.zeros(rows, kv_heads, L, d, dtype=dtype, device=device)
            values = torch.zeros_like(keys)
            index = torch.arange(L - n, L, device=device)
            args = (qkv, cos, sin, heads, kv_heads, keys, values, index)
            reference = engine.rotate_qkv_into(*args)
            ref_k = keys.clone()
            for name, fn in (("rotate_into", rotate_into), ("rotate_then_copy", rotate_then_copy),
                             ("halves_then_copy", halves_then_copy)):
                keys.zero_()
                same = torch.equal(fn(*args), reference) and torch.equal(keys, ref_k)
                print(f"{family} rows={rows} n={n} rotary {name}: {graph_us(lambda: fn(*args)):.1f} us  same={same}")
            print(f"{family} rows={rows} n={n} rotary eager: {graph_us(lambda: engine.rotate_qkv_into(*args)):.1f} us")
            width = heads * d
            gate_up = torch.randn(rows, n, 2 * ff, dtype=dtype, device=device)
            h = torch.randn(rows, n, width, dtype=dtype, device=device)
            w = torch.ones(width, dtype=dtype, device=device)
            ideal = (gate_up.numel() * 1.5 * 2) / 4.2e12 * 1e6
            print(f"{family} rows={rows} n={n} gate compiled {graph_us(lambda: compiled_gate(gate_up)):.1f} us, "
                  f"eager {graph_us(lambda: engine.silu_gate(gate_up)):.1f} us, bandwidth floor {ideal:.1f} us; "
                  f"add_norm compiled {graph_us(lambda: compiled_norm(h, h, w, 1e-5)):.1f} us")
            if n == 32:
                q = torch.randn(rows, heads, n, d, dtype=dtype, device=device)
                k = torch.randn(rows, kv_heads, L, d, dtype=dtype, device=device)
                v = torch.randn_like(k)
                ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)
                line = f"{family} rows={rows} attention {n}x{L}: sdpa {graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != kv_heads)):.1f} us"
                for chunks in (1, 2, 4, 8, 16):
                    try:
                        err = (split_key_attention(q, k, v, chunks) - ref).abs().max().item()
                        line += f", split {chunks}: {graph_us(lambda: split_key_attention(q, k, v, chunks)):.1f} us (err {err:.4f})"
                    except RuntimeError as error:
                        line += f", split {chunks}: {type(error).__name__} {str(error)[:80]}"
                print(line)


if __name__ == "__main__":
    import sys

    {"attention": attention_backends, "products": products}.get(sys.argv[1] if sys.argv[1:] else "", main)()
