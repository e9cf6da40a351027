"""LLaDA: the official layout round-trips, loading is strict, and the forward pass is the published one."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdllm.models import CheckpointError, load_model, load_tokenizer, resolve_checkpoint, save_checkpoint
from fastdllm.models.tiny import build_tiny_model


def reference_forward(state, cfg, ids):
    """The forward equations of the spec, written out with plain tensor ops (bidirectional, no cache)."""
    p = "model.transformer."
    d, heads = cfg["d_model"], cfg["n_heads"]
    hd = d // heads
    n = ids.shape[1]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w

    inv = cfg["rope_theta"] ** (-torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(n).float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = state[p + "wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        x = rms(h, state[b + "attn_norm.weight"])
        q = (x @ state[b + "q_proj.weight"].T).view(1, n, heads, hd).transpose(1, 2)
        k = (x @ state[b + "k_proj.weight"].T).view(1, n, heads, hd).transpose(1, 2)
        v = (x @ state[b + "v_proj.weight"].T).view(1, n, heads, hd).transpose(1, 2)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / hd**0.5, -1) @ v
        h = h + att.transpose(1, 2).reshape(1, n, d) @ state[b + "attn_out.weight"].T
        x = rms(h, state[b + "ff_norm.weight"])
        gate = torch.nn.functional.silu(x @ state[b + "ff_proj.weight"].T)
        h = h + (gate * (x @ state[b + "up_proj.weight"].T)) @ state[b + "ff_out.weight"].T
    return rms(h, state[p + "ln_f.weight"]) @ state[p + "ff_out.weight"].T


def test_round_trip_and_reference_forward(tiny_llada_dir, tiny_llada):
    model, tokenizer = tiny_llada
    cfg = json.loads((tiny_llada_dir / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["block_type"] == "llama"
    state = load_file(str(tiny_llada_dir / "model.safetensors"))
    assert set(state) == set(model.state_dict())
    ids = torch.tensor([tokenizer.encode("Reads 5 pages, then 6.")])
    logits = model(ids, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(logits, reference_forward(state, cfg, ids), rtol=1e-4, atol=1e-4)
    assert tokenizer.mask_token_id == cfg["mask_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == cfg["mask_token_id"]


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_llada):
    model, tokenizer = tiny_llada
    save_checkpoint(model, tmp_path, tokenizer, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = load_model(tmp_path, torch.float32)
    ids = torch.tensor([[5, 9, 30, 41]])
    pos = torch.arange(4)[None]
    assert torch.equal(model(ids, pos), reloaded(ids, pos))
    assert load_tokenizer(tmp_path).encode("1+2") == tokenizer.encode("1+2")


def test_bfloat16_load(tiny_llada_dir):
    model = load_model(tiny_llada_dir, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[5, 6]]), torch.tensor([[0, 1]])).dtype == torch.float32


def test_loading_fails_loudly(tmp_path, tiny_llada_dir):
    build_tiny_model("llada", tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    del state["model.transformer.ln_f.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*ln_f.*unexpected.*extra"):
        load_model(tmp_path, torch.float32)

    config = json.loads((tiny_llada_dir / "config.json").read_text())
    config["block_type"] = "sequential"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="block_type"):
        load_model(tmp_path, torch.float32)


def test_missing_model_path_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="model.path=.*does not exist.*local"):
        resolve_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="without config.json"):
        resolve_checkpoint(str(tmp_path))


def test_random_model_at_a_released_vocabulary_round_trips_with_a_padded_tokenizer(tmp_path):
    """What experiments/007-multi-gpu/save_random_checkpoint.py saves, at small widths: a random model in
    bf16 whose character tokenizer is padded to the model's vocabulary, so every predicted id decodes."""
    import dataclasses

    from fastdllm.models.llada import LLaDAConfig, LLaDAModelLM
    from fastdllm.models.tiny import build_char_tokenizer, random_model, special_token_ids

    vocab = 4096
    tokenizer = build_char_tokenizer("llada", vocab_size=vocab)
    plain = build_char_tokenizer("llada")
    assert len(tokenizer) == vocab and len(plain) < vocab
    assert tokenizer.decode([vocab - 1]) == f"<|reserved_{vocab - len(plain) - 1}|>"
    assert tokenizer("12 + 30 =")["input_ids"] == plain("12 + 30 =")["input_ids"]
    with pytest.raises(ValueError, match="vocab_size=8"):
        build_char_tokenizer("llada", vocab_size=8)

    ids = special_token_ids("llada", tokenizer)
    assert ids == {"mask_token_id": tokenizer.mask_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    config = dataclasses.replace(LLaDAConfig.tiny(vocab_size=vocab), **ids)
    model = random_model(LLaDAModelLM, config, torch.bfloat16, "cpu", seed=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    again = random_model(LLaDAModelLM, config, torch.bfloat16, "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    save_checkpoint(model, tmp_path, tokenizer)
    loaded = load_model(tmp_path, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert len(load_tokenizer(tmp_path)) == vocab
