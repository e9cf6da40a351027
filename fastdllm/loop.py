"""The decode loop: one loop for every model, cache, generation and reuse strategy.

The loop owns the sequence (left-padded prompts, then gen_length mask tokens split into blocks
decoded left to right) and the counters. Each step it asks the cache strategy for the logits of
the current block (the cache decides what the model recomputes), asks the generation strategy
which masked positions to commit, writes them, and counts forward passes, positions computed and
layer-positions computed (positions times the layers actually run over them: a layer that a reuse
strategy skips counts 0).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastdllm.cache.base import CacheStrategy
from fastdllm.engine import CompiledEngine, notice
from fastdllm.generation.base import GenerationStrategy, certainty_density
from fastdllm.models.base import DiffusionLM
from fastdllm.models.layers import KVCache, LayerPlan, PositionHook
from fastdllm.registry import ConfigError
from fastdllm.reuse.base import ReuseStrategy


class ModelCall:
    """The model as strategies see it within one batch: the current tokens, their positions and padding.

    `predict` computes a span of positions and returns the logits that predict a block, handling
    the family's logit shift and classifier-free guidance, and counts what it computed.
    """

    def __init__(self, model: DiffusionLM, tokens: torch.Tensor, key_mask: torch.Tensor, prompt_mask: torch.Tensor,
                 cfg_scale: float, reuse: ReuseStrategy, engine: Optional[CompiledEngine] = None,
                 attention_block: Optional[int] = None, sub_block_length: Optional[int] = None):
        self.model = model
        self.num_layers = len(model.parts()[1])
        # engine=compiled runs the forwards it supports; None runs DiffusionLM.forward (engine=eager).
        self.engine = engine
        self.tokens = tokens
        # None when nothing is padded: attention then needs no mask (decided once per batch, since
        # reading a GPU tensor's value in every layer would stall the device).
        self.key_mask = None if bool(key_mask.all()) else key_mask
        self.prompt_mask = prompt_mask
        # Absolute positions, 0 at each sample's first prompt token (left padding does not shift them).
        self.position_ids = (key_mask.long().cumsum(-1) - 1).clamp_min(0)
        self.cfg_scale = cfg_scale
        self.reuse = reuse
        self.length = tokens.shape[1]
        self.shift = model.logit_shift
        # Block-causal families: the block size of their attention mask (the loop lays the batch out so
        # that every sample's blocks start at the same columns); None: bidirectional attention.
        self.attention_block = attention_block
        # The sub-block length (the block length when blocks have no sub-blocks), and, set by the loop
        # before each step, the positions of the block [B, block_length] this step may commit (each
        # sample's current sub-block).
        self.sub_block_length = sub_block_length
        self.decoding: Optional[torch.Tensor] = None
        self.forwards = 0
        self.positions = 0
        # (rows, positions computed, positions with logits, sequence length) of every forward of the batch.
        self.forward_shapes: list[tuple[int, int, int, int]] = []
        self.layer_positions = 0
        self.hooked = False

    def attention_mask(self, queries: torch.Tensor, keys: tuple[int, int], first: Optional[int] = None
                       ) -> Optional[torch.Tensor]:
        """What the queries at columns `queries` ([n], or [B, n]) may attend among the key columns
        [keys[0], keys[1]): the key mask (bidirectional), or the block-causal mask [B or 1, 1, n, keys].
        `first`: the first query column of a span (a host value)."""
        key_start, key_end = keys
        key_mask = self.key_mask
        if key_mask is not None and (key_start, key_end) != (0, self.length):
            key_mask = key_mask[:, key_start:key_end]
        size = self.attention_block
        if size is None or (first is not None and (key_end - 1) // size <= first // size):
            return key_mask  # bidirectional, or every key lies in the first query's block or before it
        query_columns = queries[..., :, None]
        key_columns = torch.arange(key_start, key_end, device=queries.device)
        mask = key_columns // size <= query_columns // size
        if key_mask is not None:
            # A padding query sees only itself: a query with no key at all would make attention NaN.
            mask = mask & key_mask[:, None, :] | (key_columns == query_columns)
        return mask.unsqueeze(-3) if mask.dim() == 3 else mask[None, None]

    def predict(self, block_start: int, block_end: int, compute: tuple[int, int],
                kv_cache: Optional[KVCache] = None, *, position_hook: Optional[PositionHook] = None,
                positions_computed: Optional[int] = None) -> torch.Tensor:
        """Run the model over positions compute=(start, end) and return logits [B, block_end -
        block_start, V] predicting the block's tokens. Keys/values outside the span come from kv_cache.
        A position_hook chooses per layer which of them are computed (models.layers.PositionHook);
        its strategy then says how many positions that amounts to (`positions_computed`)."""
        start, end = compute
        first, last = block_start - self.shift, block_end - self.shift
        # The block's positions predicted from inside the span; block-causal families may compute part
        # of a block (a sub-block, or the block without the position before it) and get logits 0 for the rest.
        lo, hi = max(first, start), min(last, end)
        covers = 0 <= start <= first and last <= end <= self.length
        if not (covers or (self.attention_block is not None and 0 <= start and lo < hi and end <= self.length)):
            raise ValueError(f"computing positions [{start}, {end}) cannot predict block [{block_start}, {block_end})")
        # A forward over the whole sequence with a key/value cache records every layer's keys/values.
        records_kv = kv_cache is not None and (start, end) == (0, self.length)
        self.reuse.begin_forward(start, end, length=self.length, records_kv=records_kv, key_mask=self.key_mask,
                                 cache_hook=position_hook is not None)
        key_mask = self.attention_mask(torch.arange(start, end, device=self.tokens.device),
                                       (0, self.length) if kv_cache is not None else (start, end), first=start)
        logits = self._forward(lambda t: t[:, start:end], key_mask, kv_cache, position_hook, slice(lo - start, hi - start),
                               start)
        self.positions += end - start if positions_computed is None else positions_computed
        if (lo, hi) != (first, last):
            block = logits.new_zeros(logits.shape[0], last - first, logits.shape[-1])
            block[:, lo - first : hi - first] = logits
            logits = block
        return logits

    def predict_at(self, positions: torch.Tensor, logits_rows: torch.Tensor, kv_cache: KVCache, *,
                   position_hook: Optional[PositionHook] = None) -> torch.Tensor:
        """Run the model over the given positions [B, n] (increasing along each row; kv_cache places
        their keys/values and holds the others') and return the logits [B, m, V] at rows
        `logits_rows` [B, m] of them (the caller applies the logit shift)."""
        self.reuse.begin_forward_at(positions)
        key_mask = self.attention_mask(positions, (0, self.length))
        logits = self._forward(lambda t: t.gather(1, positions), key_mask, kv_cache, position_hook, logits_rows)
        self.positions += positions.shape[1]
        return logits

    def _forward(self, select: Callable[[torch.Tensor], torch.Tensor], key_mask: Optional[torch.Tensor],
                 kv_cache: Optional[KVCache], position_hook: Optional[PositionHook],
                 logits_for: slice | torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        """The model over the positions `select` takes from a [B, L] tensor under `key_mask`, with CFG
        and the mask token never predicted; counts the forward. `start`: the first column of a span
        (None: scattered positions, which the engine does not run)."""
        ids, positions = select(self.tokens), select(self.position_ids)
        if self.cfg_scale > 0:
            # The unconditional copy sees the prompt as mask tokens; both run as one batch.
            unconditional = self.tokens.masked_fill(self.prompt_mask, self.model.config.mask_token_id)
            ids = torch.cat([ids, select(unconditional)])
            positions = positions.repeat(2, 1)
            if key_mask is not None and key_mask.shape[0] > 1:
                key_mask = key_mask.repeat(2, *[1] * (key_mask.dim() - 1))
            if isinstance(logits_for, torch.Tensor):
                logits_for = logits_for.repeat(2, 1)
        reuse_hook = self.reuse.position_hook(kv_cache)
        if reuse_hook is not None:  # begin_forward refused a cache with a position hook of its own
            position_hook, kv_cache = reuse_hook
        self.hooked = position_hook is not None
        if self.engine is not None and not self.hooked and start is not None and self.engine.supports(kv_cache):
            reused = self.reuse.reused_layers()
            logits = self.engine.forward(ids, positions, key_mask, kv_cache=kv_cache, logits_for=logits_for,
                                         reused=reused, start=start, length=self.length)
            # The engine runs every layer it does not skip over every computed position.
            skipped = len(reused.layers) if reused.skipping else 0
            self.layer_positions += ids.shape[1] * (self.num_layers - skipped)
        else:
            if self.hooked:
                position_hook = CountingHook(position_hook, self)
            logits = self.model(ids, positions, key_mask, kv_cache=kv_cache, layer_runner=self.run_layer,
                                logits_for=logits_for, position_hook=position_hook)
        self.forward_shapes.append((ids.shape[0], ids.shape[1], logits.shape[1], self.length))
        logits = logits[..., : self.model.config.vocab_size]
        if self.cfg_scale > 0:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + (self.cfg_scale + 1) * (conditional - unconditional)
        # The mask token is never a prediction: committing it would leave a position masked but counted as decoded.
        logits[..., self.model.config.mask_token_id] = -torch.inf
        self.forwards += 1
        return logits

    def run_layer(self, layer: int, hidden: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The reuse strategy's layer runner, counting the positions each real layer computation runs
        over (shapes are host values, so counting costs no device read); with a position hook, the
        CountingHook counts the positions its plans compute instead."""

        def counted(x: torch.Tensor) -> torch.Tensor:
            if not self.hooked:
                self.layer_positions += x.shape[1]
            return compute(x)

        return self.reuse.run_layer(layer, hidden, counted)


class CountingHook:
    """A PositionHook passed through, counting into `call.layer_positions` the positions each layer's
    plan computes; a position whose attention runs but whose feed-forward is reused counts half
    (rounded down per layer)."""

    def __init__(self, hook: PositionHook, call: ModelCall):
        self.hook, self.call = hook, call

    def plan(self, layer: int, hidden: torch.Tensor, normed: torch.Tensor, value_proj) -> LayerPlan:
        plan = self.hook.plan(layer, hidden, normed, value_proj)
        attention_rows = hidden.shape[1] if plan.compute is None else plan.compute.shape[1]
        if plan.feed_forward_rows is None:
            self.call.layer_positions += attention_rows
            return plan
        choose = plan.feed_forward_rows

        def counted(attention_out: torch.Tensor) -> Optional[torch.Tensor]:
            rows = choose(attention_out)
            self.call.layer_positions += (attention_rows + (attention_rows if rows is None else rows.shape[1])) // 2
            return rows

        return dataclasses.replace(plan, feed_forward_rows=counted)

    def record(self, layer, attention_out, feed_forward_out, attention_weights) -> None:
        self.hook.record(layer, attention_out, feed_forward_out, attention_weights)


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
    # (rows, positions computed, positions with logits, sequence length) of each forward pass over the batch.
    forward_shapes: list[tuple[int, int, int, int]] = field(default_factory=list)
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
    def of(cls, lengths: list[int], gen_length: int, block_length: int, block_causal: bool) -> "Layout":
        if not block_causal:
            prompt_length = max(lengths)
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
    layout = Layout.of([len(p) for p in prompts], gen_length, block_length, model.block_causal)
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
        notice(f"reuse={reuse.config.name} decides per layer on the host (run_layer); its forwards run eager")
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
