"""The tokenizer of a GGUF file, both ways: ``tokenizer.ggml.*`` metadata <-> ``tokenizer.json`` + config.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary, the merges or scores and the special
token ids, and names the rest (``tokenizer.ggml.pre``) for llama.cpp to look up. Reading rebuilds a
Hugging Face ``tokenizers.Tokenizer`` that encodes as llama.cpp does; writing turns a model
directory's tokenizer back into those fields. Two kinds are supported:

* ``gpt2``: byte-level BPE (SmolLM, Qwen2/DeepSeek-R1-Distill-Qwen, Llama 3, r1kit's own tokenizers),
  whose text splitting is chosen by the pre-tokenizer name, see :data:`PRE_TOKENIZERS`;
* ``llama``: SentencePiece-style BPE (Llama 2, Mistral, TinyLlama): ``▁`` for spaces, merges ranked
  by the token scores, unknown characters spelled as ``<0xNN>`` byte tokens.

Where llama.cpp and transformers' GGUF loader disagree, this follows llama.cpp, whose rules the
file was written for: ``smollm`` splits digits, the Llama 3 family adds BOS unless told otherwise,
and a SentencePiece vocabulary prefixes a space after every special token, as sentencepiece does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from r1kit.config import read_json, write_text_atomic
from r1kit.errors import CheckpointError

# gguf.TokenType values, spelled out so that reading a tokenizer needs no gguf import
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    # use_regex=True is GPT-2's own split; False when a Split before it already cut the text
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    """One family of llama.cpp's ``tokenizer.ggml.pre`` values: how it splits text before BPE."""

    name: str  # the value r1kit writes
    aliases: tuple[str, ...]  # every value llama.cpp reads the same way
    steps: tuple[dict[str, Any], ...]  # the tokenizer.json pre-tokenizers, in order
    ignore_merges: bool = False  # a piece that is already a token is not merged (llama.cpp's flag)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token flag

    def as_json(self) -> dict[str, Any]:
        return self.steps[0] if len(self.steps) == 1 else {"type": "Sequence", "pretokenizers": list(self.steps)}


# Each family splits as llama.cpp's llm_tokenizer_bpe does for that name (its regexes in
# tokenizer.json's own spelling); transformers' GGUF loader treats some of them (smollm, default) as
# plain GPT-2.
PRE_TOKENIZERS = (
    PreTokenizer("gpt-2", ("gpt-2", "phi-2", "mpt", "olmo"), (_byte_level(True),)),
    PreTokenizer(
        "smollm",
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        ({"type": "Digits", "individual_digits": True}, _byte_level(True)),
    ),
    PreTokenizer("qwen2", ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), (_split(QWEN2_SPLIT), _byte_level(False))),
    PreTokenizer(
        "llama-bpe",
        ("llama-bpe", "llama3", "llama-v3", "falcon3"),
        (_split(LLAMA3_SPLIT), _byte_level(False)),
        ignore_merges=True,
        add_bos=True,
    ),
    # llama.cpp's fallback for files without a name: punctuation runs, GPT-2, digit runs cut in threes
    PreTokenizer(
        "default",
        ("default",),
        tuple(_split(r) for r in (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")) + (_byte_level(False),),
    ),
)
MODELS = ("gpt2", "llama")


@dataclass
class GGUFTokenizer:
    """A tokenizer rebuilt from GGUF metadata: the ``tokenizers`` object and its ``tokenizer_config.json``."""

    tokenizer: Tokenizer
    config: dict[str, Any]

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
        ``chat_template.jinja`` (when there is a template) into ``folder`` (made if missing), each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        write_text_atomic(folder / "tokenizer_config.json", _json(self.config))
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        write_text_atomic(folder / "special_tokens_map.json", _json({k: self.config[k] for k in names if k in self.config}))
        if self.config.get("chat_template"):
            write_text_atomic(folder / "chat_template.jinja", self.config["chat_template"])


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# GGUF -> tokenizer
# ---------------------------------------------------------------------------------------------


def tokenizer_from_gguf(reader) -> GGUFTokenizer:
    """The tokenizer a ``gguf.GGUFReader``'s metadata describes (kinds ``gpt2`` and ``llama``)."""
    from r1kit.checkpoints.gguf_read import field

    kind = field(reader, "tokenizer.ggml.model")
    if kind not in MODELS:
        raise CheckpointError(
            f"tokenizer.ggml.model={kind!r} is not supported; r1kit reads GGUF tokenizers {list(MODELS)} "
            "(byte-level BPE and SentencePiece-style BPE)"
        )
    tokens = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError("the GGUF has no tokenizer.ggml.tokens; it carries no tokenizer")
    types = field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(f"the GGUF has {len(tokens)} tokens but {len(types)} token types; the file is corrupt")
    ids = _special_token_ids(reader, len(tokens))
    if kind == "gpt2":
        pre = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"))
        body = _byte_level_json(tokens, field(reader, "tokenizer.ggml.merges"), pre)
        bos_default = pre.add_bos
    else:
        prefix = field(reader, "tokenizer.ggml.add_space_prefix", True)  # llama.cpp's default for this kind
        unk = tokens[ids["unk_token"]] if "unk_token" in ids else None
        body = _sentencepiece_json(tokens, field(reader, "tokenizer.ggml.scores"), prefix, unk)
        bos_default = True  # llama.cpp's (and sentencepiece's) default
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", bos_default))
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False))
    added = _added_tokens(tokens, types)
    body["added_tokens"] = added
    body["post_processor"] = _post_processor(tokens, ids, add_bos, add_eos)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: tokens[index] for name, index in ids.items()},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "chat_template": field(reader, "tokenizer.chat_template"),
        "model_max_length": field(reader, f"{field(reader, 'general.architecture')}.context_length"),
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
    }
    return GGUFTokenizer(Tokenizer.from_str(json.dumps(body)), {k: v for k, v in config.items() if v is not None})


