"""Dream: the official layout, the Qwen2 forward made bidirectional, the logit shift in the loop,
and Dream's decoding rules (generation=dream)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, run_generate
from fastdllm.cache import CACHES
from fastdllm.generation import GENERATIONS
from fastdllm.generation.base import even_schedule
from fastdllm.generation.dream import DreamGeneration, dream_schedule
from fastdllm.loop import generate, stop_token_ids
from fastdllm.models import CheckpointError, load_model, load_tokenizer, save_checkpoint
from fastdllm.models.tiny import build_tiny_model
from fastdllm.registry import ConfigError
from fastdllm.reuse import REUSES

REPO = Path(__file__).resolve().parents[1]


def build_tiny_dream(directory, **sizes):
    """A tiny Dream with random q/k/v biases and norm scales (the initialiser leaves them 0 and 1),
    so that the test covers them; std 0.5 makes confidences differ clearly between positions."""
    model, tokenizer = build_tiny_model("Dream", None, seed=1, std=0.5, **sizes)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    save_checkpoint(model, directory, tokenizer)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_dream_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-dream")
    build_tiny_dream(directory, rope_theta=500.0)
    return directory


@pytest.fixture(scope="module")
def tiny_dream(tiny_dream_dir):
    return load_model(tiny_dream_dir, torch.float32), load_tokenizer(tiny_dream_dir)


def official_names(layers: int, tied: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"}
        names |= {f"{p}self_attn.{proj}_proj.{kind}" for proj in "qkv" for kind in ("weight", "bias")}
        names |= {f"{p}mlp.{proj}_proj.weight" for proj in ("gate", "up", "down")}
    return names


# ---------------------------------------------------------------- the model


def test_official_layout_round_trip(tmp_path, tiny_dream_dir, tiny_dream):
    model, tokenizer = tiny_dream
    config = json.loads((tiny_dream_dir / "config.json").read_text())
    assert config["model_type"] == "Dream" and config["rope_scaling"] is None
    assert set(load_file(str(tiny_dream_dir / "model.safetensors"))) == official_names(2, tied=False)
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == config["mask_token_id"] == model.config.mask_token_id
    assert type(model).logit_shift == 1
    assert stop_token_ids(model, tokenizer) == sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))

    original, _ = build_tiny_dream(tmp_path / "again", rope_theta=500.0)
    reloaded = load_model(tmp_path / "again", torch.float32)
    ids = torch.tensor([tokenizer.encode("What is 12 + 30?")])
    positions = torch.arange(ids.shape[1])[None]
    assert torch.equal(original(ids, positions), reloaded(ids, positions))


def test_tied_embeddings(tmp_path):
    original, _ = build_tiny_dream(tmp_path, tie_word_embeddings=True)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == official_names(2, tied=True)
    reloaded = load_model(tmp_path, torch.float32)
    ids, positions = torch.tensor([[5, 9, 30, 41]]), torch.arange(4)[None]
    assert torch.equal(original(ids, positions), reloaded(ids, positions))


def test_loading_fails_loudly(tmp_path, tiny_dream_dir):
    build_tiny_dream(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.bias"]
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.*k_proj\.bias.*unexpected.*o_proj\.bias"):
        load_model(tmp_path, torch.float32)

    config = json.loads((tiny_dream_dir / "config.json").read_text())
    for key, value in [("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("hidden_act", "gelu"), ("use_sliding_window", True)]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=key):
            load_model(tmp_path, torch.float32)


def test_matches_transformers_qwen2_made_bidirectional(tiny_dream):
    """Dream is Qwen2 without the causal mask: transformers' Qwen2 (eager attention, given no mask)
    with the same weights must give the same logits, with and without left padding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tokenizer = tiny_dream
    c = model.config
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
            max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, attn_implementation="eager",
        )
    ).eval()
    qwen.load_state_dict(model.state_dict(), strict=True)

    ids = torch.tensor([tokenizer.encode("Tom has 3 apples and buys 4 more.")])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = qwen(input_ids=ids, position_ids=positions, attention_mask={"full_attention": None}).logits
        causal = qwen(input_ids=ids, position_ids=positions).logits
    ours = model(ids, positions)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert (ours - causal).abs().max() > 1e-2  # the test would notice a causal mask

    # Left padding: the padded keys are masked out, positions start at the first real token.
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    key_mask = torch.arange(padded.shape[1])[None] >= pad
    padded_positions = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
    additive = torch.zeros(1, 1, padded.shape[1], padded.shape[1]).masked_fill(~key_mask[:, None, None], -torch.inf)
    with torch.no_grad():
        expected = qwen(input_ids=padded, position_ids=padded_positions, attention_mask={"full_attention": additive}).logits
    ours = model(padded, padded_positions, key_mask)
    torch.testing.assert_close(ours[:, pad:], expected[:, pad:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- decoding


def reference_dream(model, prompt_ids, gen_length, block_length, steps, alg, mask_id, eps=1e-3):
    """Dream's sampler, block-wise, greedy, one sample, full forward each step, written out plainly:
    the token at position i is predicted from the logits at i - 1, and each step commits
    int(m * (1 - s / t)) of the block's m masked positions (all at the block's last step)."""
    x = torch.tensor([prompt_ids + [mask_id] * gen_length])
    start, per_block = len(prompt_ids), steps // (gen_length // block_length)
    timesteps = torch.linspace(1, eps, per_block + 1)
    for lo in range(start, start + gen_length, block_length):
        hi = lo + block_length
        for i in range(per_block):
            logits = model(x, torch.arange(x.shape[1])[None])[0].double()
            logits[:, mask_id] = -torch.inf
            logits = torch.cat([logits[:1], logits[:-1]])  # shift right by one
            probs = torch.softmax(logits, -1)
            top2 = probs.topk(2, -1).values
            confidence = {
                "maskgit_plus": top2[:, 0],
                "topk_margin": top2[:, 0] - top2[:, 1],
                "entropy": (probs * probs.clamp_min(1e-30).log()).sum(-1),
            }[alg]
            masked = torch.zeros(x.shape[1], dtype=torch.bool)
            masked[lo:hi] = x[0, lo:hi] == mask_id
            m = masked.sum().float()
            count = int(m * (1 - timesteps[i + 1] / timesteps[i])) if i < per_block - 1 else int(m)
            for pos in confidence.masked_fill(~masked, -torch.inf).topk(count).indices.tolist():
                x[0, pos] = logits[pos].argmax()
    return x[0, start:]


@pytest.mark.parametrize(
    "alg,gen_length,block_length,steps",
    [("maskgit_plus", 32, 32, 32), ("maskgit_plus", 24, 8, 6), ("topk_margin", 32, 8, 32), ("entropy", 32, 8, 16)],
)
def test_matches_reference_dream(tiny_dream, alg, gen_length, block_length, steps):
    model, tok = tiny_dream
    for prompt in PROMPTS[:2]:
        out = run_generate(model, tok, [prompt], gen_length=gen_length, name="dream", alg=alg,
                           block_length=block_length, steps=steps)
        expected = reference_dream(model, tok.encode(prompt), gen_length, block_length, steps, alg, model.config.mask_token_id)
        assert torch.equal(out.responses[0], expected), (alg, prompt)
        assert out.nfe == [steps]
        assert sum(out.committed_per_step[0]) == gen_length


def test_dream_schedule():
    # Dream's float32 timesteps: at one step per token the first step reveals nothing and the last two.
    assert dream_schedule(torch.tensor([8]), 8, 1e-3).tolist() == [[0, 1, 1, 1, 1, 1, 1, 2]]
    assert dream_schedule(torch.tensor([32, 5]), 8, 1e-3).tolist() == [[3, 4, 4, 4, 4, 4, 4, 5], [0, 0, 0, 0, 1, 1, 1, 2]]
    assert dream_schedule(torch.tensor([7]), 1, 1e-3).tolist() == [[7]]


class EvenScheduleDream(DreamGeneration):
    """Dream's selection under LLaDA's even schedule, to compare the selection rules alone."""

    def schedule(self, masked_count, steps):
        return even_schedule(masked_count, steps)


def test_maskgit_plus_selects_as_vanilla_low_confidence(tiny_dream):
    model, tok = tiny_dream
    prompts = [tok.encode(p) for p in PROMPTS]
    config = GENERATIONS.to_config({"name": "dream", "alg": "maskgit_plus", "block_length": 8})
    dream = generate(
        model, prompts, gen_length=32, generation=EvenScheduleDream(config), cache=CACHES.build({"name": "none"}),
        reuse=REUSES.build({"name": "none"}), generators=[torch.Generator().manual_seed(i) for i in range(3)],
        stop_ids=stop_token_ids(model, tok),
    )
    vanilla = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, remasking="low_confidence")
    assert torch.equal(dream.responses, vanilla.responses)
    assert dream.committed_per_step == vanilla.committed_per_step

    # Under Dream's own schedule the steps differ (0 at a block's first step, 2 at its last).
    published = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, name="dream", alg="maskgit_plus")
    assert published.committed_per_step[0] == [0, 1, 1, 1, 1, 1, 1, 2] * 4


