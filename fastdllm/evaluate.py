"""One evaluation run: validate the config, load model and task, decode every sample once across
the accelerate processes, stream finished samples to samples.jsonl, then write results.json.

The jobs around the decoding live in their own modules: validation (settings.py), the run
directory's files and checks (rundir.py), prompts and answers (tasks/prompts.py), the metrics and
the table (summary.py)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from fastdllm.config import set_cpu_threads
from fastdllm.loggers import LOGGERS
from fastdllm.decoder import Decoder, LoadedModel
from fastdllm.models import load_model, load_tokenizer, resolve_checkpoint
from fastdllm.models.loading import read_config
from fastdllm.registry import ConfigError
from fastdllm.rundir import CONFIG_FILE, RESULTS_FILE, SAMPLES_FILE, RunDirLock, append_samples, check_resumable, read_samples
from fastdllm.settings import Settings, gen_length_of, validate
from fastdllm.summary import print_table, summarize
from fastdllm.tasks import TASKS, Example, Task
from fastdllm.tasks.prompts import check_context, decode_answer, encode_prompts

# bench.py, session.py, harness.py and agreement.py still import these names from here; they move
# to the new homes (rundir, settings, tasks.prompts) with the core rewrite that owns those files.
from fastdllm.rundir import RESUMABLE_KEYS  # noqa: F401


def sample_seed(seed: int, example_id: str) -> int:
    """Per-sample seed: the same sample draws the same noise in any batch and on any process."""
    return zlib.crc32(f"{seed}:{example_id}".encode())


@dataclass
class Inputs:
    task: Task
    # The rows to evaluate (after `limit`).
    examples: list[Example]
    checkpoint: Path
    tokenizer: Any
    # Sample id -> (prompt text, its token ids).
    prompts: dict[str, tuple[str, list[int]]]


def read_inputs(settings: Settings) -> Inputs:
    """Read and check every input before any weights are loaded: config.json, the rows, the
    tokenizer, and every prompt's length against the model's context."""
    checkpoint = resolve_checkpoint(settings.model.path, settings.model.revision)
    _, model_config = read_config(checkpoint)
    gen_length = gen_length_of(settings)
    if gen_length >= model_config.max_context:
        source = "generation.gen_length" if settings.generation.gen_length else f"dataset={settings.dataset.name}'s gen_length"
        raise ConfigError(
            f"the response length {gen_length} ({source}) leaves no room for a prompt in the model context of "
            f"{model_config.max_context} tokens: set generation.gen_length below {model_config.max_context}"
        )
    task = TASKS.build(settings.dataset)
    examples = task.load()[: settings.run.limit]
    if not examples:
        raise ConfigError(f"dataset={settings.dataset.name} has no rows to evaluate")
    tokenizer = load_tokenizer(checkpoint)
    chat = settings.dataset.chat if settings.dataset.chat is not None else settings.model.instruct
    texts, ids = encode_prompts(task, examples, tokenizer, chat)
    check_context(examples, ids, gen_length, model_config.max_context)
    return Inputs(task, examples, checkpoint, tokenizer, {e.id: pair for e, pair in zip(examples, zip(texts, ids))})


def run(cfg: DictConfig, run_dir: Optional[Path] = None,
        on_accept: Optional[Callable[[Path], None]] = None) -> Optional[dict[str, Any]]:
    """Evaluate; returns the results on the main process (None on the others).

    Every input is checked before any decoding, and the run directory is locked, checked and only
    then written: first the resolved config, then whatever `on_accept(run_dir)` records (eval.py:
    Hydra's .hydra/), then samples as they finish."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    settings = validate(cfg)
    run_cfg = settings.run
    # On a machine without a GPU, accelerate only forms a multi-process (gloo) group when told to use the CPU.
    use_cpu = run_cfg.device == "cpu" or (run_cfg.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    device = torch.device("cpu") if use_cpu else state.device
    if run_cfg.device == "cuda" and device.type != "cuda":
        raise ConfigError("device='cuda' but no GPU is visible; use device=auto or device=cpu")
    set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)))
    torch.manual_seed(run_cfg.seed)

    def share(value: Any) -> Any:
        """The main process's `value`, on every process."""
        if state.num_processes == 1:
            return value
        shared = [value if state.is_main_process else None]
        broadcast_object_list(shared)
        return shared[0]

    def on_main(action: Callable[[], Any]) -> Any:
        """Run `action` on the main process; its result, or its ConfigError, reaches every process."""
        outcome: tuple[Optional[str], Any] = (None, None)
        if state.is_main_process:
            try:
                outcome = (None, action())
            except ConfigError as err:
                outcome = (str(err), None)
        error, value = share(outcome)
        if error is not None:
            raise ConfigError(error)
        return value

    # Every process writes into the main process's run directory (Hydra's clock may differ across processes).
    run_dir = Path(share(str(run_dir)))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with contextlib.ExitStack() as held:
        def lock_and_check() -> None:
            # A second run into this directory is refused here, at once, naming the process that holds it.
            run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunDirLock(run_dir))
            check_resumable(run_dir, resolved, run_cfg.resume)

        def accept() -> list[str]:
            OmegaConf.save(OmegaConf.create(resolved), run_dir / CONFIG_FILE)
            if on_accept is not None:
                on_accept(run_dir)
            return [r["id"] for r in read_samples(run_dir / SAMPLES_FILE)]

        on_main(lock_and_check)
        inputs = read_inputs(settings)
        done = set(on_main(accept))
        return decode(settings, inputs, done, state, device, run_dir, resolved)


