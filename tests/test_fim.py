"""Fill-in-the-middle prompt building (r1kit.fim) on tokenizers built here with each family's markers."""

import pytest
from chatml_models import bpe_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.fim import STYLES, FimError, detect_fim

BY_NAME = {style.name: style for style in STYLES}
SPELLINGS = {
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "deepseek": ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # fullwidth bars, U+2581
}
# each family's tokenizer, as the real ones: DeepSeek-Coder's adds BOS, the others do not
TOKENIZERS = {
    "starcoder": bpe_tokenizer(["<|endoftext|>", *SPELLINGS["starcoder"], "<fim_pad>"], vocab_size=300),
    "qwen": bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPELLINGS["qwen"], "<|fim_pad|>"], vocab_size=300),
    "deepseek": bpe_tokenizer(["<\uff5cbegin\u2581of\u2581sentence\uff5c>", *SPELLINGS["deepseek"]], vocab_size=300, bos="<\uff5cbegin\u2581of\u2581sentence\uff5c>"),
}


def encode_fim(name: str, prefix: str, suffix: str) -> list[int]:
    return TOKENIZERS[name].encode(BY_NAME[name].prompt(prefix, suffix), add_special_tokens=True).ids


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_family_is_detected_and_builds_psm_prompts(name):
    tok = TOKENIZERS[name]
    style = detect_fim(tok)
    assert style is not None and style.name == name and style.markers == SPELLINGS[name]
    p, s, m = (tok.token_to_id(marker) for marker in SPELLINGS[name])
    part = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    bos = [tok.token_to_id("<\uff5cbegin\u2581of\u2581sentence\uff5c>")] if name == "deepseek" else []
    assert encode_fim(name, "def add(a, b):\n    ", "\n    return c\n") == bos + [p] + part("def add(a, b):\n    ") + [s] + part("\n    return c\n") + [m]


def test_no_family_without_all_three_markers():
    assert detect_fim(bpe_tokenizer(["<|endoftext|>"], vocab_size=300)) is None
    assert detect_fim(bpe_tokenizer(["<fim_prefix>", "<fim_middle>"], vocab_size=300)) is None  # no <fim_suffix>


def test_a_marker_inside_the_text_is_refused_naming_the_field():
    style = BY_NAME["qwen"]
    with pytest.raises(FimError, match=r"prompt contains '<\|fim_suffix\|>'") as info:
        style.prompt("x = '<|fim_suffix|>'", "")
    assert info.value.param == "prompt"
    with pytest.raises(FimError) as info:
        style.prompt("", "<|fim_middle|>")
    assert info.value.param == "suffix"


# text made of the markers' own characters, so that near-markers and whole markers both turn up
pieces = st.sampled_from(["<", ">", "|", "_", "fim", "prefix", "suffix", "middle", "\uff5c", "\u2581", "begin", "hole", "end", " ", "\n", "def", "é", "🙂",
                          "<fim_prefix>", "<|fim_suffix|>", "<\uff5cfim\u2581end\uff5c>", "<|endoftext|>"])  # fmt: skip
texts = st.lists(pieces, max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(SPELLINGS)), texts, texts)
def test_prefix_and_suffix_survive_intact(name, prefix, suffix):
    style, tok = BY_NAME[name], TOKENIZERS[name]
    if any(marker in text for marker in style.markers for text in (prefix, suffix)):
        with pytest.raises(FimError):
            style.prompt(prefix, suffix)
        return
    ids = encode_fim(name, prefix, suffix)
    p, s, m = (tok.token_to_id(marker) for marker in style.markers)
    # each marker exactly once, in PSM order, the middle marker last: the model writes from there
    assert [i for i in ids if i in (p, s, m)] == [p, s, m] and ids[-1] == m
    between = lambda a, b: tok.decode(ids[ids.index(a) + 1 : ids.index(b)], skip_special_tokens=False)  # noqa: E731
    assert between(p, s) == prefix and between(s, m) == suffix
