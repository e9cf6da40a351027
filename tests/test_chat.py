"""The loop's step observer, the streamed chat decode and `python -m fastdllm.chat`, against eval.py."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import fastdllm.config  # noqa: F401
import fastdllm.loggers  # noqa: F401
import fastdllm.tasks  # noqa: F401
from conftest import PROMPTS, REPO
from fastdllm.cache import CACHES
from fastdllm.evaluate import run
from fastdllm.rundir import read_samples
from fastdllm.generation import GENERATIONS
from fastdllm.loop import generate, stop_token_ids
from fastdllm.registry import ConfigError
from fastdllm.reuse import REUSES
from fastdllm.session import (MASK_PLACEHOLDER, Trace, decode, encode_conversation, frame, leading_text, load_settings,
                              loaded_model, merge_overrides, render)
from fastdllm.tasks.arith import _INSTRUCTION

# The chat stops at the end token (early_stop); eval.py is told the same.
SETTINGS = ["cache=dual", "generation.threshold=0.7", "generation.block_length=16", "generation.early_stop=true"]


@pytest.mark.parametrize("cache", [{"name": "none"}, {"name": "dual"}])
def test_on_step_sees_every_commit_and_changes_nothing(tiny_llada, cache):
    model, tok = tiny_llada
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    def decode_batch(on_step=None):
        return generate(model, ids, gen_length=32, generation=GENERATIONS.build({"name": "vanilla", "block_length": 8, "threshold": 0.5}),
                        cache=CACHES.build(cache), reuse=REUSES.build({"name": "none"}),
                        generators=[torch.Generator().manual_seed(i) for i in range(len(ids))],
                        stop_ids=stop_token_ids(model, tok), on_step=on_step)

    seen = torch.full((len(ids), 32), model.config.mask_token_id)
    counts = []

    def on_step(step):
        assert len(set(step.response_starts)) == 1, "this family aligns every response"
        start, end = step.start - step.response_starts[0], step.end - step.response_starts[0]
        block = seen[:, start:end]
        assert not (step.committed & (block != model.config.mask_token_id)).any(), "a position was committed twice"
        block[step.committed] = step.tokens[:, step.start:step.end][step.committed]
        counts.append(step.committed.sum(-1).tolist())

    watched, plain = decode_batch(on_step), decode_batch()
    assert torch.equal(watched.responses, plain.responses) and watched.nfe == plain.nfe
    assert torch.equal(seen, watched.responses)
    for i in range(len(ids)):
        assert [c[i] for c in counts if c[i]] == watched.committed_per_step[i]


@pytest.fixture(scope="module")
def eval_samples(tmp_path_factory):
    """eval.py's outputs for the first arith rows on the shipped tiny LLaDA, under SETTINGS."""
    out = tmp_path_factory.mktemp("eval")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SETTINGS, "limit=3", f"output_dir={out}", "progress=false"])
    run(cfg, out)
    examples = fastdllm.tasks.TASKS.build(fastdllm.tasks.TASKS.to_config(cfg.dataset)).load()[:3]
    return examples, read_samples(Path(out) / "samples.jsonl")


def test_streamed_answer_equals_eval(eval_samples):
    examples, samples = eval_samples
    settings = load_settings(SETTINGS)
    loaded = loaded_model(settings)
    for example, sample in zip(examples, samples):
        message = {"role": "user", "content": f"{example.question}\n{_INSTRUCTION}"}
        assert loaded.tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True) == sample["prompt"]
        steps_seen = []
        for trace in decode(settings, [message]):
            steps_seen.append(trace.steps)
        # Traces in step order, the last one with the answer.
        assert steps_seen == sorted(steps_seen) and steps_seen[-1] == trace.steps
        answer = trace.answer
        # The text drawn from the streamed commits alone is eval's output.
        assert leading_text(frame(trace, loaded.stop_ids), loaded.tokenizer) == answer.text == sample["output"] != ""
        assert ((answer.nfe, answer.positions, answer.layer_positions, answer.tokens)
                == (sample["nfe"], sample["positions"], sample["layer_positions"], sample["tokens"]))


def trace_of_last(settings, message):
    *_, trace = decode(settings, [message])
    return trace


