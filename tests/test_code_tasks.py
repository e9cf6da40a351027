"""HumanEval and MBPP: gold solutions pass, corrupted and hostile ones fail, prompts and the gate."""
import gzip
import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from fastdllm.registry import ConfigError
from fastdllm.sandbox import SandboxLimits
from fastdllm.tasks.humaneval import HumanEval, HumanEvalConfig
from fastdllm.tasks.mbpp import MBPP, MBPPConfig

HUMANEVAL_PATH = REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
needs_humaneval = pytest.mark.skipif(not HUMANEVAL_PATH.is_file(), reason=f"{HUMANEVAL_PATH} not found")
FAST = SandboxLimits(timeout_s=5.0, memory_mb=512, workers=2)

# Rows in the real MBPP formats: `full` (text, test_setup_code) and `sanitized` (prompt, test_imports).
MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.",
     "code": "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s ",
     "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"", "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"", "assert remove_Occ(\"PHP\",\"P\") == \"H\""],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to sort a given matrix in ascending order according to the sum of its rows.",
     "code": "def sort_matrix(M):\r\n    result = sorted(M, key=sum)\r\n    return result",
     "test_list": ["assert sort_matrix([[1, 2, 3], [2, 4, 5], [1, 1, 1]])==[[1, 1, 1], [1, 2, 3], [2, 4, 5]]",
                   "assert sort_matrix([[1, 2, 3], [-2, 4, -5], [1, -1, 1]])==[[-2, 4, -5], [1, -1, 1], [1, 2, 3]]",
                   "assert sort_matrix([[5,8,9],[6,4,3],[2,1,4]])==[[2, 1, 4], [6, 4, 3], [5, 8, 9]]"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 17, "prompt": "Write a function that returns the perimeter of a square given its side length as input.",
     "code": "def square_perimeter(a):\n  perimeter=4*a\n  return perimeter",
     "test_imports": ["import math"],
     "test_list": ["assert square_perimeter(10)==40", "assert square_perimeter(5)==20", "assert math.isclose(square_perimeter(4), 16)"]},
]


def humaneval(sandbox: SandboxLimits = FAST) -> HumanEval:
    return HumanEval(HumanEvalConfig(path=str(HUMANEVAL_PATH), allow_code_eval=True, sandbox=sandbox))


@pytest.fixture(scope="module")
def humaneval_examples():
    return humaneval().load()


def accuracy(task, examples, completions) -> float:
    return sum(correct for _, correct in task.judge(examples, completions)) / len(examples)


@needs_humaneval
def test_humaneval_gold_scores_164_of_164(humaneval_examples):
    assert len(humaneval_examples) == 164 and humaneval_examples[0].id == "HumanEval/0"
    # Base-model style: the completion is the body that continues the prompt.
    assert accuracy(humaneval(), humaneval_examples, [e.reference for e in humaneval_examples]) == 1.0


@needs_humaneval
def test_humaneval_corrupted_solutions_fail(humaneval_examples):
    # The gold body behind an early `return 'corrupted'` (at the body's own indentation): still valid code.
    corrupted = [re.match(r"\s*", e.reference.lstrip("\n")).group() + "return 'corrupted'\n" + e.reference
                 for e in humaneval_examples]
    assert accuracy(humaneval(), humaneval_examples, corrupted) == 0.0


@needs_humaneval
def test_humaneval_chat_answer_in_a_code_block(humaneval_examples):
    example = humaneval_examples[2]  # truncate_number
    function = example.question + example.reference
    chat = f"Sure! Here is the function:\n```python\n{function}```\nIt drops the integer part."
    wrong = chat.replace("return number % 1.0", "return number // 1.0")
    task = humaneval()
    assert task.extract_answer(chat) == function
    assert [correct for _, correct in task.judge([example, example], [chat, wrong])] == [True, False]


@needs_humaneval
def test_humaneval_hostile_completions_fail_only_themselves(humaneval_examples):
    example = humaneval_examples[0]
    hostile = ["    while True:\n        pass\n", "    import os\n    os.system('rm -rf /')\n",
               "    x = bytearray(10 * 2**30)\n", "    import posix\n    while True:\n        posix.fork()\n"]
    task = humaneval(sandbox=SandboxLimits(timeout_s=1.0, memory_mb=256, workers=2))
    judgements = task.judge([example] * 5, hostile + [example.reference])
    assert [correct for _, correct in judgements] == [False, False, False, False, True]


def test_code_tasks_refuse_to_run_code_without_permission(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MBPP_ROWS))
    for task in (HumanEval(HumanEvalConfig(path=str(HUMANEVAL_PATH))), MBPP(MBPPConfig(path=str(path)))):
        with pytest.raises(ConfigError, match=r"allow_code_eval=true") as error:
            task.load()
        assert "untrusted code" in str(error.value)


@needs_humaneval
def test_humaneval_prompts(humaneval_examples):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    example = humaneval_examples[0]
    task = humaneval()
    # Base models continue the released prompt itself.
    assert task.build_prompt(example, tokenizer=None, chat=False) == example.question
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = task.build_prompt(example, tokenizer, chat=True)
    assert chat.startswith("<|user|>Complete the following Python function") and chat.endswith("<|assistant|>")
    assert f"```python\n{example.question}```" in chat
    # is_correct judges one whole program against the tests (gold).
    assert task.is_correct(example.question + example.reference, example.gold)
    assert not task.is_correct(example.question + "    return None\n", example.gold)
    assert not task.is_correct(None, example.gold)


