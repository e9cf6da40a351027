"""arith task: deterministic generation, disjoint splits, well-formed answers, scoring, prompts, config."""
from __future__ import annotations

import itertools
import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fastdllm.tasks  # noqa: F401  (registers the dataset schemas)
from conftest import REPO
from fastdllm.models.tiny import build_char_tokenizer
from fastdllm.registry import ConfigError
from fastdllm.tasks import TASKS
from fastdllm.tasks.arith import (
    MAX_OPERATIONS,
    MAX_VALUE,
    TEST_SEED,
    TEST_SIZE,
    TEST_SPLIT,
    Arith,
    ArithConfig,
    generate_problems,
    train_problems,
    write_test_split,
)

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
APPLY = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


@pytest.fixture(scope="module")
def task() -> Arith:
    return Arith(ArithConfig())


@pytest.fixture(scope="module")
def examples(task):
    return task.load()


def first(stream, n):
    return list(itertools.islice(stream, n))


def test_generation_is_deterministic_per_seed():
    assert first(generate_problems(7), 50) == first(generate_problems(7), 50)
    assert first(generate_problems(7), 50) != first(generate_problems(8), 50)


def test_committed_test_split_is_what_its_generator_writes(tmp_path):
    rewritten = tmp_path / "test.jsonl"
    write_test_split(rewritten, seed=TEST_SEED, size=TEST_SIZE)
    assert rewritten.read_bytes() == TEST_SPLIT.read_bytes()


def test_test_split_has_stable_unique_rows(examples):
    assert len(examples) == TEST_SIZE
    assert len({ex.id for ex in examples}) == TEST_SIZE
    assert len({ex.question for ex in examples}) == TEST_SIZE
    assert examples[0].id == "arith-test-0"


def test_train_split_never_contains_a_test_question(examples, task):
    test_questions = {ex.question for ex in examples}
    train = first(train_problems(seed=0), 20000)
    assert not test_questions & {row["question"] for row in train}
    # The raw stream from the test seed would repeat the test split; the train split skips those.
    assert not test_questions & {ex.question for ex in first(task.train_examples(TEST_SEED), 2000)}


def test_references_are_chained_correct_steps_ending_in_the_answer(examples):
    tokenizer = build_char_tokenizer("llada")
    for ex in examples:
        *steps, last = ex.reference.split("\n")
        assert 1 <= len(steps) <= MAX_OPERATIONS
        value = None
        for line in steps:
            a, op, b, result = STEP.fullmatch(line).groups()
            a, b, result = int(a), int(b), int(result)
            assert value is None or a == value, "each step starts from the previous result"
            assert APPLY[op](a, b) == result and (op != "/" or a % b == 0)
            assert all(1 <= n <= MAX_VALUE for n in (a, b, result))
            value = result
        assert last == f"#### {value}" and ex.gold == str(value)
        # The answer and its end token fit the task's gen_length.
        assert len(tokenizer(ex.reference, add_special_tokens=False)["input_ids"]) + 1 <= ArithConfig().gen_length


def test_gold_scores_100_percent_and_corrupted_0_percent(task, examples):
    def accuracy(completions):
        return sum(task.is_correct(task.extract_answer(c), ex.gold) for c, ex in zip(completions, examples)) / len(examples)

    assert accuracy([ex.reference for ex in examples]) == 1.0
    off_by_one = [ex.reference.rpartition("#### ")[0] + f"#### {int(ex.gold) + 1}" for ex in examples]
    assert accuracy(off_by_one) == 0.0
    assert accuracy(["I don't know."] * len(examples)) == 0.0


def test_prompts_use_the_chat_template_for_instruct_models(task, examples):
    tokenizer = build_char_tokenizer("llada")
    chat = task.build_prompt(examples[0], tokenizer, chat=True)
    assert chat.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + examples[0].question)
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "####" in chat


def test_base_model_prompts_take_fewshot_examples_from_the_train_split(examples):
    task = Arith(ArithConfig(num_fewshot=2))
    prompt = task.build_prompt(examples[0], build_char_tokenizer("llada"), chat=False)
    assert prompt.count("Question: ") == 3 and prompt.endswith(f"Question: {examples[0].question}\nAnswer:\n")
    test_questions = {ex.question for ex in examples}
    assert not any(row["question"] in test_questions for row in task.fewshot_rows)


def test_training_config_composes_with_the_arith_dataset():
    import fastdllm.train  # noqa: F401  (registers train_schema)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    config = TASKS.to_config(cfg.dataset)
    assert isinstance(config, ArithConfig) and config.gen_length == 64
    assert OmegaConf.to_object(cfg).steps >= 1
    with pytest.raises(ConfigError, match="split='train' is invalid"):
        ArithConfig(split="train")
