"""GGUF tokenizers both ways, checked against transformers' own GGUF loader (``AutoTokenizer`` with
``gguf_file``), which never runs r1kit's code.

Where that loader and llama.cpp disagree, r1kit follows llama.cpp (the rules the file was written
for) and the test says so: SmolLM2's ``smollm`` pre-tokenizer splits digits off before the GPT-2
split (the reference gets SmolLM2's published pre-tokenizer back), and a SentencePiece vocabulary
prefixes a space to every piece of text, including text that starts with a space or follows a
special token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

from r1kit.checkpoints.gguf_tokenizer import add_tokenizer_to_gguf, tokenizer_from_gguf  # noqa: E402
from r1kit.errors import CheckpointError  # noqa: E402
from r1kit.chat_template import DEFAULT_TEMPLATE, ChatTemplate  # noqa: E402

SPACE = "\u2581"

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's what we'll do, isn't it?",
    "def area(r):\n    if r < 0:\n\t\traise ValueError('negative')\n        return 3.14159 * r ** 2\n\n\n",
    "x        =    [1,2,3]   # many spaces\t\ttabs\n",
    "机器学习是人工智能的一个分支。你好，世界！",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧 done",
    "Numbers: 3.14159, 1,000,000, 2024-01-01, x1y22z333",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<fim_prefix>def f():<fim_suffix>\n    return 1<fim_middle>",
    "<|endoftext|>tail",
    "   leading and trailing   ",
    "line\r\nwindows\r\n\r\nend",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
]


def auto_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def write_gguf(path: Path, tokenizer_fields=None, model_dir: Path | None = None) -> Path:
    """A GGUF with a tiny llama header (all transformers' loader needs to find a tokenizer) and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (writer.add_context_length, 256),
        (writer.add_embedding_length, 8),
        (writer.add_block_count, 1),
        (writer.add_feed_forward_length, 16),
        (writer.add_head_count, 2),
        (writer.add_head_count_kv, 2),
        (writer.add_rope_dimension_count, 4),
        (writer.add_layer_norm_rms_eps, 1e-5),
    ):
        add(value)
    if model_dir is not None:
        add_tokenizer_to_gguf(writer, model_dir)
    else:
        tokenizer_fields(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path: Path):
    return tokenizer_from_gguf(gguf.GGUFReader(str(path)))


def assert_same_ids(mine: Tokenizer, reference, texts, add_special_tokens=(True, False)):
    for text in texts:
        for special in add_special_tokens:
            assert mine.encode(text, add_special_tokens=special).ids == reference.encode(text, add_special_tokens=special), (
                text,
                special,
            )


# --------------------------------------------------------------------------------------------- SmolLM2 (gpt2 / smollm)


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    """r1kit's tokenizer of the real SmolLM2 GGUF and the model directory it was saved into."""
    result = read(Path(smollm2_gguf))
    folder = tmp_path_factory.mktemp("smollm2")
    result.save(folder)
    return result, folder


@pytest.fixture(scope="module")
def smol_auto(smollm2_hf):
    return smollm2_hf[1]


@pytest.fixture(scope="module")
def smol_reference(smol_auto):
    """transformers' tokenizer of the GGUF with SmolLM2's published pre-tokenizer (digits split off,
    then GPT-2's), which llama.cpp's ``smollm`` applies and transformers' GGUF loader leaves out."""
    backend = Tokenizer.from_str(smol_auto.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return backend


def test_smollm2_ids_match_transformers(smol, smol_auto):
    assert_same_ids(smol[0].tokenizer, smol_auto, TEXTS)


def test_smollm2_special_tokens_and_flags_match_transformers(smol, smol_auto):
    config = smol[0].config
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[name] == getattr(smol_auto, name)
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)
    assert config["model_max_length"] == 8192
    assert config["added_tokens_decoder"]["1"]["content"] == "<|im_start|>"
    assert smol[0].tokenizer.encode("<|im_start|>").ids == [1]


def test_smollm2_digits_split_as_llama_cpp_does(smol, smol_auto, smol_reference):
    # llama.cpp's smollm rule cuts "\p{N}" first, so whitespace before a digit stays one piece
    vocab = smol[0].tokenizer.get_vocab()
    assert smol[0].tokenizer.encode("return  2").ids == [vocab["return"], vocab["ĠĠ"], vocab["2"]]
    texts = ["a  1", "\n 7\n  8", "x\t 12 345  6789", "half ½, Ⅻ, x²"]
    assert_same_ids(smol[0].tokenizer, _Ids(smol_reference), texts)


