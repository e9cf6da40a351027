"""The decoding engine: how a forward pass is executed (`engine=eager|compiled|auto`).

`eager` runs DiffusionLM.forward, module by module: the reference every test is written against.
`compiled` runs the same math restructured for the GPU, where a batch-1 step is otherwise bound by
launching ~1,500 small kernels rather than by reading the weights:
- the q/k/v and the gate/up projections run as one matrix product each (the parameters become views
  into one fused matrix, so parameter names, checkpoints and the eager path are unchanged);
- keys/values live in preallocated full-sequence buffers, one set per (rows, length), written in place
  at the computed positions given as a tensor (not a Python slice), so one graph serves every block;
  block-causal families (Fast-dLLM v2) fill them block by block, their mask a graph input like the rest;
- grouped-query attention reads the shared key/value heads directly (SDPA `enable_gqa`); a short span
  at a small batch is attended with FlashAttention's kernel, and a forward over few positions multiplies
  with cuBLASLt's kernels, the fastest there;
- layers a reuse strategy skips (reuse=layer, reuse.base.ReusedLayers) add a contribution kept in a
  preallocated [rows, length, width] buffer per layer, written in place at the computed positions by
  the forwards that compute them;
- RMSNorm with its residual add, rotary embedding and the SiLU gate are compiled (torch.compile) into
  one kernel each, first with symbolic sizes, specialised to the shape once a forward shape recurs;
- each forward shape (rows, span, logits, padding or not, key/value buffers, layers skipped or
  recorded) is captured as a CUDA graph (again when its kernels are specialised) and then replayed: one
  launch per forward, no host work per layer.
On a CPU it runs the same restructured code without compilation or graphs (what the CPU tests check
against eager). `auto` is `compiled` on CUDA and `eager` elsewhere.

A forward runs eager instead, with a one-line notice, where the fast path cannot honour it: a reuse
strategy that decides per layer on the host (`runs_compiled()` false: it overrides `run_layer`, e.g.
reuse=layer with adaptive_tolerance), a key/value cache other than models.kv.SequenceKV, or a family
whose model or block forward is not the one this engine re-implements (see `unsupported`); a forward
with a position hook (reuse=trim|activation, cache=dllm|d2cache) runs eager, without a notice. The
rules a strategy follows to stay on the fast path are written in cache/base.py and reuse/base.py.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import sys
import types
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdllm.models.base import DiffusionLM
from fastdllm.models.kv import SequenceKV, StaticKV
from fastdllm.models.layers import KVCache, ReusedLayers, apply_rotary, attention, rotary_cos_sin

_NOTICES: set[str] = set()
# Captured forward shapes kept at most (a prefix cache at 512 + 256 tokens uses 9 per batch shape).
MAX_GRAPHS = 32
# Kernels specialised to a forward's shapes (see compile_or_eager) run the small kernels up to 2x faster
# than kernels with symbolic rows and positions (LLaDA-8B shapes), but each new shape costs a compilation
# (3-5 s per batch of new length, measured in an evaluation). So a forward is first captured with the
# shared symbolic kernels and recaptured with specialised ones once its shape has been replayed
# SPECIALISE_AFTER times, across batches: a dual or prefix span (the same shape in every batch, whatever
# its prompt length) soon is, a batch's full-sequence forwards (a new length per batch, one replay per
# block) are not unless their length recurs. At most STATIC_SHAPES shapes per kernel are specialised.
SPECIALISE_AFTER = 16
STATIC_SHAPES = 32
# Set while a forward is captured with specialised kernels (read by compile_or_eager's kernels).
_SPECIALISED = contextvars.ContextVar("specialised_kernels", default=False)
# Positions (rows x span) up to which a half-precision forward's matrix products use cuBLASLt (see _blas_library).
FEW_POSITIONS = 160


def notice(message: str) -> None:
    """Say once per process, in one line, that something runs off the fast path."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"engine=compiled: {message}", file=sys.stderr)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # layers.RMSNorm's math: normalise in float32, cast back, then scale.
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm, as one kernel: (h + delta, rms_norm(h + delta))."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection [B, n, (heads + 2 kv_heads) d] into rotated q [B, heads, n, d],
    rotated k and v [B, kv_heads, n, d]."""
    B, n, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.view(B, n, heads + 2 * kv_heads, head_dim).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def rotate_qkv_into(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                    fresh: Optional[torch.Tensor] = None) -> torch.Tensor:
    """rotate_qkv, writing k and v into the full-sequence buffers at positions `index` in the same
    kernel; returns q. fresh [B, n]: write only those positions of each row, keep the others."""
    q, k, v = rotate_qkv(qkv, cos, sin, heads, kv_heads)
    if fresh is not None:
        keep = ~fresh[:, None, :, None]
        k = torch.where(keep, keys.index_select(2, index), k)
        v = torch.where(keep, values.index_select(2, index), v)
    keys.index_copy_(2, index, k)
    values.index_copy_(2, index, v)
    return q


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class FusedBlock:
    """One block's weights as the compiled forward uses them."""

    def __init__(self, block):
        p = block.parts()
        self.attn_norm, self.mlp_norm, self.eps = p.attn_norm.weight, p.mlp_norm.weight, p.attn_norm.eps
        self.heads, self.kv_heads = p.heads, p.kv_heads
        self.qkv_weight = fuse_rows([p.q_proj, p.k_proj, p.v_proj], "weight")
        biases = [p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]
        self.qkv_bias = None if all(b is None for b in biases) else fuse_rows([p.q_proj, p.k_proj, p.v_proj], "bias")
        self.out_weight, self.out_bias = p.out_proj.weight, p.out_proj.bias
        self.gate_up_weight = fuse_rows([p.gate, p.up], "weight")
        self.down_weight = p.down.weight