OPTIONS = [
    {"alg": "origin"},
    {"alg": "maskgit_plus"},
    {"alg": "topk_margin", "alg_temp": 0.5},
    {"alg": "entropy", "temperature": 0.7, "top_p": 0.9},
    {"alg": "entropy", "alg_temp": 0.2, "temperature": 1.0, "top_k": 5},
    {"alg": "maskgit_plus", "threshold": 0.5, "steps": 8},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_every_alg_decodes_and_batch_equals_single(tiny_dream, options):
    """Left-padded batches decode each sample exactly as alone (same per-sample generator)."""
    model, tok = tiny_dream
    batched = run_generate(model, tok, PROMPTS, gen_length=16, block_length=8, name="dream", **options)
    assert not (batched.responses == model.config.mask_token_id).any()
    for i, prompt in enumerate(PROMPTS):
        single = run_generate(model, tok, [prompt], gen_length=16, block_length=8, seed=i, name="dream", **options)
        assert torch.equal(batched.responses[i], single.responses[0]), (options, i)
        assert batched.nfe[i] == single.nfe[0] <= options.get("steps", 16)
        assert batched.committed_per_step[i] == single.committed_per_step[0]
        assert sum(single.committed_per_step[0]) == 16


@pytest.mark.parametrize("options", [{"alg": "origin"}, {"alg": "entropy", "alg_temp": 1.0}, {"alg": "entropy", "temperature": 1.0}])
def test_randomness_comes_from_the_sample_generator(tiny_dream, options):
    model, tok = tiny_dream
    runs = [run_generate(model, tok, PROMPTS[:1], gen_length=32, block_length=8, name="dream", seed=s, **options) for s in (1, 1, 2)]
    assert torch.equal(runs[0].responses, runs[1].responses)
    assert not torch.equal(runs[0].responses, runs[2].responses)


def test_threshold_commits_several_per_step(tiny_dream):
    model, tok = tiny_dream
    out = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, name="dream", alg="maskgit_plus", threshold=0.3)
    assert all(n < 32 for n in out.nfe) and all(max(s) > 1 for s in out.committed_per_step)
    assert all(sum(s) == 32 for s in out.committed_per_step)


