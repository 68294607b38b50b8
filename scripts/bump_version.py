"""Bump the CalVer version shared by micboard-shared, micboard-agent and micboard-collector.

Versions are ``YY.MM.DD`` (the release date) with ``.N`` appended for a second, third, ...
release on the same day: ``26.11.28``, ``26.11.28.1``, ``26.11.28.2``, ``26.11.29``.

Usage::

    python scripts/bump-version.py [--date YYYY-MM-DD] [--dry-run] [--root DIR] [VERSION]
    python scripts/bump-version.py --current

Without ``VERSION`` the next version is computed from today's date (or ``--date``). Every place
the version lives is rewritten together: the ``[project] version`` of the three
``pyproject.toml`` files, the ``micboard-shared==X`` pins (``micboard-shared[embedded]==X``
included) of the agent and the collector, and ``__version__`` in ``micboard.shared``. A
``## [VERSION] - YYYY-MM-DD`` heading is written under ``## [Unreleased]`` in ``CHANGELOG.md``,
so what was unreleased becomes that release's notes.

Exit codes: 0 done, 1 the tree is not as expected (a file or marker is missing, the files
disagree on the current version), 2 the bump is refused (the new version is not after the
current one, or it is not a valid CalVer version) or the command line is wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_OK = 0
EXIT_TREE = 1
EXIT_REFUSED = 2

CHANGELOG = "CHANGELOG.md"
UNRELEASED_HEADING = "## [Unreleased]"

_CALVER_RE = re.compile(r"^(?P<yy>\d{2})\.(?P<mm>\d{2})\.(?P<dd>\d{2})(?:\.(?P<n>[1-9]\d*))?$")
_PROJECT_TABLE_RE = re.compile(r"(?ms)^\[project\][^\n]*\n(?P<body>.*?)(?=^\[|\Z)")
_PROJECT_VERSION_RE = re.compile(r'(?m)^version\s*=\s*"(?P<v>[^"]*)"')
_SHARED_PIN_RE = re.compile(r'"micboard-shared(?:\[[^\]"]*\])?\s*==\s*(?P<v>[^";\s]*)')
_DUNDER_VERSION_RE = re.compile(r'(?m)^__version__\s*=\s*"(?P<v>[^"]*)"')


class VersionRefusedError(Exception):
    """The requested version is invalid or does not come after the current one."""


class TreeError(Exception):
    """The source tree does not hold the version where it is expected to."""


@dataclass(frozen=True, order=True)
class CalVer:
    """A ``YY.MM.DD[.N]`` version; ``serial`` 0 stands for no ``.N`` suffix."""

    year: int
    month: int
    day: int
    serial: int = 0

    @classmethod
    def parse(cls, text: str) -> CalVer:
        """Parse the canonical form (two-digit fields, no ``.0``); raise VersionRefusedError."""
        match = _CALVER_RE.match(text)
        if match is None:
            raise VersionRefusedError(
                f"{text!r} is not a CalVer version: expected YY.MM.DD or YY.MM.DD.N "
                "(two digits each, N >= 1), e.g. 26.11.28 or 26.11.28.1"
            )
        version = cls(
            year=2000 + int(match["yy"]),
            month=int(match["mm"]),
            day=int(match["dd"]),
            serial=int(match["n"] or 0),
        )
        try:
            version.release_date()
        except ValueError as exc:
            raise VersionRefusedError(f"{text!r} does not name a real date: {exc}") from exc
        return version

    @classmethod
    def for_date(cls, day: dt.date, serial: int = 0) -> CalVer:
        """The version of a release on ``day`` (the ``serial``-th extra one that day)."""
        if not 2000 <= day.year <= 2099:
            raise VersionRefusedError(f"{day.isoformat()} is outside the two-digit years 2000-2099")
        return cls(year=day.year, month=day.month, day=day.day, serial=serial)

    def release_date(self) -> dt.date:
        """The calendar date the version names."""
        return dt.date(self.year, self.month, self.day)

    def __str__(self) -> str:
        """Render the canonical text form."""
        text = f"{self.year % 100:02d}.{self.month:02d}.{self.day:02d}"
        return f"{text}.{self.serial}" if self.serial else text


def next_version(current: CalVer, today: dt.date) -> CalVer:
    """The version to release on ``today`` after ``current``; refuse if ``current`` is later."""
    candidate = CalVer.for_date(today)
    if candidate.release_date() == current.release_date():
        return CalVer.for_date(today, serial=current.serial + 1)
    if candidate < current:
        raise VersionRefusedError(
            f"current version {current} is dated after {today.isoformat()}; "
            "refusing to go backwards (pass --date or an explicit VERSION)"
        )
    return candidate


def check_newer(current: CalVer, proposed: CalVer) -> None:
    """Raise VersionRefusedError unless ``proposed`` comes strictly after ``current``."""
    if proposed == current:
        raise VersionRefusedError(f"version {proposed} is the current version; nothing to bump")
    if proposed < current:
        raise VersionRefusedError(f"version {proposed} is older than the current {current}; refusing")


@dataclass(frozen=True)
class VersionSite:
    """One kind of place in one file where the version is written."""

    path: str
    what: str
    pattern: re.Pattern[str]
    project_table_only: bool = False


VERSION_SITES: tuple[VersionSite, ...] = (
    VersionSite("shared/pyproject.toml", "[project] version", _PROJECT_VERSION_RE, project_table_only=True),
    VersionSite("agent/pyproject.toml", "[project] version", _PROJECT_VERSION_RE, project_table_only=True),
    VersionSite("agent/pyproject.toml", "micboard-shared pin", _SHARED_PIN_RE),
    VersionSite(
        "collector/pyproject.toml", "[project] version", _PROJECT_VERSION_RE, project_table_only=True
    ),
    VersionSite("collector/pyproject.toml", "micboard-shared pin", _SHARED_PIN_RE),
    VersionSite("shared/src/micboard/shared/__init__.py", "__version__", _DUNDER_VERSION_RE),
)


@dataclass(frozen=True)
class Occurrence:
    """A version found in a file: where it sits (character span) and what it says."""

    site: VersionSite
    start: int
    end: int
    value: str


def find_occurrences(site: VersionSite, text: str) -> list[Occurrence]:
    """Every match of ``site`` in ``text``; raise TreeError when there is none."""
    offset = 0
    region = text
    if site.project_table_only:
        table = _PROJECT_TABLE_RE.search(text)
        if table is None:
            raise TreeError(f"{site.path}: no [project] table")
        offset = table.start("body")
        region = table["body"]
    found = [
        Occurrence(site, offset + m.start("v"), offset + m.end("v"), m["v"])
        for m in site.pattern.finditer(region)
    ]
    if not found:
        raise TreeError(f"{site.path}: no {site.what} found")
    return found


def read_current(root: Path) -> tuple[CalVer, dict[str, str], list[Occurrence]]:
    """Read every version site; return the version they agree on, the file texts and the sites."""
    texts: dict[str, str] = {}
    occurrences: list[Occurrence] = []
    for site in VERSION_SITES:
        if site.path not in texts:
            path = root / site.path
            try:
                texts[site.path] = path.read_text(encoding="utf-8")
            except FileNotFoundError as exc:
                raise TreeError(f"{site.path}: file not found under {root}") from exc
        occurrences.extend(find_occurrences(site, texts[site.path]))
    values = {occ.value for occ in occurrences}
    if len(values) != 1:
        listing = "\n".join(f"  {occ.site.path}: {occ.site.what} = {occ.value}" for occ in occurrences)
        raise TreeError(f"the files disagree on the current version:\n{listing}")
    (value,) = values
    try:
        current = CalVer.parse(value)
    except VersionRefusedError as exc:
        raise TreeError(f"the current version is not valid CalVer: {exc}") from exc
    return current, texts, occurrences


def rewrite(text: str, occurrences: Sequence[Occurrence], new: str) -> str:
    """Replace each occurrence's span in ``text`` with ``new`` (spans must belong to ``text``)."""
    for occ in sorted(occurrences, key=lambda o: o.start, reverse=True):
        text = text[: occ.start] + new + text[occ.end :]
    return text