def fuse_rows(linears: list[torch.nn.Linear], name: str) -> torch.Tensor:
    """Concatenate the linears' `name` parameters along the output rows, and make each parameter a
    view into the result: one matrix product computes all of them, and no memory is duplicated."""
    parts = [getattr(linear, name) for linear in linears]
    fused = torch.cat([p.detach() for p in parts])
    offset = 0
    for part in parts:
        rows = part.shape[0]
        part.data = fused[offset: offset + rows]
        offset += rows
    return fused


class CapturedForward:
    """One forward shape as a CUDA graph: static input tensors, copied into before each replay."""

    def __init__(self, run: Callable[..., torch.Tensor], inputs: dict[str, Optional[torch.Tensor]], pool,
                 specialised: bool = False):
        self.run, self.specialised = run, specialised
        token = _SPECIALISED.set(specialised)
        try:
            self._capture(inputs, pool)
        finally:
            _SPECIALISED.reset(token)

    def _capture(self, inputs: dict[str, Optional[torch.Tensor]], pool) -> None:
        run = self.run
        self.static = {name: None if t is None else t.clone() for name, t in inputs.items()}
        # Warm up off the capture (compilation, kernel selection, library workspaces), as CUDA graphs require.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = run(**self.static)
        self.pool = self.graph.pool()

    def __call__(self, inputs: dict[str, Optional[torch.Tensor]]) -> torch.Tensor:
        for name, tensor in inputs.items():
            if tensor is not None:
                self.static[name].copy_(tensor)
        self.graph.replay()
        # A copy: the next replay overwrites the graph's output while the caller may still hold this one.
        return self.output.clone()


