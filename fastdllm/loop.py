"""The decode loop: one loop for every model, cache, generation and reuse strategy.

The loop owns the sequence (left-padded prompts, then gen_length mask tokens split into blocks
decoded left to right) and the counters. Each step it asks the cache strategy for the logits of
the current block (the cache decides what the model recomputes), asks the generation strategy
which masked positions to commit, writes them, and counts forward passes, positions computed and
layer-positions computed (positions times the layers actually run over them: a layer that a reuse
strategy skips counts 0).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastdllm.cache.base import CacheStrategy
from fastdllm.engine import CompiledEngine
from fastdllm.forward import ForwardShape, ModelCall
from fastdllm.generation.base import GenerationStrategy, certainty_density
from fastdllm.models.base import DiffusionLM
from fastdllm.registry import ConfigError
from fastdllm.reuse.base import ReuseStrategy


@dataclass
class BatchOutput:
    # Response token ids [B, gen_length] (end tokens included), on the CPU.
    responses: torch.Tensor
    # Per sample: forward passes, token positions computed, tokens committed at each step.
    nfe: list[int]
    positions: list[int]
    committed_per_step: list[list[int]]
    # Decode wall time of the whole batch (device-synchronised).
    seconds: float
    # What each forward pass over the batch computed (forward.ForwardShape).
    forward_shapes: list[ForwardShape] = field(default_factory=list)
    # Per sample: positions x layers actually computed (a skipped layer counts 0).
    layer_positions: list[int] = field(default_factory=list)


@dataclass
class Step:
    """What one decoding step committed, for an observer (`generate(on_step=...)`: chat, web UI).

    The tensors are the loop's own, on its device and overwritten by later steps: copy what you keep.
    """

    # The columns of the sequence the step decoded (the current block).
    start: int
    end: int
    # [B, end - start] bool: the positions this step committed.
    committed: torch.Tensor
    # [B, sequence length]: prompts and responses so far (the mask id where still masked).
    tokens: torch.Tensor
    # Column of each sample's first response token.
    response_starts: list[int]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stop_token_ids(model: DiffusionLM, tokenizer) -> list[int]:
    """The model's end-of-text id plus the family's end-of-turn tokens present in the tokenizer."""
    ids = {model.config.eos_token_id}
    for token in model.stop_token_strings:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)


@dataclass
class Layout:
    """Where each sample's prompt and response go in the batch's token matrix.

    Bidirectional families: prompts left-padded to the longest, then gen_length masks, blocks from there.
    Block-causal families: each sample's blocks are counted from its own first prompt token, and the
    first block to decode is the one holding its prompt's end (it starts with the prompt's last
    L mod block_length tokens, or, when that is 0, with a token the prefill predicts). Left padding by a
    whole number of blocks puts that block at the same columns for every sample, so the batch shares
    one block grid, and decoding covers at least gen_length tokens after each prompt (one block more
    for a prompt that ends inside a block). Padding is masked out of attention and positions start at 0
    at each sample's first prompt token, so a sample decodes exactly as it does alone.
    """

    pads: list[int]  # padding columns before each prompt
    response_starts: list[int]  # column of each sample's first response token
    decode_ends: list[int]  # each sample's masks run from its response start up to here
    first_block: int  # column where the first decoded block starts
    num_blocks: int
    length: int

    @classmethod
    def of(cls, lengths: list[int], gen_length: int, block_length: int, block_causal: bool,
           pad_to: int = 1) -> "Layout":
        """`pad_to`: bidirectional families pad the prompts to a multiple of it, so that batches of
        nearby prompt lengths share one sequence length (and engine=compiled's graphs and buffers)."""
        if not block_causal:
            prompt_length = -(-max(lengths) // pad_to) * pad_to
            return cls([prompt_length - n for n in lengths], [prompt_length] * len(lengths),
                       [prompt_length + gen_length] * len(lengths), prompt_length, gen_length // block_length,
                       prompt_length + gen_length)
        complete = [n // block_length for n in lengths]  # the prompt's complete blocks
        blocks = [-(-(n % block_length + gen_length) // block_length) for n in lengths]
        first_block = max(complete) * block_length
        return cls([first_block - k * block_length for k in complete], [first_block + n % block_length for n in lengths],
                   [first_block + b * block_length for b in blocks], first_block, max(blocks),
                   first_block + max(blocks) * block_length)


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]],
    *,
    gen_length: int,
    generation: GenerationStrategy,
    cache: CacheStrategy,
    reuse: ReuseStrategy,
    generators: list[torch.Generator],
    stop_ids: list[int],
    # Runs the forwards (fastdllm.engine.build_engine); None = eager.
    engine: Optional[CompiledEngine] = None,
    # Called after every step with what it committed (chat, web UI); its time counts in `seconds`.
    on_step: Optional[Callable[[Step], None]] = None,
    # Pad the prompts of a bidirectional family to a multiple of this many tokens (see Layout.of).
    pad_to: int = 1,
) -> BatchOutput:
    """Decode a batch of prompts. Block-causal families (Fast-dLLM v2) also run, outside the denoising
    steps, one forward over the prompt's complete blocks (prefill) and one over each finished block:
    both keep the keys/values (cached strategies) and their last logits give the next block's first
    token, greedily."""
    config = generation.config
    _, steps_per_block = config.check_lengths(gen_length)
    device = next(model.parameters()).device
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    batch = len(prompts)
    if min(len(p) for p in prompts) == 0:
        raise ConfigError("a prompt is empty: every sample needs at least one prompt token")
    block_length = config.block_length
    layout = Layout.of([len(p) for p in prompts], gen_length, block_length, model.block_causal, pad_to)
    if max(layout.length - pad for pad in layout.pads) > model.config.max_context:
        raise ConfigError(
            f"prompt of {max(len(p) for p in prompts)} tokens + generation.gen_length={gen_length} exceeds the model "
            f"context of {model.config.max_context} tokens: shorten the prompt (dataset.num_fewshot) or gen_length"
        )

    tokens = torch.full((batch, layout.length), eos_id, dtype=torch.long, device=device)
    key_mask = torch.zeros((batch, layout.length), dtype=torch.bool, device=device)
    prompt_mask = torch.zeros_like(key_mask)
    for i, prompt in enumerate(prompts):
        start = layout.pads[i]
        tokens[i, start : start + len(prompt)] = torch.tensor(prompt, device=device)
        tokens[i, layout.response_starts[i] : layout.decode_ends[i]] = mask_id
        key_mask[i, start:] = True
        prompt_mask[i, start : start + len(prompt)] = True
    response_starts = torch.tensor(layout.response_starts, device=device)
    in_response = torch.arange(layout.length, device=device)[None, :] >= response_starts[:, None]

    if engine is not None and not reuse.runs_compiled():
        engine.fallback(f"reuse={reuse.config.name} decides per layer on the host (run_layer); its forwards run eager")
        engine = None
    sub_block_length = config.sub_block_length or block_length
    call = ModelCall(model, tokens, key_mask, prompt_mask, config.cfg_scale, reuse, engine,
                     attention_block=block_length if model.block_causal else None, sub_block_length=sub_block_length)
    sigma = config.sigma if config.sigma is not None else cache.certainty_prior_sigma
    sub_block_of = torch.arange(block_length, device=device) // sub_block_length
    cache.begin_batch()
    reuse.begin_batch(num_layers=call.num_layers)
    # Counters stay on the device, read once after the batch: a host read inside a step would stall
    # the device every step. A sample's committed count at a step where it was inactive is -1.
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    positions = torch.zeros_like(nfe)
    layer_positions = torch.zeros_like(nfe)
    committed: list[torch.Tensor] = []
    running = torch.ones(batch, dtype=torch.bool, device=device)  # False once early-stopped
    stop = torch.tensor(stop_ids, device=device)

    def count(rows: torch.Tensor, committed_now: torch.Tensor) -> None:
        """Charge the forwards since the counters were reset to `rows`, which committed `committed_now`."""
        nonlocal nfe, positions, layer_positions
        nfe += rows * call.forwards
        positions += rows * call.positions
        layer_positions += rows * call.layer_positions
        committed.append(torch.where(rows, committed_now, -1))

    def finish_block(block_start: int, block_end: int, rows: torch.Tensor) -> None:
        """Block-causal: [block_start, block_end) is final for `rows`; predict the token at block_end."""
        call.forwards = call.positions = call.layer_positions = 0
        # Like a block's first step, this forward writes keys/values that later steps keep: a reuse
        # strategy computes every layer and position here.
        reuse.begin_step(block_start, block_end, 0)
        logits = cache.finish_block(call, block_start, block_end)
        receives = rows & (tokens[:, block_end] == mask_id)
        tokens[:, block_end] = torch.where(receives, logits[:, 0].argmax(-1), tokens[:, block_end])
        count(rows, receives.long())
        if on_step is not None:
            on_step(Step(block_end, block_end + 1, receives[:, None], tokens, layout.response_starts))

    def stop_finished(end: int) -> None:
        """Samples with a stop token in their response before column `end` (nothing masked there) are done."""
        finished = running & (torch.isin(tokens[:, :end], stop) & in_response[:, :end]).any(-1)
        tokens[:, end:].masked_fill_(finished[:, None], eos_id)
        running.logical_and_(~finished)

    _synchronize(device)
    started = time.perf_counter()
    if call.attention_block is not None and layout.first_block > 0:
        finish_block(0, layout.first_block, torch.tensor([pad < layout.first_block for pad in layout.pads], device=device))
    for block in range(layout.num_blocks):
        block_start = layout.first_block + block * block_length
        block_end = block_start + block_length
        block_tokens = tokens[:, block_start:block_end]
        masked = block_tokens == mask_id
        schedule = generation.schedule(masked.sum(-1), steps_per_block)
        # Sub-blocks cap a step's commits below its quota, so the step count is no longer known ahead.
        exact = generation.commits_exactly_quota() and sub_block_length == block_length
        steps = steps_per_block
        if exact:
            # Each step commits exactly its quota, so a sample is active while the quotas before the step
            # leave positions masked: the block's step count is known now (one host read per block).
            quota_before = schedule.cumsum(-1) - schedule
            steps = int(((quota_before < masked.sum(-1, keepdim=True)) & running[:, None]).sum(-1).max())
        for step in range(steps):
            active = running & masked.any(-1)
            # Data-dependent commits (a threshold): whether any sample is left is known only now.
            if not exact and not active.any():
                break
            call.decoding = masked & active[:, None]
            if sub_block_length < block_length:
                # Each sample decodes the first sub-block of the block that still has masked positions.
                current = masked.view(batch, -1, sub_block_length).any(-1).float().argmax(-1)
                call.decoding &= sub_block_of == current[:, None]
            reuse.begin_step(block_start, block_end, step)
            call.forwards = call.positions = call.layer_positions = 0
            logits = cache.block_logits(call, block_start, block_end, step)
            # The certainty prior is passed only when on, so strategies without it keep working.
            prior = {} if not sigma else {"prior": certainty_density(tokens[:, layout.first_block:] != mask_id, sigma)[
                :, block_start - layout.first_block : block_end - layout.first_block]}
            proposed, commit = generation.select(logits, call.decoding, schedule[:, step], generators, **prior)
            block_tokens.copy_(torch.where(commit, proposed, block_tokens))
            masked &= ~commit
            count(active, commit.sum(-1))
            if on_step is not None:
                on_step(Step(block_start, block_end, commit, tokens, layout.response_starts))
        if config.early_stop:
            # The block is fully decoded, so a stop token in the response so far has nothing masked before it.
            stop_finished(block_end)
        if call.attention_block is not None and block + 1 < layout.num_blocks:
            rows = running & (tokens[:, block_end] == mask_id)
            if rows.any():  # one host read per block: no forward once every sample has stopped
                finish_block(block_start, block_end, rows)
                if config.early_stop:
                    stop_finished(block_end + 1)
    _synchronize(device)
    seconds = time.perf_counter() - started
    steps_committed = torch.stack(committed, dim=1).tolist() if committed else [[] for _ in range(batch)]
    committed_per_step = [[c for c in row if c >= 0] for row in steps_committed]
    columns = response_starts[:, None] + torch.arange(gen_length, device=device)
    return BatchOutput(tokens.gather(1, columns).cpu(), nfe.tolist(), positions.tolist(), committed_per_step, seconds,
                       call.forward_shapes, layer_positions.tolist())


def answer_length(response: list[int], stop_ids: list[int]) -> int:
    """Generated tokens up to (not including) the first stop token."""
    for i, token in enumerate(response):
        if token in stop_ids:
            return i
    return len(response)