def decode(settings: Settings, inputs: Inputs, done: set[str], state, device: torch.device, run_dir: Path,
           resolved: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Decode the rows not `done` across the processes, stream them to samples.jsonl, then write
    results.json; returns the results on the main process (None on the others)."""
    from accelerate.utils import gather_object
    from tqdm import tqdm

    run_cfg = settings.run
    task, examples, tokenizer, encoded = inputs.task, inputs.examples, inputs.tokenizer, inputs.prompts
    samples_path = run_dir / SAMPLES_FILE
    todo = [e for e in examples if e.id not in done]

    loaded = LoadedModel.of(load_model(inputs.checkpoint, getattr(torch, run_cfg.dtype), device), tokenizer, run_cfg.engine)
    decoder = Decoder.of(loaded, settings.generation, settings.cache, settings.reuse)
    stop_ids = decoder.stop_ids
    logger = LOGGERS.build(settings.logger)
    gen_length = gen_length_of(settings)

    # Process i takes rows i, i + N, i + 2N, ...: each round of batches covers consecutive rows, so
    # samples.jsonl is written in dataset order. Every process runs the same number of batches so
    # they can gather together.
    shard = todo[state.process_index :: state.num_processes]
    num_batches = math.ceil(math.ceil(len(todo) / state.num_processes) / run_cfg.batch_size)
    position = {e.id: i for i, e in enumerate(todo)}
    progress = tqdm(total=len(todo), desc="samples", disable=not (run_cfg.progress and state.is_main_process))
    for b in range(num_batches):
        batch = shard[b * run_cfg.batch_size : (b + 1) * run_cfg.batch_size]
        records = []
        if batch:
            prompts_text, prompts = [encoded[e.id][0] for e in batch], [encoded[e.id][1] for e in batch]
            generators = [torch.Generator(device).manual_seed(sample_seed(run_cfg.seed, e.id)) for e in batch]
            warmup_before = decoder.engine_report()["warmup_seconds"]
            out = decoder.generate(prompts, gen_length=gen_length, generators=generators)
            # Seconds of this batch spent capturing graphs and compiling kernels, not decoding.
            warmup = decoder.engine_report()["warmup_seconds"] - warmup_before
            for i, example in enumerate(batch):
                text, tokens = decode_answer(tokenizer, out.responses[i].tolist(), stop_ids)
                [(predicted, correct)] = task.judge([example], [text])
                records.append({
                    "id": example.id,
                    "prompt": prompts_text[i],
                    "output": text,
                    "extracted": predicted,
                    "gold": example.gold,
                    "correct": correct,
                    "nfe": out.nfe[i],
                    "positions": out.positions[i],
                    "layer_positions": out.layer_positions[i],
                    "tokens": tokens,
                    "committed_per_step": out.committed_per_step[i],
                    "latency_s": out.seconds,
                    "warmup_s": round(warmup, 3),
                    "batch_size": len(batch),
                    "process": state.process_index,
                })
        gathered = gather_object(records) if state.num_processes > 1 else records
        if state.is_main_process:
            append_samples(samples_path, sorted(gathered, key=lambda r: position[r["id"]]))
            progress.update(len(gathered))
    progress.close()

    if not state.is_main_process:
        return None
    wanted = {e.id for e in examples}
    finished = [r for r in read_samples(samples_path) if r["id"] in wanted]
    results = summarize(finished, settings, state.num_processes) | decoder.engine_report()
    # The samples' own warm-up (of this process, including any resumed part) rather than the engine's.
    results["warmup_seconds"] = round(sum(r.get("warmup_s", 0.0) / r["batch_size"] for r in finished), 3)
    (run_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    if run_cfg.progress:
        print_table(results)
    logger.log_run(run_dir, resolved, results, finished)
    return results
