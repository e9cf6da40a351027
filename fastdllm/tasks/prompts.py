"""A task's text on its way into the model and back: prompts as token ids, checked against the
model's context, and the completion text of a decoded response."""
from __future__ import annotations

from fastdllm.loop import answer_length
from fastdllm.registry import ConfigError
from fastdllm.tasks.base import Example, Task


def encode_prompts(task: Task, examples: list[Example], tokenizer, chat: bool) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids; a chat template already holds its special tokens."""
    texts = [task.build_prompt(e, tokenizer, chat) for e in examples]
    return texts, [tokenizer(text, add_special_tokens=not chat)["input_ids"] for text in texts]


def check_context(examples: list[Example], prompts: list[list[int]], gen_length: int, max_context: int) -> None:
    """Every prompt plus the response fits the model's context: checked over all rows before any decoding."""
    longest = max(range(len(examples)), key=lambda i: len(prompts[i]))
    length = len(prompts[longest])
    if length + gen_length > max_context:
        raise ConfigError(
            f"the longest prompt (row {examples[longest].id}) has {length} tokens; with gen_length={gen_length} it "
            f"needs {length + gen_length} > the model context of {max_context} tokens: lower dataset.num_fewshot "
            "or generation.gen_length, or set limit"
        )


def decode_answer(tokenizer, response: list[int], stop_ids: list[int]) -> tuple[str, int]:
    """The completion text up to the first stop token, and its length in tokens."""
    tokens = answer_length(response, stop_ids)
    return tokenizer.decode(response[:tokens], skip_special_tokens=True), tokens
