"""A checkpoint's ``generation_config.json``: the sampling defaults its authors recommend, and extra stop ids.

Rules (vLLM's ``--generation-config auto``): the fields the file sets among ``temperature``, ``top_k``,
``top_p``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (as ``max_tokens``) become the
default sampling parameters; a request or a command-line flag that sets one wins. ``mode="none"``
(vLLM's ``vllm``) keeps r1kit's built-in defaults. ``do_sample`` does not make decoding greedy, as in
vLLM: many files carry ``do_sample: false`` from ``save_pretrained`` next to the temperature their
authors want; ask for ``temperature=0`` for greedy decoding. ``eos_token_id`` (an id or a list) ends
generation in both modes, as in vLLM: it is part of the model (Llama-3-Instruct's ``<|eot_id|>`` is only
there), not a sampling preference. Every other field (``bos_token_id``, ``num_beams``, ...) is ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from r1kit.config import read_json
from r1kit.errors import CheckpointError, ConfigError
from r1kit.infer.sampling import RANGES

log = logging.getLogger(__name__)

FILE = "generation_config.json"
MODES = ("auto", "none")
# generation_config.json name -> SamplingParams name (Hugging Face's max_new_tokens is vLLM's max_tokens)
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The fields r1kit takes from ``generation_config.json``; None: the file does not set it."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_id: tuple[int, ...] = ()
    do_sample: bool | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = FILE) -> GenerationConfig:
        """Validate the known fields of a parsed file; errors name ``where``, the field and the fix."""
        def bad(name: str, want: object) -> ConfigError:
            return ConfigError(f"{where}: {name}={raw[name]!r} must be {want}; fix the file or pass --generation-config none", param=name)

        def number(name: str):
            """The file's value of a sampling field, checked against the range ``SamplingParams`` takes."""
            value, allowed = raw.get(name), RANGES[SAMPLING_FIELDS[name]]
            if value is None:
                return None
            if value not in allowed:
                raise bad(name, allowed)
            return value if allowed.integer else float(value)

        eos = raw.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
        if eos_ids is None:
            eos_ids = []
        if not isinstance(eos_ids, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos_ids):
            raise bad("eos_token_id", "a token id or a list of token ids (integers >= 0)")
        do_sample = raw.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise bad("do_sample", "true or false")
        return cls(
            temperature=number("temperature"),
            top_k=number("top_k"),
            top_p=number("top_p"),
            min_p=number("min_p"),
            repetition_penalty=number("repetition_penalty"),
            max_new_tokens=number("max_new_tokens"),
            eos_token_id=tuple(eos_ids),
            do_sample=do_sample,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        path = Path(path)
        raw = read_json(path, CheckpointError, "; fix the file or pass --generation-config none", mapping=True)
        config = cls.from_dict(raw, str(path))
        if config.do_sample is False and config.sampling_defaults().keys() & {"temperature", "top_k", "top_p", "min_p"}:
            log.warning("%s says do_sample=false: r1kit, like vLLM, still samples with its temperature/top_k/top_p/min_p; "
                        "send temperature=0 for greedy decoding", path)  # fmt: skip
        return config

    @classmethod
    def for_model(cls, model_dir: str | Path | None, mode: str = "auto") -> GenerationConfig:
        """The config of a model directory under ``mode``: ``auto`` (the file's defaults), ``none``
        (only its ``eos_token_id``). A directory without the file has an empty config."""
        if mode not in MODES:
            raise ConfigError(f"generation_config={mode!r} must be one of {list(MODES)}")
        path = Path(model_dir) / FILE if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        config = cls.from_file(path)
        return config if mode == "auto" else cls(eos_token_id=config.eos_token_id)

    def sampling_defaults(self) -> dict[str, Any]:
        """The fields the file sets, under ``SamplingParams``' names (``SamplingParams(**defaults)``)."""
        return {ours: getattr(self, theirs) for theirs, ours in SAMPLING_FIELDS.items() if getattr(self, theirs) is not None}

    def extra_stop_ids(self, model_eos: Iterable[int], vocab_size: int) -> tuple[int, ...]:
        """The file's end-of-sequence ids that the model's own EOS ids lack (for ``SamplingParams.with_eos_ids``)."""
        outside = [i for i in self.eos_token_id if i >= vocab_size]
        if outside:
            raise CheckpointError(f"{FILE}: eos_token_id {outside} is outside the model's vocabulary [0, {vocab_size}); fix the file")
        known = set(model_eos)
        return tuple(i for i in self.eos_token_id if i not in known)