def test_chat_command_in_a_pipe(eval_samples):
    """Plain text, no colour codes; the printed answers are the session's, metrics after each."""
    examples, _ = eval_samples
    questions = [e.question for e in examples[:2]]
    settings = load_settings(SETTINGS)
    expected = [trace_of_last(settings, {"role": "user", "content": q}).answer.text for q in questions]
    stdin = f"{questions[0]}\n/clear\n{questions[1]}\n/settings generation.threshold=2\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "fastdllm.chat", *SETTINGS], input=stdin, capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    answers = result.stdout.split("]\n")[:-1]
    assert len(answers) == 2
    for printed, text in zip(answers, expected):
        answer, metrics = printed.rsplit("\n[", 1)
        assert answer == text
        assert "tokens/s" in metrics and "NFE" in metrics and "tokens/step" in metrics
    assert "generation.threshold=2.0 is invalid" in result.stderr


def read_until(stream, text: str) -> None:
    """Read lines until one holds `text` (fails at the end of the stream)."""
    for line in stream:
        if text in line:
            return
    pytest.fail(f"{text!r} never came")


def test_ctrl_c_stops_the_answer_not_the_session():
    chat = subprocess.Popen([sys.executable, "-m", "fastdllm.chat", "generation=vanilla", "generation.gen_length=448"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        read_until(chat.stderr, "/help")  # the settings, then the hint: ready
        chat.stdin.write("What is 2 + 3?\n")
        chat.stdin.flush()
        time.sleep(0.5)  # 448 one-token steps take far longer
        chat.send_signal(signal.SIGINT)
        read_until(chat.stderr, "answer stopped")
        stdout, stderr = chat.communicate("/settings\n/exit\n", timeout=60)
    finally:
        chat.kill()
    assert chat.returncode == 0, stderr
    assert "overrides: generation=vanilla generation.gen_length=448" in stderr
    assert "tokens/s" not in stdout, "the stopped answer reports no metrics"


def test_settings_follow_eval_syntax():
    assert merge_overrides(["cache=prefix", "cache.refresh_interval=2", "seed=1"], ["cache=dual", "seed=2"]) == ["cache=dual", "seed=2"]
    settings = load_settings(["cache=dual", "generation.threshold=0.8"])
    assert (settings.cache.name, settings.generation.threshold) == ("dual", 0.8)
    with pytest.raises(ConfigError, match="Available options in 'cache'"):
        load_settings(["cache=nonexistent"])
    with pytest.raises(ConfigError, match="generation.block_length=48 is invalid"):
        load_settings(["generation.block_length=48"])


def test_frames_show_masks_and_stop_at_the_answer_end():
    settings = load_settings([])
    tokenizer, stop_ids = loaded_model(settings).tokenizer, loaded_model(settings).stop_ids
    mask, end = loaded_model(settings).model.config.mask_token_id, stop_ids[0]
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    trace = Trace([mask] * 6, [-1] * 6)
    trace.record(0, 6, [True, False, False, True, True, False], [a, mask, mask, end, b, mask])
    # An end token with masks before it is not yet the answer's end.
    assert render(frame(trace, stop_ids), tokenizer).plain == f"a{MASK_PLACEHOLDER * 2}b{MASK_PLACEHOLDER}"
    assert leading_text(frame(trace, stop_ids), tokenizer) == "a"
    trace.record(0, 6, [False, True, True, False, False, False], [a, b, a, end, b, mask])
    assert render(frame(trace, stop_ids), tokenizer).plain == leading_text(frame(trace, stop_ids), tokenizer) == "aba"
    # Replay: the response as it stood after the first step.
    assert render(frame(trace, stop_ids, after=1), tokenizer).plain == f"a{MASK_PLACEHOLDER * 2}b{MASK_PLACEHOLDER}"


def test_conversation_keeps_the_history_in_the_chat_template():
    settings = load_settings(["system_prompt=Be brief."])
    tokenizer = loaded_model(settings).tokenizer
    turns = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2"}]
    text = tokenizer.decode(encode_conversation(settings, tokenizer, turns))
    assert text == tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *turns], tokenize=False,
                                                 add_generation_prompt=True)
