"""SFT data: only assistant tokens carry loss (single and multi-turn, packed and not) under real chat
templates, and packed documents never attend to each other (a packed row's logits equal each
document's run alone)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from r1kit.errors import ConfigError
from r1kit.model import R1kitForCausalLM
from r1kit.reason.sft import packed_forward
from r1kit.reason.sft_data import IGNORE, Document, build_documents, encode_chat, pack
from r1kit.tokenizer import load_tokenizer

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky."},
    ],
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return ChatTemplate.from_model_dir(smollm2_dir), load_tokenizer(smollm2_dir)


def loss_text(tokenizer, ids, loss):
    """The decoded runs of loss-carrying tokens."""
    runs, current = [], []
    for token, keep in zip(ids, loss):
        if keep:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


def test_only_assistant_turns_carry_loss_with_smollm2s_template(smol):
    template, tokenizer = smol
    ids, loss = encode_chat(CHATS[0], template, tokenizer)
    assert loss_text(tokenizer, ids, loss) == ["It is 5.<|im_end|>\n"]
    ids, loss = encode_chat(CHATS[1], template, tokenizer)
    assert loss_text(tokenizer, ids, loss) == ["Hello!<|im_end|>\n", "Blue, like the sky.<|im_end|>\n"]
    assert tokenizer.decode(ids, skip_special_tokens=False) == template.render(CHATS[1], add_generation_prompt=False)


def test_r1kits_default_template_keeps_only_the_answer_of_earlier_turns(tmp_path):
    from r1kit.tokenizer import SPECIAL_TOKENS, train_tokenizer

    tokenizer = train_tokenizer(["What is two plus three? It is five. Hello, blue sky colour."] * 20, vocab_size=300)
    assert all(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    template = ChatTemplate(DEFAULT_TEMPLATE, "<|bos|>", "<|eos|>")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello"},
            {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Blue"}]  # fmt: skip
    ids, loss = encode_chat(chat, template, tokenizer)
    assert loss_text(tokenizer, ids, loss) == ["Hello<|eos|>\n", "Blue<|eos|>\n"]


def test_a_template_that_rewrites_history_is_refused(smol):
    _, tokenizer = smol
    rewriting = ChatTemplate("{% for m in messages %}{% if not loop.last %}OLD {% endif %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ConfigError, match="only appends"):
        encode_chat(CHATS[1], rewriting, tokenizer)


def test_documents_shift_targets_and_packing_keeps_them_whole(smol):
    template, tokenizer = smol
    docs, dropped = build_documents(CHATS * 3, template, tokenizer, seq_len=256)
    assert dropped == 0
    rows = pack(docs, 256)
    assert len(rows) < len(docs)  # several documents share a row
    for packed_flag in (True, False):
        rows = pack(docs, 256, packing=packed_flag)
        # every target of every document appears once, in order, in its row, with positions from 0
        found = []
        for r in range(len(rows)):
            for d in rows.documents[r].unique().tolist():
                if d < 0:
                    continue
                at = rows.documents[r] == d
                assert rows.positions[r][at].tolist() == list(range(int(at.sum())))
                found.append((rows.inputs[r][at].tolist(), rows.targets[r][at].tolist()))
        assert sorted(found) == sorted((d.inputs, d.targets) for d in docs)
        assert (rows.targets[rows.documents < 0] == IGNORE).all()
    ids, loss = encode_chat(CHATS[1], template, tokenizer)
    doc = next(d for d in docs if len(d.inputs) == len(ids) - 1)
    assert doc.targets == [t if keep else IGNORE for t, keep in zip(ids[1:], loss[1:])]


@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(30, 64))
@settings(max_examples=50, deadline=None)
def test_packing_never_overfills_a_row_nor_loses_a_document(lengths, seq_len):
    docs = [Document(list(range(n)), [i] * n) for i, n in enumerate(lengths)]
    rows = pack(docs, seq_len)
    assert int((rows.documents >= 0).sum()) == sum(lengths)
    assert sorted(t for t in rows.targets.flatten().tolist() if t != IGNORE) == sorted(i for i, n in enumerate(lengths) for _ in range(n))


@pytest.mark.parametrize("attention", [["global", "global"], ["local", "global"]])
def test_a_packed_row_equals_each_document_alone(tiny_config, attention):
    config = tiny_config(attention=attention, local_window=3)
    model = R1kitForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    docs = [Document(torch.randint(0, 61, (n,), generator=g).tolist(), [1] * n) for n in (7, 4, 9)]
    rows = pack(docs, 24)
    assert len(rows) == 1
    with torch.no_grad():
        packed = packed_forward(model, rows, window=3)[0]
        at = 0
        for doc in sorted(docs, key=lambda d: -len(d.inputs)):
            alone = model(torch.tensor([doc.inputs]), window=3)[0]
            torch.testing.assert_close(packed[at : at + len(doc.inputs)], alone, atol=1e-5, rtol=1e-5)
            at += len(doc.inputs)
