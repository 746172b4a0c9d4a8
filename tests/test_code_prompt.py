"""The code assistant's text side: FIM spelling per tokenizer family, truncation around the cursor, and
the stop rules per language on generated code shapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.apps.code.languages import BY_NAME, cut, language_for
from r1kit.apps.code.prompt import PromptConfig, build_prompt
from r1kit.errors import ConfigError
from r1kit.fim import STYLES
from r1kit.tokenizer import train_tokenizer

CORPUS = ["def f(x):\n    return x + 1\n", "int main(void) {\n    return 0;\n}\n", "for i in range(10):\n    print(i)\n"] * 20


@pytest.fixture(scope="module")
def plain_tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def _with_markers(markers):
    tok = train_tokenizer(CORPUS, vocab_size=400)
    tok.add_special_tokens(list(markers))
    return tok


@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.name)
def test_fim_prompt_is_spelled_in_the_tokenizers_family(style):
    tok = _with_markers([m for m in (*style.markers, style.file_separator) if m])
    prompt = build_prompt(tok, "def f(x):\n    return ", "\n\nprint(f(1))\n", BY_NAME["python"], path="a.py")
    assert prompt.fim == style
    assert prompt.held_back == " "  # the trailing space is the next token's, not the prompt's
    assert prompt.text == f"{style.prefix}def f(x):\n    return{style.suffix}\n\nprint(f(1))\n{style.middle}"
    ids = tok.encode(prompt.text).ids
    for marker in style.markers:  # each marker is its one added token, exactly once
        assert ids.count(tok.token_to_id(marker)) == 1


@pytest.mark.parametrize("style", STYLES, ids=lambda s: s.name)
def test_neighbouring_files_in_the_repository_format(style):
    tok = _with_markers([m for m in (*style.markers, style.file_separator) if m])
    prompt = build_prompt(tok, "x = ", "", BY_NAME["python"], path="main.py", neighbours=[("util.py", "def g():\n    pass\n")])
    assert prompt.neighbours == ("util.py",)
    if style.file_separator:
        sep = style.file_separator
        assert prompt.text == f"{sep}util.py\ndef g():\n    pass\n{sep}main.py\n{style.prefix}x ={style.suffix}{style.middle}"
    else:
        assert prompt.text == f"{style.prefix}# file: util.py\ndef g():\n    pass\n\n# file: main.py\nx ={style.suffix}{style.middle}"


def test_without_fim_tokens_the_prompt_is_the_prefix(plain_tokenizer):
    prompt = build_prompt(plain_tokenizer, "int main(void) {\n    return", "\n}\n", BY_NAME["c"])
    assert prompt.fim is None and prompt.suffix == ""
    assert prompt.text == "int main(void) {\n    return"
    assert prompt.insertion(" 0;") == " 0;"


@settings(max_examples=40, deadline=None)
@given(before=st.integers(0, 120), after=st.integers(0, 120), window=st.integers(90, 600), fim=st.booleans())
def test_truncation_keeps_the_cursors_neighbourhood(before, after, window, fim):
    tok = _TOKENIZERS["qwen" if fim else "plain"]
    prefix = "".join(f"line_{i} = {i}\n" for i in range(before)) + "cursor = "
    suffix = "".join(f"after_{i} = {i}\n" for i in range(after))
    config = PromptConfig(context_tokens=window, max_new_tokens=16)
    prompt = build_prompt(tok, prefix, suffix, BY_NAME["python"], config=config)
    assert prompt.tokens == len(tok.encode(prompt.text).ids) <= window - 16 or prompt.prefix == "cursor ="
    assert prefix.rstrip(" ").endswith(prompt.prefix) and prompt.prefix.endswith("cursor =")
    assert suffix.startswith(prompt.suffix) if fim else prompt.suffix == ""
    dropped_before = prefix.rstrip(" ")[:len(prefix.rstrip(" ")) - len(prompt.prefix)]
    assert dropped_before == "" or dropped_before.endswith("\n")  # whole lines, the farthest first
    assert prompt.suffix == "" or prompt.suffix.endswith("\n")
    if fim and prompt.tokens + 12 < window - 16:  # room was left: nothing near the cursor was dropped
        assert prompt.prefix == prefix.rstrip(" ") and prompt.suffix == suffix


_TOKENIZERS = {"plain": train_tokenizer(CORPUS, vocab_size=400), "qwen": _with_markers(STYLES[1].markers)}


# ----- stop rules on generated shapes -----

_statement = st.sampled_from(["x = 1", "call(a, b)", "y = 'a:b'", "return z"])
_tree = st.recursive(_statement, lambda inner: st.tuples(st.sampled_from(["if c:", "for i in r:", "def f():"]),
                                                          st.lists(inner, min_size=1, max_size=3)), max_leaves=12)


def _render_python(nodes, depth=0, out=None):
    """Lines as ``(indent, text, node_id)``; a block's header is followed by its body one level deeper."""
    out = [] if out is None else out
    for node in nodes:
        if isinstance(node, str):
            out.append((depth, node))
        else:
            out.append((depth, node[0]))
            _render_python(node[1], depth + 1, out)
    return out


