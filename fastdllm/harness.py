"""lm-evaluation-harness bridge (optional extra `lmeval`): any lm-eval task through this framework's
decode loop, with any model/cache/generation/reuse setting.

    python -m fastdllm.harness --model_args model=llada-inst,cache=dual,generation.threshold=0.9,generation.gen_length=256 \\
        --tasks gsm8k --apply_chat_template --batch_size 8

`python -m fastdllm.harness` is lm-eval's command line with the `fastdllm` model registered
(`--model fastdllm` is implied); from Python, `import fastdllm.harness` registers it for
`lm_eval.simple_evaluate(model="fastdllm", ...)`, or pass a `FastDLLMHarness(...)` instance.
`--model_args` are eval.py's overrides (`group=option` and `dotted.key=value`), so every key and
check of eval.py applies; `dataset` plays no part except through its default gen_length.

- generate_until: prompts are decoded `batch_size` at a time by the loop (sorted by length, results
  returned in request order), each with its own seed, then cut at the first `until` string (the
  decode itself stops at the model's end token). The response length is `generation.gen_length`
  when set, else the request's `max_gen_toks` rounded up to a whole number of blocks.
- loglikelihood (multiple-choice tasks: MMLU, GPQA, ...): the context followed by the continuation
  with every continuation token masked, one forward pass; the score is the sum of the
  continuation tokens' log-probabilities at their masked positions, and `is_greedy` whether each is
  the arg-max. For a one-token continuation (an answer letter) this is exactly the model's
  conditional probability, as in Fast-dLLM v2's evaluation (first target token masked); for longer
  ones it is the fully-masked estimate, not a likelihood bound.
- loglikelihood_rolling (perplexity tasks) is not supported: a masked diffusion model has no
  left-to-right factorisation to roll.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_dir
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import fastdllm.cache  # noqa: F401  (each import registers its group's options and schemas)
import fastdllm.config  # noqa: F401
import fastdllm.generation  # noqa: F401
import fastdllm.loggers  # noqa: F401
import fastdllm.reuse  # noqa: F401
import fastdllm.tasks  # noqa: F401
from fastdllm.config import resolve_device
from fastdllm.decoder import build
from fastdllm.evaluate import sample_seed
from fastdllm.settings import validate
from fastdllm.tasks.prompts import decode_answer

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_MAX_GEN_TOKS = 256


def cut_at_stop_strings(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cuts = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


@register_model("fastdllm")
class FastDLLMHarness(LM):
    def __init__(self, batch_size: Any = 1, max_batch_size: Optional[int] = None, device: Optional[str] = None,
                 **overrides: Any):
        super().__init__()
        # lm-eval may pass "auto" or "auto:4"; the loop decodes a fixed batch, so those mean 1.
        batch = int(batch_size) if str(batch_size).isdigit() else 1
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"{key}={value}" for key, value in overrides.items()]
                          + [f"batch_size={batch}", "output_dir=unused"])
        self.settings = validate(cfg)
        run = self.settings.run
        self._device = resolve_device(device if device in ("cpu", "cuda") else run.device)
        self.decoder = build(self.settings.model.path, self.settings.model.revision, dtype=run.dtype,
                             device=self._device, engine=run.engine, generation=self.settings.generation,
                             cache=self.settings.cache, reuse=self.settings.reuse)
        self.model, self.tokenizer, self.stop_ids = self.decoder.model, self.decoder.tokenizer, self.decoder.stop_ids
        self.batch_size = batch
        # Forward passes and decode seconds of every generate_until call, counted by the loop.
        self.nfe_total, self.decode_seconds = 0, 0.0

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.settings.model.name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        # A chat-templated context already starts with its special tokens.
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def response_length(self, gen_kwargs: dict[str, Any]) -> int:
        if self.settings.generation.gen_length is not None:
            return self.settings.generation.gen_length
        block = self.settings.generation.block_length
        return math.ceil(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)) / block) * block

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        contexts = [request.args[0] for request in requests]
        kwargs = [request.args[1] for request in requests]
        prompts = [self.encode(context) for context in contexts]
        # One response length per batch; similar prompt lengths together (less padding).
        groups: dict[int, list[int]] = {}
        for i in sorted(range(len(requests)), key=lambda i: -len(prompts[i])):
            groups.setdefault(self.response_length(kwargs[i]), []).append(i)
        batches = [(length, group[start : start + self.batch_size])
                   for length, group in groups.items() for start in range(0, len(group), self.batch_size)]
        answers: list[str] = [""] * len(requests)
        for length, batch in tqdm(batches, disable=disable_tqdm, desc="fastdllm generate_until"):
            for i, answer in zip(batch, self._decode(batch, length, contexts, prompts, kwargs)):
                answers[i] = answer
        report = self.decoder.engine_report()
        print(f"fastdllm: {self.nfe_total} forward passes in {self.decode_seconds:.1f} s, engine={report['engine']}, "
              f"warm-up {report['warmup_seconds']} s, fallbacks: {'; '.join(report['engine_fallbacks']) or 'none'}",
              file=sys.stderr)
        return answers

    def _decode(self, indices: list[int], gen_length: int, contexts: list[str], prompts: list[list[int]],
                kwargs: list[dict[str, Any]]) -> list[str]:
        seed = self.settings.run.seed
        generators = [torch.Generator(self._device).manual_seed(sample_seed(seed, contexts[i])) for i in indices]
        out = self.decoder.generate([prompts[i] for i in indices], gen_length=gen_length, generators=generators)
        self.nfe_total += sum(out.nfe)
        self.decode_seconds += out.seconds
        texts = []
        for row, i in enumerate(indices):
            text, _ = decode_answer(self.tokenizer, out.responses[row].tolist(), self.stop_ids)
            until = kwargs[i].get("until") or []
            texts.append(cut_at_stop_strings(text, [until] if isinstance(until, str) else until))
        return texts

    @torch.inference_mode()
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        config, shift = self.model.config, self.model.logit_shift
        scores = []
        for request in tqdm(requests, disable=disable_tqdm, desc="fastdllm loglikelihood"):
            context, continuation = request.args
            target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            prefix = self.encode(context) if context else [config.eos_token_id]
            prefix = prefix[-(config.max_context - len(target)) :]  # keep the end of a too-long context
            tokens = torch.tensor([prefix + [config.mask_token_id] * len(target)], device=self._device)
            positions = torch.arange(tokens.shape[1], device=self._device)[None]
            logits = self.model(tokens, positions)[0]
            start = len(prefix) - shift
            log_probs = torch.log_softmax(logits[start : start + len(target)], dim=-1)
            wanted = torch.tensor(target, device=self._device)
            total = log_probs.gather(-1, wanted[:, None]).sum().item()
            scores.append((total, bool((log_probs.argmax(-1) == wanted).all().item())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "fastdllm: loglikelihood_rolling (perplexity tasks) is not supported: a masked diffusion model has no "
            "left-to-right likelihood to roll; use generation or multiple-choice tasks"
        )


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    if "--model" not in sys.argv:
        sys.argv[1:1] = ["--model", "fastdllm"]
    cli_evaluate()


if __name__ == "__main__":
    main()
