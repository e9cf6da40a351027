"""engine=compiled against engine=eager on tiny random models, CPU, float32 (no compilation or CUDA
graphs on a CPU: this checks the restructured forward: fused projections, static key/value buffers
written at tensor positions, grouped-query attention, the final-position selection, the layers that
reuse=layer skips)."""
from __future__ import annotations

import pytest
import torch

from fastdllm.cache import CACHES
from fastdllm.models.kv import SequenceKV
from fastdllm.engine import CompiledEngine, build_engine
from fastdllm.generation import GENERATIONS
from fastdllm.loop import generate
from fastdllm.models.layers import fused_weights
from fastdllm.models.tiny import build_tiny_model
from fastdllm.reuse import REUSES
from fastdllm.reuse.base import ReuseConfig, ReuseStrategy
from fastdllm.reuse.layer import LayerReuseConfig
from test_caches import GEN_LENGTH, PROMPTS, tiny
from test_caches import decode as decode_tiny


def decode(family, cache: str, engine, reuse=None, **generation):
    return decode_tiny(family, {"name": cache}, engine=engine, reuse=reuse, **generation)


@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("options", [{}, {"cfg_scale": 1.5}, {"threshold": 0.5}, {"temperature": 1.0, "steps": 8}])
def test_compiled_engine_decodes_as_eager(family, cache, options):
    model, _ = tiny(family)
    engine = build_engine("compiled", model)
    assert isinstance(engine, CompiledEngine)
    eager = decode(family, cache, None, **options)
    compiled = decode(family, cache, engine, **options)
    assert torch.equal(compiled.responses, eager.responses)
    assert compiled.nfe == eager.nfe and compiled.positions == eager.positions
    assert compiled.committed_per_step == eager.committed_per_step
    # The compiled forwards really ran: one key/value buffer set per batch shape for the cached runs.
    assert (len(engine.kv) == 1) == (cache != "none")


def test_auto_engine_is_eager_on_cpu():
    model, _ = tiny("llada")
    assert build_engine("auto", model) is None and build_engine("eager", model) is None


def test_fused_projections_are_views_of_unchanged_weights():
    """The one forward multiplies with fused q/k/v and gate/up matrices; the parameters become views
    into them, so names and values are unchanged, and after a move to another dtype they are fused again."""
    model, _ = build_tiny_model("Dream", std=0.3, seed=4)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    ids, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    with torch.no_grad():
        logits = model(ids, positions)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layer = model.model.layers[0]
    weights = fused_weights(layer)
    assert layer.self_attn.q_proj.weight.untyped_storage().data_ptr() == weights.qkv_weight.untyped_storage().data_ptr()
    assert weights.qkv_bias is not None  # Dream's projections carry biases
    model.double()
    with torch.no_grad():
        again = model(ids, positions)
    assert fused_weights(layer) is not weights and fused_weights(layer).qkv_weight.dtype == torch.float64
    torch.testing.assert_close(again.float(), logits, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_unfused_parameters():
    """While gradients are recorded (training), the fused matrices are built from the parameters
    themselves, so every projection gets its gradient."""
    model, _ = build_tiny_model("llada", std=0.3, seed=4)
    model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None]).sum().backward()
    block = model.model.transformer["blocks"][0]
    for linear in (block.q_proj, block.k_proj, block.v_proj, block.ff_proj, block.up_proj):
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


class SkipSecondLayer(ReuseStrategy):
    def run_layer(self, layer, hidden, compute):
        return hidden if layer == 1 else compute(hidden)


def test_reuse_deciding_per_layer_runs_eager_with_a_notice(capsys):
    model, _ = tiny("llada")
    reuse = SkipSecondLayer(ReuseConfig(name="skip-second"))
    eager = decode("llada", "none", None, reuse=reuse)
    compiled = decode("llada", "none", CompiledEngine(model), reuse=reuse)
    assert torch.equal(compiled.responses, eager.responses)
    assert "reuse=skip-second" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("reuse", [{"k": 1}, {"layers": [0]}, {"k": 1, "refresh_interval": 2}],
                         ids=["last", "first", "refresh-every-2"])
