"""Every `rstpm` command line in README.md and docs/**/*.md parses with today's command line.

Nothing is run: each line goes through ``rstpm.cli.build_parser().parse_args`` in-process;
argparse's error (its SystemExit) is reported with the file, line number and command.

Command lines (`command_lines`): inside fenced code blocks (``` or ~~~), a line that starts
(after indentation) with ``rstpm ``, ``$ rstpm `` or ``.venv/bin/rstpm ``, also after ``time ``
and ``VAR=value `` prefixes. `` #`` starts a comment. A line ending in ``\\`` continues on the
next one; so does an indented line starting with ``[`` or ``-`` (a synopsis wrapped without
backslashes). A shell operator (``|``, ``&&``, ``;``, ``>``...) ends the command, as does a
``;`` glued to a word (``--precision fp32; ...``).

Synopsis normalisation (`normalise`), kept small:

* ``[...]`` optional groups are included once, innermost first (``[--data D [--masks M]]`` ->
  ``--data D --masks M``); a group of lowercase prose (``[any fit option]``) is dropped;
* ``a|b`` alternatives: the first one (``--preset lite|paper`` -> ``--preset lite``);
* ``...`` repeat marks are dropped (``[CAT ...]`` -> ``CAT``, ``IMAGES...`` -> ``IMAGES``,
  ``--ray [...]`` -> ``--ray``); a bare ``...`` outside brackets stands for an elided value and
  becomes the placeholder ``X``;
* a placeholder in capitals (RUN_DIR, CAT, FILE, N, V) is a plain token, and any option takes it
  as a value: its type and choices are not checked (``--epochs N``, ``--variant V``); real
  values (``--epochs 10``, ``--variant full``) are;
* option names are not abbreviated: ``--epoch 3`` is an error (argparse's allow_abbrev off), so a
  renamed option never hides behind its old name's prefix.

Also: every subcommand is the subcommand of at least one README command line (the README's
synopsis names them all, ``serve`` included).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rstpm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("**/*.md"))]

FENCE = re.compile(r"\s*(```|~~~)")
START = re.compile(
    r"\s*(?:\$\s+)?(?:(?:time|\w+=(?:\$\([^)]*\)|'[^']*'|\"[^\"]*\"|\S+))\s+)*"
    r"(?:\.venv/bin/)?rstpm(?:\s+|$)(?P<args>.*)"
)
SYNOPSIS_CONTINUATION = re.compile(r"\s+[\[-]")
GROUP = re.compile(r"\[([^\[\]]*)\]")
PROSE = re.compile(r"[a-z]+(?: [a-z]+)+")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
SHELL_OPERATOR = re.compile(r"\|\|?|&&?|;|\d?>.*|<.*")


def _strip_comment(line: str) -> str:
    return line.split(" #", 1)[0].rstrip()


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, the command's arguments after `rstpm`) of each command line in ``path``."""
    found: list[tuple[int, str]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = START.fullmatch(_strip_comment(line)) if fenced else None
        if match is None:
            continue
        number, parts = i, [match.group("args")]
        while i < len(lines) and not FENCE.match(lines[i]):
            if parts[-1].endswith("\\"):
                parts[-1] = parts[-1][:-1]
            elif not SYNOPSIS_CONTINUATION.match(lines[i]):
                break
            parts.append(_strip_comment(lines[i]).strip())
            i += 1
        if parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
        found.append((number, " ".join(p.strip() for p in parts if p.strip())))
    return found


def _group(match: re.Match[str]) -> str:
    content = match.group(1)
    if PROSE.fullmatch(content.strip()):
        return ""
    return re.sub(r"(?:^|(?<=\s))\.\.\.(?=\s|$)", "", content)


def normalise(args: str) -> list[str]:
    """The argv that a (synopsis-style) command line stands for; see the module docstring."""
    previous = None
    while previous != args:
        previous, args = args, GROUP.sub(_group, args)
    argv = []
    for word in shlex.split(args):
        if SHELL_OPERATOR.fullmatch(word):
            break
        token, semicolon, _ = word.partition(";")  # `--precision fp32; next command`
        if token == "...":
            argv.append("X")
        else:
            alternatives = [a for a in token.removesuffix("...").split("|") if a]
            argv.extend(alternatives[:1])
        if semicolon:
            break
    return argv


class _AnyPlaceholder(tuple):
    """An option's choices that also take a placeholder (``--variant V``)."""

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and PLACEHOLDER.fullmatch(value) is not None) or (
            super().__contains__(value)
        )


