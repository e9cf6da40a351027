"""Talking to a model interactively (fastdllm.chat in the terminal, fastdllm.app in the browser).

Settings are composed from eval.py's config groups (conf/chat.yaml) with eval.py's override syntax.
A decode runs the project's loop in a worker thread and hands every step to the caller as a
`Trace` (each response position's token and the step that committed it), so a user interface can
draw the answer while it is decoded, and replay it afterwards.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.text import Text

import fastdllm.cache  # noqa: F401  (each import registers its group's options and schemas)
import fastdllm.generation  # noqa: F401
import fastdllm.reuse  # noqa: F401
from fastdllm.cache import CACHES
from fastdllm.config import DEVICES, DTYPES, ENGINES, ModelConfig, resolve_device
from fastdllm.decoder import Decoder, LoadedModel, load
from fastdllm.generation import GENERATIONS
from fastdllm.loop import BatchOutput, Step
from fastdllm.registry import ConfigError, check
from fastdllm.reuse import REUSES
from fastdllm.tasks.prompts import decode_answer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "cache", "generation", "reuse")
MASK_PLACEHOLDER = "░"


@dataclass
class ChatConfig:
    model: Any = MISSING
    cache: Any = MISSING
    generation: Any = MISSING
    reuse: Any = MISSING
    # Every answer draws its noise from this seed: the same prompt and settings give the same answer.
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    # How forwards run (fastdllm/engine.py): auto = compiled on CUDA, eager elsewhere.
    engine: str = "auto"
    # Put before the conversation as a system message (chat-template models); null: none.
    system_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {list(DTYPES)}")
        check(self.device in DEVICES, "device", self.device, f"choose one of {list(DEVICES)}")
        check(self.engine in ENGINES, "engine", self.engine, f"choose one of {list(ENGINES)}")


ConfigStore.instance().store(name="chat_schema", node=ChatConfig)


@dataclass
class Settings:
    """The validated chat configuration (every group's checks have run) and the overrides that made it."""

    overrides: list[str]
    # The option chosen in each group (`parallel` is an option of the `vanilla` rule).
    choices: dict[str, str]
    run: ChatConfig
    model: ModelConfig
    cache: Any
    generation: Any
    reuse: Any

    @property
    def gen_length(self) -> int:
        return self.generation.gen_length

    def describe(self) -> str:
        """The settings as the group options and their non-default keys, on one line."""
        parts = [f"model={self.choices['model']}"]
        for group in ("cache", "generation", "reuse"):
            keys = [f"{k}={v}" for k, v in vars(getattr(self, group)).items() if k != "name" and v not in (None, False)]
            parts.append(f"{group}={self.choices[group]}" + (f" ({', '.join(keys)})" if keys else ""))
        return " | ".join(parts)


_compose_lock = threading.Lock()  # Hydra's global state allows one composition at a time


def override_key(override: str) -> str:
    """The key an override sets (`cache=dual` -> cache, `+x.y=1` -> x.y)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(current: list[str], new: list[str]) -> list[str]:
    """`current` with `new` applied: a key set again keeps only its latest value; choosing another
    option of a group drops the keys set inside the old option (`cache=dual` after `cache.refresh_interval=2`)."""
    merged = list(current)
    for override in new:
        key = override_key(override)
        merged = [o for o in merged if override_key(o) != key and not (key in GROUPS and override_key(o).startswith(key + "."))]
        merged.append(override)
    return merged


def load_settings(overrides: list[str]) -> Settings:
    """Compose conf/chat.yaml with eval.py-style overrides and validate every group."""
    try:
        with _compose_lock:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="chat", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra's message, without the config search path it appends.
        raise ConfigError(" ".join(str(err).split("Config search path")[0].split())) from None
    choices = {group: cfg.hydra.runtime.choices[group] for group in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(cfg, overrides, choices)


def validate(cfg: DictConfig, overrides: list[str], choices: dict[str, str]) -> Settings:
    try:
        run_fields = {k: v for k, v in cfg.items() if k not in GROUPS}
        settings = Settings(
            overrides=list(overrides),
            choices=choices,
            run=ChatConfig(**OmegaConf.to_container(OmegaConf.create(run_fields), resolve=True)),
            model=OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model)),
            cache=CACHES.to_config(cfg.cache),
            generation=GENERATIONS.to_config(cfg.generation),
            reuse=REUSES.to_config(cfg.reuse),
        )
    except OmegaConfBaseException as err:
        raise ConfigError(" ".join(str(err).split())) from None
    check(settings.generation.gen_length is not None, "generation.gen_length", None, "a chat needs a response length")
    settings.generation.check_lengths(settings.gen_length)
    return settings


def group_options(group: str) -> list[str]:
    """The options Hydra offers for a config group (conf/<group>/*.yaml): what a user may choose."""
    with _compose_lock:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


# ---------------------------------------------------------------- models


# Models kept in memory: the two of a side-by-side comparison; loading a third drops the least recently used.
MODELS_KEPT = 2
_models: OrderedDict[tuple, LoadedModel] = OrderedDict()
_models_lock = threading.Lock()


def loaded_model(settings: Settings) -> LoadedModel:
    """The settings' model, loaded once per (checkpoint, dtype, device) and kept for later turns."""
    device = resolve_device(settings.run.device)
    key = (settings.model.path, settings.model.revision, settings.run.dtype, str(device), settings.run.engine)
    with _models_lock:
        if key not in _models:
            while len(_models) >= MODELS_KEPT:
                _models.popitem(last=False)
            _models[key] = load(settings.model.path, settings.model.revision, settings.run.dtype, device,
                                settings.run.engine)
        _models.move_to_end(key)
        return _models[key]


def encode_conversation(settings: Settings, tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for a conversation ending in a user message: the chat template for instruct
    models (it holds its special tokens), else the turns as plain text to continue."""
    if settings.model.instruct:
        if settings.run.system_prompt:
            messages = [{"role": "system", "content": settings.run.system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(m["content"] + "\n" for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


# ---------------------------------------------------------------- one streamed decode


@dataclass
class Answer:
    """A finished answer and the loop's counters for it."""

    text: str
    tokens: int
    nfe: int
    positions: int
    # Positions x layers computed (reuse strategies skip some).
    layer_positions: int
    steps: int
    seconds: float
    # Decoder.engine_report(): the engine that ran, its fallbacks and warm-up seconds.
    engine: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Answer tokens per decoding step (1.0 is one token per step; a threshold raises it)."""
        return self.tokens / self.steps if self.steps else float("nan")

    def metrics(self) -> str:
        return (f"{self.tokens} tokens in {self.seconds:.2f} s | {self.tokens_per_s:.1f} tokens/s | NFE {self.nfe} | "
                f"{self.tokens_per_step:.2f} tokens/step | {self.positions} positions, {self.layer_positions} "
                f"layer-positions computed | engine={self.engine.get('engine', 'eager')}"
                + "".join(f" ({reason})" for reason in self.engine.get("engine_fallbacks", [])))


@dataclass
class Trace:
    """One response being decoded: each position's token and the step (counted over the whole
    response) that committed it; -1 while masked."""

    tokens: list[int]
    step_of: list[int]
    # The block (response offsets) each step decoded.
    step_blocks: list[tuple[int, int]] = field(default_factory=list)
    answer: Optional[Answer] = None

    @property
    def steps(self) -> int:
        return len(self.step_blocks)

    def record(self, block_start: int, block_end: int, committed: list[bool], block_tokens: list[int]) -> None:
        """One step over the block [block_start, block_end) of response offsets; a block may reach
        past either end of the response (block-causal families align blocks to the whole sequence)."""
        step = self.steps
        for offset, is_committed in enumerate(committed):
            if is_committed and 0 <= block_start + offset < len(self.tokens):
                self.tokens[block_start + offset] = block_tokens[offset]
                self.step_of[block_start + offset] = step
        self.step_blocks.append((max(block_start, 0), min(block_end, len(self.tokens))))


@dataclass
class Piece:
    """A run of response positions as a user interface draws them."""

    token_ids: list[int]
    # The step that committed them; None for masked positions.
    step: Optional[int]
    # Whether they are end tokens (drawn as nothing in the text).
    stop: bool = False


def frame(trace: Trace, stop_ids: list[int], after: Optional[int] = None, cut_at_end: bool = True) -> list[Piece]:
    """The response as it stood after its first `after` steps (default: all so far): committed and
    masked positions up to the end of the block being decoded, cut (with `cut_at_end`) at the first
    end token with nothing masked before it. Runs of positions committed at the same step form one piece."""
    after = trace.steps if after is None else after
    end = trace.step_blocks[max(after - 1, 0)][1] if trace.step_blocks else 0
    pieces: list[Piece] = []
    all_committed = True
    for position in range(end):
        committed_at = trace.step_of[position]
        visible = committed_at if 0 <= committed_at < after else None
        token = trace.tokens[position]
        if cut_at_end and visible is not None and token in stop_ids and all_committed:
            break
        all_committed &= visible is not None
        is_stop = visible is not None and token in stop_ids
        if pieces and pieces[-1].step == visible and pieces[-1].stop == is_stop:
            pieces[-1].token_ids.append(token)
        else:
            pieces.append(Piece([token], visible, is_stop))
    return pieces


def render(pieces: list[Piece], tokenizer, latest_step: Optional[int] = None) -> Text:
    """Committed text (what `latest_step` committed in bold), each masked position as a dim placeholder."""
    text = Text()
    for piece in pieces:
        if piece.step is None:
            text.append(MASK_PLACEHOLDER * len(piece.token_ids), style="dim")
        elif not piece.stop:
            text.append(tokenizer.decode(piece.token_ids, skip_special_tokens=True),
                        style="bold cyan" if piece.step == latest_step else "")
    return text


def leading_text(pieces: list[Piece], tokenizer) -> str:
    """The text of the answer's leading committed tokens (what can no longer change)."""
    ids: list[int] = []
    for piece in pieces:
        if piece.step is None or piece.stop:
            break
        ids += piece.token_ids
    # A character cut in half by the last token would print as U+FFFD: wait for its other half.
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


class Stopped(Exception):
    """Raised inside the loop (through its observer) when the reader of a decode went away."""


def decode(settings: Settings, messages: list[dict[str, str]]) -> Iterator[Trace]:
    """Decode the answer to `messages`, yielding the trace after each step (the latest one when the
    reader fell behind) and once more at the end with `answer` set. Closing the iterator (or Ctrl-C while it waits) stops the decode at its
    next step."""
    loaded = loaded_model(settings)
    prompt = encode_conversation(settings, loaded.tokenizer, messages)
    gen_length, mask_id = settings.gen_length, loaded.model.config.mask_token_id
    steps: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def on_step(step: Step) -> None:
        if cancelled.is_set():
            raise Stopped
        # One small copy to the host per step, only while someone watches.
        offset = step.response_starts[0]
        steps.put((step.start - offset, step.end - offset, step.committed[0].tolist(),
                   step.tokens[0, step.start:step.end].tolist()))

    decoder = Decoder.of(loaded, settings.generation, settings.cache, settings.reuse)

    def work() -> None:
        try:
            steps.put(decoder.generate([prompt], gen_length=gen_length, on_step=on_step,
                                       generators=[torch.Generator(loaded.device).manual_seed(settings.run.seed)]))
        except BaseException as err:  # handed to the reader, which raises it in its own thread
            steps.put(err)

    trace = Trace([mask_id] * gen_length, [-1] * gen_length)
    worker = threading.Thread(target=work, name="fastdllm-decode", daemon=True)
    worker.start()
    try:
        while True:
            item = steps.get()
            # A reader slower than the decode sees the latest step, not every one.
            while isinstance(item, tuple) and not steps.empty():
                trace.record(*item)
                item = steps.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, BatchOutput):
                # The trace keeps what the steps committed; the loop's early stop may have filled the rest.
                text, tokens = decode_answer(loaded.tokenizer, item.responses[0].tolist(), loaded.stop_ids)
                trace.answer = Answer(text, tokens, item.nfe[0], item.positions[0], item.layer_positions[0],
                                      len(item.committed_per_step[0]), item.seconds, decoder.engine_report())
                yield trace
                return
            trace.record(*item)
            yield trace
    finally:
        cancelled.set()
        worker.join()
