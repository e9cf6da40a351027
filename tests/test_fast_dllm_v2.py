"""Fast-dLLM v2: the official layout (loaded through model=fast-dllm-v2-7b model.path=<dir>), the
block-causal forward against transformers' Qwen2, the published decoding written out plainly, the
exactness of cache=prefix, the sub-block cache, batch invariance with prompts of different lengths,
and the training objective's inputs and mask. CPU, float32, tiny random models."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import fastdllm.cache  # noqa: F401  (each import registers its group's options and schemas)
import fastdllm.config  # noqa: F401
import fastdllm.generation  # noqa: F401
import fastdllm.loggers  # noqa: F401
import fastdllm.reuse  # noqa: F401
import fastdllm.tasks  # noqa: F401
from conftest import REPO, run_generate
from fastdllm.cache import CACHES
from fastdllm.config import ASSETS
from fastdllm.engine import build_engine
from fastdllm.evaluate import run
from fastdllm.tasks.prompts import encode_prompts
from fastdllm.generation import GENERATIONS
from fastdllm.forward import ModelCall
from fastdllm.loop import answer_length, generate, stop_token_ids
from fastdllm.models import CheckpointError, load_model, load_tokenizer, save_checkpoint
from fastdllm.models.tiny import build_tiny_model
from fastdllm.registry import ConfigError
from fastdllm.reuse import REUSES
from fastdllm.tasks import TASKS
from fastdllm.train import block_diffusion_loss, block_diffusion_mask

BLOCK, SUB_BLOCK, GEN_LENGTH = 8, 4, 16
# Prompt lengths around the block size: shorter, exactly one block (the published code's L == B
# case), two whole blocks, and with a remainder.
PROMPT_LENGTHS = [5, 8, 16, 13, 3]
TEXT = "Tom has 3 apples and buys 4 more. How many apples does Tom have now?"
PROMPTS = [TEXT[:n] for n in PROMPT_LENGTHS]


def build_tiny_v2(directory: Path | None, **sizes):
    """A tiny Fast-dLLM v2 with random q/k/v biases and norm scales, saved as the release is laid
    out: its tokenizer_config names a remote tokenizer class (never needed)."""
    model, tokenizer = build_tiny_model("Fast_dLLM_Qwen", None, seed=1, std=0.4, **sizes)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    if directory is not None:
        save_checkpoint(model, directory, tokenizer)
        path = Path(directory) / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config.update(tokenizer_class="Qwen2Tokenizer", auto_map={"AutoTokenizer": ["tokenization_qwen.Tokenizer", None]})
        path.write_text(json.dumps(config))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-v2")
    build_tiny_v2(directory)
    return directory


@functools.cache
def tiny_v2():
    return build_tiny_v2(None)


def decode(prompts=PROMPTS, cache="none", seed=0, reuse=None, engine=None, **generation):
    model, tokenizer = tiny_v2()
    options = {"name": "fast-dllm-v2", "block_length": BLOCK, "sub_block_length": SUB_BLOCK} | generation
    cache_config = cache if isinstance(cache, dict) else {"name": cache}
    return run_generate(model, tokenizer, prompts, gen_length=GEN_LENGTH, cache=cache_config, reuse=reuse, seed=seed,
                        engine=engine, **options)


# ---------------------------------------------------------------- the model


def test_release_preset_loads_a_directory_in_the_official_layout(v2_dir, tmp_path):
    config = json.loads((v2_dir / "config.json").read_text())
    assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 32 and "auto_map" in config
    assert "mask_token_id" not in config
    names = set(load_file(str(v2_dir / "model.safetensors")))
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias", "lm_head.weight"} <= names
    assert not any(name.endswith("o_proj.bias") for name in names)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=fast-dllm-v2-7b", f"model.path={v2_dir}", "generation=fast-dllm-v2", "generation.gen_length=32",
            "dataset=arith", "limit=3", "batch_size=3", f"output_dir={tmp_path}", "progress=false",
        ])
    results = run(cfg, tmp_path)
    assert results["samples"] == 3 and results["model"] == "fast-dllm-v2-7b"
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(s["nfe"] == len(s["committed_per_step"]) > 0 for s in samples)


def test_mask_token_comes_from_the_tokenizer(v2_dir, tmp_path):
    model, tokenizer = load_model(v2_dir, torch.float32), load_tokenizer(v2_dir)
    assert model.config.mask_token_id == tokenizer.convert_tokens_to_ids("|<MASK>|") != 151665
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, tokenizer) == sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                     add_generation_prompt=True)

    for file in v2_dir.iterdir():
        text = file.read_text() if file.suffix in (".json", ".jinja") else None
        (tmp_path / file.name).write_text(text.replace("|<MASK>|", "|<PAD>|")) if text else (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match=r"no \|<MASK>\| token"):
        load_model(tmp_path, torch.float32)


def test_tied_embeddings(tmp_path):
    original, tokenizer = build_tiny_v2(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    reloaded = load_model(tmp_path, torch.float32)
    ids, positions = torch.tensor([tokenizer.encode(TEXT[:12])]), torch.arange(12)[None]
    assert torch.equal(original(ids, positions), reloaded(ids, positions))


def block_causal(length: int, block: int, pad: int = 0) -> torch.Tensor:
    """Query i may see key j iff j's block is not after i's (positions counted after `pad`)."""
    position = (torch.arange(length) - pad).clamp_min(0)
    return (position[None, :] // block <= position[:, None] // block) & (torch.arange(length) >= pad)[None, :]


def test_block_causal_forward_matches_transformers_qwen2():
    """The loop's block-causal mask on our forward equals transformers' Qwen2 (eager) given the same
    mask as an additive bias, with and without left padding; it differs from causal and from full."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tokenizer = tiny_v2()
    c = model.config
    qwen = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="eager",
    )).eval()
    qwen.load_state_dict(model.state_dict(), strict=True)
    reuse = REUSES.build({"name": "none"})
    for pad in (0, BLOCK):
        ids = torch.tensor([[c.eos_token_id] * pad + tokenizer.encode(TEXT[:21])])
        length = ids.shape[1]
        key_mask = torch.arange(length)[None] >= pad
        call = ModelCall(model, ids, key_mask, key_mask, 0.0, reuse, attention_block=BLOCK)
        ours = model(ids, call.position_ids, call.attention_mask(torch.arange(length), (0, length), first=0))
        bias = torch.zeros(1, 1, length, length).masked_fill(~block_causal(length, BLOCK, pad), -torch.inf)
        bias[..., :pad, :] = 0  # padding queries (never read) attend to anything, so no row is all -inf
        with torch.no_grad():
            expected = qwen(input_ids=ids, position_ids=call.position_ids, attention_mask={"full_attention": bias}).logits
            causal = qwen(input_ids=ids[:, pad:]).logits
        torch.testing.assert_close(ours[:, pad:], expected[:, pad:], rtol=1e-4, atol=1e-4)
        assert (ours[:, pad:] - causal).abs().max() > 1e-2
        assert (ours - model(ids, call.position_ids, key_mask)).abs().max() > 1e-2