class _Ids:
    """``encode(text, add_special_tokens)`` -> ids of a bare ``tokenizers.Tokenizer``, like transformers' API."""

    def __init__(self, backend: Tokenizer):
        self.backend = backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids


def test_smollm2_decode_round_trips(smol):
    tokenizer = smol[0].tokenizer
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


pieces = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["<|im_start|>", "<|im_end|>", " ", "  ", "\n", "\t", "123", " 4", "é", "中文", "👍🏽", "'s"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(pieces, max_size=8).map("".join))
def test_smollm2_random_text_matches_transformers(smol, smol_reference, text):
    tokenizer = smol[0].tokenizer
    ids = tokenizer.encode(text).ids
    assert ids == smol_reference.encode(text).ids
    if _bytes_in_vocab(tokenizer, text):  # SmolLM2 has no token for some bytes (0xF1, 0x04, ...): those are dropped
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def _bytes_in_vocab(tokenizer: Tokenizer, text: str) -> bool:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling, vocab = bytes_to_unicode(), tokenizer.get_vocab()
    return all(spelling[b] in vocab for b in text.encode("utf-8"))


def test_saved_directory_loads_in_transformers_and_renders_chats(smol, smol_auto):
    _, folder = smol
    assert {p.name for p in folder.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert_same_ids(Tokenizer.from_file(str(folder / "tokenizer.json")), loaded, TEXTS)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (smol_auto.bos_token, smol_auto.eos_token, smol_auto.pad_token)
    template = ChatTemplate.from_model_dir(folder)
    for chat in CHATS:
        for generation in (True, False):
            expected = smol_auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
            assert template.render(chat, add_generation_prompt=generation) == expected


def test_smollm2_directory_writes_back_the_same_gguf_fields(smol, smollm2_gguf, tmp_path):
    """Every tokenizer field the original file has comes back equal, so llama.cpp, transformers and
    r1kit read the written file as they read the original (checked above)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    written = write_gguf(tmp_path / "smol.gguf", model_dir=smol[1])
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    original, _ = read_gguf_metadata(str(smollm2_gguf), arrays)
    again, _ = read_gguf_metadata(str(written), arrays)
    # llama.cpp ignores add_space_prefix for byte-level BPE, so it is not written for one
    expected = {k: v for k, v in original.items() if k.startswith("tokenizer.") and k != "tokenizer.ggml.add_space_prefix"}
    assert {k: again[k] for k in expected} == expected
    assert again["tokenizer.ggml.add_eos_token"] is False


# --------------------------------------------------------------------------------------------- SentencePiece (llama)

WORDS = ["hello", "world", "the", "tokenizer", "is", "a", "test", "of", "llama", "in", "ing", "er"]
SPM_TEXTS = [
    "hello world",
    "the tokenizer is a test of llama",
    "helloing worlder",
    "hello   world  ",
    "héllo wörld 中文 😀 ½",
    "hello\nworld\t!",
    "",
]


def sentencepiece_fields(writer) -> None:
    """A small SentencePiece vocabulary: specials, 256 byte tokens, characters, then word pieces
    ranked by distinct scores (every prefix of every word, with and without the ▁ space)."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<think>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    chars = sorted({c for w in WORDS for c in SPACE + w})
    pieces = sorted({word[:end] for w in WORDS for word in (SPACE + w, w) for end in range(2, len(word) + 1)}, key=lambda p: (len(p), p))
    tokens += chars + pieces
    types += [gguf.TokenType.NORMAL] * (len(chars) + len(pieces))
    scores = [0.0] * 261 + [-1e6] * len(chars) + [-float(i) for i in range(len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", sentencepiece_fields)


def test_sentencepiece_ids_match_transformers(spm_file):
    mine = read(spm_file).tokenizer
    assert_same_ids(mine, auto_tokenizer(spm_file), SPM_TEXTS)
    assert mine.encode("hello").ids[0] == 1  # add_bos_token
    for text in SPM_TEXTS:
        assert mine.decode(mine.encode(text).ids, skip_special_tokens=True) == text


def test_sentencepiece_prefixes_a_space_as_llama_cpp_does(spm_file):
    """llama.cpp prefixes ' ' to each piece of text (sentencepiece's dummy prefix), even one that
    already starts with a space or follows a special token; transformers' GGUF loader does not."""
    mine = read(spm_file).tokenizer
    vocab = mine.get_vocab()
    space, hello, world = vocab[SPACE], vocab[SPACE + "hello"], vocab[SPACE + "world"]
    assert mine.encode("  hello", add_special_tokens=False).ids == [space, space, hello]
    assert mine.encode("<|im_start|>hello<s>world", add_special_tokens=False).ids == [3, hello, 1, world]
    assert mine.encode("<think>hello", add_special_tokens=False).ids == [4, hello]


def test_sentencepiece_round_trip_through_gguf(spm_file, tmp_path):
    original = read(spm_file)
    original.save(tmp_path / "dir")
    written = write_gguf(tmp_path / "again.gguf", model_dir=tmp_path / "dir")
    texts = SPM_TEXTS + ["<|im_start|>hello</s>", "  hello"]
    assert_same_ids(read(written).tokenizer, _Ids(original.tokenizer), texts)
    assert_same_ids(original.tokenizer, auto_tokenizer(written), SPM_TEXTS)
    reader = gguf.GGUFReader(str(written))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.token_type"].contents()[:6] == [3, 3, 3, 3, 4, 6]


# --------------------------------------------------------------------------------------------- r1kit's own byte-level BPE


@pytest.fixture(scope="module")
def r1kit_dir(tmp_path_factory):
    from r1kit.tokenizer import train_tokenizer

    corpus = ["The cat sat on the mat. 12 cats, 345 mats!", "def f(x):\n    return x * 2\n", "naïve café 中文 😀"] * 50
    folder = tmp_path_factory.mktemp("r1kit_tok")
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    tokenizer.save(str(folder / "tokenizer.json"))
    # r1kit's model directories keep the special ids in config.json; the model has more rows than tokens
    (folder / "config.json").write_text(json.dumps({"vocab_size": 416, "bos_token_id": 0, "eos_token_id": 1}))
    return folder


def test_r1kit_tokenizer_round_trip_through_gguf(r1kit_dir, tmp_path):
    written = write_gguf(tmp_path / "r1kit.gguf", model_dir=r1kit_dir)
    original = Tokenizer.from_file(str(r1kit_dir / "tokenizer.json"))
    mine = read(written)
    texts = TEXTS + ["<|user|>hi<|assistant|><think>\nok</think>", "The cat  sat\n\n 12 34"]
    assert_same_ids(mine.tokenizer, _Ids(original), texts)
    # transformers' GGUF loader adds GPT-2's "<|endoftext|>" as a new unknown token when the file has none
    assert_same_ids(mine.tokenizer, auto_tokenizer(written), [t for t in texts if "<|endoftext|>" not in t])
    reader = gguf.GGUFReader(str(written))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 416  # padded with [PADn] like llama.cpp
    assert (mine.config["bos_token"], mine.config["eos_token"]) == ("<|bos|>", "<|eos|>")
    assert mine.config["chat_template"] == DEFAULT_TEMPLATE


# --------------------------------------------------------------------------------------------- errors


def _tiny_fields(model: str, pre: str | None = None):
    def add(writer) -> None:
        writer.add_tokenizer_model(model)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])

    return add


@pytest.mark.parametrize(("model", "pre", "named"), [("bert", None, "'bert'"), ("gpt2", "jais-2", "'jais-2'"), ("rwkv", None, "'rwkv'")])
def test_unsupported_gguf_tokenizer_is_a_clear_error(tmp_path, model, pre, named):
    path = write_gguf(tmp_path / "bad.gguf", _tiny_fields(model, pre))
    with pytest.raises(CheckpointError, match=named) as error:
        read(path)
    assert "supported" in str(error.value)


def test_unrepresentable_directory_tokenizer_is_a_clear_error(tmp_path):
    from tokenizers import models

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="'WordPiece'"):
        write_gguf(tmp_path / "wp.gguf", model_dir=tmp_path)

    bpe = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="Whitespace"):
        write_gguf(tmp_path / "ws.gguf", model_dir=tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        write_gguf(tmp_path / "none.gguf", model_dir=tmp_path / "nowhere")
