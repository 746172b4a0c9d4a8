"""``LLM``: offline batched generation with vLLM's shape, so code and benchmarks can swap engines.

    from r1kit import LLM, SamplingParams
    llm = LLM("path/to/model")
    outs = llm.generate(["Hello", [1, 2, 3], {"prompt_token_ids": [4, 5]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].num_cached_tokens

As vLLM's ``LLM``, a model directory's ``generation_config.json`` gives the default sampling
parameters (``generation_config="auto"``; ``"none"``: r1kit's) and extra end-of-sequence ids; see
:mod:`r1kit.generation_config`. A text prompt is encoded with the tokenizer's special tokens
(a Llama tokenizer's BOS), as vLLM encodes one. Everything runs on :class:`r1kit.infer.engine.LLMEngine`;
this class only queues the prompts and steps the engine until they are done.

``LLM(model, tensor_parallel_size=2)`` splits the model over two processes (gloo on the CPU, NCCL
and one GPU each on CUDA; :mod:`r1kit.infer.tensor_parallel`); :meth:`LLM.close` (or a ``with``
block) stops them, as does the end of the program.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from r1kit.device import resolve_device, resolve_dtype
from r1kit.errors import ConfigError
from r1kit.generation_config import GenerationConfig
from r1kit.infer.engine import EngineConfig, LLMEngine
from r1kit.infer.outputs import RequestOutput
from r1kit.infer.processor import Prompt
from r1kit.infer.sampling import SamplingParams


class LLM:
    # an LLM wrapped around an existing engine (LLM.__new__, as tests do) has no checkpoint config
    generation_config: GenerationConfig = GenerationConfig()
    _extra_eos: tuple[int, ...] = ()

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        think_token_ids: tuple[int, int] | None = None,
        generation_config: str = "auto",
        **engine_args,
    ) -> None:
        """``model``: a model directory, ``.gguf`` file or pulled model name (loaded onto ``device``, default
        the CPU), or an ``R1kitForCausalLM``, which the engine copies (cast and moved to ``dtype``/``device``
        when given): the caller's model is left as it was and can still train; ``engine_args``: :class:`EngineConfig` fields
        (``block_size``, ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``kv_cache_memory``,
        ``kv_cache_fraction``, ``num_kv_blocks``, ``enable_prefix_caching``, ``pack_weights``, ``decode_kernel``, ``decode_step``,
        ``tensor_parallel_size``);
        ``generation_config``: ``"auto"`` or ``"none"`` (only read for a model directory)."""
        from r1kit.checkpoints.load import load_model, resolve_model

        model_dir = resolve_model(model) if isinstance(model, (str, Path)) else None
        self.generation_config = GenerationConfig.for_model(model_dir, generation_config)
        dtype = resolve_dtype(dtype)
        owned = model_dir is not None or dtype is not None or device is not None  # a model nobody else holds
        if model_dir is not None:
            from r1kit.tokenizer import load_tokenizer

            model = load_model(model_dir, dtype=dtype, device=device or "cpu")
            if tokenizer is None and (model_dir / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(model_dir)
        elif owned:  # the caller's model keeps its dtype and device
            model = copy.deepcopy(model).to(device=None if device is None else resolve_device(device), dtype=dtype)
        unknown = set(engine_args) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown LLM arguments {sorted(unknown)}; engine options are {sorted(EngineConfig.__dataclass_fields__)}")
        self.llm_engine = LLMEngine(model, tokenizer, EngineConfig(**engine_args), think_token_ids, take_model=owned)
        self._extra_eos = self.generation_config.extra_stop_ids(self.llm_engine.special.eos, model.config.vocab_size)

    def close(self) -> None:
        """Stop the engine's tensor-parallel worker processes, if it has any."""
        self.llm_engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's recommended sampling (``generation_config.json``) over r1kit's defaults."""
        return SamplingParams(**self.generation_config.sampling_defaults())

    def request_params(self, params: SamplingParams | None = None) -> SamplingParams:
        """What a request runs with: ``params`` (default: :meth:`get_default_sampling_params`) plus the
        checkpoint's extra end-of-sequence ids."""
        return (params or self.get_default_sampling_params()).with_eos_ids(self._extra_eos)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ConfigError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts; give one, or one per prompt")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(engine.add_request(None, prompt, self.request_params(params)))
            finished: dict[str, RequestOutput] = {}
            progress = _progress(len(ids)) if use_tqdm else None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
            if progress is not None:
                progress.close()
        except BaseException:
            for request_id in ids:
                engine.abort(request_id)
            raise
        return [finished[i] for i in ids]


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="requests")