def test_layer_reuse_runs_compiled_as_eager(family, cache, reuse, capsys, monkeypatch):
    """The skipped layers add the contributions the engine recorded, in eager's order of the adds, and
    count no layer-positions; the same engine decodes a second batch of the same shape alike."""
    monkeypatch.setattr("fastdllm.engine._NOTICES", set())
    model, _ = tiny(family)
    engine = build_engine("compiled", model)
    config = {"name": "layer"} | reuse
    eager = decode(family, cache, None, reuse=REUSES.build(config))
    layers = len(model.parts()[1])
    assert sum(eager.layer_positions) < layers * sum(eager.positions)  # layers were skipped
    for _ in range(2):
        compiled = decode(family, cache, engine, reuse=REUSES.build(config))
        assert torch.equal(compiled.responses, eager.responses)
        assert compiled.nfe == eager.nfe and compiled.positions == eager.positions
        assert compiled.committed_per_step == eager.committed_per_step
        assert compiled.layer_positions == eager.layer_positions
    # The compiled forwards really ran: one contribution buffer per skipped layer, no notice.
    skipped = LayerReuseConfig(**reuse).skipped_layers(layers)
    assert [{name[1] for name, _, _ in kept if name[0] == "contribution"} for kept in engine.static.values()] == [skipped]
    assert "engine=compiled" not in capsys.readouterr().err


def test_layer_reuse_with_adaptive_tolerance_runs_eager_with_a_notice(capsys, monkeypatch):
    monkeypatch.setattr("fastdllm.engine._NOTICES", set())
    model, _ = tiny("llada")
    engine = CompiledEngine(model)
    config = {"name": "layer", "k": 1, "adaptive_tolerance": 0.1}
    eager = decode("llada", "dual", None, reuse=REUSES.build(config))
    compiled = decode("llada", "dual", engine, reuse=REUSES.build(config))
    assert torch.equal(compiled.responses, eager.responses) and compiled.layer_positions == eager.layer_positions
    assert not engine.kv and not engine.static
    assert "reuse=layer decides per layer on the host" in capsys.readouterr().err


def test_a_new_batch_shape_frees_the_previous_buffers():
    model, tokenizer = tiny("Dream")
    engine = CompiledEngine(model)
    for prompts in (PROMPTS, PROMPTS[:2] + ["a much longer prompt than any before it"]):
        kwargs = dict(gen_length=GEN_LENGTH, generation=GENERATIONS.build({"name": "vanilla", "gen_length": GEN_LENGTH, "block_length": 8}),
                      cache=CACHES.build({"name": "dual"}), reuse=REUSES.build({"name": "none"}),
                      stop_ids=[model.config.eos_token_id])
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        generators = [torch.Generator() for _ in ids]  # greedy: no random numbers are drawn
        eager = generate(model, ids, generators=generators, **kwargs)
        compiled = generate(model, ids, generators=generators, engine=engine, **kwargs)
        assert torch.equal(compiled.responses, eager.responses)
        assert list(engine.kv) == [(len(ids), max(map(len, ids)) + GEN_LENGTH)]


def test_partial_forward_needs_the_recorded_cache():
    model, _ = tiny("llada")
    engine = CompiledEngine(model)
    ids = torch.randint(10, 40, (1, 12))
    positions = torch.arange(12)[None]
    recorded = SequenceKV(12)
    engine.forward(ids, positions, kv_cache=recorded.computing(0, 12), columns=torch.arange(12))
    engine.forward(ids[:, 4:8], positions[:, 4:8], kv_cache=recorded.computing(4, 8), columns=torch.arange(4, 8))
    with pytest.raises(RuntimeError, match="SequenceKV recorded by the last full forward"):
        engine.forward(ids[:, 4:8], positions[:, 4:8], kv_cache=SequenceKV(12).computing(4, 8), columns=torch.arange(4, 8))


def test_steps_beyond_the_tokens_of_a_block_stop_early():
    """With more steps than tokens the last quotas are 0: the loop runs only the steps that commit."""
    out = decode("llada", "dual", None, steps=2 * GEN_LENGTH)
    assert out.nfe == [GEN_LENGTH] * len(PROMPTS)
    assert all(steps == [1] * GEN_LENGTH for steps in out.committed_per_step)


