"""The decode loop against a plain reference implementation of LLaDA's published sampler."""
import pytest
import torch

from conftest import PROMPTS, run_generate
from fastdllm.loop import answer_length, stop_token_ids


def reference_llada(model, prompt_ids, gen_length, block_length, steps, mask_id):
    """LLaDA's semi-autoregressive low-confidence remasking, greedy, one sample, full forward each step."""
    x = torch.tensor([prompt_ids + [mask_id] * gen_length])
    start = len(prompt_ids)
    blocks = gen_length // block_length
    per_block = steps // blocks
    for b in range(blocks):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        count = int((x[0, lo:hi] == mask_id).sum())
        quota = [count // per_block + (1 if s < count % per_block else 0) for s in range(per_block)]
        for s in range(per_block):
            logits = model(x, torch.arange(x.shape[1])[None])[0].double()
            logits[:, mask_id] = -torch.inf  # a decoded position never holds the mask token
            probs = torch.softmax(logits, -1)
            guess = logits.argmax(-1)
            conf = probs.gather(-1, guess[:, None])[:, 0]
            conf[:lo] = -torch.inf
            conf[hi:] = -torch.inf
            conf[x[0] != mask_id] = -torch.inf
            for pos in conf.topk(quota[s]).indices.tolist():
                x[0, pos] = guess[pos]
    return x[0, start:]


@pytest.mark.parametrize("gen_length,block_length,steps", [(32, 32, 32), (32, 8, 32), (32, 8, 16), (24, 8, 12)])
def test_matches_reference_llada(tiny_llada, gen_length, block_length, steps):
    model, tok = tiny_llada
    for prompt in PROMPTS[:2]:
        out = run_generate(model, tok, [prompt], gen_length=gen_length, block_length=block_length, steps=steps)
        expected = reference_llada(model, tok.encode(prompt), gen_length, block_length, steps, model.config.mask_token_id)
        assert torch.equal(out.responses[0], expected)
        assert out.nfe == [steps]
        assert sum(out.committed_per_step[0]) == gen_length


def test_threshold_just_under_one_reproduces_vanilla(tiny_llada):
    model, tok = tiny_llada
    vanilla = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8)
    parallel = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, threshold=0.999999)
    assert torch.equal(vanilla.responses, parallel.responses)
    assert vanilla.nfe == parallel.nfe == [32, 32, 32]


def test_threshold_commits_several_per_step_and_fewer_nfe(tiny_llada):
    model, tok = tiny_llada
    out = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, threshold=0.3)
    assert all(n < 32 for n in out.nfe)
    assert all(max(steps) > 1 for steps in out.committed_per_step)
    assert all(sum(steps) == 32 for steps in out.committed_per_step)
    factor = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, factor=1.0)
    assert all(n <= 32 for n in factor.nfe) and all(sum(s) == 32 for s in factor.committed_per_step)


def test_steps_stay_an_upper_bound_under_threshold(tiny_llada):
    model, tok = tiny_llada
    out = run_generate(model, tok, PROMPTS, gen_length=32, block_length=8, steps=8, threshold=0.99)
    assert all(n <= 8 for n in out.nfe)


@pytest.mark.parametrize("options", [{}, {"threshold": 0.5}, {"temperature": 0.7}, {"remasking": "random"}, {"cfg_scale": 1.0}])
def test_batch_equals_single(tiny_llada, options):
    model, tok = tiny_llada
    batched = run_generate(model, tok, PROMPTS, gen_length=16, block_length=8, **options)
    for i, prompt in enumerate(PROMPTS):
        single = run_generate(model, tok, [prompt], gen_length=16, block_length=8, seed=i, **options)
        assert torch.equal(batched.responses[i], single.responses[0]), (options, i)
        assert batched.nfe[i] == single.nfe[0]
        assert batched.committed_per_step[i] == single.committed_per_step[0]


def test_sampling_depends_on_seed(tiny_llada):
    model, tok = tiny_llada
    a = run_generate(model, tok, PROMPTS[:1], gen_length=32, block_length=8, temperature=1.0, seed=1)
    b = run_generate(model, tok, PROMPTS[:1], gen_length=32, block_length=8, temperature=1.0, seed=2)
    assert not torch.equal(a.responses, b.responses)


def test_early_stop_fills_eos_without_forward_passes(tiny_llada):
    model, tok = tiny_llada
    stop = stop_token_ids(model, tok)
    full = run_generate(model, tok, PROMPTS, gen_length=64, block_length=8)
    early = run_generate(model, tok, PROMPTS, gen_length=64, block_length=8, early_stop=True)
    stopped_any = False
    for i in range(len(PROMPTS)):
        response = full.responses[i].tolist()
        first_stop = answer_length(response, stop)
        block_of_stop = first_stop // 8
        decoded_blocks = block_of_stop + 1 if first_stop < 64 else 8
        # Identical up to the end of the block holding the first end token, EOS afterwards.
        assert early.responses[i, : decoded_blocks * 8].tolist() == response[: decoded_blocks * 8]
        assert early.responses[i, decoded_blocks * 8 :].tolist() == [model.config.eos_token_id] * (64 - decoded_blocks * 8)
        assert early.nfe[i] == 8 * decoded_blocks
        stopped_any |= decoded_blocks < 8
    assert stopped_any, "the fixture model should emit an end token early for some prompt"


def test_classifier_free_guidance_decodes_real_tokens(tiny_llada):
    model, tok = tiny_llada
    plain = run_generate(model, tok, PROMPTS, gen_length=16, block_length=8)
    guided = run_generate(model, tok, PROMPTS, gen_length=16, block_length=8, cfg_scale=2.0)
    assert not (guided.responses == model.config.mask_token_id).any()
    assert not torch.equal(plain.responses, guided.responses), "guidance should change some prediction"
