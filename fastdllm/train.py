"""Train a tiny model from scratch on a generated task: `python -m fastdllm.train` (config: conf/train.yaml).

`objective=llada` (default): a tiny LLaDA with LLaDA's supervised fine-tuning loss. Each row is a
chat-templated prompt followed by a response of exactly gen_length tokens: the worked answer,
`<|eot_id|>`, then `<|endoftext|>` padding (as LLaDA-8B-Instruct, the padding is part of the response
and is learned). Per row, t is drawn uniformly from (0, 1] and each response token is replaced by the
mask token with probability t; the loss is the cross-entropy on masked tokens weighted by 1/t, summed
and divided by the response length and the batch size. The prompt is never masked and carries no loss.

`objective=fast-dllm-v2`: a tiny Fast-dLLM v2 (block diffusion, Qwen2 layout) with the published
objective. Each row is the prompt, the worked answer, `<|im_end|>`, then `<|endoftext|>` up to the
end of that block (blocks of `block_size` from the row's first token, as at inference). Per block,
t ~ U(0, 1) and each response token of the block is masked with probability (1 - eps) t + eps; the
complementary view masks exactly the other response tokens. Each view is fed as [noisy | clean]
(2L positions, both halves at positions 0..L-1) under the training mask (block_diffusion_mask); the
loss is the shifted cross-entropy (logits at i - 1 predict token i) of the noisy half on the masked
tokens, averaged over both views (no 1/t weighting, as published).

The result is saved in the family's official layout (fastdllm.models.save_checkpoint), so eval.py loads
it as it loads the released models. Same config and seed, same run: the problems, the batches, the
masks and the initial weights all come from the seed.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fastdllm.config import DEVICES, resolve_device
from fastdllm.decoder import Decoder, LoadedModel
from fastdllm.models import load_model, load_tokenizer, save_checkpoint
from fastdllm.models.tiny import build_tiny_model
from fastdllm.registry import ConfigError, check
from fastdllm.tasks import TASKS, Example, Task
from fastdllm.tasks.prompts import decode_answer, encode_prompts

# LLaDA's SFT draws the masking rate as (1 - eps) * u + eps, so that 1/t stays bounded.
MIN_MASK_RATE = 1e-3


@dataclass
class ArchitectureConfig:
    """Sizes of the model trained from scratch (LLaDA's config.json names; the same sizes for Fast-dLLM v2)."""

    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 4
    # Key/value heads (grouped-query attention); null = n_heads.
    n_kv_heads: Optional[int] = None
    mlp_hidden_size: int = 512
    max_sequence_length: int = 512
    rope_theta: float = 10000.0
    # Standard deviation of the initial weights.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check(self.d_model % self.n_heads == 0, "architecture.n_heads", self.n_heads, "must divide d_model")
        check(self.n_kv_heads is None or (self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0),
              "architecture.n_kv_heads", self.n_kv_heads, "must divide n_heads, or be null")

    def family_sizes(self, objective: str) -> dict[str, Any]:
        """These sizes under the config.json names of the objective's model family."""
        kv_heads = self.n_kv_heads or self.n_heads
        if objective == "llada":
            return dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=kv_heads,
                        mlp_hidden_size=self.mlp_hidden_size, max_sequence_length=self.max_sequence_length,
                        rope_theta=self.rope_theta)
        return dict(hidden_size=self.d_model, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    num_key_value_heads=kv_heads, intermediate_size=self.mlp_hidden_size,
                    max_position_embeddings=self.max_sequence_length, rope_theta=self.rope_theta)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    # Linear warm-up, then cosine decay to min_lr_ratio * lr at the last step.
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


# objective -> the model family it trains (a key of MODEL_FAMILIES).
OBJECTIVES = {"llada": "llada", "fast-dllm-v2": "Fast_dLLM_Qwen"}