def _placeholder_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return value if PLACEHOLDER.fullmatch(value) else convert(value)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid int value"
    return parse


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def docs_parser() -> argparse.ArgumentParser:
    """The command line's parser, its options taking capital placeholders as values and no
    abbreviated option names."""
    parser = build_parser()
    for each in _parsers(parser):
        each.allow_abbrev = False
        for action in each._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.type is not None and callable(action.type):
                action.type = _placeholder_or(action.type)
            if action.choices is not None:
                action.choices = _AnyPlaceholder(action.choices)
    return parser


def subcommands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


def parse_error(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """argparse's complaint about ``argv`` (None: it parses; --help and --version count)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            return stderr.getvalue().strip().splitlines()[-1]
    return None


COMMANDS = [
    pytest.param(path, number, args, id=f"{path.relative_to(ROOT)}:{number}")
    for path in DOC_FILES
    for number, args in command_lines(path)
]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return docs_parser()


@pytest.mark.parametrize(("path", "number", "args"), COMMANDS)
def test_documented_command_parses(
    parser: argparse.ArgumentParser, path: Path, number: int, args: str
) -> None:
    argv = normalise(args)
    error = parse_error(parser, argv)
    assert error is None, (
        f"{path.relative_to(ROOT)}:{number}: `rstpm {args}` (parsed as {shlex.join(argv)}): {error}"
    )


def test_readme_names_every_subcommand() -> None:
    named = {normalise(args)[0] for _, args in command_lines(README) if normalise(args)}
    missing = [name for name in subcommands() if name not in named]
    assert not missing, f"README.md has no `rstpm` command line for: {', '.join(missing)}"


REFUSED_BY_BENCH = {"--students-from", "--workers"}
"""Fit options `rstpm bench` accepts from the shared parser but refuses with a one-line error."""


def test_readme_synopsis_names_every_option_of_every_command() -> None:
    """The README's synopsis is checked against the parser: an option added to a command and
    not to its synopsis line fails here."""
    named: dict[str, set[str]] = {}
    for _, args in command_lines(README):
        argv = normalise(args)
        if argv:
            named.setdefault(argv[0], set()).update(a for a in argv if a.startswith("--"))
    sub = next(a for a in docs_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        options = {o for a in command._actions for o in a.option_strings if o.startswith("--")}
        options -= {"--help"} | (REFUSED_BY_BENCH if name == "bench" else set())
        missing = sorted(options - named.get(name, set()))
        assert not missing, f"README.md's synopsis of `rstpm {name}` lacks {', '.join(missing)}"


def test_commands_are_found() -> None:
    assert len(command_lines(README)) >= 10


def test_extraction_and_normalisation(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "rstpm fit --out outside-a-fence\n"
        "```bash\n"
        "rstpm test --run RUN_DIR --data CAT [--variant stpm|st] [--out DIR]   # comment\n"
        "           [--data LABELLED_DIR [--masks DIR]] [any fit option]\n"
        "$ rstpm fit --data a b \\\n"
        "      --epochs 10   # continued\n"
        "TOKEN=$(cat key) time .venv/bin/rstpm predict --run R IMAGES... --ray [...] | jq .\n"
        "rstpm fit --data ... --out /runs --ray auto; echo done\n"
        "python -c 'rstpm fit'\n"
        "```\n"
        "rstpm demo\n"
    )
    found = command_lines(doc)
    assert [number for number, _ in found] == [3, 5, 7, 8]
    assert [normalise(args) for _, args in found] == [
        "test --run RUN_DIR --data CAT --variant stpm --out DIR --data LABELLED_DIR --masks "
        "DIR".split(),
        "fit --data a b --epochs 10".split(),
        "predict --run R IMAGES --ray".split(),
        "fit --data X --out /runs --ray auto".split(),
    ]


@pytest.mark.parametrize(
    ("args", "ok"),
    [
        ("fit --data CAT --out RUN_DIR --epochs N --variant-free", False),
        ("fit --data CAT --out RUN_DIR --epochs N [--schedule fast|paper]", True),
        ("fit --data CAT --out RUN_DIR --epochs ten", False),
        ("fit --data CAT --out RUN_DIR --epoch 3", False),
        ("test --run R --data D --variant V", True),
        ("test --run R --data D --variant fulll", False),
        ("predict PATH", False),  # --run is required
        ("fitt --data D", False),
        ("serve --run line1=runs/bottle [--host 127.0.0.1]", True),
        ("fit --help", True),
    ],
)
def test_parse_catches_bad_commands(parser: argparse.ArgumentParser, args: str, ok: bool) -> None:
    assert (parse_error(parser, normalise(args)) is None) is ok
