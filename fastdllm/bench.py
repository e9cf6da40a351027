"""Cache benchmark: one configuration, N prompts, every cache strategy side by side in one process.

    python -m fastdllm.bench                                   # model=tiny-llada on dataset=arith
    python -m fastdllm.bench generation.threshold=0.9 'caches=[{name: none}, {name: dual, refresh_interval: 8}]'
    python -m fastdllm.bench random_weights=true dtype=bfloat16 generation.gen_length=256 generation.steps=128

Prints, per batch size and cache: NFE and positions computed (mean per prompt), ms per decoding step
and tokens/s (all gen_length tokens), each also as a ratio to the first cache (cache=none by default),
`same_tokens`, the share of response tokens equal to the first cache's, and, with a dataset's prompts,
the accuracy. On CUDA also: the peak device memory of the cache's decodes, the floor (per step, from
the device's bandwidth and matrix rate measured at the start: each forward costs at least the larger of
reading its weights and keys/values and doing its matrix products; with reuse=none only, since it
counts every layer), the ratio to that floor and which term bounds it; with engine=compiled, `same_as_eager` (share of the first batch's tokens equal to an
eager decode) and eager ms per step. The decode loop, strategies and configuration groups are the
project's own (conf/bench.yaml composes them).

With random_weights=true the model is the family's module at `sizes` (unset fields keep the released
model's, e.g. LLaDA-8B), built in the target dtype on the device (meta-device init, then PyTorch's
default initialisation there), and the prompts are random ids: timing without downloaded weights.
Leave generation.threshold null there so every cache commits the same fixed number of tokens per step
(gen_length / steps). `ar_baseline=true` adds an autoregressive model (transformers' Qwen2, static
cache, compiled) decoding as many tokens, measured in the same run.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fastdllm.cache import CACHES
from fastdllm.config import DEVICES, DTYPES, ENGINES, ModelConfig, resolve_device
from fastdllm.decoder import Decoder, LoadedModel
from fastdllm.forward import ForwardShape
from fastdllm.generation import GENERATIONS
from fastdllm.loop import BatchOutput, stop_token_ids
from fastdllm.models import load_model, load_tokenizer, resolve_checkpoint
from fastdllm.models.base import MODEL_FAMILIES, DiffusionLM
from fastdllm.models.tiny import random_model
from fastdllm.registry import ConfigError, check
from fastdllm.reuse import REUSES
from fastdllm.tasks import TASKS
from fastdllm.tasks.prompts import decode_answer, encode_prompts


@dataclass
class BenchConfig:
    model: Any = MISSING
    generation: Any = MISSING
    reuse: Any = MISSING
    dataset: Any = MISSING
    # Cache configurations to compare; ratios are to the first.
    caches: list[Any] = field(default_factory=lambda: [{"name": "none"}, {"name": "prefix"}, {"name": "dual"}])
    # Prompts decoded per batch size (at least one full batch).
    prompts: int = 8
    batch_size: int = 4
    # Several batch sizes in one run (each a block of the table); empty = [batch_size].
    batch_sizes: list[int] = field(default_factory=list)
    # Untimed decodes of the first batch per cache before timing (compilation, graph capture, allocator).
    warmup: int = 1
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    # How forwards run (fastdllm/engine.py): auto = compiled on CUDA, eager elsewhere.
    engine: str = "auto"
    # With engine=compiled: also decode the first batch eagerly; `same_as_eager` and `eager_ms_per_step`.
    check_eager: bool = True
    # Random weights at `sizes` instead of the model group's checkpoint, and random prompts.
    random_weights: bool = False
    family: str = "llada"
    # Fields of the family's config.json; null or unset ones keep the released model's.
    sizes: Any = None
    prompt_length: int = 64
    # Autoregressive baseline in the same run (random weights, CUDA): transformers' Qwen2 at `ar_sizes`
    # (unset fields: Qwen2.5-7B), `generate` greedy with its static cache and compiled decoding step,
    # prompt_length prompt ids, gen_length new tokens, at each of ar_batch_sizes.
    ar_baseline: bool = False
    ar_batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])
    ar_sizes: Any = None
    # Also write the results as JSON / as the Markdown table here.
    output_json: Optional[str] = None
    output_markdown: Optional[str] = None

    def __post_init__(self) -> None:
        check(self.prompts >= 1, "prompts", self.prompts, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(all(b >= 1 for b in self.batch_sizes), "batch_sizes", self.batch_sizes, "must all be >= 1")
        check(all(b >= 1 for b in self.ar_batch_sizes), "ar_batch_sizes", self.ar_batch_sizes, "must all be >= 1")
        check(self.warmup >= 0, "warmup", self.warmup, "must be >= 0")
        check(self.dtype in DTYPES, "dtype", self.dtype, f"choose one of {list(DTYPES)}")
        check(self.device in DEVICES, "device", self.device, f"choose one of {list(DEVICES)}")
        check(self.engine in ENGINES, "engine", self.engine, f"choose one of {list(ENGINES)}")
        check(self.family in MODEL_FAMILIES, "family", self.family, f"choose one of {sorted(MODEL_FAMILIES)}")
        check(self.prompt_length >= 1, "prompt_length", self.prompt_length, "must be >= 1")
        check(len(self.caches) >= 1, "caches", self.caches, "name at least one cache")
        check(not self.ar_baseline or self.random_weights, "ar_baseline", self.ar_baseline, "needs random_weights=true")


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


def random_workload(cfg: BenchConfig, count: int, gen_length: int, dtype: torch.dtype, device: torch.device) -> Workload:
    family = MODEL_FAMILIES[cfg.family]
    config = family.config_class(**(cfg.sizes or {}))
    model = random_model(family, config, dtype, device, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(config.vocab_size, (count, cfg.prompt_length), generator=generator)
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
    """One cache's measurements over every prompt of one batch size."""

    seconds: float = 0.0
    steps: int = 0
    nfe: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    responses: list[torch.Tensor] = field(default_factory=list)
    # What every forward computed.
    forwards: list[ForwardShape] = field(default_factory=list)

    def add(self, out: BatchOutput) -> None:
        self.seconds += out.seconds
        # Every step runs one forward over the whole batch, so the batch's steps are its longest sample's.
        self.steps += max(len(c) for c in out.committed_per_step)
        self.nfe += out.nfe
        self.positions += out.positions
        self.responses.append(out.responses)
        self.forwards += out.forward_shapes