@dataclass
class TrainConfig:
    # The task trained on (its train split must be generated: it needs a train_examples(seed) method).
    dataset: Any = MISSING
    # llada: LLaDA's masked-diffusion SFT on a tiny LLaDA; fast-dllm-v2: block diffusion on a tiny Fast-dLLM v2.
    objective: str = "llada"
    # fast-dllm-v2: the block size of the noise and of the attention mask (config.json bd_size).
    block_size: int = 32
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    steps: int = 5000
    batch_size: int = 512
    # Distinct train problems generated up front and cycled through (a fresh mask every time).
    train_problems: int = 250000
    # Decode the test split as eval.py does by default every this many steps (0: only at the end).
    eval_every: int = 2000
    # Start from this checkpoint (of the objective's family) instead of random weights; `architecture` is then unused.
    init_from: Optional[str] = None
    # Where the checkpoint (config.json, model.safetensors, tokenizer) is written.
    output_dir: str = MISSING
    device: str = "auto"
    # Deterministic GPU kernels: the same command on the same kind of GPU gives bitwise the same weights
    # (otherwise atomic adds in the backward pass make runs differ by rounding, then by a point or two).
    deterministic: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "train_problems"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        check(self.objective in OBJECTIVES, "objective", self.objective, f"choose one of {list(OBJECTIVES)}")
        check(self.block_size >= 1, "block_size", self.block_size, "must be >= 1")
        check(self.device in DEVICES, "device", self.device, f"choose one of {list(DEVICES)}")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


class ResponseEncoder:
    """Prompt and response token ids of an example, exactly as the model sees them at evaluation.

    A response is the answer, the end-of-turn token, then padding: up to gen_length tokens
    (`pad_to_multiple` null, LLaDA), or up to the end of the block it ends in (Fast-dLLM v2)."""

    def __init__(self, task: Task, tokenizer, gen_length: int, end_token: str, pad_to_multiple: Optional[int] = None):
        self.task = task
        self.tokenizer = tokenizer
        self.gen_length = gen_length
        self.end_id = tokenizer.convert_tokens_to_ids(end_token)
        self.pad_id = tokenizer.pad_token_id
        self.pad_to_multiple = pad_to_multiple

    def prompts(self, examples: list[Example]) -> list[list[int]]:
        return encode_prompts(self.task, examples, self.tokenizer, chat=True)[1]

    def responses(self, examples: list[Example], prompts: list[list[int]]) -> list[list[int]]:
        answers = self.tokenizer([ex.reference for ex in examples], add_special_tokens=False)["input_ids"]
        rows = []
        for ex, prompt, answer in zip(examples, prompts, answers):
            response = answer + [self.end_id]
            if len(response) > self.gen_length:
                raise ConfigError(
                    f"dataset.gen_length={self.gen_length} is invalid: example {ex.id} needs {len(response)} tokens"
                )
            if self.pad_to_multiple is None:
                padding = self.gen_length - len(response)
            else:
                padding = -(len(prompt) + len(response)) % self.pad_to_multiple
            rows.append(response + [self.pad_id] * padding)
        return rows


def evaluate(model, task: Task, encoder: ResponseEncoder, generation: dict[str, Any]) -> dict[str, float]:
    """Test accuracy and mean forward passes under `generation` with cache=none, the whole test
    split as one batch: a progress check, not a measurement of speed."""
    examples = task.load()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    decoder = Decoder.of(LoadedModel.of(model, encoder.tokenizer), generation, {"name": "none"}, {"name": "none"})
    stop_ids = decoder.stop_ids
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        # Greedy decoding draws no random numbers; the loop still takes one generator per row.
        out = decoder.generate(encoder.prompts(examples), gen_length=encoder.gen_length,
                               generators=[torch.Generator() for _ in examples])
    model.train(was_training)
    completions = [decode_answer(encoder.tokenizer, r.tolist(), stop_ids)[0] for r in out.responses]
    correct = [task.is_correct(task.extract_answer(c), ex.gold) for c, ex in zip(completions, examples)]
    return {"accuracy": 100.0 * sum(correct) / len(correct), "nfe": sum(out.nfe) / len(out.nfe)}


