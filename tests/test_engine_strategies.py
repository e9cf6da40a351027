"""Every cache and reuse strategy on engine=compiled decodes as eager, tokens and every counter.

On the CPU the engine runs the one forward without graphs; `EmulatedCapture` then stands in for a
CUDA graph's capture as far as a CPU can: the capture's warm-up really runs the forward (with the
strategy's `state_tensors` put back afterwards), so a strategy whose warm-up leaves a trace decodes
differently. On a GPU the same cases run with real CUDA graphs, float32.
"""
from __future__ import annotations

import pytest
import torch

import fastdllm.engine as engine_module
from fastdllm.cache import CACHES
from fastdllm.engine import CompiledEngine
from fastdllm.generation import GENERATIONS
from fastdllm.loop import generate
from fastdllm.models.tiny import build_tiny_model
from fastdllm.reuse import REUSES
from test_caches import GEN_LENGTH, PROMPTS

CACHES_ON_ENGINE = {
    "none": {"name": "none"},
    "dual": {"name": "dual"},
    "dllm": {"name": "dllm", "kp": 4, "kr": 2, "rou": 0.25},
    "d2cache": {"name": "d2cache", "rollout_p": 0.3, "current_k": 4, "inflate_w": 1},
}
REUSES_ON_ENGINE = {
    "none": {"name": "none"},
    "layer": {"name": "layer", "k": 1},
    "trim": {"name": "trim", "tolerance": 0.01, "max_ratio": 0.5},
    "activation": {"name": "activation", "tolerance": 0.01, "max_ratio": 0.5},
}
# A position-choosing cache does not combine with a reuse strategy (the strategies refuse it).
CASES = [(c, r) for c in CACHES_ON_ENGINE for r in REUSES_ON_ENGINE if r == "none" or c in ("none", "dual")]


class EmulatedCapture:
    """engine.CapturedForward on a CPU, for one forward: the warm-up runs the forward and puts `state`
    back; the capture, which a GPU records without running, is then the forward's real run (as the
    graph's first replay would be), counting the hook's positions once."""

    def __init__(self, run, inputs, pool, specialised=False, state=(), hook=None):
        self.run, self.specialised, self.pool, self.hook = run, specialised, None, hook
        kept = [t.clone() for t in state]
        run(**inputs)
        for tensor, saved in zip(state, kept):
            tensor.copy_(saved)
        if hook is not None:
            hook.counted = 0
        self.output = None

    def __call__(self, inputs):
        self.output = self.run(**inputs)
        self.counted = 0 if self.hook is None else self.hook.counted
        return self.output


class NeverReplayed(dict):
    """The engine's captured forwards, every lookup a miss: each forward is captured afresh (a replay
    would rerun the capture's Python objects, which a GPU does not: the GPU test checks replays)."""

    def get(self, key, default=None):
        return None


def emulated_engine(model, monkeypatch) -> CompiledEngine:
    engine = CompiledEngine(model)
    engine.graphs, engine.captured = True, NeverReplayed()
    monkeypatch.setattr(engine_module, "CapturedForward", EmulatedCapture)
    return engine


def decode(family, cache, reuse, engine, model, tokenizer, device, **generation):
    config = {"name": "vanilla", "gen_length": GEN_LENGTH, "block_length": 8, "steps": 8} | generation
    return generate(model, [tokenizer(p)["input_ids"] for p in PROMPTS], gen_length=GEN_LENGTH,
                    generation=GENERATIONS.build(config), cache=CACHES.build(CACHES_ON_ENGINE[cache]),
                    reuse=REUSES.build(REUSES_ON_ENGINE[reuse]),
                    generators=[torch.Generator(device).manual_seed(i) for i in range(len(PROMPTS))],
                    stop_ids=[model.config.eos_token_id], engine=engine)


def assert_same(compiled, eager):
    assert torch.equal(compiled.responses, eager.responses)
    assert compiled.nfe == eager.nfe and compiled.positions == eager.positions
    assert compiled.layer_positions == eager.layer_positions
    assert compiled.committed_per_step == eager.committed_per_step


@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("cache,reuse", CASES)
@pytest.mark.parametrize("options", [{}, {"cfg_scale": 1.0}, {"threshold": 0.5}], ids=["plain", "cfg", "threshold"])
def test_strategies_on_the_engine_decode_as_eager(family, cache, reuse, options, monkeypatch):
    """Every forward captured (emulated: see EmulatedCapture) decodes as eager does."""
    model, tokenizer = build_tiny_model(family, std=0.3, seed=2)
    engine = emulated_engine(model, monkeypatch)
    eager = decode(family, cache, reuse, None, model, tokenizer, "cpu", **options)
    assert_same(decode(family, cache, reuse, engine, model, tokenizer, "cpu", **options), eager)
    assert engine.captured, "the forwards were captured"
    assert not engine.fallbacks


def test_a_warm_up_that_leaves_a_trace_changes_the_decode(monkeypatch):
    """The emulation is strict enough to matter: without putting dllm's value cache back after the
    warm-up, its adaptive layers compare fresh values with themselves and select other rows."""
    model, tokenizer = build_tiny_model("llada", std=0.3, seed=2)
    engine = emulated_engine(model, monkeypatch)
    eager = decode("llada", "dllm", "none", None, model, tokenizer, "cpu")
    from fastdllm.cache.dllm import DLLMCache

    monkeypatch.setattr(DLLMCache, "state_tensors", lambda self: [])
    traced = decode("llada", "dllm", "none", engine, model, tokenizer, "cpu")
    assert not torch.equal(traced.responses, eager.responses) or traced.layer_positions != eager.layer_positions


def test_trim_without_a_cap_runs_without_graphs_and_says_so(monkeypatch, capsys):
    """reuse=trim without max_ratio reads a count on the host inside the forward: not capturable."""
    monkeypatch.setattr(engine_module, "_NOTICES", set())
    model, tokenizer = build_tiny_model("llada", std=0.3, seed=2)
    engine = CompiledEngine(model)
    engine.graphs = True
    monkeypatch.setitem(REUSES_ON_ENGINE, "trim", {"name": "trim", "tolerance": 0.01})
    eager = decode("llada", "none", "trim", None, model, tokenizer, "cpu")
    assert_same(decode("llada", "none", "trim", engine, model, tokenizer, "cpu"), eager)
    assert engine.fallbacks == ["TrimReuse chooses its positions on the host: its forwards run without CUDA graphs"]
    assert "TrimReuse chooses its positions on the host" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real CUDA graphs)")
@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("cache,reuse", CASES)
@pytest.mark.parametrize("options", [{}, {"threshold": 0.5}], ids=["plain", "threshold"])
def test_strategies_under_cuda_graphs_decode_as_eager(family, cache, reuse, options):
    """Two batches through one engine (the second replays the first's graphs), each equal to eager."""
    model, tokenizer = build_tiny_model(family, std=0.3, seed=2)
    model = model.cuda()
    engine = CompiledEngine(model)
    eager = decode(family, cache, reuse, None, model, tokenizer, "cuda", **options)
    for _ in range(2):
        assert_same(decode(family, cache, reuse, engine, model, tokenizer, "cuda", **options), eager)
    assert engine.captured and not engine.fallbacks
