"""`striped-attention COMMAND --help`: every command explains itself in plain text."""

from __future__ import annotations

import re

import pytest

from striped_attention.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage lines
    assert description[:1].isupper(), description
    assert not re.search(r"``|:\w+:`|`striped-attention \w+`:", text), text


def test_every_command_has_a_one_line_summary():
    summary = build_parser().format_help()
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", summary, re.M), (command, summary)
