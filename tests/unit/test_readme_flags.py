"""Every `--flag` README.md mentions for fedrec is an option that `fedrec <command> --help` lists.

Flags are read from README.md's text: its code blocks (one logical line at a time, comments
included) and its inline code spans and prose. A flag is attributed to the nearest command
written before it in the same line or span: after `fedrec train` it must be among
`fedrec train --help`'s options, after `fedrec server start` among that command's, and so on. A
flag with no command before it (prose such as "`--eval-every N` evaluates every N rounds")
must be an option of some fedrec command. Flags after another program's name (`mlflow`,
`prefect`, `dask`, `curl`, `git`, `make`'s recipes, `uv sync`, ...) belong to that program
and are not checked here.

The options of each command are read from its `--help` output (click's option lines), so a flag
that exists but is hidden from the help counts as missing, as it does for a reader. Every
`fedrec COMMAND` and `make TARGET` written in the README's code (blocks and spans) must exist too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedrec.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"

# a flag, or a family of them ("the `--neural-*` settings")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?:-\*)?")
# a program in command position (a line's start, after `uv run`, a pipe, `;`, `&&`, `$(`, `#`,
# `then: ` or an environment assignment), whose flags follow it; fedrec's subcommands follow
# "fedrec" (not a value such as `--side after:fedrec`)
PROGRAM = re.compile(
    r"(?:^|[|;&(#]|:(?=\s)|\buv run|\S=\S*)\s*"
    r"(fedrec|mlflow|prefect|dask|curl|git|make|pip|python3?|pytest|ruff|uv (?:sync|add|pip))"
    r"(?![\w-])"
)
OPTION_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}|$)")


def command_options(path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    """Each fedrec command path (``("train",)``, ``("server", "start")``) with the long options
    its ``--help`` lists; groups map to their own options and recurse into their commands."""
    runner = CliRunner()
    result = runner.invoke(main, [*path, "--help"], prog_name="fedrec")
    assert result.exit_code == 0, result.output
    options: set[str] = set()
    commands: list[str] = []
    section = None
    for line in result.output.splitlines():
        if line and not line.startswith(" "):
            section = line.rstrip(":")
            continue
        if section == "Commands":
            name = line.split()[0] if line.strip() else ""
            if name and line.startswith("  ") and not line.startswith("   "):
                commands.append(name)
            continue
        match = OPTION_LINE.match(line)
        if match:
            options.update(FLAG.findall(match.group(1)))
    found = {path: options}
    for name in commands:
        found |= command_options((*path, name))
    return found


def _segments(text: str, with_prose: bool = True) -> list[tuple[int, str]]:
    """README's text as (line number, segment) pairs: each logical line of a code block (with
    backslash continuations joined), each inline code span (which may run over two lines of a
    paragraph), and (``with_prose``) each prose line without its code spans."""
    segments: list[tuple[int, str]] = []
    in_block, pending, pending_line = False, "", 0
    paragraph: list[str] = []
    paragraph_line = 0

    def prose() -> None:
        body = "\n".join(paragraph)
        for span in re.finditer(r"`([^`]+)`", body):
            line = paragraph_line + body[: span.start()].count("\n")
            segments.append((line, span.group(1).replace("\n", " ")))
        rest = re.sub(r"`[^`]+`", lambda m: "\n" * m.group().count("\n"), body)
        if with_prose:
            segments.extend(
                (paragraph_line + offset, line) for offset, line in enumerate(rest.split("\n"))
            )
        paragraph.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            prose()
            in_block = not in_block
            continue
        if in_block:
            if not pending:
                pending_line = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            segments.append((pending_line, pending + line))
            pending = ""
        elif line.strip():
            if not paragraph:
                paragraph_line = number
            paragraph.append(line)
        else:
            prose()
    prose()
    return segments


def _subcommand(words: list[str], commands: dict[tuple[str, ...], set[str]]) -> tuple[str, ...]:
    """The longest fedrec command path spelled by the words after ``fedrec``."""
    path: tuple[str, ...] = ()
    for word in words:
        if (*path, word) in commands:
            path = (*path, word)
        else:
            break
    return path


def readme_flags(
    text: str, commands: dict[tuple[str, ...], set[str]]
) -> list[tuple[int, tuple[str, ...] | None, str]]:
    """(line, fedrec command path or None for "any fedrec command", flag) for every flag README
    attributes to fedrec; flags after another program's name are left out. "fedrec" without a
    command after it (prose: "fedrec's server") names no command."""
    found = []
    for number, segment in _segments(text):
        owners = [(m.start(1), m) for m in PROGRAM.finditer(segment)]
        for flag in FLAG.finditer(segment):
            before = [m for start, m in owners if start < flag.start()]
            if not before:
                found.append((number, None, flag.group()))
                continue
            program = before[-1]
            if program.group(1) != "fedrec":
                continue
            words = segment[program.end(1) : flag.start()].split()
            found.append((number, _subcommand(words, commands) or None, flag.group()))
    return found


@pytest.fixture(scope="module")
def commands() -> dict[tuple[str, ...], set[str]]:
    return command_options()


def test_the_help_lists_the_commands_and_options_it_is_checked_against(commands):
    assert {("train",), ("recommend",), ("predict",), ("serve",), ("server", "start")} <= set(
        commands
    )
    assert {"--data", "--rounds", "--dp-epsilon", "--no-warm-start"} <= commands[("train",)]
    assert "--grace" in commands[("server", "stop")] and "--grace" not in commands[("train",)]


def test_the_extraction_attributes_flags_to_their_command(commands):
    text = (
        "Run `uv run fedrec server stop --grace 3` or `--eval-every N`; `uv run python -m\n"
        "benchmarks.secagg --degree 4` is not fedrec's.\n"
        "```bash\n"
        "uv run fedrec train --data x.csv \\\n"
        "    --rounds 2   # or --seed 1\n"
        "uv run mlflow models serve -m m --env-manager local\n"
        "uv run fedrec train --task-runner dask --dask-address tcp://h:8786\n"
        "make deploy   # then: prefect --no-prompt deploy\n"
        "```\n"
    )

    found = readme_flags(text, commands)

    assert found == [
        (1, ("server", "stop"), "--grace"),
        (1, None, "--eval-every"),
        (4, ("train",), "--data"),
        (4, ("train",), "--rounds"),
        (4, ("train",), "--seed"),
        (7, ("train",), "--task-runner"),
        (7, ("train",), "--dask-address"),
    ]


def test_a_flag_that_no_command_has_is_reported(commands):
    text = (
        "A failed task is retried `--task-retries` times; `fedrec recommend --pairs p.csv`.\n"
        "The `--neural-*` settings, not the `--neutral-*` ones.\n"
    )

    found = readme_flags(text, commands)

    missing = [(flag, path) for _, path, flag in found if not _exists(flag, path, commands)]
    assert missing == [
        ("--task-retries", None),
        ("--pairs", ("recommend",)),
        ("--neutral-*", None),
    ]


def _exists(flag: str, path: tuple[str, ...] | None, commands) -> bool:
    groups = commands.values() if path is None else [commands[path]]
    if flag.endswith("-*"):
        return any(option.startswith(flag[:-1]) for options in groups for option in options)
    return any(flag in options for options in groups)


def test_every_flag_in_the_readme_is_an_option_of_its_command(commands):
    found = readme_flags(README.read_text(encoding="utf-8"), commands)

    missing = [
        f"README.md:{line}: {flag} is not an option of "
        + ("any fedrec command" if path is None else f"`fedrec {' '.join(path)}`")
        for line, path, flag in found
        if not _exists(flag, path, commands)
    ]
    assert len(found) > 100  # the extraction reads the README's flags, not nothing
    assert not missing, "\n".join(missing)


# in command position, as PROGRAM: prose's "to make a copy" is not a target
MAKE_TARGET = re.compile(r"(?:^|[|;&(#:])\s*make ([a-z][a-z0-9-]*)")
FEDREC_COMMAND = re.compile(r"(?:^|[|;&(#:]|\buv run)\s*fedrec ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?")


def test_every_make_target_and_fedrec_command_in_the_readme_exists(commands):
    text = README.read_text(encoding="utf-8")
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))
    groups = {path[0] for path in commands if len(path) == 2}

    code = _segments(text, with_prose=False)  # prose's "fedrec trains" names no command
    named = {m[1] for _, segment in code for m in MAKE_TARGET.finditer(segment)}
    spelled = [
        (number, m[1], m[2]) for number, segment in code for m in FEDREC_COMMAND.finditer(segment)
    ]

    assert {"demo", "test", "mlflow-ui", "deploy"} <= named  # the extraction finds them
    assert named <= targets, f"README names make targets the Makefile lacks: {named - targets}"
    wrong = [
        f"README.md:{number}: fedrec {command} {sub or ''}".strip()
        for number, command, sub in spelled
        if (command,) not in commands or (command in groups and (command, sub) not in commands)
    ]
    assert len(spelled) > 20 and not wrong, "\n".join(wrong)