def masked_diffusion_loss(model, ids: torch.Tensor, gen_length: int, generator: torch.Generator) -> torch.Tensor:
    """LLaDA's SFT loss on the last gen_length tokens (the responses) of unpadded rows of equal length."""
    batch, length = ids.shape
    responses = ids[:, -gen_length:]
    rate = (1 - MIN_MASK_RATE) * torch.rand(batch, 1, device=ids.device, generator=generator) + MIN_MASK_RATE
    masked = torch.rand(batch, gen_length, device=ids.device, generator=generator) < rate
    noisy = ids.clone()
    noisy[:, -gen_length:] = responses.masked_fill(masked, model.config.mask_token_id)
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    logits = model(noisy, positions)[:, -gen_length:]
    token_loss = F.cross_entropy(logits[masked], responses[masked], reduction="none") / rate.expand_as(masked)[masked]
    return token_loss.sum() / (batch * gen_length)


def block_diffusion_mask(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Fast-dLLM v2's training attention mask [1, 1, 2L, 2L] over [noisy | clean] (True = may attend):
    a noisy query sees its own noisy block and the clean blocks before it; a clean query sees the
    clean blocks up to its own. Noisy tokens are never keys for another block."""
    index = torch.arange(2 * length, device=device)
    clean = index >= length
    block = (index % length) // block_size
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    same_block_same_copy = (q_block == k_block) & (q_clean == k_clean)
    noisy_sees_earlier_clean = ~q_clean & k_clean & (k_block < q_block)
    clean_sees_clean_causally = q_clean & k_clean & (k_block <= q_block)
    return (same_block_same_copy | noisy_sees_earlier_clean | clean_sees_clean_causally)[None, None]


def block_diffusion_loss(model, ids: torch.Tensor, response: torch.Tensor, block_size: int,
                         generator: torch.Generator) -> torch.Tensor:
    """Fast-dLLM v2's loss on rows of equal length (a multiple of block_size); `response` [N, L] marks
    the supervised tokens (the prompt is never masked)."""
    batch, length = ids.shape
    rate = (1 - MIN_MASK_RATE) * torch.rand(batch, length // block_size, 1, device=ids.device, generator=generator) + MIN_MASK_RATE
    drawn = (torch.rand(batch, length // block_size, block_size, device=ids.device, generator=generator) < rate).view(batch, length)
    # The complementary view masks exactly the response tokens the first one leaves visible.
    masked = torch.cat([drawn & response, ~drawn & response])
    clean = ids.repeat(2, 1)
    noisy = clean.masked_fill(masked, model.config.mask_token_id)
    positions = torch.arange(length, device=ids.device).repeat(2).expand(2 * batch, 2 * length)
    attention = block_diffusion_mask(length, block_size, ids.device)
    logits = model(torch.cat([noisy, clean], dim=1), positions, attention, logits_for=slice(0, length))
    # The logits at i - 1 predict token i.
    targets = clean[:, 1:].masked_fill(~masked[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


class LengthBuckets:
    """Train rows grouped by length, so a batch needs no padding (and attention no mask, which lets
    it run the fused kernels). A batch is drawn from the bucket of a uniformly drawn row, so every
    row is equally likely to be trained on."""

    def __init__(self, rows: list[list[int]], prompt_lengths: list[int], device: torch.device):
        lengths = torch.tensor([len(row) for row in rows])
        self.prompt_lengths = torch.tensor(prompt_lengths, device=device)
        sorted_lengths, order = lengths.sort(stable=True)
        sizes = torch.bincount(lengths)
        first = sizes.cumsum(0) - sizes  # where the rows of each length start in the sorted order
        self.order = order.to(device)
        # For the row at each place of the sorted order: where its bucket starts, and its size.
        self.bucket_start = first[sorted_lengths].to(device)
        self.bucket_size = sizes[sorted_lengths].to(device)
        self.lengths = lengths.to(device)
        # Rows aligned right: the rows of a bucket of length n are the last n columns.
        data = torch.zeros((len(rows), int(lengths.max())), dtype=torch.long)
        for i, row in enumerate(rows):
            data[i, data.shape[1] - len(row):] = torch.tensor(row)
        self.data = data.to(device)

    def __len__(self) -> int:
        return len(self.order)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one length [N, L], and which of their tokens are the response [N, L]."""
        device = self.order.device
        anchor = torch.randint(len(self), (1,), device=device, generator=generator)
        offsets = (torch.rand(batch_size, device=device, generator=generator) * self.bucket_size[anchor]).long()
        index = self.order[self.bucket_start[anchor] + offsets]
        length = int(self.lengths[index[0]])
        response = torch.arange(length, device=device)[None, :] >= self.prompt_lengths[index][:, None]
        return self.data[index, self.data.shape[1] - length:], response


def lr_factor(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = resolve_device(cfg.device)
    task = TASKS.build(cfg.dataset)
    if not hasattr(task, "train_examples"):
        raise ConfigError(f"dataset.name={task.config.name!r} is invalid: training needs a task with a generated train split")
    gen_length = task.config.gen_length
    torch.manual_seed(cfg.seed)
    arch = cfg.architecture
    v2 = cfg.objective == "fast-dllm-v2"
    sizes = arch.family_sizes(cfg.objective) | ({"bd_size": cfg.block_size} if v2 else {})
    if cfg.init_from is None:
        model, tokenizer = build_tiny_model(OBJECTIVES[cfg.objective], seed=cfg.seed, std=arch.init_std, **sizes)
    else:
        model, tokenizer = load_model(Path(cfg.init_from), torch.float32), load_tokenizer(Path(cfg.init_from))
        check(model.model_type == OBJECTIVES[cfg.objective], "init_from", cfg.init_from,
              f"must be a {OBJECTIVES[cfg.objective]} checkpoint for objective={cfg.objective}")
    model.to(device).train().requires_grad_(True)
    parameters = sum(p.numel() for p in model.parameters())
    if v2:
        encoder = ResponseEncoder(task, tokenizer, gen_length, "<|im_end|>", pad_to_multiple=cfg.block_size)
        # Fast-dLLM v2's decoding at its two published thresholds (1.0: one token per step).
        checks = {f"threshold_{t}": {"name": "fast-dllm-v2", "block_length": cfg.block_size, "threshold": t} for t in (1.0, 0.9)}
    else:
        encoder = ResponseEncoder(task, tokenizer, gen_length, "<|eot_id|>")
        checks = {"vanilla": {"name": "vanilla"}, "threshold_0.9": {"name": "vanilla", "threshold": 0.9}}

    started = time.perf_counter()
    examples = list(itertools.islice(task.train_examples(cfg.seed), cfg.train_problems))
    prompts = encoder.prompts(examples)
    rows = [p + r for p, r in zip(prompts, encoder.responses(examples, prompts))]
    buckets = LengthBuckets(rows, [len(p) for p in prompts], device)
    print(f"{parameters / 1e6:.2f}M parameters on {device}; {len(buckets)} train problems encoded in "
          f"{time.perf_counter() - started:.1f}s", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = cfg.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), fused=device.type == "cuda",
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, cfg.steps))
    generator = torch.Generator(device).manual_seed(cfg.seed)

    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ids, response = buckets.sample(cfg.batch_size, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if v2:
                loss = block_diffusion_loss(model, ids, response, cfg.block_size, generator)
            else:
                loss = masked_diffusion_loss(model, ids, gen_length, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == cfg.steps:
            print(f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{time.perf_counter() - started:.1f}s", flush=True)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            name, generation = next(iter(checks.items()))
            print(f"step {step} test {name} {evaluate(model, task, encoder, generation)}", flush=True)
            # Kept up to date so that a run stopped early still leaves a usable checkpoint.
            save_checkpoint(model, cfg.output_dir, tokenizer)
    train_seconds = time.perf_counter() - started

    output_dir = save_checkpoint(model, cfg.output_dir, tokenizer)
    # Score the checkpoint as saved, read back through the same loader eval.py uses.
    saved = load_model(output_dir, torch.float32, device)
    results = {"parameters": parameters, "train_seconds": round(train_seconds)}
    results |= {name: evaluate(saved, task, encoder, generation) for name, generation in checks.items()}
    print(f"saved {output_dir}: {results}", flush=True)
    return results


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # The dataset group is validated by its own schema (the task's config class).
    dataset = TASKS.to_config(cfg.dataset)
    config: TrainConfig = OmegaConf.to_object(cfg)
    config.dataset = dataset
    train(config)


if __name__ == "__main__":
    main()
