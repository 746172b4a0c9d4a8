"""Structured output: the grammar library (xgrammar) behind one adapter.

A :class:`~r1kit.infer.sampling.StructuredOutputs` spec is checked here without a tokenizer
(:func:`check_spec`, when the request is built), compiled once per distinct spec against the engine's
tokenizer (:class:`Grammars`, a bounded cache), and followed by one :class:`GrammarState` per
sequence: the sampler asks :func:`mask_disallowed` for the rows' allowed tokens, the engine feeds each
sampled token back with :meth:`GrammarState.accept`. Why xgrammar: ``docs/structured_output.md``
(``benchmarks/bench_structured.py`` measures it against llguidance and outlines-core).

Nothing else in r1kit imports the library, so changing it touches this module alone. This module
never samples and never touches the cache or the model.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from r1kit.errors import ConfigError

if TYPE_CHECKING:
    from r1kit.infer.sampling import StructuredOutputs

# Whitespace allowed between JSON tokens, in characters per gap: enough for a pretty-printed,
# nested object; bounded, so that a model stuck on whitespace (small models are) still ends.
MAX_WHITESPACE = 16
CACHE_SIZE = 64  # compiled grammars kept per engine (each holds its precomputed token masks)
# xgrammar prefixes its messages with a time and its C++ source position: noise for the user
_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _xgr():
    import xgrammar  # imported on first use: it pulls in transformers, a few seconds

    return xgrammar


def _message(exc: Exception) -> str:
    lines = [_NOISE.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line)


# keywords xgrammar would pass over silently: refused, so that an output always matches its schema
_UNENFORCED = ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "patternProperties", "propertyNames")
_FORMATS = frozenset({"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri", "uri-reference",
                      "uri-template", "json-pointer", "relative-json-pointer"})  # fmt: skip
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
# xgrammar's character of a length-bounded string, as it prints its grammar: it lets raw control
# characters through, which no strict JSON parser reads; a JSON string's own character replaces it
_LOOSE_CHAR = r"[^\"\\\r\n]"
_JSON_CHAR = r"[^\0-\x1f\"\\]"


def _check_keywords(schema: Any, where: str = "json") -> None:
    """ConfigError, naming where it is, for a keyword xgrammar would pass over."""
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            _check_keywords(sub, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for key in _UNENFORCED:
        if key in schema and schema[key] not in (False, None):
            raise ConfigError(f"{where}: the JSON schema keyword {key!r} cannot be enforced while generating; leave it out", param="structured")
    if "format" in schema and schema["format"] not in _FORMATS:
        raise ConfigError(f"{where}: format {schema['format']!r} is not supported; use one of {', '.join(sorted(_FORMATS))} or a pattern", param="structured")
    if ("minLength" in schema or "maxLength" in schema) and ("pattern" in schema or "format" in schema):
        raise ConfigError(f"{where}: minLength/maxLength cannot be enforced together with pattern or format; put the length in the pattern", param="structured")
    for key in _SUBSCHEMA + _SCHEMA_LISTS:
        if key in schema:
            _check_keywords(schema[key], f"{where}.{key}")
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_keywords(sub, f"{where}.{key}.{name}")


def _json_grammar(schema: Any) -> Any:
    xgr = _xgr()
    _check_keywords(schema)
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE, strict_mode=True)
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR)) if _LOOSE_CHAR in text else grammar


def _grammar(spec: StructuredOutputs) -> Any:
    """The spec as an xgrammar ``Grammar`` (no tokenizer needed); ConfigError when it is not valid."""
    xgr, kind = _xgr(), spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else spec.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, (dict, bool)):
                raise ConfigError(f"json must be a JSON schema (an object, or its JSON text), got {type(schema).__name__}", param="structured")
            return _json_grammar(schema)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":  # JSON's string escapes are EBNF's: each choice a literal alternative
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice))
        text = spec.grammar
        return xgr.Grammar.from_ebnf(text) if "::=" in text else xgr.Grammar.from_lark(text)
    except ConfigError:
        raise
    except json.JSONDecodeError as exc:
        raise ConfigError(f"json is not valid JSON text: {exc}", param="structured") from None
    except Exception as exc:
        how = {"grammar": " (EBNF with a root rule 'root ::= ...', or Lark with 'start: ...')"}.get(kind, "")
        raise ConfigError(f"the structured output {kind} is not valid{how}: {_message(exc)}", param="structured") from None


def check_spec(spec: StructuredOutputs) -> None:
    """Raise :class:`ConfigError` (``param="structured"``) if the library cannot build ``spec``."""
    for name in ("regex", "grammar"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{name} must be a non-empty string", param="structured")
    _grammar(spec)


def _tokenizer_info(tokenizer, vocab_size: int) -> Any:
    """The vocabulary as xgrammar sees it. Special tokens (chat markers, ``<think>``) get the empty
    string, which xgrammar never allows: as text they would match inside a JSON string, and the
    detokenizer drops them, so the text would no longer be what the grammar checked."""
    xgr = _xgr()
    vocab = [""] * vocab_size  # ids past the tokenizer's (a padded embedding) stay "": never allowed
    special = {i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in special:  # an id past the model's could never be sampled
            vocab[i] = token
    # how the vocabulary encodes bytes (byte-level, byte-fallback, raw) read from tokenizer.json, as
    # xgrammar's own from_huggingface does
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.to_str())
    return xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size, add_prefix_space=meta["add_prefix_space"])


class GrammarState:
    """One sequence's place in its grammar. ``stop_ids`` are the tokens that may end the output where
    the grammar is complete (the model's EOS, the request's stop ids); with none, the output ends as
    soon as the grammar is complete."""

    def __init__(self, compiled: Any, stop_ids: list[int]) -> None:
        self._matcher = _xgr().GrammarMatcher(compiled, override_stop_tokens=stop_ids or None, terminate_without_stop_token=not stop_ids)

    def accept(self, token: int) -> None:
        """Advance by a sampled token. The sampler only lets allowed tokens through, so a refused one
        is a bug in r1kit, not in the request."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which its own mask allowed")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and nothing more may follow (a stop token was accepted, or, with no
        stop tokens, the grammar is complete)."""
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


class Grammars:
    """One engine's compiled grammars. The tokenizer's vocabulary is read once, on the first spec, so
    an engine that never sees one pays nothing; compiled grammars are kept per spec (the last
    :data:`CACHE_SIZE`). Thread-safe: the server compiles a request's spec on a worker thread before
    handing the request to the engine's thread (``r1kit.infer.processor.Processor.prepare``)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # how many specs were compiled (the rest came from the cache)

    def compile(self, spec: StructuredOutputs) -> Any:
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            if self._compiler is None:
                self._compiler = _xgr().GrammarCompiler(_tokenizer_info(self.tokenizer, self.vocab_size), max_threads=1, cache_enabled=False)
            compiled = self._compiler.compile_grammar(_grammar(spec))
            self.compiles += 1
            self._cache[key] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    def states(self, spec: StructuredOutputs, stop_ids: list[int], n: int) -> list[GrammarState]:
        """``n`` fresh states of ``spec``'s grammar: one per completion of a request."""
        compiled = self.compile(spec)
        return [GrammarState(compiled, stop_ids) for _ in range(n)]


def mask_disallowed(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """Set to -inf, in place, every token of ``logits`` [B, V] (float32) that ``rows``' grammar states
    do not allow next; the other rows are left as they are."""
    xgr = _xgr()
    bitmask = torch.empty((logits.shape[0], -(-logits.shape[-1] // 32)), dtype=torch.int32)  # only ``rows`` are filled and read
    for row, state in zip(rows, states):
        state.fill(bitmask, row)
    # xgrammar's kernel reads the packed bits where they are: a third of the time of unpacking them
    # with torch ops; in place, as a step's logits can be large (a copy of them cost more than the mask)
    backend = "cpu" if logits.device.type == "cpu" else "auto"
    with torch.inference_mode():  # the model's logits are inference tensors
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows, backend=backend)