# ---------------------------------------------------------------- decoding


def reference_v2(model, prompt, gen_length, block, sub_block, threshold, stop_ids):
    """Fast-dLLM v2's `generate`, one sample, greedy, the whole sequence recomputed at every forward
    under the block-causal mask, written out plainly (prefilling a prompt of exactly one block too).
    Returns the response (end tokens after a stop) and the number of forward passes."""
    mask_id, eos = model.config.mask_token_id, model.config.eos_token_id

    def logits_of(x):
        ids = torch.tensor([x])
        out = model(ids, torch.arange(len(x))[None], block_causal(len(x), block)[None, None])[0].double()
        out[:, mask_id] = -torch.inf
        return out

    x, length, forwards = list(prompt), len(prompt), 0
    if length >= block:
        forwards += 1
        if length % block == 0:
            x.append(int(logits_of(x[: length // block * block])[-1].argmax()))
    first = length // block * block
    blocks = -(-(length % block + gen_length) // block)
    for k in range(blocks):
        lo = first + k * block
        x += [mask_id] * (lo + block - len(x))
        for s in range(lo, lo + block, sub_block):
            while mask_id in x[s : s + sub_block]:
                logits = logits_of(x)
                forwards += 1
                masked = [p for p in range(s, s + sub_block) if x[p] == mask_id]
                probs = torch.softmax(logits[[p - 1 for p in masked]], -1)  # position p is predicted at p - 1
                confidence, token = probs.max(-1)
                commit = {masked[int(confidence.argmax())]} | {p for p, c in zip(masked, confidence) if c > threshold}
                for p, t in zip(masked, token.tolist()):
                    if p in commit:
                        x[p] = t
        if any(t in stop_ids for t in x[length : lo + block]):
            break
        if k + 1 < blocks:
            x.append(int(logits_of(x)[-1].argmax()))
            forwards += 1
            if x[-1] in stop_ids:
                break
    response = x[length : length + gen_length]
    return response + [eos] * (gen_length - len(response)), forwards


@pytest.mark.parametrize("threshold", [0.9, 0.3, 1.0])
def test_matches_the_published_decoding_written_out(threshold):
    model, tokenizer = tiny_v2()
    stop_ids = stop_token_ids(model, tokenizer)
    out = decode(threshold=threshold)
    for i, prompt in enumerate(PROMPTS):
        expected, forwards = reference_v2(model, tokenizer.encode(prompt), GEN_LENGTH, BLOCK, SUB_BLOCK, threshold, stop_ids)
        assert out.responses[i].tolist() == expected, (threshold, prompt)
        assert out.nfe[i] == forwards == len(out.committed_per_step[i])
    if threshold == 1.0:  # nothing is strictly above 1: one token per step
        assert all(max(c) == 1 for c in out.committed_per_step)
    if threshold == 0.3:
        assert any(max(c) > 1 for c in out.committed_per_step)


def test_a_prompt_of_exactly_one_block_is_prefilled():
    out = decode(prompts=[TEXT[:BLOCK]], threshold=0.9)
    # The prefill forward predicts the first response token (the published code skips it at L == B).
    assert out.committed_per_step[0][0] == 1 and out.positions[0] > 0
    other = decode(prompts=[TEXT[1 : BLOCK + 1]], threshold=0.9)
    assert not torch.equal(out.responses, other.responses)


@pytest.mark.parametrize("threshold", [0.9, 0.3])
@pytest.mark.parametrize("sub_block_length", [SUB_BLOCK, None])
def test_prefix_cache_is_exact(threshold, sub_block_length):
    """Finished blocks' keys/values never change: cache=prefix decodes exactly as cache=none, with
    the current block's positions per step instead of the whole sequence."""
    reference = decode(threshold=threshold, sub_block_length=sub_block_length)
    cached = decode(cache="prefix", threshold=threshold, sub_block_length=sub_block_length)
    assert torch.equal(cached.responses, reference.responses)
    assert cached.nfe == reference.nfe and cached.committed_per_step == reference.committed_per_step
    assert all(c < r for c, r in zip(cached.positions, reference.positions))


@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_sub_block_cache(threshold):
    prefix = decode(cache="prefix", threshold=threshold)
    refreshed = decode(cache={"name": "dual", "refresh_interval": 1}, threshold=threshold)
    assert torch.equal(refreshed.responses, prefix.responses) and refreshed.positions == prefix.positions
    dual = decode(cache="dual", threshold=threshold)
    mask_id = tiny_v2()[0].config.mask_token_id
    assert not (dual.responses == mask_id).any()
    assert sum(dual.positions) < sum(prefix.positions)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("options", [{"threshold": 0.5}, {"temperature": 1.0, "top_p": 0.9}, {"sub_block_length": None}])
def test_batch_equals_single_with_prompts_of_different_lengths(cache, options):
    batched = decode(cache=cache, **options)
    for i, prompt in enumerate(PROMPTS):
        single = decode(prompts=[prompt], cache=cache, seed=i, **options)
        assert torch.equal(batched.responses[i], single.responses[0]), (cache, options, prompt)
        assert batched.nfe[i] == single.nfe[0]
        assert batched.committed_per_step[i] == single.committed_per_step[0]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("options", [{"threshold": 0.5}, {"threshold": 1.0, "sub_block_length": None},
                                     {"temperature": 1.0, "top_p": 0.9}])
def test_compiled_engine_decodes_as_eager(cache, options, capsys):
    """The compiled forward with the block-causal mask, key/value buffers filled block by block (the
    prefill, each block's steps, its block-end forward) and the sub-block cache's per-sample writes."""
    engine = build_engine("compiled", tiny_v2()[0])
    assert engine is not None
    compiled = decode(cache=cache, engine=engine, **options)
    eager = decode(cache=cache, **options)
    assert torch.equal(compiled.responses, eager.responses)
    assert compiled.nfe == eager.nfe and compiled.positions == eager.positions
    assert compiled.committed_per_step == eager.committed_per_step
    # Every forward ran compiled: one key/value buffer set per batch shape for the cached runs, no notice.
    assert (len(engine.kv) == 1) == (cache != "none")
    assert "engine=compiled" not in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_compiled_engine_runs_layer_reuse_as_eager(cache, capsys, monkeypatch):
    """Block-causal: the prefill and block-end forwards record the skipped layer's contribution, the
    steps of a block (sub-block spans included) add it."""
    monkeypatch.setattr("fastdllm.engine._NOTICES", set())
    engine = build_engine("compiled", tiny_v2()[0])
    reuse = {"name": "layer", "k": 1}
    compiled = decode(cache=cache, reuse=reuse, engine=engine, threshold=0.5)
    eager = decode(cache=cache, reuse=reuse, threshold=0.5)
    assert sum(eager.layer_positions) < len(tiny_v2()[0].parts()[1]) * sum(eager.positions)  # a layer was skipped
    assert torch.equal(compiled.responses, eager.responses)
    assert compiled.nfe == eager.nfe and compiled.positions == eager.positions
    assert compiled.committed_per_step == eager.committed_per_step
    assert compiled.layer_positions == eager.layer_positions
    assert len(engine.static) == 1
    assert "engine=compiled" not in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("reuse", [{"name": "layer", "k": 1}, {"name": "trim", "tolerance": 0.1},
                                   {"name": "trim", "tolerance": 0.1, "max_ratio": 0.5},
                                   {"name": "activation", "tolerance": 0.1}])
def test_reuse_strategies_run_on_block_causal_models(cache, reuse):
    """A block-causal batch starts with the prefill of the prompts' blocks, not a forward over the
    whole sequence, and its block-end forwards write keys/values that later steps keep: reuse
    records cover the sequence from the start, and block-end forwards compute every layer. Each
    sample still decodes as it does alone."""
    threshold = {"threshold": 0.5}
    batched = decode(cache=cache, reuse=reuse, **threshold)
    assert not (batched.responses == tiny_v2()[0].config.mask_token_id).any()
    for i in (0, 2, 3):
        single = decode(prompts=[PROMPTS[i]], cache=cache, reuse=reuse, seed=i, **threshold)
        assert torch.equal(batched.responses[i], single.responses[0]), (cache, reuse, PROMPTS[i])


# ---------------------------------------------------------------- the committed tiny-v2

CHECKPOINT = ASSETS / "tiny-v2"


def arith_prompts(tokenizer, rows: int) -> list[list[int]]:
    task = TASKS.build({"name": "arith"})
    return encode_prompts(task, task.load()[:rows], tokenizer, chat=True)[1]


def test_committed_tiny_v2_is_small_and_stops_each_sample_at_its_end_token():
    """In one batch, each sample stops at its own end token (end tokens after it, no more forward
    passes) while the others go on; the answers are those decoded without stopping."""
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 16 * 2**20
    model, tokenizer = load_model(CHECKPOINT, torch.float32), load_tokenizer(CHECKPOINT)
    assert model.config.mask_token_id == tokenizer.convert_tokens_to_ids("|<MASK>|")
    stop_ids = stop_token_ids(model, tokenizer)
    prompts = arith_prompts(tokenizer, 6)

    def run_batch(early_stop: bool):
        generation = GENERATIONS.build({"name": "fast-dllm-v2", "early_stop": early_stop})
        return generate(model, prompts, gen_length=64, generation=generation, cache=CACHES.build({"name": "prefix"}),
                        reuse=REUSES.build({"name": "none"}), generators=[torch.Generator() for _ in prompts],
                        stop_ids=stop_ids)

    stopped, full = run_batch(True), run_batch(False)
    assert len(set(stopped.nfe)) > 1  # the samples stop after different numbers of forward passes
    for i in range(len(prompts)):
        response, reference = stopped.responses[i].tolist(), full.responses[i].tolist()
        end = answer_length(response, stop_ids)
        assert end < 64 and response[:end + 1] == reference[:end + 1]
        assert set(response[end + 1:]) <= set(stop_ids)
        assert stopped.nfe[i] <= full.nfe[i]
    assert any(s < f for s, f in zip(stopped.nfe, full.nfe))


def test_committed_tiny_v2_reaches_the_recorded_accuracy(tmp_path):
    """The first 20 arith rows (all right in the model card's full-split runs; one miss tolerated
    for arithmetic that differs between CPUs), batched, with the sub-block cache."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-v2", "generation=fast-dllm-v2", "cache=dual", "limit=20", "batch_size=10",
            f"output_dir={tmp_path}", "progress=false",
        ])
    results = run(cfg, tmp_path)
    assert results["samples"] == 20 and results["accuracy"] * 20 >= 19
    assert results["nfe_mean"] < 16  # about 10 forward passes for answers of about 40 tokens


@pytest.mark.parametrize("options,field", [
    ({"steps": 16}, "steps"),
    ({"sub_block_length": 3}, "sub_block_length"),
    ({"threshold": 0.0}, "threshold"),
])
def test_invalid_settings_name_the_field(options, field):
    with pytest.raises(ConfigError, match=rf"^generation\.{field}="):
        GENERATIONS.build({"name": "fast-dllm-v2", **options})


# ---------------------------------------------------------------- training


def test_training_mask_follows_the_published_rules():
    length, block = 8, 4
    mask = block_diffusion_mask(length, block, torch.device("cpu"))[0, 0]
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean, qb, kb = q >= length, k >= length, (q % length) // block, (k % length) // block
            allowed = (q_clean == k_clean and qb == kb) or (not q_clean and k_clean and kb < qb) or (q_clean and k_clean and kb <= qb)
            assert bool(mask[q, k]) == allowed, (q, k)


class RecordingModel(torch.nn.Module):
    """Stands in for the model: records its inputs and returns uniform logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.calls = []

    def forward(self, ids, positions, mask, logits_for):
        self.calls.append((ids, positions, mask, logits_for))
        return torch.zeros(ids.shape[0], logits_for.stop, self.config.vocab_size, requires_grad=True)


def test_training_inputs_are_complementary_views_of_noisy_and_clean():
    config = tiny_v2()[0].config
    model = RecordingModel(config)
    ids = torch.randint(4, config.vocab_size, (3, 16))
    response = torch.arange(16)[None, :] >= torch.tensor([[5], [9], [12]])
    loss = block_diffusion_loss(model, ids, response, 8, torch.Generator().manual_seed(0))
    inputs, positions, mask, logits_for = model.calls[0]
    assert inputs.shape == (6, 32) and logits_for == slice(0, 16)
    assert torch.equal(inputs[:, 16:], ids.repeat(2, 1))  # the clean copy
    assert torch.equal(positions[0], torch.arange(16).repeat(2))  # both copies at positions 0..L-1
    masked = inputs[:, :16] == config.mask_token_id
    assert not (masked & ~response.repeat(2, 1)).any()  # the prompt is never masked
    assert torch.equal(masked[:3] ^ masked[3:], response)  # every response token masked in exactly one view
    torch.testing.assert_close(loss, torch.tensor(config.vocab_size).log())  # uniform logits: CE = log V
