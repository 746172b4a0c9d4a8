"""Normalization, language filter, augmentation, tokenizer and config: the per-document pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1kit.data.augment import augment, scale_numbers
from r1kit.data.clean import clean_chunk
from r1kit.data.config import EMBEDDED_MIN_TOKENS, PrepareConfig
from r1kit.data.normalize import normalize
from r1kit.data.readers import RawDoc
from r1kit.data.records import Doc, Drop
from r1kit.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from r1kit.errors import CheckpointError, ConfigError

SAMPLES = {
    "en": ["The committee met on Tuesday to review the annual budget and agreed to fund two new libraries.",
           "Reasoning models learn to write out intermediate steps before they give a final answer to a question."],
    "zh": ["深度学习模型在自然语言处理任务中表现出色，但训练成本很高，需要大量的数据和计算资源。",
           "今天天气很好，我们一起去公园散步，然后在湖边的小餐馆吃了午饭。"],
    "de": ["Der Ausschuss hat am Dienstag den Jahreshaushalt geprüft und beschlossen, zwei neue Bibliotheken zu bauen.",
           "Die Kinder spielen im Garten, während ihre Eltern in der Küche das Abendessen vorbereiten."],
    "fr": ["Le comité s'est réuni mardi pour examiner le budget annuel et a décidé de financer deux bibliothèques.",
           "Les enfants jouent dans le jardin pendant que leurs parents préparent le dîner dans la cuisine."],
}


def test_language_filter_keeps_zh_en_drops_de_fr():
    raws = [RawDoc(f"{lang}{i}", "s", None, "text", text) for lang, texts in SAMPLES.items() for i, text in enumerate(texts)]
    out = {r.id: r for r in clean_chunk(raws, ("zh", "en"), 0.5, 4096)}
    for lang in ("en", "zh"):
        for i in range(2):
            assert isinstance(out[f"{lang}{i}"], Doc) and out[f"{lang}{i}"].lang == lang
    for lang in ("de", "fr"):
        for i in range(2):
            assert isinstance(out[f"{lang}{i}"], Drop) and out[f"{lang}{i}"].reason == "language"
    mixed = clean_chunk([RawDoc("m", "s", None, "text", SAMPLES["zh"][0] + " " + SAMPLES["en"][0])], ("zh", "en"), 0.5, 4096)
    assert isinstance(mixed[0], Doc)
    code = clean_chunk([RawDoc("c", "s.py", None, "code", "def f(x):\n    return x  # Der Hund\n")], ("zh", "en"), 0.5, 4096)
    assert isinstance(code[0], Doc) and code[0].lang == "code"


def test_normalize_repairs_and_rejects():
    assert normalize(b"\xff\xfe not utf8")[1] == "invalid_utf8"
    assert normalize(" \x00\x01 \n")[1] == "empty"
    text, _, _ = normalize("cafÃ© e\u0301\r\n\x07，你好 “quoted” &amp;".encode())
    assert text == "café é\n，你好 “quoted” &amp;"  # mojibake fixed, NFC, CRLF, control stripped; nothing else


def test_number_augmentation_keeps_valid_numbers():
    assert scale_numbers("共有3个, 2.50 元, 10.", 1.2) == "共有4个, 3.00 元, 12."
    assert scale_numbers("python 3.11.2 on x86 with utf8", 1.2) == "python 3.11.2 on x86 with utf8"
    doc = Doc("d", "s", None, "text", "我不会去，可能有 5 个人")
    copy = augment(doc, {"不会": "无法", "可能": "或许"}, 1.0, 1.2, seed=0)
    assert copy.text == "我无法去，或许有 6 个人" and copy.augmented and copy.id == "d#aug"
    assert augment(doc, {"不会": "无法"}, 0.5, 1.2, seed=0).text == augment(doc, {"不会": "无法"}, 0.5, 1.2, seed=0).text
    assert augment(Doc("c", "s", None, "code", "x = 3"), {}, 1.0, 1.2, 0) is None
    assert doc.text == "我不会去，可能有 5 个人"


def test_tokenizer_roundtrip_and_special_tokens(tmp_path):
    texts = [SAMPLES["en"][0], SAMPLES["zh"][0], "def f(x):\n\treturn x ** 2  # ünïcödé 🙂\n"] * 20
    tok = train_tokenizer(texts, 400)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for text in texts[:3] + ["never seen: Ωμέγα 𝔘 \x0b"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).get_vocab_size() == tok.get_vocab_size()
    with pytest.raises(CheckpointError, match="r1kit prepare"):
        load_tokenizer(tmp_path / "missing")


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="min_tokens"):
        PrepareConfig(min_tokens=100, max_tokens=10)
    with pytest.raises(ConfigError, match="did you mean 'vocab_size'"):
        PrepareConfig.from_dict({"vocab_sise": 1000})
    with pytest.raises(ConfigError, match="languages"):
        PrepareConfig(languages=("English",))
    assert PrepareConfig().min_tokens == EMBEDDED_MIN_TOKENS and PrepareConfig(inputs=("x",)).min_tokens == 512
    path = tmp_path / "p.yaml"
    path.write_text("prepare:\n  vocab_size: 1000\n  languages: [zh]\n", encoding="utf-8")
    cfg = PrepareConfig.from_yaml(path)
    assert cfg.vocab_size == 1000 and cfg.languages == ("zh",)
    assert cfg.fingerprint() == PrepareConfig.from_yaml(path).fingerprint() != PrepareConfig().fingerprint()
    assert PrepareConfig(workers=2).fingerprint() == PrepareConfig(workers=1).fingerprint()


@pytest.mark.parametrize("name", ["prepare-embedded.yaml", "prepare-seed.yaml"])
def test_shipped_configs_load(name):
    cfg = PrepareConfig.from_yaml(Path(__file__).parent.parent / "configs" / name)
    assert cfg.max_tokens == 16384 and cfg.languages == ("zh", "en")
