"""`rstpm X --help` names the default of every option of every subcommand.

An option with a value default shows ``default: VALUE`` (rstpm.cli.DefaultsHelpFormatter); an
option whose default is None or "" says in words what it falls back to (``default: from
--schedule (fast: 100)``), never ``None``. Flags (store_true, --help, --version), required options
and positionals need no default. The check reads the help text exactly as printed.
"""

from __future__ import annotations

import argparse
import re

import pytest

from rstpm.cli import DefaultsHelpFormatter, build_parser

WIDE = "10000"
"""$COLUMNS while help is printed: no wrapping, so a default is never split across lines."""


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _needs_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.nargs != 0 and not action.required


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's entry in printed help: first option string -> its text on one line."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        start = re.match(r"  (-[^\s,]+)", line)
        if start:
            current = blocks.setdefault(start.group(1), [])
            current.append(line)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {name: " ".join(" ".join(lines).split()) for name, lines in blocks.items()}


def missing_defaults(parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    """What is wrong with the defaults in ``help_text`` (the parser's printed --help)."""
    blocks = _option_blocks(help_text)
    problems = []
    for action in parser._actions:
        if not _needs_default(action):
            continue
        name = action.option_strings[0]
        block = blocks.get(name)
        if block is None:
            problems.append(f"{name}: not in the help")
        elif "None" in block:
            problems.append(f"{name}: says None: {block!r}")
        elif action.default in (None, ""):
            if not re.search(r"\bdefault\b", block):
                problems.append(f"{name}: default {action.default!r} not put in words: {block!r}")
        elif f"default: {action.default}" not in block:
            problems.append(f"{name}: no 'default: {action.default}': {block!r}")
    return problems


def _printed_help(
    parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_is_checked() -> None:
    names = set(_subcommands(build_parser()))
    assert {"fit", "test", "predict", "serve", "export", "bench", "threshold", "check"} <= names


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_help_names_every_default(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", WIDE)
    parser = build_parser()
    sub = _subcommands(parser)[command]
    help_text = _printed_help(parser, [command, "--help"], capsys)
    assert help_text.startswith(f"usage: rstpm {command}")
    assert missing_defaults(sub, help_text) == []


def test_top_level_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", WIDE)
    parser = build_parser()
    help_text = _printed_help(parser, ["--help"], capsys)
    assert missing_defaults(parser, help_text) == []
    for command in _subcommands(parser):
        assert command in help_text


def test_the_check_fails_on_a_missing_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check itself: an option without words for its None default, one whose help hides
    its value, one that says None, and one without help each get reported."""
    monkeypatch.setenv("COLUMNS", WIDE)
    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--silent", type=int, help="no words for None")
    parser.add_argument("--none", help="default: None")
    parser.add_argument("--plain", type=int, default=3)
    parser.add_argument("--worded", type=int, help="default: from the run")
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--needed", required=True)
    plain_argparse = argparse.ArgumentParser(prog="y")
    plain_argparse.add_argument("--bare", type=int, default=3)
    plain_argparse.add_argument("--hidden", type=int, default=3, help="no value")

    problems = missing_defaults(parser, _printed_help(parser, ["--help"], capsys))
    assert [p.split(":")[0] for p in problems] == ["--silent", "--none"]
    problems = missing_defaults(plain_argparse, _printed_help(plain_argparse, ["--help"], capsys))
    assert [p.split(":")[0] for p in problems] == ["--bare", "--hidden"]