def add_changelog_heading(text: str, version: CalVer, day: dt.date) -> str:
    """Insert ``## [version] - day`` right under ``## [Unreleased]``; raise TreeError if impossible."""
    lines = text.splitlines(keepends=True)
    heading = f"## [{version}] - {day.isoformat()}"
    if any(line.startswith(f"## [{version}]") for line in lines):
        raise TreeError(f"{CHANGELOG}: already has a heading for {version}")
    for index, line in enumerate(lines):
        if line.rstrip() == UNRELEASED_HEADING:
            newline = "\r\n" if line.endswith("\r\n") else "\n"
            lines[index + 1 : index + 1] = [newline, heading + newline]
            return "".join(lines)
    raise TreeError(f"{CHANGELOG}: no '{UNRELEASED_HEADING}' heading to release from")


def unreleased_is_empty(text: str) -> bool:
    """Whether nothing but blank lines sits between ``## [Unreleased]`` and the next ``## `` heading."""
    in_section = False
    for line in text.splitlines():
        if line.rstrip() == UNRELEASED_HEADING:
            in_section = True
        elif in_section and line.startswith("## "):
            return True
        elif in_section and line.strip():
            return False
    return True


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader never sees a half-written file."""
    mode = path.stat().st_mode & 0o777
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class BumpPlan:
    """What a bump will do: the versions, the release date and each file's new text."""

    current: CalVer
    new: CalVer
    release_date: dt.date
    new_texts: dict[str, str]
    changes: list[str]
    warnings: list[str]