@settings(max_examples=60, deadline=None)
@given(nodes=st.lists(_tree, min_size=1, max_size=4), data=st.data())
def test_python_cut_ends_at_the_end_of_the_block(nodes, data):
    lines = _render_python(nodes)
    headers = [k for k, (_, text) in enumerate(lines) if text.endswith(":")]
    if not headers:
        return
    h = data.draw(st.sampled_from(headers))
    depth = lines[h][0]
    end = h + 1
    while end < len(lines) and lines[end][0] > depth:
        end += 1
    text = [" " * 4 * d + t + "\n" for d, t in lines]
    python = BY_NAME["python"]
    # the cursor at the end of the header: the body is the completion
    prefix, completion = "".join(text[:h + 1])[:-1], "\n" + "".join(text[h + 1:])
    assert cut(python, prefix, completion) == "\n" + "".join(text[h + 1:end])
    # the cursor at the start of a line of the body: the rest of the body
    children = [k for k in range(h + 1, end) if lines[k][0] == depth + 1]
    k = data.draw(st.sampled_from(children))
    assert cut(python, "".join(text[:k]), "".join(text[k:])) == "".join(text[k:end])


_c_statement = st.sampled_from(['x = 1;', 's = "}{";', "c = '}';", "// } not a brace", "/* { */ y = 2;", "f(a, b);"])
_c_tree = st.recursive(_c_statement, lambda inner: st.tuples(st.sampled_from(["if (c) {", "while (x) {", "void f(void) {"]),
                                                              st.lists(inner, min_size=1, max_size=3)), max_leaves=12)


def _render_braces(nodes, depth=0, out=None):
    out = [] if out is None else out
    for node in nodes:
        if isinstance(node, str):
            out.append((depth, node, None))
        else:
            out.append((depth, node[0], "open"))
            _render_braces(node[1], depth + 1, out)
            out.append((depth, "}", "close"))
    return out


@settings(max_examples=60, deadline=None)
@given(nodes=st.lists(_c_tree, min_size=1, max_size=4), data=st.data(), name=st.sampled_from(["c", "java", "javascript", "rust"]))
def test_brace_cut_ends_at_the_matching_brace(nodes, data, name):
    if name == "rust":  # no char literals in Rust's lexing here ('a is a lifetime)
        nodes = [n for n in nodes if "'" not in str(n)] or ["x = 1;"]
    lines = _render_braces(nodes)
    text = ["    " * d + t + "\n" for d, t, _ in lines]
    language = BY_NAME[name]
    opens = [k for k, line in enumerate(lines) if line[2] == "open"]
    if not opens:
        return
    h = data.draw(st.sampled_from(opens))
    depth = lines[h][0]
    close = next(k for k in range(h + 1, len(lines)) if lines[k][2] == "close" and lines[k][0] == depth)
    # the cursor just before the block's "{": the completion writes the block and stops after its "}"
    header = text[h]
    brace = header.index("{")
    prefix, completion = "".join(text[:h]) + header[:brace], header[brace:] + "".join(text[h + 1:])
    assert cut(language, prefix, completion) == header[brace:] + "".join(text[h + 1:close + 1])
    # the cursor at the start of a line inside: up to, not including, the closing brace's line
    k = data.draw(st.integers(h + 1, close))
    # (a line of the body that is not the closing brace of a block nested in it: that brace would end the nested block)
    if (lines[k][0] == depth + 1 and lines[k][2] != "close") or k == close:
        assert cut(language, "".join(text[:k]), "".join(text[k:])) == "".join(text[k:close])


def test_shell_keywords_and_single_line_mode():
    shell = BY_NAME["shell"]
    completion = "if [ -f x ]; then\n  echo done_count\nfi\necho after\n"
    assert cut(shell, "", completion) == "if [ -f x ]; then\n  echo done_count\nfi\n"
    assert cut(shell, "f() {\n", "  echo '}'\n  echo hi\n}\nrest\n") == "  echo '}'\n  echo hi\n"
    assert cut(BY_NAME["python"], "x = ", "compute(1)\ny = 2\n", single_line=True) == "compute(1)"


def test_languages_by_extension_and_bad_names():
    assert len(BY_NAME) == 12
    assert language_for("a/b.hpp").name == "cpp" and language_for("x.PY").name == "python"
    with pytest.raises(ConfigError, match="no known language has the extension '.xyz'"):
        language_for("notes.xyz")
    with pytest.raises(ConfigError, match="unknown language 'cobol'"):
        language_for("a.py", "cobol")