@pytest.mark.parametrize(
    "options,field",
    [
        ({"alg": "low_confidence"}, "alg"),
        ({"alg_temp": -0.1}, "alg_temp"),
        ({"alg": "origin", "alg_temp": 0.5}, "alg_temp"),
        ({"alg": "maskgit_plus", "alg_temp": 0.5, "threshold": 0.9}, "alg_temp"),
        ({"alg": "entropy", "threshold": 0.9}, "threshold"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"eps": 1.0}, "eps"),
    ],
)
def test_invalid_settings_name_the_field(options, field):
    with pytest.raises(ConfigError, match=rf"^generation\.{field}="):
        GENERATIONS.build({"name": "dream", **options})


def test_hydra_presets_compose():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import fastdllm.settings  # noqa: F401  (registers every group's schema)
    from fastdllm.config import ModelConfig

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for preset, hub_id, instruct in [("dream-base", "Dream-org/Dream-v0-Base-7B", False), ("dream-inst", "Dream-org/Dream-v0-Instruct-7B", True)]:
            cfg = compose("config", overrides=[f"model={preset}", "generation=dream", "generation.alg=maskgit_plus", "generation.threshold=0.9"])
            model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
            assert (model.path, model.instruct) == (hub_id, instruct)
            generation = GENERATIONS.to_config(cfg.generation)
            assert (generation.name, generation.alg, generation.threshold, generation.eps) == ("dream", "maskgit_plus", 0.9, 1e-3)


def test_release_tokenizer_without_tokenizer_json_loads_without_remote_code(tmp_path, tiny_dream_dir):
    """Dream's release ships vocab.json + merges.txt and names a remote tokenizer class."""
    from tokenizers.pre_tokenizers import ByteLevel

    (tmp_path / "config.json").write_text((tiny_dream_dir / "config.json").read_text())
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({"Ġt": len(vocab), "he": len(vocab) + 1})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\n")
    special = {"content": "", "special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": {str(len(vocab)): {**special, "content": "<|endoftext|>"},
                                 str(len(vocab) + 1): {**special, "content": "<|mask|>"}},
        "eos_token": "<|endoftext|>", "mask_token": "<|mask|>",
    }))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == len(vocab) + 1
    assert tokenizer.encode("the <|mask|>")[-1] == len(vocab) + 1