class CompiledEngine:
    """engine=compiled for one model (see the module docstring). Build it with `build_engine`."""

    def __init__(self, model: DiffusionLM):
        self.model = model
        embedding, blocks, final_norm, head = model.parts()
        self.embedding, self.final_norm, self.head = embedding.weight, final_norm, head
        self.blocks = [FusedBlock(block) for block in blocks]
        first = self.blocks[0]
        self.head_dim = first.qkv_weight.shape[0] // (first.heads + 2 * first.kv_heads)
        self.device, self.dtype = self.embedding.device, self.embedding.dtype
        on_gpu = self.device.type == "cuda"
        self.graphs = on_gpu
        wrap = compile_or_eager if on_gpu else (lambda fn, **_: fn)
        self.norm, self.add_norm, self.gate = wrap(rms_norm), wrap(add_rms_norm), wrap(silu_gate)
        # rotate_qkv_into's keys/values (arguments 5, 6) span the whole sequence: their length stays symbolic.
        self.rotate, self.rotate_into = wrap(rotate_qkv), wrap(rotate_qkv_into, lengths={5: 2, 6: 2})
        self.rotary = wrap(rotary_cos_sin)
        self.multiprocessors = torch.cuda.get_device_properties(self.device).multi_processor_count if on_gpu else None
        # The memory pool the graphs share (they replay one at a time), set by the first capture.
        self.pool = None
        self.captured: dict[tuple, CapturedForward] = {}
        # Replays per forward shape (across batches), and how many make it worth specialised kernels.
        self.replays: collections.Counter[tuple] = collections.Counter()
        self.specialise_after = SPECIALISE_AFTER
        self.kv: dict[tuple[int, int], StaticKV] = {}
        # Per (rows, length): each reused layer's contribution (output minus input) [rows, length, width].
        self.contributions: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        # Per (rows, length): the SequenceKV whose keys/values the buffers hold (set by a full forward).
        self.owner: dict[tuple[int, int], weakref.ref] = {}

    def _attention_backends(self, q: torch.Tensor):
        """The attention kernels SDPA tries first for queries q [B, heads, n, d]. A short span at a small
        batch (fewer 128-query tiles than the GPU has multiprocessors) is attended fastest by
        FlashAttention's kernel (32 queries over 768 keys: 12.4 against cuDNN's 14.5 us, experiment 002);
        elsewhere SDPA's own order (cuDNN first) is. A backend that cannot run the call is skipped."""
        batch, heads, n, _ = q.shape
        if self.multiprocessors is None or batch * heads * -(-n // 128) >= self.multiprocessors:
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH], set_priority=True)

    @contextlib.contextmanager
    def _blas_library(self, positions: int):
        """The BLAS library for a forward's matrix products (chosen as the forward is captured). For few
        positions in half precision cuBLASLt's kernels are faster (one layer's products at 32 positions:
        112 against 117 us, at 160: 139 against 142; at 768 the default is: 483 against 506, experiment
        002); elsewhere torch's preferred library is kept."""
        if self.multiprocessors is None or self.dtype == torch.float32 or positions > FEW_POSITIONS:
            yield
            return
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch.backends.cuda.preferred_blas_library(previous)

    def clear(self) -> None:
        """Free the key/value and contribution buffers and the captured graphs (e.g. between benchmark
        configurations)."""
        self.captured.clear()
        self.kv.clear()
        self.contributions.clear()
        self.owner.clear()
        self.pool = None

    def supports(self, kv_cache: Optional[KVCache]) -> bool:
        if kv_cache is None or type(kv_cache) is SequenceKV:
            return True
        notice(f"key/value cache {type(kv_cache).__name__} is not models.kv.SequenceKV; its forwards run eager")
        return False

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                kv_cache=None, logits_for: slice = slice(None), reused: ReusedLayers = ReusedLayers(),
                start: int = 0, length: Optional[int] = None) -> torch.Tensor:
        """DiffusionLM.forward's contract (without layer_runner); kv_cache is None or a SequenceKV.
        `reused`: the reuse strategy's layers, and whether this forward skips them or records their
        contributions; these are kept per column of the sequence, so without a kv_cache (which knows it)
        the forward needs where its positions lie: columns [start, start + n) of `length`."""
        rows, n = input_ids.shape
        first, last, _ = logits_for.indices(n)
        buffers, columns, fresh, contributions = None, None, None, None
        if kv_cache is not None:
            buffers = self._buffers(rows, kv_cache)
            start, length, fresh = kv_cache.span[0], kv_cache.length, kv_cache.fresh
        if reused.layers:
            contributions = self._contributions(rows, length, reused.layers)
        if buffers is not None or contributions is not None:
            columns = torch.arange(start, start + n, device=self.device)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "key_mask": key_mask, "columns": columns,
                  "fresh": fresh, "logits_index": torch.arange(first, last, device=self.device)}

        def run(**static):
            with self._blas_library(rows * n):
                return self._forward(buffers, contributions, reused, **static)

        if not self.graphs:
            return run(**inputs)
        # The shape leaves out the sequence length (of the mask's keys, of the buffers: symbolic in the
        # specialised kernels), so a span's shape recurs across batches of any prompt length.
        shape = (rows, n, last - first, None if key_mask is None else tuple(key_mask.shape[:-1]), fresh is None, reused)
        key = shape + (None if key_mask is None else key_mask.shape[-1], None if buffers is None else id(buffers))
        self.replays[shape] += 1
        hot = self.replays[shape] >= self.specialise_after
        captured = self.captured.get(key)
        if captured is None or (hot and not captured.specialised):
            if captured is None and len(self.captured) >= MAX_GRAPHS:  # shapes that never repeat (cache=none over varied lengths)
                self.captured.clear()
                self.pool = None
            captured = self.captured[key] = CapturedForward(run, inputs, self.pool, specialised=hot)
            self.pool = captured.pool
        return captured(inputs)

    def _batch_shape(self, key: tuple[int, int]) -> None:
        """One batch shape (rows, length) at a time (an evaluation's batches differ in length): the
        buffers of the previous shape, and the graphs that read them, are freed rather than kept for later."""
        if key not in self.kv and key not in self.contributions:
            self.clear()

    def _contributions(self, rows: int, length: int, layers: frozenset[int]) -> dict[int, torch.Tensor]:
        """The reused layers' contribution buffers for this batch shape. They are not cleared between
        batches of one shape: a forward that skips a layer reads only positions that an earlier forward
        of its batch recorded (a block's first step records every position its later steps compute)."""
        key = (rows, length)
        self._batch_shape(key)
        contributions = self.contributions.setdefault(key, {})
        for layer in layers - contributions.keys():
            contributions[layer] = torch.zeros(rows, length, self.embedding.shape[1], dtype=self.dtype,
                                               device=self.device)
        return contributions

    def _buffers(self, rows: int, kv_cache) -> StaticKV:
        length = kv_cache.length
        key = (rows, length)
        if key not in self.kv:
            self._batch_shape(key)
            self.kv[key] = StaticKV(len(self.blocks), rows, self.blocks[0].kv_heads, length, self.head_dim, self.dtype,
                                    self.device)
        buffers = self.kv[key]
        # A block-causal cache is filled block by block and never by one full forward: it takes the
        # buffers at its first forward (positions it has not written are masked out of attention).
        if kv_cache.span == (0, length) or (kv_cache.starts_empty and not kv_cache.keys):
            # A full forward (re)records the keys/values: the buffers now belong to this SequenceKV,
            # which sees them as its own (so an eager forward on it reads the same tensors).
            self.owner[key] = weakref.ref(kv_cache)
            kv_cache.keys, kv_cache.values = dict(enumerate(buffers.keys)), dict(enumerate(buffers.values))
        elif self.owner.get(key, lambda: None)() is not kv_cache:
            raise RuntimeError(
                "engine=compiled keeps one set of key/value buffers per batch shape: a partial forward must use the "
                "SequenceKV recorded by the last full forward of that shape (two caches alive at once need engine=eager)"
            )
        return buffers

    def _forward(self, buffers: Optional[StaticKV], contributions: Optional[dict[int, torch.Tensor]],
                 reused: ReusedLayers, input_ids, position_ids, key_mask, columns, fresh, logits_index) -> torch.Tensor:
        rows, n = input_ids.shape
        h = F.embedding(input_ids, self.embedding)
        cos, sin = self.rotary(position_ids, self.head_dim, self.model.config.rope_theta)
        # What the previous layer adds to h (its feed-forward output, or a kept contribution), added in
        # the kernel of the next norm; None: h is the next layer's input. The adds happen in eager's
        # order (h + attention, + feed-forward, + contribution), so the values are eager's.
        pending = None
        # Past its keys/values, nothing reads the last layer's outputs but the output head: it runs its
        # queries, attention and feed-forward only for the positions whose logits are used (unless a
        # reuse strategy keeps its contribution at every position).
        last = len(self.blocks) - 1
        trim_last = logits_index.shape[0] < n and last not in reused.layers
        for i, block in enumerate(self.blocks):
            if i in reused.layers and reused.skipping:
                h = h if pending is None else h + pending
                pending = contributions[i].index_select(1, columns)
                continue
            if pending is None:
                x = self.norm(h, block.attn_norm, block.eps)
            else:
                h, x = self.add_norm(h, pending, block.attn_norm, block.eps)
            layer_input = h
            qkv = F.linear(x, block.qkv_weight, block.qkv_bias)
            if buffers is None:
                q, k, v = self.rotate(qkv, cos, sin, block.heads, block.kv_heads)
            else:
                k, v = buffers.keys[i], buffers.values[i]
                q = self.rotate_into(qkv, cos, sin, block.heads, block.kv_heads, k, v, columns, fresh)
            if i == last and trim_last:
                q, h = q.index_select(2, logits_index), h.index_select(1, logits_index)
                if key_mask is not None and key_mask.dim() == 4:  # a mask per query
                    key_mask = key_mask.index_select(2, logits_index)
            with self._attention_backends(q):
                a = attention(q, k, v, layer=i, key_mask=key_mask, kv_cache=None)
            h, x = self.add_norm(h, F.linear(a.transpose(1, 2).reshape(rows, q.shape[2], -1), block.out_weight,
                                             block.out_bias), block.mlp_norm, block.eps)
            pending = F.linear(self.gate(F.linear(x, block.gate_up_weight)), block.down_weight)
            if i in reused.layers:
                h, pending = h + pending, None
                contributions[i].index_copy_(1, columns, h - layer_input)
        # Only the positions whose logits are used go through the final norm and the output head.
        if not trim_last:
            h = h.index_select(1, logits_index)
            pending = None if pending is None else pending.index_select(1, logits_index)
        if pending is not None:
            h = h + pending
        return F.linear(self.norm(h, self.final_norm.weight, self.final_norm.eps), self.head).float()