def test_a_family_with_its_own_forward_runs_eager_with_a_notice(capsys):
    """engine=compiled runs DiffusionLM.forward with its own kernels: a family that replaces that
    forward computes something the engine does not know, so it is refused with the reason."""
    model, _ = build_tiny_model("Dream", std=0.3, seed=5)
    family = type(model)
    model.__class__ = type("OwnForward", (family,), {"forward": lambda self, *args, **kwargs: family.forward(self, *args, **kwargs)})
    assert build_engine("compiled", model) is None
    assert "OwnForward overrides DiffusionLM.forward" in capsys.readouterr().err


def test_a_block_variant_the_forward_does_not_implement_is_refused():
    """A family declares the variants of its blocks; one the forward does not implement (on any
    engine) stops the model from being built, naming it, rather than running the wrong math."""
    family = type(build_tiny_model("llada")[0])
    unknown = type("WithExperts", (family,), {"variants": frozenset({"moe_feed_forward"})})
    with pytest.raises(ValueError, match="moe_feed_forward"):
        unknown(family.config_class.tiny(vocab_size=64))


@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("logits_for", [slice(None), slice(4, 8), slice(11, 12)])
@pytest.mark.parametrize("per_query_mask", [False, True])
def test_forward_logits_match_eager(family, logits_for, per_query_mask):
    """The compiled forward's logits, including the last layer run only for the positions with logits,
    under a key mask or a per-query (block-causal) mask."""
    model, _ = tiny(family)
    ids = torch.randint(10, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).repeat(2, 1)
    if per_query_mask:
        key_mask = (torch.arange(12)[None, :] // 4 <= torch.arange(12)[:, None] // 4)[None, None]
    else:
        key_mask = torch.ones(2, 12, dtype=torch.bool)
        key_mask[1, :3] = False
    eager = model(ids, positions, key_mask, logits_for=logits_for)
    compiled = CompiledEngine(model).forward(ids, positions, key_mask, logits_for=logits_for)
    assert compiled.shape == eager.shape
    torch.testing.assert_close(compiled, eager.float(), rtol=1e-5, atol=1e-5)


def test_compiled_kernels_are_specialised_to_the_first_shapes_then_shared(monkeypatch):
    """compile_or_eager: while specialising, each of the first STATIC_SHAPES input shapes is compiled for
    itself (once, however often it recurs, and whatever the length of a whole-sequence buffer); later
    shapes, and every call outside specialising, share one compilation with symbolic sizes; results are
    fn's throughout."""
    import torch._dynamo

    from fastdllm import engine as engine_module

    monkeypatch.setattr(engine_module, "STATIC_SHAPES", 3)
    torch._dynamo.reset()
    compiled_graphs = []

    def backend(graph, example_inputs):
        # A symbolic size arrives as an input of its own, beside the tensors.
        compiled_graphs.append([tuple(x.shape) if isinstance(x, torch.Tensor) else "size" for x in example_inputs])
        return graph.forward

    def write_and_shift(x, by, buffer, index):
        buffer.index_copy_(0, index, x * by)
        return x + 1

    fn = engine_module.compile_or_eager(write_and_shift, backend=backend, lengths={2: 0})

    def check(n, length):
        buffer = torch.zeros(length, dtype=torch.long)
        assert torch.equal(fn(torch.arange(n), 2, buffer, torch.arange(n)), torch.arange(n) + 1)
        assert torch.equal(buffer[:n], torch.arange(n) * 2) and not buffer[n:].any()

    token = engine_module._SPECIALISED.set(True)  # as while a recurring forward is captured
    try:
        for n, length in ((2, 10), (3, 10), (4, 10), (2, 12), (3, 14), (4, 16)):
            check(n, length)
        # One specialised compilation per number of positions n, the buffer's length symbolic in each.
        assert [inputs[1:] for inputs in compiled_graphs] == [[(10,), (2,), (2,)], [(10,), (3,), (3,)], [(10,), (4,), (4,)]]
        assert all(inputs[0] == "size" for inputs in compiled_graphs)
        for n in (5, 6, 7, 8):  # past STATIC_SHAPES: the shared kernels
            check(n, 20)
    finally:
        engine_module._SPECIALISED.reset(token)
    for n in (2, 9, 10):  # not specialising: the shared kernels, whatever the shape
        check(n, 20)
    # The shared kernels: a compilation or two (as torch.compile learns which sizes change), never one per shape.
    assert 1 <= len(compiled_graphs) - 3 <= 2


def test_short_spans_at_small_batches_prefer_flash_attention_and_compute_the_same():
    """On a GPU with few query tiles per multiprocessor, SDPA tries FlashAttention first; the forward's
    logits stay eager's (CPU: the same choice, made as if the GPU had 64 multiprocessors)."""
    from torch.nn.attention import SDPBackend

    model, _ = tiny("llada")
    engine = CompiledEngine(model)
    assert engine.multiprocessors is None  # CPU: SDPA's own order
    engine.multiprocessors = 64
    heads = model.parts()[1][0].parts().heads
    sdpa_order = torch._C._get_sdp_priority_order()
    with engine._attention_backends(torch.zeros(1, heads, 8, 4)):
        assert torch._C._get_sdp_priority_order()[:2] == [SDPBackend.FLASH_ATTENTION.value, SDPBackend.CUDNN_ATTENTION.value]
    with engine._attention_backends(torch.zeros(64 // heads, heads, 8, 4)):  # as many tiles as multiprocessors
        assert torch._C._get_sdp_priority_order() == sdpa_order
    ids = torch.randint(0, model.config.vocab_size - 8, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        eager = model(ids, positions, logits_for=slice(4, 8))
        compiled = engine.forward(ids, positions, logits_for=slice(4, 8))
    torch.testing.assert_close(compiled, eager.float(), rtol=1e-5, atol=1e-5)


def test_few_positions_in_half_precision_multiply_with_cublaslt_then_restore_the_library(monkeypatch):
    """(A CPU build cannot switch to cuBLASLt: torch's switch is replaced by one that records the choice.)"""
    from fastdllm.engine import FEW_POSITIONS

    library = ["cublas"]

    def preferred_blas_library(backend=None):
        if backend is not None:
            library[0] = backend
        return library[0]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred_blas_library)
    engine = CompiledEngine(tiny("llada")[0])
    with engine._blas_library(8):  # CPU: nothing changes
        assert library == ["cublas"]
    engine.multiprocessors, engine.dtype = 64, torch.bfloat16  # as on a GPU, in half precision
    with engine._blas_library(FEW_POSITIONS):
        assert library == ["cublaslt"]
    assert library == ["cublas"]
    with engine._blas_library(FEW_POSITIONS + 1):
        assert library == ["cublas"]


def test_forward_shapes_replayed_often_get_specialised_kernels_then_keep_them(monkeypatch):
    """With graphs (simulated on the CPU: a capture runs the forward directly), a forward shape is first
    captured with shared kernels and recaptured with specialised ones at its specialise_after-th replay;
    a later decode captures that shape with specialised kernels at once. Tokens stay eager's."""
    from fastdllm import engine as engine_module

    captures = []

    class Capture:
        def __init__(self, run, inputs, pool, specialised=False, **_):
            self.run, self.specialised, self.pool = run, specialised, None
            captures.append(specialised)

        def __call__(self, inputs):
            return self.run(**inputs)

    monkeypatch.setattr(engine_module, "CapturedForward", Capture)
    model, _ = tiny("llada")
    engine = CompiledEngine(model)
    engine.graphs, engine.specialise_after = True, 3
    # GEN_LENGTH 16 in blocks of 8, one token per step: per block one full forward and 7 span forwards.
    compiled = decode("llada", "dual", engine, steps=16)
    eager = decode("llada", "dual", None, steps=16)
    assert torch.equal(compiled.responses, eager.responses)
    # Span: shared kernels, then specialised at its third replay; full forward: 2 replays, shared only.
    assert sorted(captures) == [False, False, True]
    assert max(engine.replays.values()) == 14 and min(engine.replays.values()) == 2
    # A new batch of another length: new graphs. The span's shape recurs (the length is not part of it):
    # specialised at once; the full forward's is new: shared kernels, and 2 replays leave it so.
    captures.clear()
    prompts = PROMPTS[:3] + [PROMPTS[3] + " and then some more"]
    compiled = decode("llada", "dual", engine, steps=16, prompts=prompts)
    assert torch.equal(compiled.responses, decode("llada", "dual", None, steps=16, prompts=prompts).responses)
    assert sorted(captures) == [False, True]