@dataclass
class Ceilings:
    """The device's measured memory bandwidth (bytes/s, read + written) and matrix-product rate (FLOP/s)."""

    bandwidth: float
    matmul: float


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after warm-up, timed with device events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """A 2 GiB device-to-device copy and an 8192^3 matrix product on random data, in the model's dtype."""
    source = torch.randint(0, 255, (2**31,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    bandwidth = 2 * source.numel() / timed(lambda: target.copy_(source), 20)
    del source, target
    a, b = (torch.randn(8192, 8192, dtype=dtype, device=device) for _ in range(2))
    matmul = 2 * 8192**3 / timed(lambda: a @ b, 10)
    return Ceilings(bandwidth, matmul)


@dataclass
class ModelShape:
    """What the floor of a forward depends on."""

    weight_bytes: int  # read by every forward: every parameter but the (gathered) token embedding
    head_bytes: int  # of them, the output head's (read whatever layers a forward skips)
    linear_params: int  # per position: the blocks' matrices
    head_params: int  # per position with logits
    kv_bytes_per_position: int  # keys + values of one position over all layers
    attention_width: int  # heads * head_dim * layers

    @classmethod
    def of(cls, model: DiffusionLM) -> "ModelShape":
        embedding, blocks, _, head = model.parts()
        parts = blocks[0].parts()
        element = embedding.weight.element_size()
        head_dim = parts.q_proj.out_features // parts.heads
        weights = sum(p.numel() for p in model.parameters()) - (0 if head is embedding.weight else embedding.weight.numel())
        return cls(
            weight_bytes=weights * element,
            head_bytes=head.numel() * element,
            linear_params=sum(p.numel() for p in blocks.parameters() if p.dim() == 2),
            head_params=head.numel(),
            kv_bytes_per_position=2 * parts.kv_heads * head_dim * len(blocks) * element,
            attention_width=parts.heads * head_dim * len(blocks),
        )

    def floor(self, forwards: list[ForwardShape], ceilings: Ceilings) -> tuple[float, str]:
        """Seconds at least needed for these forwards, from what each actually computed (the positions
        each layer ran over, the layers run), and the term that bounds most of them ('memory' or 'compute')."""
        total, compute_bound = 0.0, 0
        for rows, n, m, length, layers, num_layers in forwards:
            share = layers / num_layers  # of the blocks' weights and keys/values read, and their products
            weights = self.head_bytes + (self.weight_bytes - self.head_bytes) * share
            memory = (weights + rows * length * self.kv_bytes_per_position * share) / ceilings.bandwidth
            flops = 2 * rows * (share * n * self.linear_params + m * self.head_params
                                + 2 * share * n * length * self.attention_width)
            compute = flops / ceilings.matmul
            total += max(memory, compute)
            compute_bound += compute > memory
        return total, "compute" if 2 * compute_bound > len(forwards) else "memory"


def cache_label(cache: Any) -> str:
    config = CACHES.to_config(cache)
    extra = [f"{k}={v}" for k, v in vars(config).items() if k != "name" and v is not None]
    return " ".join([config.name, *extra])


def run(cfg: BenchConfig, model_cfg: ModelConfig) -> tuple[list[str], list[dict[str, Any]]]:
    """Decode with every cache at every batch size; returns the header lines and the table's rows."""
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    generation = GENERATIONS.build(cfg.generation)
    dataset = TASKS.to_config(cfg.dataset)
    gen_length = generation.config.response_length(dataset.gen_length)
    num_blocks, steps_per_block = generation.config.check_lengths(gen_length)
    caches = [(cache_label(c), CACHES.build(c)) for c in cfg.caches]
    reuse = REUSES.build(cfg.reuse)
    batch_sizes = list(cfg.batch_sizes) or [cfg.batch_size]
    if cfg.random_weights:
        work = random_workload(cfg, max(cfg.prompts, *batch_sizes), gen_length, dtype, device)
    else:
        work = dataset_workload(cfg, model_cfg, dataset, gen_length, dtype, device)
    on_gpu = device.type == "cuda"
    ceilings = measure_ceilings(device, dtype) if on_gpu else None
    shape = ModelShape.of(work.model)
    loaded = LoadedModel.of(work.model, engine=cfg.engine, stop_ids=work.stop_ids)
    eager = LoadedModel.of(work.model, engine="eager", stop_ids=work.stop_ids)
    engine = loaded.engine
    engine_name = "eager" if engine is None else "compiled"
    if engine is not None and cfg.random_weights:
        # Random prompts of one length: every forward shape recurs in every decode, as in a long run of
        # fixed shapes, so its kernels are specialised from the first capture (within the warm-up).
        engine.specialise_after = 1

    def decode(decoder: Decoder, batch: range) -> BatchOutput:
        generators = [torch.Generator(device).manual_seed(cfg.seed + i) for i in batch]
        return decoder.generate([work.prompts[i] for i in batch], gen_length=gen_length, generators=generators)

    header = [f"{work.description} | prompt {cfg.prompt_length if cfg.random_weights else 'dataset'}, gen_length {gen_length}, "
              f"block {generation.config.block_length}, {gen_length // (num_blocks * steps_per_block)} tokens/step, "
              f"threshold {getattr(generation.config, 'threshold', None)}, reuse={reuse.config.name} | {device} "
              f"{cfg.dtype} engine={engine_name}"]
    if ceilings is not None:
        header.append(f"{torch.cuda.get_device_name(device)}, measured: copy {ceilings.bandwidth / 1e12:.2f} TB/s, "
                      f"{cfg.dtype} matrix product {ceilings.matmul / 1e12:.0f} TFLOP/s; weights read per forward "
                      f"{shape.weight_bytes / 1e9:.2f} GB")
    print("\n".join(header))
    rows = []
    for batch_size in batch_sizes:
        count = min(len(work.prompts), max(cfg.prompts, batch_size))
        batches = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
        block_rows = []
        reference = None
        for label, cache in caches:
            # One cache at a time, its graphs and buffers freed after it: peak memory is its own.
            if engine is not None:
                engine.clear()
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            decoder = Decoder(loaded, generation, cache, reuse)
            for _ in range(cfg.warmup):
                decode(decoder, batches[0])
            totals = Totals()
            for batch in batches:
                totals.add(decode(decoder, batch))
            responses = torch.cat(totals.responses)
            reference = responses if reference is None else reference
            row = {
                "batch": batch_size,
                "cache": label,
                "nfe": sum(totals.nfe) / len(totals.nfe),
                "positions": sum(totals.positions) / len(totals.positions),
                "ms_per_step": 1000 * totals.seconds / totals.steps,
                "tokens_per_s": responses.numel() / totals.seconds,
                "same_tokens": (responses == reference).float().mean().item(),
            }
            if ceilings is not None:
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            report = decoder.engine_report()
            row.update(engine=report["engine"], warmup_s=report["warmup_seconds"],
                       engine_fallbacks="; ".join(report["engine_fallbacks"]) or "none")
            # The floor counts what each forward actually computed (positions per layer, layers run).
            if ceilings is not None:
                floor, bound = shape.floor(totals.forwards, ceilings)
                row.update(floor_ms_per_step=1000 * floor / totals.steps, x_floor=totals.seconds / floor, bound=bound)
            if engine is not None and cfg.check_eager and batch_size == batch_sizes[0]:
                eager_out = decode(Decoder(eager, generation, cache, reuse), batches[0])
                row["same_as_eager"] = (eager_out.responses == totals.responses[0]).float().mean().item()
                row["eager_ms_per_step"] = 1000 * eager_out.seconds / max(len(c) for c in eager_out.committed_per_step)
            cache.begin_batch()  # drop its keys/values, so the next cache's peak memory is its own
            if work.score is not None:
                row["accuracy"] = sum(work.score(r.tolist(), i) for i, r in enumerate(responses)) / len(responses)
            block_rows.append(row)
        print_table(block_rows)
        rows += block_rows
    if engine is not None:
        engine.clear()
    if cfg.ar_baseline:
        del work, engine, loaded, eager, decoder
        torch.cuda.empty_cache()
        ar_rows = autoregressive_rows(cfg, gen_length, dtype, device, ceilings)
        print_table(ar_rows)
        rows += ar_rows
    return header, rows


# Qwen2.5-7B's shapes: the autoregressive model a dLLM of this size would be compared with.
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)


def autoregressive_rows(cfg: BenchConfig, gen_length: int, dtype: torch.dtype, device: torch.device,
                        ceilings: Optional[Ceilings]) -> list[dict[str, Any]]:
    """transformers' Qwen2 with random weights: greedy `generate` of exactly gen_length tokens after
    prompt_length random ids, static cache (so transformers compiles the decoding step), per batch size.
    Time includes the prefill; one untimed generate per batch size first (compilation)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**(QWEN25_7B | dict(cfg.ar_sizes or {})))
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    layers = model.model.layers
    shape = ModelShape(
        weight_bytes=(params - embedding.numel()) * embedding.element_size(),
        head_bytes=model.lm_head.weight.numel() * embedding.element_size(),
        linear_params=sum(p.numel() for p in layers.parameters() if p.dim() == 2),
        head_params=model.lm_head.weight.numel(),
        kv_bytes_per_position=2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        * config.num_hidden_layers * embedding.element_size(),
        attention_width=config.hidden_size * config.num_hidden_layers,
    )
    label = f"autoregressive qwen2 ({params:,} parameters)"
    rows = []
    for batch_size in cfg.ar_batch_sizes:
        generator = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(config.vocab_size, (batch_size, cfg.prompt_length), generator=generator).to(device)
        options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=gen_length, min_new_tokens=gen_length,
                       do_sample=False, cache_implementation="static", pad_token_id=config.eos_token_id)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model.generate(ids, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = model.generate(ids, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        new_tokens = out.shape[1] - ids.shape[1]
        row = {"batch": batch_size, "cache": label, "nfe": new_tokens, "positions": cfg.prompt_length + new_tokens - 1,
               "ms_per_step": 1000 * seconds / new_tokens, "tokens_per_s": batch_size * new_tokens / seconds}
        if ceilings is not None:
            # The prefill, then one position per step attending to the positions before it.
            layers = config.num_hidden_layers
            forwards = [ForwardShape(batch_size, cfg.prompt_length, 1, cfg.prompt_length, layers, layers)]
            forwards += [ForwardShape(batch_size, 1, 1, cfg.prompt_length + t, layers, layers) for t in range(1, new_tokens)]
            floor, bound = shape.floor(forwards, ceilings)
            row.update(floor_ms_per_step=1000 * floor / new_tokens, x_floor=seconds / floor, bound=bound,
                       peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        rows.append(row)
    return rows


RATIO_KEYS = ("nfe", "positions", "ms_per_step", "tokens_per_s")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table; the four speed columns also as a ratio to the first row of the same batch size."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("batch", "cache")]
    lines = ["| batch | cache | " + " | ".join(keys) + " |", "| ---: | --- |" + " ---: |" * len(keys)]
    firsts: dict[int, dict[str, Any]] = {}
    for row in rows:
        first = firsts.setdefault(row["batch"], row)
        cells = []
        for key in keys:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif isinstance(value, str):
                cells.append(value)
            elif key in RATIO_KEYS:
                cells.append(f"{value:.1f} ({value / first[key]:.2f}x)")
            else:
                cells.append(f"{value:.3f}" if key.startswith("same") or key == "accuracy" else f"{value:.2f}")
        lines.append(f"| {row['batch']} | {row['cache']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(markdown_table(rows))


def validate(cfg: DictConfig) -> tuple[BenchConfig, ModelConfig]:
    """The composed config as the benchmark's settings and the model group's (checks run)."""
    fields = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "model"}
    return BenchConfig(**fields), OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        bench, model_cfg = validate(cfg)
        header, rows = run(bench, model_cfg)
    except ConfigError as err:
        sys.exit(f"configuration error: {err}")
    if bench.output_json:
        results = {"config": OmegaConf.to_container(cfg, resolve=True), "header": header, "rows": rows}
        Path(bench.output_json).write_text(json.dumps(results, indent=2) + "\n")
    if bench.output_markdown:
        Path(bench.output_markdown).write_text("\n\n".join(header) + "\n\n" + markdown_table(rows) + "\n")


if __name__ == "__main__":
    main()