_ID_KEYS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def _special_token_ids(reader, count: int) -> dict[str, int]:
    """``{"bos_token": id, ...}`` for the special tokens the file names."""
    from r1kit.checkpoints.gguf_read import field

    ids = {}
    for name, key in _ID_KEYS.items():
        index = field(reader, f"tokenizer.ggml.{key}_token_id")
        if index is None:
            continue
        if not 0 <= index < count:
            raise CheckpointError(f"tokenizer.ggml.{key}_token_id={index} is outside the {count}-token vocabulary; the file is corrupt")
        ids[name] = int(index)
    return ids


def _pre_tokenizer(name: str) -> PreTokenizer:
    for pre in PRE_TOKENIZERS:
        if name in pre.aliases:
            return pre
    known = sorted(alias for pre in PRE_TOKENIZERS for alias in pre.aliases)
    raise CheckpointError(f"tokenizer.ggml.pre={name!r} is not supported; r1kit reads the byte-level pre-tokenizers {known}")


def _tokenizer_json(model: dict[str, Any], normalizer=None, pre_tokenizer=None, decoder=None) -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": decoder,
        "model": model,
    }


def _bpe(vocab: dict[str, int], merges: list[list[str]], **options) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": options.get("unk_token"),
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": options.get("fuse_unk", False),
        "byte_fallback": options.get("byte_fallback", False),
        "ignore_merges": options.get("ignore_merges", False),
        "vocab": vocab,
        "merges": merges,
    }


def _vocab(tokens: list[str]) -> dict[str, int]:
    # Tokens keep the file's spelling: byte-level ones are already in the byte alphabet, and an added
    # token in plain text is matched whole before BPE ever sees it.
    return {token: index for index, token in enumerate(tokens)}


