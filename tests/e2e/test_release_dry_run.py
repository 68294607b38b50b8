"""The release dry run: six artefacts build, pass twine, install into a fresh venv and run --version."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from micboard.shared import __version__

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_release_dry_run_builds_installs_and_runs(tmp_path: Path) -> None:
    if shutil.which("bash") is None:  # pragma: no cover - every supported platform has bash
        pytest.skip("bash is needed for scripts/release_dry_run.sh")
    dist = tmp_path / "dist"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "release_dry_run.sh")],
        cwd=ROOT,
        env={**os.environ, "DIST_DIR": str(dist)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    artefacts = sorted(p.name for p in dist.iterdir())
    assert len([a for a in artefacts if a.endswith(".whl")]) == 3, artefacts
    assert len([a for a in artefacts if a.endswith(".tar.gz")]) == 3, artefacts
    assert f"micboard-agent {__version__}" in result.stdout
    assert f"micboard-collector {__version__}" in result.stdout
