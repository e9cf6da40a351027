"""The decoding engine: how the one forward pass (DiffusionLM.forward) is executed (`engine=eager|compiled|auto`).

`eager` calls the forward as it is: the reference every test is written against. `compiled` runs the
same forward, where a batch-1 step on a GPU is otherwise bound by launching ~1,500 small kernels
rather than by reading the weights; what it adds is its own, never the math:
- the forward's small kernels (RMSNorm with its residual add, rotary embedding, rotary with the
  key/value write, the SiLU gate; models.layers.Kernels) compiled with torch.compile into one kernel
  each, first with symbolic sizes, specialised to the shape once a forward shape recurs;
- keys/values in preallocated full-sequence buffers (models.kv.StaticKV) lent to the cache's
  SequenceKV, one set per (rows, length), written in place at the computed columns given as a tensor,
  so one graph serves every block; the reused layers' contributions (reuse=layer) likewise;
- the attention backend and BLAS library per shape: a short span at a small batch is attended with
  FlashAttention's kernel, a forward over few positions multiplies with cuBLASLt's kernels;
- each forward shape (rows, span, logits, padding or not, key/value buffers, layers skipped or
  recorded) captured as a CUDA graph (again when its kernels are specialised) and then replayed: one
  launch per forward, no host work per layer.
On a CPU it runs the same forward without compilation or graphs. `auto` is `compiled` on CUDA and
`eager` elsewhere.

A forward runs eager instead, said once on the terminal and recorded in `fallbacks` (results.json's
`engine_fallbacks`), where the fast path cannot honour it: a reuse strategy that decides per layer on
the host (`runs_compiled()` false, e.g. reuse=layer with adaptive_tolerance), a position hook that
cannot be captured (`capture_key()` None), or a family that overrides DiffusionLM.forward. The rules
a strategy follows to stay on the fast path are written in cache/base.py and reuse/base.py.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import sys
import time
import types
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastdllm.models.base import DiffusionLM
from fastdllm.models.kv import PositionKV, SequenceKV, StaticKV
from fastdllm.models.layers import (KVCache, Kernels, ReusedLayers, add_rms_norm, rms_norm, rotary_cos_sin, rotate_qkv,
                                    rotate_qkv_into, silu_gate)

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


# Where torch.compile keeps its compiled kernels between runs (unless TORCHINDUCTOR_CACHE_DIR is set):
# a second evaluation on the same machine loads them instead of compiling again.
COMPILE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastdllm" / "torch-compile"


def notice(message: str) -> None:
    """Say once per process, in one line, that something runs off the fast path."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"engine=compiled: {message}", file=sys.stderr)