def _byte_level_json(tokens: list[str], merges: list[str] | None, pre: PreTokenizer) -> dict[str, Any]:
    if not merges:
        raise CheckpointError("the GGUF's gpt2 tokenizer has no tokenizer.ggml.merges; the file is incomplete")
    pairs = [merge.split(" ") for merge in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise CheckpointError(f"tokenizer.ggml.merges holds {bad!r}, which is not two tokens separated by one space")
    model = _bpe(_vocab(tokens), pairs, ignore_merges=pre.ignore_merges)
    return _tokenizer_json(model, pre_tokenizer=pre.as_json(), decoder=_byte_level(True))


def _sentencepiece_json(tokens: list[str], scores: list[float] | None, prefix: bool, unk: str | None) -> dict[str, Any]:
    if not scores or len(scores) != len(tokens):
        raise CheckpointError("the GGUF's llama tokenizer needs one tokenizer.ggml.scores entry per token; the file is incomplete")
    vocab = _vocab(tokens)
    model = _bpe(vocab, _merges_from_scores(tokens, scores, vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    # A normalizer (not Metaspace) so that every piece of text between special tokens gets its
    # space prefix, as llama.cpp and sentencepiece do.
    space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    steps = [{"type": "Prepend", "prepend": SPACE}, space] if prefix else [space]
    decoder = [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return _tokenizer_json(
        model, normalizer={"type": "Sequence", "normalizers": steps}, decoder={"type": "Sequence", "decoders": decoder}
    )


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges that reproduce SentencePiece's rule: join the adjacent pair whose joined token scores best.

    Every way of cutting a token into two tokens becomes a merge ranked by the whole token's score
    (ties by token id, which llama.cpp breaks by position instead: real vocabularies have no ties).
    """
    ranked = []
    for index, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Control and unknown tokens as special added tokens, user-defined ones as plain added tokens:
    llama.cpp matches both whole in the text (control ones only when parsing special tokens)."""
    return [
        {
            "id": index,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind != USER_DEFINED,
        }
        for index, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, UNKNOWN, USER_DEFINED)
    ]


def _post_processor(tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool) -> dict[str, Any]:
    """BOS/EOS around each sequence exactly when the file's flags say so."""
    bos = _end_token(tokens, ids, "bos_token", add_bos)
    eos = _end_token(tokens, ids, "eos_token", add_eos)

    def sequence(part: str, type_id: int) -> list[dict[str, Any]]:
        def special(ends):
            return [{"SpecialToken": {"id": text, "type_id": type_id}} for text, _ in ends]

        return special(bos) + [{"Sequence": {"id": part, "type_id": type_id}}] + special(eos)

    return {
        "type": "TemplateProcessing",
        "single": sequence("A", 0),
        "pair": sequence("A", 0) + sequence("B", 1),
        "special_tokens": {text: {"id": text, "ids": [i], "tokens": [text]} for text, i in bos + eos},
    }


def _end_token(tokens: list[str], ids: dict[str, int], name: str, added: bool) -> list[tuple[str, int]]:
    """``[(text, id)]`` of the BOS or EOS token when it is added to every sequence, else ``[]``."""
    if not added:
        return []
    if name not in ids:
        raise CheckpointError(f"the GGUF sets tokenizer.ggml.add_{name} but names no {name} id; the file is inconsistent")
    return [(tokens[ids[name]], ids[name])]


# ---------------------------------------------------------------------------------------------
# model directory -> GGUF
# ---------------------------------------------------------------------------------------------


def add_tokenizer_to_gguf(writer, model_dir: str | Path) -> None:
    """Write the ``tokenizer.ggml.*`` fields and chat template of ``model_dir``'s tokenizer into a ``gguf.GGUFWriter``.

    The directory needs ``tokenizer.json`` (a BPE model: byte-level, or SentencePiece-style with
    byte fallback); ``tokenizer_config.json``, ``chat_template.jinja`` and ``config.json`` add the
    special tokens, the template and the vocabulary size when present. A tokenizer llama.cpp could
    not reproduce is a CheckpointError.
    """
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "tokenizer.json", required=True)
    config = _read_json(model_dir / "tokenizer_config.json")
    where = model_dir / "tokenizer.json"
    model = raw.get("model") or {}
    _check_bpe(model, where)
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    model_config = _read_json(model_dir / "config.json")
    tokens, types = _token_table(raw, model_config.get("vocab_size"), kind)
    ids = _special_ids(tokens, config, model_config, model)
    add_bos, add_eos = _added_ends(raw, config, ids, where)

    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(_pre_name(raw, where))
        writer.add_token_merges([_merge_text(pair, where) for pair in merges])
    else:
        writer.add_add_space_prefix(_sentencepiece_prefix(raw, where))
        writer.add_token_scores(_scores(tokens, merges))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, index in ids.items():
        writer.add_uint32(f"tokenizer.ggml.{_ID_KEYS[name]}_token_id", index)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = _chat_template(model_dir, tokens)
    if template:
        writer.add_chat_template(template)


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path} is missing; a GGUF needs the model's tokenizer (save it with the model)")
        return {}
    return read_json(path, CheckpointError)


def _check_bpe(model: dict[str, Any], where: Path) -> None:
    """Refuse the BPE options (and non-BPE models) that llama.cpp's tokenizers have no place for."""
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"{where}: a {model.get('type')!r} tokenizer model cannot go into a GGUF; r1kit writes BPE tokenizers "
            "(byte-level like GPT-2/Llama 3/Qwen2, or SentencePiece-style with byte fallback like Llama 2)"
        )
    extras = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix") if model.get(k)}
    if extras:
        raise CheckpointError(f"{where}: BPE options {extras} have no GGUF equivalent; llama.cpp would tokenize differently")


