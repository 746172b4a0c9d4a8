"""`PrepareConfig`: every option of `r1kit prepare`, typed and validated when it is built.

Each field is also a command-line flag (see ``r1kit.cli.prepare``). This module must never import the
heavy stage libraries (datasketch, lingua, tokenizers, dask): ``r1kit prepare --help`` reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from r1kit.config import _build, load_section
from r1kit.errors import ConfigError

ENGINES = ("local", "dask")
SHINGLE_KINDS = ("word", "char")
# The seed's examples (§3.1): words a model should also see in their near-synonym form.
DEFAULT_SYNONYMS = {"不会": "无法", "可能": "或许"}
DEFAULT_CODE_EXTENSIONS = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts",
                           ".go", ".rs", ".rb", ".php", ".cs", ".kt", ".swift", ".scala", ".sh", ".sql")
DEFAULT_TEXT_EXTENSIONS = (".txt", ".md", ".rst")
SEED_MIN_TOKENS = 512
EMBEDDED_MIN_TOKENS = 64
# Fields that change how a run executes but never what it writes: left out of the fingerprint so
# that a run resumed with more workers or on a cluster reuses the finished stages.
_EXECUTION_ONLY = ("output", "workers", "engine", "dask_address", "chunk_docs", "progress")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options of the data pipeline; defaults follow the seed (§3.1) where it gives a value.

    ``inputs`` empty means the embedded corpus: the standard library's ``.py`` sources and its
    ``pydoc_data`` topics, found through ``sysconfig`` (no download).
    """

    inputs: tuple[str, ...] = ()
    output: str = "runs/prepare"
    text_field: str = "text"
    text_extensions: tuple[str, ...] = DEFAULT_TEXT_EXTENSIONS
    code_extensions: tuple[str, ...] = DEFAULT_CODE_EXTENSIONS
    # language filter
    languages: tuple[str, ...] = ("zh", "en")
    language_threshold: float = 0.5
    language_sample_chars: int = 1024
    # near-duplicate removal
    near_dup_threshold: float = 0.95
    minhash_bands: int = 14
    minhash_rows: int = 8
    shingle: str = "word"
    shingle_size: int = 5
    # length filter, in tokens of the project tokenizer; min_tokens None = the seed's 512 for your
    # inputs, EMBEDDED_MIN_TOKENS for the embedded corpus (most pydoc topics are under 512 tokens)
    min_tokens: int | None = None
    max_tokens: int = 16384
    # augmentation (off by default)
    augment: bool = False
    synonyms: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SYNONYMS))
    synonym_probability: float = 1.0
    number_scale: float = 1.2
    # tokenizer: train one, or use an existing tokenizer.json
    tokenizer: str | None = None
    vocab_size: int = 16384
    tokenizer_train_bytes: int = 200_000_000
    # shards
    shard_tokens: int = 16_777_216
    val_fraction: float = 0.02
    seed: int = 0
    # execution
    engine: str = "local"
    workers: int = 0
    dask_address: str | None = None
    chunk_docs: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("inputs", "text_extensions", "code_extensions", "languages"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name}={value!r} must be a list of strings")
            set_(name, tuple(value))
        if self.min_tokens is None:
            set_("min_tokens", SEED_MIN_TOKENS if self.inputs else EMBEDDED_MIN_TOKENS)
        for name in ("text_extensions", "code_extensions"):
            bad = [e for e in getattr(self, name) if not e.startswith(".")]
            if bad:
                raise ConfigError(f"{name}: {bad} must start with a dot, e.g. '.py'")
        if not self.languages:
            raise ConfigError("languages must name at least one ISO 639-1 code, e.g. [zh, en]")
        if not all(len(code) == 2 and code.isalpha() and code.islower() for code in self.languages):
            raise ConfigError(f"languages={list(self.languages)} must be lowercase ISO 639-1 codes such as 'zh' or 'en'")
        for name in ("language_threshold", "near_dup_threshold", "synonym_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be between 0 and 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1): it is the share of documents held out")
        for name in ("language_sample_chars", "minhash_bands", "minhash_rows", "shingle_size", "min_tokens",
                     "max_tokens", "tokenizer_train_bytes", "shard_tokens", "chunk_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.min_tokens > self.max_tokens:
            raise ConfigError(f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}; swap them")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 300:
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be an integer >= 300 (256 bytes + special tokens + merges)")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"workers={self.workers!r} must be >= 0 (0 = one per CPU core)")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine!r} is not one of {ENGINES}")
        if self.shingle not in SHINGLE_KINDS:
            raise ConfigError(f"shingle={self.shingle!r} is not one of {SHINGLE_KINDS}")
        if not self.number_scale > 0:
            raise ConfigError(f"number_scale={self.number_scale} must be positive")
        if not isinstance(self.synonyms, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k for k, v in self.synonyms.items()
        ):
            raise ConfigError("synonyms must be a mapping of word: replacement (strings), e.g. {不会: 无法}")
        set_("synonyms", dict(self.synonyms))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "prepare config") -> PrepareConfig:
        return _build(cls, raw, where=where)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PrepareConfig:
        """Load from YAML; the fields may sit at the top level or under ``prepare:``."""
        return load_section(cls, path, "prepare")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def fingerprint(self) -> str:
        """A hash of every field that changes what the pipeline writes (resume compares it)."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_ONLY}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