class CapturedForward:
    """One forward shape as a CUDA graph: static input tensors, copied into before each replay."""

    def __init__(self, run: Callable[..., torch.Tensor], inputs: dict[str, Optional[torch.Tensor]], pool,
                 specialised: bool = False, state: tuple[torch.Tensor, ...] = (), hook=None):
        self.run, self.specialised, self.hook = run, specialised, hook
        token = _SPECIALISED.set(specialised)
        try:
            self._capture(inputs, pool, state)
        finally:
            _SPECIALISED.reset(token)

    def _capture(self, inputs: dict[str, Optional[torch.Tensor]], pool, state: tuple[torch.Tensor, ...]) -> None:
        run = self.run
        self.static = {name: None if t is None else t.clone() for name, t in inputs.items()}
        # Warm up off the capture (compilation, kernel selection, library workspaces), as CUDA graphs
        # require. The warm-up really runs the forward: the tensors a strategy updates in place (`state`)
        # are put back afterwards, so that the replay below is the forward's only effect.
        kept = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, saved in zip(state, kept):
            tensor.copy_(saved)
        if self.hook is not None:
            self.hook.counted = 0
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = run(**self.static)
        self.pool = self.graph.pool()
        # A position hook's count of the positions its plans compute (fixed by the graph's shapes).
        self.counted = 0 if self.hook is None else self.hook.counted

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
        embedding, blocks, _, _ = model.parts()
        self.num_layers, self.width = len(blocks), embedding.weight.shape[1]
        self.device, self.dtype = embedding.weight.device, embedding.weight.dtype
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
        self.graphs = on_gpu
        wrap = compile_or_eager if on_gpu else (lambda fn, **_: fn)
        # rotate_qkv_into's keys/values (arguments 5, 6) span the whole sequence: their length stays symbolic.
        self.kernels = Kernels(norm=wrap(rms_norm), add_norm=wrap(add_rms_norm), rotary=wrap(rotary_cos_sin),
                               rotate=wrap(rotate_qkv), rotate_into=wrap(rotate_qkv_into, lengths={5: 2, 6: 2}),
                               gate=wrap(silu_gate), attention_backends=self._attention_backends)
        self.multiprocessors = torch.cuda.get_device_properties(self.device).multi_processor_count if on_gpu else None
        # The memory pool the graphs share (they replay one at a time), set by the first capture.
        self.pool = None
        self.captured: dict[tuple, CapturedForward] = {}
        # Replays per forward shape (across batches), and how many make it worth specialised kernels.
        self.replays: collections.Counter[tuple] = collections.Counter()
        self.specialise_after = SPECIALISE_AFTER
        self.kv: dict[tuple[int, int], StaticKV] = {}
        # Per (rows, length): tensors kept across forwards (reused layers' contributions, strategies' state).
        self.static: dict[tuple[int, int], dict[tuple, torch.Tensor]] = {}
        # Per (rows, length): the SequenceKV whose keys/values the buffers hold (set by a full forward).
        self.owner: dict[tuple[int, int], weakref.ref] = {}
        # What ran off the fast path, and why (results.json's engine_fallbacks).
        self.fallbacks: list[str] = []
        # Seconds spent capturing graphs (and compiling their kernels): results.json's warmup_seconds.
        self.warmup_seconds = 0.0

    def fallback(self, reason: str) -> None:
        """Record (and say once) that something runs off the fast path."""
        if reason not in self.fallbacks:
            self.fallbacks.append(reason)
        notice(reason)

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
        """Free the key/value and kept buffers and the captured graphs (e.g. between benchmark configurations)."""
        self.captured.clear()
        self.kv.clear()
        self.static.clear()
        self.owner.clear()
        self.pool = None

    def supports(self, kv_cache: Optional[KVCache]) -> bool:
        if kv_cache is None or isinstance(kv_cache, (SequenceKV, PositionKV)):
            return True
        self.fallback(f"key/value cache {type(kv_cache).__name__} is not one of models.kv's; its forwards run eager")
        return False

    def buffer(self, rows: int, length: int, name: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-initialised tensor kept for this batch shape (rows, length) under `name`: the same
        tensor for every batch of that shape, so that captured graphs read and write it in place. Not
        cleared between batches: its user writes what it reads within a batch."""
        key = (rows, length)
        self._batch_shape(key)
        kept = self.static.setdefault(key, {})
        if (name, shape, dtype) not in kept:
            kept[(name, shape, dtype)] = torch.zeros(shape, dtype=dtype, device=self.device)
        return kept[(name, shape, dtype)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                kv_cache=None, logits_for: slice = slice(None), *, columns: Optional[torch.Tensor] = None,
                fresh: Optional[torch.Tensor] = None, position_hook=None, reused: ReusedLayers = ReusedLayers(),
                contributions: Optional[dict[int, torch.Tensor]] = None) -> torch.Tensor:
        """DiffusionLM.forward's contract (without layer_runner), run with compiled kernels and, on a GPU,
        as a captured CUDA graph per forward shape."""
        rows, n = input_ids.shape
        if isinstance(logits_for, slice):
            logits_for = torch.arange(*logits_for.indices(n), device=self.device)
        if isinstance(kv_cache, SequenceKV):
            self._lend_buffers(rows, kv_cache)
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "key_mask": key_mask, "columns": columns,
                  "fresh": fresh, "logits_for": logits_for}

        def run(**static):
            with self._blas_library(rows * n):
                return self.model.forward(kv_cache=kv_cache, position_hook=position_hook, reused=reused,
                                          contributions=contributions, kernels=self.kernels, **static)

        if not self.graphs:
            return run(**inputs)
        hook_key, state = (), ()
        if position_hook is not None:
            hook_key = position_hook.capture_key()
            if hook_key is None:
                strategy = type(getattr(position_hook, "hook", position_hook)).__name__  # inside a CountingHook
                self.fallback(f"{strategy} chooses its positions on the host: its forwards run without CUDA graphs")
                return run(**inputs)
            state = tuple(position_hook.state_tensors())
        # The shape leaves out the sequence length (of the mask's keys, of the buffers: symbolic in the
        # specialised kernels), so a span's shape recurs across batches of any prompt length.
        shape = (rows, n, tuple(logits_for.shape), None if key_mask is None else tuple(key_mask.shape[:-1]),
                 fresh is None, reused, hook_key)
        kv_key = None if not isinstance(kv_cache, SequenceKV) else id(self.kv[(rows, kv_cache.length)])
        kept = tuple(id(t) for t in (contributions or {}).values())
        key = shape + (None if key_mask is None else key_mask.shape[-1], kv_key, kept)
        self.replays[shape] += 1
        hot = self.replays[shape] >= self.specialise_after
        captured = self.captured.get(key)
        if captured is None or (hot and not captured.specialised):
            if captured is None and len(self.captured) >= MAX_GRAPHS:  # shapes that never repeat (cache=none over varied lengths)
                self.captured.clear()
                self.pool = None
            started = time.perf_counter()
            captured = self.captured[key] = CapturedForward(run, inputs, self.pool, specialised=hot, state=state,
                                                            hook=position_hook)
            self.warmup_seconds += time.perf_counter() - started
            self.pool = captured.pool
        logits = captured(inputs)
        if position_hook is not None:  # what its plans computed, counted as the graph was captured
            position_hook.counted = captured.counted
        return logits

    def _batch_shape(self, key: tuple[int, int]) -> None:
        """One batch shape (rows, length) at a time (an evaluation's batches differ in length): the
        buffers of the previous shape, and the graphs that read them, are freed rather than kept for later."""
        if key not in self.kv and key not in self.static:
            self.clear()

    def _lend_buffers(self, rows: int, kv_cache: SequenceKV) -> None:
        length = kv_cache.length
        key = (rows, length)
        if key not in self.kv:
            self._batch_shape(key)
            _, blocks, _, _ = self.model.parts()
            parts = blocks[0].parts()
            head_dim = parts.q_proj.out_features // parts.heads
            self.kv[key] = StaticKV(len(blocks), rows, parts.kv_heads, length, head_dim, self.dtype, self.device)
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
    """Why engine=compiled cannot run this model, or None. It runs DiffusionLM.forward with its own
    kernels: a family that replaces that forward computes something the engine does not know."""
    if type(model).forward is not DiffusionLM.forward:
        return f"{type(model).__name__} overrides DiffusionLM.forward"
    return None