def _token_table(raw: dict[str, Any], vocab_size: int | None, kind: str) -> tuple[list[str], list[int]]:
    """Every token by id (added ones included) and its GGUF type; ids up to the model's vocabulary
    size that no token uses become unused ``[PADn]`` tokens, as llama.cpp's converter writes them."""
    by_id = {index: token for token, index in raw["model"]["vocab"].items()}
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    by_id.update({index: t["content"] for index, t in added.items()})
    size = max(max(by_id) + 1, vocab_size or 0)
    tokens, types = [], []
    for index in range(size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(BYTE if kind == "llama" and _is_byte_token(token) else NORMAL)
    return tokens, types


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">") and all(c in "0123456789ABCDEFabcdef" for c in token[3:5])


def _special_ids(tokens: list[str], config: dict[str, Any], model_config: dict[str, Any], model: dict[str, Any]) -> dict[str, int]:
    """BOS/EOS/UNK/PAD ids: the tokens ``tokenizer_config.json`` names, else ``config.json``'s ids
    (where r1kit's own model directories keep them), else the BPE model's unknown token."""
    index = {token: i for i, token in enumerate(tokens)}
    ids: dict[str, int] = {}
    for name in _ID_KEYS:
        text = config.get(name)
        text = text.get("content") if isinstance(text, dict) else text
        fallback = model_config.get(f"{name}_id")
        fallback = fallback[0] if isinstance(fallback, list) and fallback else fallback
        if name == "unk_token" and text is None:
            text = model.get("unk_token")
        if text in index:
            ids[name] = index[text]
        elif isinstance(fallback, int) and 0 <= fallback < len(tokens):
            ids[name] = fallback
    return ids


def _added_ends(raw: dict[str, Any], config: dict[str, Any], ids: dict[str, int], where: Path) -> tuple[bool, bool]:
    """Whether BOS and EOS are added to every sequence: ``tokenizer_config.json``'s flags when it has
    them (transformers then rebuilds the post-processor from them), else ``tokenizer.json``'s post-processor."""
    if "add_bos_token" in config or "add_eos_token" in config:
        return bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
    return _template_ends(raw.get("post_processor"), ids, where)


def _template_ends(processor: dict[str, Any] | None, ids: dict[str, int], where: Path) -> tuple[bool, bool]:
    if processor is None or processor.get("type") == "ByteLevel":
        return False, False
    if processor.get("type") == "Sequence":
        ends = [_template_ends(p, ids, where) for p in processor["processors"]]
        return any(b for b, _ in ends), any(e for _, e in ends)
    if processor.get("type") != "TemplateProcessing":
        raise CheckpointError(f"{where}: post-processor {processor.get('type')!r} has no GGUF equivalent; llama.cpp only adds BOS/EOS")
    single = processor["single"]
    position = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
    if position is None:
        raise CheckpointError(f"{where}: the post-processor's template has no $A sequence")
    specials = processor.get("special_tokens", {})
    return (
        _adds(single[:position], specials, ids.get("bos_token"), "BOS", where),
        _adds(single[position + 1 :], specials, ids.get("eos_token"), "EOS", where),
    )


