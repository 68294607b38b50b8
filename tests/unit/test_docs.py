"""The documentation matches the code: the generated API reference, the commands and the settings it names.

- docs/API.md is what ``scripts/gen_api_docs.py`` renders from the OpenAPI document;
- every ``micboard-agent``, ``micboard-collector``, ``python3 tasks.py`` and ``make`` command in a
  code block of the docs names real subcommands and options (each checked against the program's
  own ``--help``);
- every ``MICBOARD_*`` variable the docs and the example files name is a settings field.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from micboard.agent.settings import AgentSettings
from micboard.collector.settings import CollectorSettings

ROOT = Path(__file__).resolve().parents[2]

#: Markdown files whose code blocks and variables are checked.
DOC_FILES = sorted({ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("deploy/**/*.md")})
#: Example configuration that names settings.
SETTINGS_FILES = [
    ROOT / ".env.example",
    *sorted(ROOT.glob("deploy/**/*.env")),
    *sorted(ROOT.glob("systemd/*.service")),
]

#: Each program, and how to run it from this environment (``-m`` keeps the program's name).
PROGRAMS: dict[str, list[str]] = {
    "micboard-agent": [sys.executable, "-m", "micboard.agent.cli"],
    "micboard-collector": [sys.executable, "-m", "micboard.collector.cli"],
}

#: ``MICBOARD_*`` names that are not settings, with the one file that defines each.
NOT_SETTINGS: dict[str, Path] = {
    "MICBOARD_TEST_PG_DSN": ROOT / "tests" / "conftest.py",  # the test suite's PostgreSQL server
    "MICBOARD_PREFIX": ROOT / "deploy" / "pi" / "install.sh",  # install.sh options
    "MICBOARD_CONFIG_DIR": ROOT / "deploy" / "pi" / "install.sh",
    "MICBOARD_UNIT_DIR": ROOT / "deploy" / "pi" / "install.sh",
}

_FENCE = re.compile(r"^```([\w-]*)\s*$")
_SHELL_LANGUAGES = {"", "sh", "shell", "bash", "console"}
_VARIABLE = re.compile(r"\bMICBOARD_[A-Z0-9_]*[A-Z0-9]\b")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_CHOICES = re.compile(r"\{([a-z][a-z0-9_,-]*)\}")


@dataclass(frozen=True, slots=True)
class Command:
    """A command found in a doc: where, and its words."""

    where: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {' '.join(self.words)}"


def _code_blocks(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line inside a shell-like fenced code block of ``path``."""
    inside = False
    shell = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(line.strip())
        if fence:
            if inside:
                inside = False
            else:
                inside, shell = True, fence.group(1) in _SHELL_LANGUAGES
            continue
        if inside and shell:
            yield number, line


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Code block lines with backslash continuations joined and comments removed."""
    pending: list[str] = []
    start = 0
    for number, line in _code_blocks(path):
        text = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        text = text.removeprefix("$ ").strip()
        if not pending:
            start = number
        if text.endswith("\\"):
            pending.append(text[:-1])
            continue
        pending.append(text)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        if joined:
            yield start, joined


def _split_commands(text: str) -> list[list[str]]:
    """The words of each simple command of a shell line (``;``, ``&&``, ``||``, ``|`` separate them)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _segments(text: str) -> Iterator[list[str]]:
    """The simple commands of a shell line, as words; ``sh -c '...'`` is looked into."""
    try:
        commands = _split_commands(text)
    except ValueError:
        return
    for words in commands:
        while words and (words[0] == "sudo" or _ASSIGNMENT.match(words[0])):
            words = words[1:]
        if len(words) >= 3 and words[0] in ("sh", "bash") and words[1] == "-c":
            yield from _segments(words[2])
            continue
        if words:
            yield words


def _program(word: str) -> str | None:
    name = word.rsplit("/", 1)[-1]
    if name in PROGRAMS or name == "make":
        return name
    return None


def documented_commands() -> list[Command]:
    """Every checked command in the docs' code blocks."""
    found: list[Command] = []
    for path in DOC_FILES:
        for number, text in _logical_lines(path):
            for words in _segments(text):
                where = f"{path.relative_to(ROOT)}:{number}"
                if _program(words[0]) is not None:
                    found.append(Command(where, (_program(words[0]) or words[0], *words[1:])))
                elif words[0] in ("python", "python3") and len(words) > 1 and words[1] == "tasks.py":
                    found.append(Command(where, ("tasks.py", *words[2:])))
    return found


