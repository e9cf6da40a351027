"""Cache benchmark: one configuration, N prompts, every cache strategy side by side in one process.

    python -m fastdllm.bench                                   # model=tiny-llada on dataset=arith
    python -m fastdllm.bench generation.threshold=0.9 'caches=[{name: none}, {name: dual, refresh_interval: 8}]'
    python -m fastdllm.bench random_weights=true dtype=bfloat16 generation.gen_length=256 generation.steps=128

Prints, per cache: NFE and positions computed (mean per prompt), ms per decoding step and tokens/s
(all gen_length tokens), each also as a ratio to the first cache (cache=none by default), plus
`same_tokens`, the share of response tokens equal to the first cache's, and, with a dataset's
prompts, the accuracy. The decode loop, strategies
and configuration groups are the project's own (conf/bench.yaml composes them).

With random_weights=true the model is the family's module at `sizes` (unset fields keep the released
model's, e.g. LLaDA-8B) with PyTorch's default initialisation, built on the device, and the prompts
are random ids: timing without downloaded weights. Leave generation.threshold null there so every
cache commits the same fixed number of tokens per step (gen_length / steps).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fastdllm.cache import CACHES
from fastdllm.config import DEVICES, DTYPES, ModelConfig, resolve_device
from fastdllm.generation import GENERATIONS
from fastdllm.evaluate import decode_answer, encode_prompts
from fastdllm.loop import BatchOutput, generate, stop_token_ids
from fastdllm.models import load_model, load_tokenizer, resolve_checkpoint
from fastdllm.models.base import MODEL_FAMILIES, DiffusionLM
from fastdllm.registry import ConfigError, check
from fastdllm.reuse import REUSES
from fastdllm.tasks import TASKS


@dataclass
class BenchConfig:
    model: Any = MISSING
    generation: Any = MISSING
    reuse: Any = MISSING
    dataset: Any = MISSING
    # Cache configurations to compare; ratios are to the first.
    caches: list[Any] = field(default_factory=lambda: [{"name": "none"}, {"name": "prefix"}, {"name": "dual"}])
    prompts: int = 8
    batch_size: int = 4
    # Untimed decodes of the first batch per cache before timing (kernel selection, allocator).
    warmup: int = 1
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    # Random weights at `sizes` instead of the model group's checkpoint, and random prompts.
    random_weights: bool = False
    family: str = "llada"
    # Fields of the family's config.json; null or unset ones keep the released model's.
    sizes: Any = None
    prompt_length: int = 64
    # Also write the results as JSON here.
    output_json: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.prompts >= 1, "prompts", self.prompts, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.warmup >= 0, "warmup", self.warmup, "must be >= 0")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {list(DTYPES)}")
        check(self.device in DEVICES, "device", self.device, f"choose one of {list(DEVICES)}")
        check(self.family in MODEL_FAMILIES, "family", self.family, f"choose one of {sorted(MODEL_FAMILIES)}")
        check(self.prompt_length >= 1, "prompt_length", self.prompt_length, "must be >= 1")
        check(len(self.caches) >= 1, "caches", self.caches, "name at least one cache")


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


@dataclass
class Workload:
    """What every cache decodes: the model, the tokenized prompts and how to score the answers."""

    model: DiffusionLM
    prompts: list[list[int]]
    gen_length: int
    stop_ids: list[int]
    description: str
    # With a dataset's prompts: (response ids, prompt index) -> whether the answer is correct.
    score: Optional[Callable[[list[int], int], bool]] = None


def random_workload(cfg: BenchConfig, gen_length: int, dtype: torch.dtype, device: torch.device) -> Workload:
    family = MODEL_FAMILIES[cfg.family]
    config = family.config_class(**(cfg.sizes or {}))
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # PyTorch's default initialisation, run on the device: seconds even at 8B
        model = family(config)
    model = model.to(dtype).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(config.vocab_size, (cfg.prompts, cfg.prompt_length), generator=generator)
    ids = ids.masked_fill(ids == config.mask_token_id, config.eos_token_id)
    params = sum(p.numel() for p in model.parameters())
    return Workload(model, ids.tolist(), gen_length, [config.eos_token_id],
                    f"random {cfg.family} ({params:,} parameters) {cfg.sizes or 'released sizes'}")


def dataset_workload(cfg: BenchConfig, model_cfg: ModelConfig, dataset: Any, gen_length: int, dtype: torch.dtype,
                     device: torch.device) -> Workload:
    """The first `prompts` examples of the dataset, prompted as fastdllm.evaluate does."""
    task = TASKS.build(dataset)
    examples = task.load()[: cfg.prompts]
    checkpoint = resolve_checkpoint(model_cfg.path, model_cfg.revision)
    model = load_model(checkpoint, dtype, device)
    tokenizer = load_tokenizer(checkpoint)
    chat = dataset.chat if dataset.chat is not None else model_cfg.instruct
    _, prompts = encode_prompts(task, examples, tokenizer, chat)
    stop_ids = stop_token_ids(model, tokenizer)

    def score(response: list[int], index: int) -> bool:
        text, _ = decode_answer(tokenizer, response, stop_ids)
        return task.is_correct(task.extract_answer(text), examples[index].gold)

    return Workload(model, prompts, gen_length, stop_ids, f"{model_cfg.name} on {dataset.name}", score)


@dataclass
class Totals:
    """One cache's measurements over every prompt."""

    seconds: float = 0.0
    steps: int = 0
    nfe: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    responses: list[torch.Tensor] = field(default_factory=list)

    def add(self, out: BatchOutput) -> None:
        self.seconds += out.seconds
        # Every step runs one forward over the whole batch, so the batch's steps are its longest sample's.
        self.steps += max(len(c) for c in out.committed_per_step)
        self.nfe += out.nfe
        self.positions += out.positions
        self.responses.append(out.responses)