def plan_bump(root: Path, today: dt.date, requested: str | None) -> BumpPlan:
    """Work out the new version and every file's new text without writing anything."""
    current, texts, occurrences = read_current(root)
    if requested is None:
        new = next_version(current, today)
    else:
        new = CalVer.parse(requested)
        check_newer(current, new)
    release_date = new.release_date()
    new_texts: dict[str, str] = {}
    changes: list[str] = []
    for path in texts:
        mine = [occ for occ in occurrences if occ.site.path == path]
        new_texts[path] = rewrite(texts[path], mine, str(new))
        changes.extend(f"{path}: {occ.site.what} {occ.value} -> {new}" for occ in mine)
    changelog_path = root / CHANGELOG
    try:
        changelog = changelog_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise TreeError(f"{CHANGELOG}: file not found under {root}") from exc
    warnings: list[str] = []
    if unreleased_is_empty(changelog):
        warnings.append(f"{CHANGELOG}: the Unreleased section is empty; {new} will have no notes")
    new_texts[CHANGELOG] = add_changelog_heading(changelog, new, release_date)
    changes.append(f"{CHANGELOG}: added '## [{new}] - {release_date.isoformat()}' under {UNRELEASED_HEADING}")
    return BumpPlan(current, new, release_date, new_texts, changes, warnings)


def apply_plan(root: Path, plan: BumpPlan) -> None:
    """Write every file of ``plan``."""
    for path, text in plan.new_texts.items():
        write_atomic(root / path, text)


def _parse_date(text: str) -> dt.date:
    """Argparse type for ``--date``."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="bump-version.py",
        description="Bump the micboard CalVer version (YY.MM.DD[.N]) everywhere it lives.",
    )
    parser.add_argument("version", nargs="?", metavar="VERSION", help="explicit new version")
    parser.add_argument(
        "--date", type=_parse_date, help="release date to compute the version from (default: today)"
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    parser.add_argument(
        "--current", action="store_true", help="print the current version (after checking the files agree)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="repository root (default: the parent of scripts/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    args = build_parser().parse_args(argv)
    root: Path = args.root
    try:
        if args.current:
            current, _, _ = read_current(root)
            print(current)
            return EXIT_OK
        today: dt.date = args.date or dt.date.today()
        plan = plan_bump(root, today, args.version)
    except VersionRefusedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TREE
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    verb = "would change" if args.dry_run else "changed"
    print(f"micboard {plan.current} -> {plan.new} ({plan.release_date.isoformat()}); {verb}:")
    for change in plan.changes:
        print(f"  {change}")
    if args.dry_run:
        print("dry run: no file written")
        return EXIT_OK
    apply_plan(root, plan)
    print(f"next: review the diff and CHANGELOG.md, run 'make check', then tag v{plan.new}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