@functools.cache
def _help(program: str, path: tuple[str, ...]) -> tuple[int, str]:
    proc = subprocess.run(
        [*PROGRAMS[program], *path, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _subcommands(help_text: str) -> set[str]:
    usage = help_text.split("\n\n", 1)[0]
    found: set[str] = set()
    for choices in _CHOICES.findall(usage):
        found.update(choices.split(","))
    return found


def check_program(program: str, args: tuple[str, ...]) -> list[str]:
    """Problems with ``program args``: an unknown subcommand, or an option its --help does not list."""
    path: list[str] = []
    rest = list(args)
    code, text = _help(program, ())
    if code != 0:
        return [f"`{program} --help` exited {code}"]
    while rest and not rest[0].startswith("-"):
        choices = _subcommands(text)
        if not choices:
            break  # the remaining words are positional arguments
        word = rest.pop(0)
        if word not in choices:
            return [f"{program}: no subcommand {word!r} after {' '.join(path) or 'the program'}"]
        path.append(word)
        code, text = _help(program, tuple(path))
        if code != 0:
            return [f"`{program} {' '.join(path)} --help` exited {code}"]
    problems = []
    for word in rest:
        if word.startswith("--"):
            option = word.split("=", 1)[0]
            if re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is None:
                problems.append(f"`{program} {' '.join(path)}` has no option {option}")
    return problems


@functools.cache
def _tasks() -> set[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks.py"), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return _subcommands(proc.stdout)


@functools.cache
def _make_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_. -]+):(?!=)", line)
        if match and not line.startswith("."):
            targets.update(match.group(1).split())
    return targets


def check_command(command: Command) -> list[str]:
    """Problems with one documented command."""
    program, *args = command.words
    if program in PROGRAMS:
        return check_program(program, tuple(args))
    if program == "tasks.py":
        if not args or args[0] not in _tasks():
            return [f"tasks.py has no task {args[0] if args else '(none)'!r}"]
        return []
    # make: every target named must exist in the Makefile and be a task of tasks.py.
    targets = [a for a in args if not a.startswith("-") and not _ASSIGNMENT.match(a)]
    return [
        f"make has no target {target!r}"
        for target in targets
        if target not in _make_targets() or target not in _tasks()
    ]


def test_api_reference_is_up_to_date() -> None:
    """docs/API.md is what the generator renders from the current OpenAPI document."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        "docs/API.md is out of date: run `python scripts/gen_api_docs.py`\n" + proc.stdout + proc.stderr
    )


def test_the_docs_show_commands() -> None:
    """The scan finds the commands the docs are known to show (so the next test is not vacuous)."""
    shown = {" ".join(c.words[:3]) for c in documented_commands()}
    assert "micboard-collector token create" in shown
    assert "micboard-agent discover --interface" in shown
    assert "tasks.py demo" in shown
    assert any(words.startswith("make ") for words in shown)


def test_documented_commands_exist() -> None:
    """Every documented command names subcommands and options the program really has."""
    problems = [
        f"{command}: {problem}" for command in documented_commands() for problem in check_command(command)
    ]
    assert not problems, "\n".join(problems)


def test_the_command_check_refuses_what_does_not_exist() -> None:
    """The checker itself: an unknown subcommand, option or task is reported."""
    assert check_program("micboard-collector", ("token", "create", "--role", "admin")) == []
    assert check_program("micboard-collector", ("token", "frobnicate"))
    assert check_program("micboard-collector", ("token", "create", "--colour", "red"))
    assert check_program("micboard-agent", ("discover", "--no-such-option"))
    assert check_command(Command("test", ("tasks.py", "nonsense")))
    assert check_command(Command("test", ("make", "nonsense")))


def _setting_names() -> set[str]:
    fields = set(AgentSettings.model_fields) | set(CollectorSettings.model_fields)
    return {f"MICBOARD_{name.upper()}" for name in fields}


def _variables(path: Path) -> set[str]:
    return set(_VARIABLE.findall(path.read_text(encoding="utf-8")))


def test_documented_variables_are_settings() -> None:
    """Every MICBOARD_* variable in the docs and example files is a field of the agent or collector."""
    settings = _setting_names()
    problems = []
    for path in [*DOC_FILES, *SETTINGS_FILES]:
        for name in sorted(_variables(path)):
            # Nested settings use the delimiter "__": MICBOARD_<FIELD>__<KEY>.
            field = name.split("__", 1)[0]
            if field in settings or name in NOT_SETTINGS:
                continue
            problems.append(f"{path.relative_to(ROOT)}: {name} is not a setting of the agent or collector")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(NOT_SETTINGS))
def test_the_exceptions_are_real(name: str) -> None:
    """Each non-setting variable the docs may name is used where the list says, and is not a setting."""
    assert name in NOT_SETTINGS[name].read_text(encoding="utf-8")
    assert name not in _setting_names()