def cache_label(cache: Any) -> str:
    config = CACHES.to_config(cache)
    extra = [f"{k}={v}" for k, v in vars(config).items() if k != "name" and v is not None]
    return " ".join([config.name, *extra])


def run(cfg: BenchConfig, model_cfg: ModelConfig) -> list[dict[str, Any]]:
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    generation = GENERATIONS.build(cfg.generation)
    dataset = TASKS.to_config(cfg.dataset)
    gen_length = generation.config.response_length(dataset.gen_length)
    generation.config.check_lengths(gen_length)
    caches = [(cache_label(c), CACHES.build(c)) for c in cfg.caches]
    reuse = REUSES.build(cfg.reuse)
    if cfg.random_weights:
        work = random_workload(cfg, gen_length, dtype, device)
    else:
        work = dataset_workload(cfg, model_cfg, dataset, gen_length, dtype, device)
    batches = [range(i, min(i + cfg.batch_size, len(work.prompts))) for i in range(0, len(work.prompts), cfg.batch_size)]

    def decode(cache, batch: range) -> BatchOutput:
        generators = [torch.Generator(device).manual_seed(cfg.seed + i) for i in batch]
        return generate(work.model, [work.prompts[i] for i in batch], gen_length=gen_length, generation=generation,
                        cache=cache, reuse=reuse, generators=generators, stop_ids=work.stop_ids)

    for _, cache in caches:
        for _ in range(cfg.warmup):
            decode(cache, batches[0])
    # Batches outer, caches inner: a slow drift of the machine affects every cache alike.
    totals = {label: Totals() for label, _ in caches}
    for batch in batches:
        for label, cache in caches:
            totals[label].add(decode(cache, batch))

    print(f"{work.description} | {len(work.prompts)} prompts, batch {cfg.batch_size}, gen_length {gen_length}, "
          f"block {generation.config.block_length}, steps {generation.config.steps or gen_length}, "
          f"threshold {getattr(generation.config, 'threshold', None)} | {device} {cfg.dtype}")
    reference = torch.cat(totals[caches[0][0]].responses)
    rows = []
    for label, _ in caches:
        t = totals[label]
        responses = torch.cat(t.responses)
        row = {
            "cache": label,
            "nfe": sum(t.nfe) / len(t.nfe),
            "positions": sum(t.positions) / len(t.positions),
            "ms_per_step": 1000 * t.seconds / t.steps,
            "tokens_per_s": responses.numel() / t.seconds,
            "same_tokens": (responses == reference).float().mean().item(),
        }
        if work.score is not None:
            row["accuracy"] = sum(work.score(r.tolist(), i) for i, r in enumerate(responses)) / len(responses)
        rows.append(row)
    print_table(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table; the four speed columns also as a ratio to the first row."""
    ratio_keys = ("nfe", "positions", "ms_per_step", "tokens_per_s")
    keys = [k for k in rows[0] if k != "cache"]
    print("| cache | " + " | ".join(keys) + " |")
    print("| --- |" + " ---: |" * len(keys))
    for row in rows:
        cells = []
        for key in keys:
            cell = f"{row[key]:.3f}" if key not in ratio_keys else f"{row[key]:.1f}"
            if key in ratio_keys:
                cell += f" ({row[key] / rows[0][key]:.2f}x)"
            cells.append(cell)
        print(f"| {row['cache']} | " + " | ".join(cells) + " |")


def validate(cfg: DictConfig) -> tuple[BenchConfig, ModelConfig]:
    """The composed config as the benchmark's settings and the model group's (checks run)."""
    fields = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "model"}
    return BenchConfig(**fields), OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        bench, model_cfg = validate(cfg)
        rows = run(bench, model_cfg)
    except ConfigError as err:
        sys.exit(f"configuration error: {err}")
    if bench.output_json:
        Path(bench.output_json).write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
