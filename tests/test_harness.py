"""The lm-eval bridge on local custom tasks: lm-eval's generations are the loop's, its scores are the model's."""
import json
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval")  # the optional extra `lmeval` (part of `test`)
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import REPO  # noqa: E402
from fastdllm.harness import FastDLLMHarness, cut_at_stop_strings  # noqa: E402
from fastdllm.tasks.arith import Arith, ArithConfig  # noqa: E402

ARITH_ROWS = [json.loads(line) for line in (REPO / "fastdllm" / "assets" / "arith" / "test-v1.jsonl").read_text().splitlines()[:4]]


@pytest.fixture(scope="module")
def harness():
    # The shipped tiny model (which solves arith), Fast-dLLM's threshold decoding, two prompts per batch.
    return FastDLLMHarness(batch_size=2, device="cpu", **{"generation.threshold": 0.9, "generation.gen_length": 64})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    data = directory / "arith.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ARITH_ROWS))
    (directory / "fastdllm_arith.yaml").write_text(textwrap.dedent(f"""\
        task: fastdllm_arith
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{question}}}}\\nAnswer with steps and `#### <number>`."
        doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
        generation_kwargs:
          until: ["\\n\\n"]
        filter_list:
          - name: final-number
            filter:
              - function: regex
                regex_pattern: "#### (\\\\-?[0-9]+)"
              - function: take_first
        metric_list:
          - metric: exact_match
        """))
    (directory / "fastdllm_arith_choice.yaml").write_text(textwrap.dedent(f"""\
        task: fastdllm_arith_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:\\n"
        doc_to_choice: "{{{{[answer, answer.split('#### ')[0] + '#### 0']}}}}"
        doc_to_target: 0
        metric_list:
          - metric: acc
        """))
    return directory


def test_generate_until_matches_the_loop_and_the_task_scorer(harness, task_dir):
    # tiny-llada is an instruct model: eval.py wraps the arith question in its chat template, and so does lm-eval here.
    output = simple_evaluate(model=harness, tasks=["fastdllm_arith"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                             log_samples=True, apply_chat_template=True)
    samples = sorted(output["samples"]["fastdllm_arith"], key=lambda s: s["doc_id"])
    contexts = [s["arguments"][0][0] for s in samples]
    # lm-eval built the same prompt as the project's arith task.
    task = Arith(ArithConfig())
    examples = task.load()[:4]
    assert contexts == [task.build_prompt(e, harness.tokenizer, chat=True) for e in examples]
    # Its responses are what eval.py's decoding gives for those prompts (each with its own seed), cut at "\n\n".
    responses = [s["resps"][0][0] for s in samples]
    expected = harness._decode(list(range(4)), 64, contexts, [harness.encode(c) for c in contexts], [{"until": ["\n\n"]}] * 4)
    assert responses == expected
    # lm-eval's exact match on the final number agrees with the project's GSM8K-style scorer.
    ours = sum(task.is_correct(task.extract_answer(r), e.gold) for r, e in zip(responses, examples)) / 4
    assert output["results"]["fastdllm_arith"]["exact_match,final-number"] == pytest.approx(ours)
    assert ours >= 0.5  # the tiny model does solve arith
    assert harness.nfe_total > 0
    # It says which engine ran (the CPU: eager) and that nothing fell back.
    assert harness.decoder.engine_report() | {"warmup_seconds": 0.0} == {
        "engine": "eager", "engine_graphs": False, "engine_fallbacks": [], "warmup_seconds": 0.0}


def test_loglikelihood_is_the_masked_conditional(harness, task_dir):
    from lm_eval.api.instance import Instance

    context = "Question: Mia has 2 pens. She gets 3 more. How many pens now?\nAnswer:\n2 + 3 = "
    characters = [harness.tokenizer.convert_ids_to_tokens(i) for i in range(7, len(harness.tokenizer))]
    requests = [Instance("loglikelihood", {}, (context, c), idx=0) for c in characters]
    scores = harness.loglikelihood(requests, disable_tqdm=True)
    # One masked position after the context: the scores are the model's distribution there.
    ids = harness.encode(context)
    tokens = torch.tensor([ids + [harness.model.config.mask_token_id]])
    with torch.inference_mode():
        log_probs = torch.log_softmax(harness.model(tokens, torch.arange(tokens.shape[1])[None])[0, -1], dim=-1)
    assert [s for s, _ in scores] == pytest.approx(log_probs[7:].tolist(), abs=1e-5)
    greedy = [c for c, (_, is_greedy) in zip(characters, scores) if is_greedy]
    assert greedy == ([harness.tokenizer.convert_ids_to_tokens(int(log_probs.argmax()))] if log_probs.argmax() >= 7 else [])
    # And lm-eval's multiple-choice scoring runs on it end to end.
    output = simple_evaluate(model=harness, tasks=["fastdllm_arith_choice"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    assert 0.0 <= output["results"]["fastdllm_arith_choice"]["acc,none"] <= 1.0


def test_rolling_likelihood_is_refused_and_stop_strings_cut(harness):
    with pytest.raises(NotImplementedError, match="no left-to-right likelihood"):
        harness.loglikelihood_rolling([])
    assert cut_at_stop_strings("a\n\nb</s>c", ["</s>", "\n\n"]) == "a"
    assert cut_at_stop_strings("abc", []) == "abc"
