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


@pytest.mark.parametrize("argv, message", [
    (["bench", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["simulate", "--world-size", "0"], "world_size must be >= 1, got 0"),
    (["plan", "--sp-degree", "0"], "sp_degree must be >= 1"),
    (["train", "--steps", "0"], "steps must be >= 1, got 0"),
])
def test_a_bad_value_exits_with_status_2_and_says_why(argv, message, capsys):
    """As argparse does for a bad flag: status 2, "striped-attention COMMAND: error: ..." on stderr."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert f"striped-attention {argv[0]}: error: " in err and message in err, err


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`striped-attention ... | head`: no traceback when the pipe closes (run in a subprocess: it redirects
    the process's stdout)."""
    import subprocess
    import sys

    code = ("import sys; import striped_attention.env as env; from striped_attention import cli\n"
            "def main(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "env.main = main; sys.exit(cli.main(['env']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)
