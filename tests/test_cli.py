"""`r1kit --help` lists every verb, and every verb's --help documents every flag."""

import argparse

import pytest

from r1kit.cli import VERBS, build_parser, main


def test_top_level_help_lists_every_verb(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_flag_of_every_verb_has_help(verb, capsys):
    parser = build_parser(verb)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[verb]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, f"{verb} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0 and "usage: r1kit " + verb in capsys.readouterr().out