def compile_or_eager(fn: Callable, backend: str | Callable = "inductor", lengths: Optional[dict[int, int]] = None
                     ) -> Callable:
    """torch.compile(fn) (one fused kernel), or fn itself, with a notice, where compilation fails.
    Two compilations: shared kernels, with the dimensions seen to change (rows, positions) symbolic, serve
    any shape without further compilation; kernels specialised to each input shape are used while
    _SPECIALISED is set (a forward replayed often enough, see SPECIALISE_AFTER), for at most STATIC_SHAPES
    shapes. Feature sizes stay constants in both, so no index arithmetic divides at runtime.
    `lengths` {argument index: dimension}: dimensions that are the whole sequence's length (key/value
    buffers), symbolic in the specialised kernels too, so that a span's kernels serve every prompt length."""
    lengths = lengths or {}
    # Copies with their own code objects: torch.compile keeps compiled variants, and counts them against
    # its recompilation limit, per code object.
    specialised, shared = (torch.compile(types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                                            fn.__defaults__, fn.__closure__), backend=backend)
                           for _ in range(2))
    static_shapes: set[tuple] = set()
    state = {"failed": False}

    def specialisable(args) -> bool:
        """Whether these arguments' shape has, or may still get, specialised kernels (then it counts)."""
        shape = tuple((tuple(None if d == lengths.get(i) else size for d, size in enumerate(a.shape)), a.dtype)
                      if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        if shape not in static_shapes and len(static_shapes) >= STATIC_SHAPES:
            return False
        static_shapes.add(shape)
        return True

    def call(*args):
        if not state["failed"]:
            try:
                if _SPECIALISED.get() and specialisable(args):
                    for i, a in enumerate(args):
                        if isinstance(a, torch.Tensor):
                            fix_sizes(a, lengths.get(i))
                    with torch._dynamo.config.patch(recompile_limit=2 * STATIC_SHAPES):
                        return specialised(*args)
                return shared(*args)
            except Exception as err:  # no compiler toolchain, unsupported backend: eager kernels still work
                state["failed"] = True
                notice(f"torch.compile of {fn.__name__} failed ({type(err).__name__}); that step runs unfused")
        return fn(*args)

    return call


def fix_sizes(tensor: torch.Tensor, length_dim: Optional[int]) -> None:
    """Have torch.compile treat every size of `tensor` as a constant, but dimension `length_dim` as symbolic."""
    for dim in range(tensor.dim()):
        if dim == length_dim:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
        else:
            torch._dynamo.mark_static(tensor, dim)


def build_engine(name: str, model: DiffusionLM) -> Optional[CompiledEngine]:
    """The engine for `engine=<name>`: None runs the model eagerly (DiffusionLM.forward)."""
    device = next(model.parameters()).device
    if name == "eager" or (name == "auto" and device.type != "cuda"):
        return None
    reason = unsupported(model)
    if reason is not None:
        notice(f"{reason}; the model runs eager")
        return None
    return CompiledEngine(model)


def unsupported(model: DiffusionLM) -> Optional[str]:
    """Why the compiled forward would not compute what the model's own forward does, or None.
    It re-implements DiffusionLM.forward over the blocks' parts(): a family that overrides the model's
    forward, or a block forward other than the one written beside its parts() (e.g. with an attention
    bias), is not covered."""
    if type(model).forward is not DiffusionLM.forward:
        return f"{type(model).__name__} overrides DiffusionLM.forward"
    _, blocks, _, _ = model.parts()
    for block in blocks:
        owner = next((cls for cls in type(block).__mro__ if "parts" in vars(cls)), None)
        if owner is None:
            return f"{type(block).__name__} exposes no parts()"
        if type(block).forward is not owner.forward:
            return f"{type(block).__name__} overrides the forward of {owner.__name__}"
    return None