def test_humaneval_is_zero_shot():
    with pytest.raises(ConfigError, match=r"num_fewshot=3 is invalid"):
        HumanEvalConfig(num_fewshot=3)


@pytest.fixture
def mbpp_file(tmp_path) -> Path:
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MBPP_ROWS))
    return path


def test_mbpp_gold_passes_and_corrupted_fails(mbpp_file):
    task = MBPP(MBPPConfig(path=str(mbpp_file), allow_code_eval=True, sandbox=FAST))
    examples = task.load()
    assert [e.id for e in examples] == ["Mbpp/11", "Mbpp/12", "Mbpp/17"]
    # As a base model would answer: the code, then the end marker and whatever followed it.
    gold = [f"{e.reference}\n[DONE]\n\nYou are an expert Python programmer" for e in examples]
    assert accuracy(task, examples, gold) == 1.0
    corrupted = [e.reference.replace("return", "return None and", 1) for e in examples]
    assert accuracy(task, examples, corrupted) == 0.0
    assert accuracy(task, examples, [f"```python\n{e.reference}\n```" for e in examples]) == 1.0


def test_mbpp_fewshot_prompt_format(mbpp_file):
    task = MBPP(MBPPConfig(path=str(mbpp_file), fewshot_path=str(mbpp_file), num_fewshot=2, allow_code_eval=True))
    examples = task.load()
    prompt = task.build_prompt(examples[0], tokenizer=None, chat=False)
    # Two worked problems (never the evaluated one), then the question, ending where the code starts.
    assert prompt.count("[BEGIN]") == 3 and prompt.count("[DONE]") == 2
    assert prompt.count("remove first and last occurrence") == 1
    assert prompt.endswith("assert remove_Occ(\"PHP\",\"P\") == \"H\"\n[BEGIN]\n")
    assert "def sort_matrix" in prompt and "def square_perimeter" in prompt
    with pytest.raises(ConfigError, match=r"num_fewshot=5 is invalid"):
        MBPP(MBPPConfig(path=str(mbpp_file), fewshot_path=str(mbpp_file), num_fewshot=5)).build_prompt(examples[0], None, False)


def test_local_gzip_file_reads_like_jsonl(tmp_path):
    path = tmp_path / "mbpp.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in MBPP_ROWS)
    assert len(MBPP(MBPPConfig(path=str(path), allow_code_eval=True)).load()) == 3


@pytest.mark.parametrize("dataset", ["humaneval", "mbpp", "math500"])
def test_yaml_composes_and_top_level_flag_reaches_the_task(dataset):
    from hydra import compose, initialize_config_dir

    from fastdllm.settings import validate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        allowed = validate(compose(config_name="config", overrides=[f"dataset={dataset}", "allow_code_eval=true",
                                                                    "dataset.num_fewshot=0"]))
        default = validate(compose(config_name="config", overrides=[f"dataset={dataset}"]))
    assert allowed.dataset.name == dataset and allowed.run.allow_code_eval
    if dataset != "math500":
        assert allowed.dataset.allow_code_eval and not default.dataset.allow_code_eval
        assert allowed.dataset.sandbox.timeout_s == 10.0


def test_eval_runs_a_code_task_end_to_end(tmp_path):
    from hydra import compose, initialize_config_dir

    from fastdllm.evaluate import run
    from fastdllm.rundir import read_samples
    from fastdllm.score import rescore

    rows = [{"task_id": "Toy/0", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n", "canonical_solution": "    return a + b\n",
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["dataset=humaneval", f"dataset.path={data}", "allow_code_eval=true",
                                                       "generation.gen_length=32", f"output_dir={out}", "progress=false"])
    results = run(cfg, out)
    [sample] = read_samples(out / "samples.jsonl")
    assert sample["id"] == "Toy/0" and sample["gold"].endswith("check(add)\n") and results["samples"] == 1
    # The tiny arith model writes no working `add`; the same sample with the gold body passes on rescoring.
    assert sample["correct"] is False and results["accuracy"] == 0.0
    task = HumanEval(HumanEvalConfig(path=str(data), allow_code_eval=True, sandbox=FAST))
    [rescored] = rescore(task, [sample | {"output": rows[0]["canonical_solution"]}])
    assert rescored["correct"] is True and rescored["correct_before"] is False


@pytest.mark.parametrize("name, hub, rows", [
    ("humaneval", ("openai/openai_humaneval", None, "test"), [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                                               "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}]),
    ("mbpp", ("google-research-datasets/mbpp", "full", "test"), MBPP_ROWS[:1]),
    ("math500", ("HuggingFaceH4/MATH-500", None, "test"), [{"problem": "1+1?", "solution": "\\boxed{2}", "answer": "2", "unique_id": "test/x/1.json"}]),
])
def test_hub_loading_asks_datasets_for_the_right_split(monkeypatch, name, hub, rows):
    import datasets

    from fastdllm.tasks import TASKS

    asked = []

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    examples = TASKS.build({"name": name, "allow_code_eval": True} if name != "math500" else {"name": name}).load()
    assert asked == [hub] and len(examples) == 1


@pytest.mark.parametrize("completion, code", [
    ("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```python3\nx = 1\n```", "x = 1\n"),
    ("```\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),  # the first block
    ("```python\nx = 1\n", "x = 1\n"),  # cut off before the closing fence
    ("    return a + b\n", "    return a + b\n"),  # no fence: the completion itself
])
def test_extract_code(completion, code):
    from fastdllm.tasks.code_tasks import extract_code

    assert extract_code(completion) == code