def _adds(pieces: list[dict[str, Any]], specials: dict[str, Any], expected: int | None, name: str, where: Path) -> bool:
    """Whether one side of the template adds the BOS (or EOS) token; anything else there has no GGUF form."""
    if not pieces:
        return False
    found = [specials.get(p.get("SpecialToken", {}).get("id"), {}).get("ids") for p in pieces]
    if found != [[expected]]:
        raise CheckpointError(
            f"{where}: the post-processor adds token ids {found} on the {name} side of the text; "
            f"a GGUF can only say that the {name} token (id {expected}) is added"
        )
    return True


def _canonical(pre: Any) -> Any:
    """A pre-tokenizer's JSON without what does not change the ids (offset trimming, one-step sequences)."""
    if isinstance(pre, dict):
        if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
            return _canonical(pre["pretokenizers"][0])
        return {k: _canonical(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_canonical(p) for p in pre]
    return pre


def _pre_name(raw: dict[str, Any], where: Path) -> str:
    """The ``tokenizer.ggml.pre`` name of a byte-level tokenizer's text splitting."""
    normalizer = raw.get("normalizer")
    # NFC is dropped as llama.cpp's converter drops it (Qwen2's tokenizers have it): ids change only for un-normalized input
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise CheckpointError(f"{where}: normalizer {normalizer.get('type')!r} has no GGUF equivalent for a byte-level BPE")
    found = _canonical(raw.get("pre_tokenizer"))
    for pre in PRE_TOKENIZERS:
        if found == _canonical(pre.as_json()):
            return pre.name
    raise CheckpointError(
        f"{where}: pre-tokenizer {json.dumps(raw.get('pre_tokenizer'))[:300]} is not one llama.cpp knows by name; "
        f"r1kit writes byte-level tokenizers that split as {[p.name for p in PRE_TOKENIZERS]}"
    )


def _merge_text(pair: list[str], where: Path) -> str:
    if len(pair) != 2 or any(" " in part for part in pair):
        raise CheckpointError(f"{where}: merge {pair!r} cannot be written as GGUF's 'left right' text")
    return " ".join(pair)


def _sentencepiece_prefix(raw: dict[str, Any], where: Path) -> bool:
    """Whether a SentencePiece-style tokenizer prefixes text with a space (llama.cpp's add_space_prefix).

    Spaces must become ``▁`` by a normalizer (``Prepend`` + ``Replace``) or a ``Metaspace`` pre-tokenizer.
    """
    normalizer = raw.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    kinds = [s.get("type") for s in steps]
    pre = raw.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and not steps:
        return pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never") != "never"
    if not pre and kinds in (["Replace"], ["Prepend", "Replace"]):
        return kinds[0] == "Prepend"
    raise CheckpointError(
        f"{where}: a byte-fallback BPE must turn spaces into '{SPACE}' with a Metaspace pre-tokenizer or Prepend/Replace "
        f"normalizers to be written as a GGUF llama tokenizer; this one has normalizers {kinds} and pre-tokenizer {pre.get('type')!r}"
    )


def _scores(tokens: list[str], merges: list[list[str]]) -> list[float]:
    """SentencePiece scores that rank tokens as the merges do: the earlier a token's first merge, the
    higher its score; tokens no merge makes score below all of them."""
    rank: dict[str, int] = {}
    for position, (left, right) in enumerate(merges):
        rank.setdefault(left + right, position)
    return [-float(rank.get(token, len(merges))) for token in tokens]


def _chat_template(model_dir: Path, tokens: list[str]) -> str | None:
    """The template r1kit itself would chat with: the directory's own, else r1kit's default when the
    vocabulary has the role tokens that default uses."""
    from r1kit.tokenizer import ASSISTANT, SYSTEM, USER
    from r1kit.chat_template import DEFAULT_TEMPLATE, ChatTemplate

    source = ChatTemplate.from_model_dir(model_dir).source
    if source == DEFAULT_TEMPLATE and not {SYSTEM, USER, ASSISTANT} <= set(tokens):
        return None
    return source
