"""The engine: requests in, token-by-token outputs out (the streaming interface the server drives).

``add_request(request_id, prompt, params)`` queues a request; each ``step()`` schedules one batch
(continuous batching: requests join between steps), runs the model over it against the paged KV
cache, samples, detokenizes, checks stop conditions and returns a ``RequestOutput`` for every
request that moved; ``abort(request_id)`` drops a request and frees its blocks at once.
:class:`r1kit.infer.llm.LLM` is the offline, vLLM-shaped wrapper over this class.
The engine owns the cache and its own copy of the model; the model only sees a cache view per forward.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from r1kit.errors import ConfigError
from r1kit.infer.block_manager import BlockManager, WindowGroup
from r1kit.infer.model_runner import ModelRunner
from r1kit.infer.native_norm import use_native_norms
from r1kit.infer.outputs import CompletionOutput, RequestMetrics, RequestOutput
from r1kit.infer.paged_cache import bytes_per_block, compressed_layers, entries_per_block, splits_window
from r1kit.infer.processor import Processor, Prompt
from r1kit.infer.sampler import constrained, sample
from r1kit.infer.sampling import SamplingParams
from r1kit.infer.scheduler import Scheduler
from r1kit.infer.weight_packing import pack_linears
from r1kit.infer.sequence import Sequence
from r1kit.model.attention import window_start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: decodes + (padded) prefill chunks
    max_model_len: int | None = None  # default: the model's max_seq_len
    kv_cache_memory: int | None = None  # bytes for the KV pool; default: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.2
    num_kv_blocks: int | None = None  # exact pool size (overrides the memory budget)
    enable_prefix_caching: bool = True
    # CPU, on the engine's copy of the model: linear weights re-laid-out for oneDNN
    # (r1kit.infer.weight_packing), RMSNorms in one C call each (r1kit.infer.native_norm)
    pack_weights: bool = True
    # decode attention reads the paged pool in place: on the CPU a C kernel built on first use
    # (r1kit.infer.decode_attention), on CUDA a Triton one (r1kit.infer.triton_decode_attention); where
    # neither can run, decodes gather K/V out of the pool as prefills do
    decode_kernel: bool = True
    # on the CPU (with decode_kernel) a step of up to 16 decodes alone runs the whole model in one C
    # call (r1kit.infer.decode_step); its float products read their own copy of the weights, so False
    # saves that memory (a float model's weights once more) for slower small-batch decodes
    decode_step: bool = True
    # processes the model is split over (r1kit.infer.tensor_parallel): this one is rank 0
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ConfigError(f"kv_cache_fraction={self.kv_cache_fraction} must be in (0, 1]")


def prepare_model(model, pack_weights: bool):
    """``model`` made ready for the engine, in place: eval mode, a float16 CPU model cast to bfloat16,
    and with ``pack_weights`` its fast paths swapped in (CPU: packed linears, native RMSNorms; CUDA:
    the fused Triton norms and activations of :mod:`r1kit.fused`, after their self-check)."""
    model.eval()
    if model.device.type == "cpu" and model.dtype == torch.float16:
        # as vLLM's CPU backend does: most CPUs have no fast float16 matmul, and the CPU kernels
        # (oneDNN packing, int4, decode attention) take float32 or bfloat16; most GPTQ checkpoints
        # from other tools say float16. bfloat16: the same size, float32's range.
        log.warning("a float16 model on the CPU runs as bfloat16 (load it as float32, e.g. --dtype float32, to run that instead)")
        model.to(torch.bfloat16)
    if pack_weights:
        pack_linears(model)
        use_native_norms(model)
        if model.device.type == "cuda":
            from r1kit.fused import apply_fused_kernels

            apply_fused_kernels(model)
    return model


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    pending: list[Sequence] = field(default_factory=list)  # completions not yet handed to the scheduler


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class LLMEngine:
    """The engine runs its own copy of the model, ``self.model``: the caller's model is left as it was
    (same modules, still trainable), at the cost of a second copy of its weights in memory (the size
    of ``model``'s parameters and buffers; where the copy is packed, the packed weights replace the
    copy's layer by layer). On CPU the copy's linear layers are packed and its RMSNorms swapped for
    one-call ones (``EngineConfig.pack_weights``); a float16 model on the CPU runs as a bfloat16
    copy. ``take_model=True`` hands the model over instead: no copy, and those changes are made to
    ``model`` itself, which is then for this engine's inference only."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, think_token_ids: tuple[int, int] | None = None,
                 take_model: bool = False) -> None:
        self.config = config = config or EngineConfig()
        mc = model.config
        if compressed_layers(mc):  # fail before copying the model: the compressed cache's layout needs it
            entries_per_block(mc, config.block_size)
        model = model if take_model else copy.deepcopy(model)
        self.workers = None
        if config.tensor_parallel_size > 1:  # this process keeps rank 0's shard; worker processes get theirs
            from r1kit.infer.tensor_parallel import launch

            self.workers, model = launch(model, config.tensor_parallel_size, config.pack_weights)
        self.model = model = prepare_model(model, config.pack_weights)
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or mc.max_seq_len
        if self.max_model_len > mc.max_seq_len:
            raise ConfigError(f"max_model_len={self.max_model_len} exceeds the model's max_seq_len={mc.max_seq_len}")
        # windowed layers beside layers that keep every block get blocks of their own (paged_cache.splits_window)
        compress = mc.hybrid_compress_block if compressed_layers(mc) else None
        shape = WindowGroup(0, compress, config.max_num_batched_tokens) if splits_window(mc) else None
        self.num_blocks, self.window_blocks = self._pool_blocks(shape)
        window = dataclasses.replace(shape, num_blocks=self.window_blocks) if shape is not None else None
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching, window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        runner = ModelRunner if self.workers is None else self.workers.runner  # the same arguments
        self.runner = runner(model, self.num_blocks, config.block_size, config.decode_kernel, self.window_blocks,
                             self.block_manager.window_table if window else None, decode_step=config.decode_step)
        self.processor = Processor(mc, tokenizer, self.max_model_len, self.num_blocks * config.block_size, config.block_size, think_token_ids)
        self.special, self.hidden_ids = self.processor.special, self.processor.hidden_ids
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.all_local = all(kind == "local" for kind in mc.attention)

    # -- setup ---------------------------------------------------------------------------------
    def _pool_blocks(self, window: WindowGroup | None) -> tuple[int, int]:
        """(main blocks, window-group blocks: 0 without a ``window`` group). ``num_kv_blocks`` gives
        both groups that many; a memory budget is shared in the ratio of what one sequence of
        ``max_model_len`` tokens holds in each."""
        c, mc = self.config, self.model.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks, c.num_kv_blocks if window else 0
        per_block = bytes_per_block(mc, c.block_size, self.model.dtype)
        budget = c.kv_cache_memory if c.kv_cache_memory is not None else int(c.kv_cache_fraction * free_memory(self.model.device))
        full = -(-self.max_model_len // c.block_size)
        window_blocks = 0
        if window is not None:
            span = window.span(mc.window_for(self.max_model_len), c.block_size)
            window_bytes = bytes_per_block(mc, c.block_size, self.model.dtype, "window")
            window_blocks = max(span, budget * span // (span * window_bytes + full * per_block))
            if c.kv_cache_memory is None:
                window_blocks = min(window_blocks, c.max_num_seqs * span)
            budget -= window_blocks * window_bytes
        blocks = budget // per_block
        if c.kv_cache_memory is None:  # no point in more than every sequence at full length
            blocks = min(blocks, c.max_num_seqs * full)
        if blocks < 1:
            raise ConfigError(f"the KV-cache budget ({budget} bytes) holds no block of {per_block} bytes; raise kv_cache_memory")
        return int(blocks), int(window_blocks)

    def update_weights(self, state_dict_or_model) -> None:
        """Take new weights into the engine's own copy without rebuilding the engine (reinforcement
        learning hands it the policy after every optimizer step): the KV pool, scheduler and tokenizer
        stay; a fresh copy of the weights is cast to the engine's dtype and packed as at start-up
        (:func:`prepare_model`), and the prefix cache is emptied, its K/V having come from the old
        weights. ``state_dict_or_model``: an ``R1kitForCausalLM`` of the same config (left untouched,
        still trainable) or its state dict (Hugging Face names). Only between requests."""
        from pathlib import Path

        from r1kit.model.hf import model_from_state

        if self.workers is not None:
            raise ConfigError("update_weights under tensor parallelism is not supported: start a new engine with the new weights")
        if self.requests:
            raise RuntimeError(f"update_weights with {len(self.requests)} unfinished request(s): let them finish or abort them first")
        source = state_dict_or_model.state_dict() if isinstance(state_dict_or_model, torch.nn.Module) else state_dict_or_model
        dtype, device = self.model.dtype, self.model.device
        # copies: the caller's tensors go on training, and must not change the engine's weights under it
        state = {name: tensor.detach().to(device=device, dtype=dtype, copy=True) for name, tensor in source.items()}
        self.model = self.runner.model = prepare_model(model_from_state(self.model.config, state, Path("update_weights"), dtype, device), self.config.pack_weights)
        self.block_manager.reset_prefix_cache()

    # -- the streaming interface ---------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        if params.n > self.config.max_num_seqs:
            raise ConfigError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}: the completions of a request run together", param="n")
        text, ids = self.processor.tokenize(prompt)
        self.processor.validate(ids, params)
        window = self.model.config.window_for(len(ids))
        in_reasoning = self.processor.opens_reasoning(ids)
        grammars = self.processor.grammar_states(params)
        seqs = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.model.device).manual_seed(params.seed + i)
            seqs.append(Sequence(request_id, i, ids, params, window, generator, in_reasoning))
            seqs[-1].grammar = grammars[i]
        request = Request(request_id, text, list(ids), params, seqs, RequestMetrics(arrival_time or time.time()))
        self.requests[request_id] = request
        # with n > 1 and prefix caching, the other completions wait for the first one's prefill, then hit its blocks
        share = self.config.enable_prefix_caching and params.prompt_logprobs is None
        for seq in seqs if not share else seqs[:1]:
            self.scheduler.add(seq)
        request.pending = [] if not share else seqs[1:]
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its blocks are freed at once. False if it was unknown."""
        request = self.requests.pop(str(request_id), None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return True

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (nothing else needs closing)."""
        if self.workers is not None:
            self.workers.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler could not run any sequence (KV pool too small for a waiting request)")
            return []
        moved: dict[str, Request] = {}
        items = [(seq, 1) for seq in batch.decodes] + batch.prefills  # one forward for the whole step
        now = time.time()
        for seq, _ in items:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or now
        if self.window_blocks:
            for seq, n in items:
                self.block_manager.prepare_window(seq, n)
        last, full = self.runner.run(items)
        done_rows = []
        for row, (seq, n) in enumerate(items):
            if full[row] is not None:
                self._record_prompt_logprobs(seq, full[row])
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
            if self.all_local:  # the next query (position num_computed) reaches back window - 1 positions
                self.block_manager.free_before(seq, window_start(seq.num_computed_tokens, seq.window))
            if seq.num_uncomputed == 0:
                done_rows.append(row)
                request = self.requests[seq.request_id]
                while request.pending:  # the prompt's blocks are registered: siblings now hit them
                    self.scheduler.add(request.pending.pop(0))
        if done_rows:
            seqs = [items[r][0] for r in done_rows]
            rows = last if len(done_rows) == len(items) else last[done_rows]  # decode steps: every row, no copy
            results = sample(rows, seqs, self.special, self.processor.decode_one if self.tokenizer else None)
            for seq, (token, entry) in zip(seqs, results):
                self._append(seq, token, entry)
                moved[seq.request_id] = self.requests[seq.request_id]
        return [self._output(r) for r in moved.values()]

    # -- per-token bookkeeping ------------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, entry) -> None:
        p = seq.params
        if constrained(seq):  # the sampler masked this token with the grammar: move the grammar past it
            seq.grammar.accept(token)
        seq.token_ids.append(token)
        metrics = self.requests[seq.request_id].metrics
        metrics.first_token_time = metrics.first_token_time or time.time()
        if entry is not None:
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[token].logprob
        if seq.in_reasoning:
            seq.reasoning_tokens += 1
        if token == self.special.think_end:
            seq.in_reasoning = False
        elif token == self.special.think_start:
            seq.in_reasoning = True
        checked = len(seq.text)  # the text before this token held no stop string
        if self.tokenizer is not None and not (p.skip_special_tokens and token in self.hidden_ids):
            seq.visible_ids.append(token)
            seq.text += self.processor.detokenize(seq)
        reason, stop = None, None
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif not p.ignore_eos and token in self.special.eos:
            reason = "stop"
        elif seq.grammar is not None and seq.grammar.terminated:  # complete, and nothing may follow
            reason = "stop"
        elif p.stop and seq.num_output_tokens >= p.min_tokens and (cut := self.processor.find_stop(seq, checked)) is not None:
            reason, (stop, seq.text) = "stop", cut
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is None:
            return
        if not isinstance(stop, str) and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.visible_ids, skip_special_tokens=False)  # flush partial characters
        seq.finish_reason, seq.stop_reason = reason, stop
        self.scheduler.finish(seq)

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Logits of a chunk's positions predict the next prompt tokens; keep those not yet recorded."""
        from r1kit.infer.sampler import logprob_entry

        start = seq.num_computed_tokens
        for i in range(logits.shape[0]):
            target = start + i + 1
            if target == len(seq.prompt_logprobs) and target < seq.num_prompt_tokens:
                decode = self.processor.decode_one if self.tokenizer else None
                seq.prompt_logprobs.append(logprob_entry(logits[i], seq.token_ids[target], seq.params.prompt_logprobs, decode))

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            finished = seq.is_finished
            hold = 0 if finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
            shown = max(seq.emitted_chars, len(seq.text) - hold)
            ids = seq.output_token_ids
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text[:shown] if not finished else seq.text,
                    token_ids=ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=None if seq.logprobs is None else list(seq.logprobs),  # a snapshot: the engine keeps appending
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=seq.text[seq.emitted_chars : shown],
                    delta_token_ids=ids[seq.emitted_tokens :],
                )
            )
            seq.emitted_chars, seq.emitted_tokens = shown, len(ids)
        finished = all(seq.is_finished for seq in request.seqs)
        if finished:
            request.metrics.finished_time = time.time()
            self.requests.pop(request.request_id, None)
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=None if first.prompt_logprobs is None else list(first.prompt_logprobs),
            metrics=request.metrics,
        )
