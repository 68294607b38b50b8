#!/usr/bin/env python3
"""Set-up and everyday tasks with nothing but Python >= 3.11: ``python3 tasks.py demo|test|check|...``.

Each task creates the virtual environment in ``.venv`` (once) and installs the three
distributions and the development tools into it from the project's own files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".micboard-installed"
INSTALL_INPUTS = [
    "pyproject.toml",
    "shared/pyproject.toml",
    "agent/pyproject.toml",
    "collector/pyproject.toml",
]


def run(*cmd: str | Path, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run a command from the project root, echoing it.

    Ctrl-C lets the command stop by itself (the demo stops its services in order) instead of
    killing it a moment later, and ends without a traceback.
    """
    print("+", " ".join(str(c) for c in cmd), flush=True)
    process = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env)
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        returncode = _interrupted(process)
    if check and returncode != 0:
        sys.exit(returncode)
    return returncode


def _interrupted(process: subprocess.Popen[bytes]) -> int:
    # From a terminal, the command got the Ctrl-C too; otherwise (a signal to this process
    # alone) it is passed on after a moment. Then wait for the command's own shutdown.
    try:
        try:
            return process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
        return process.wait(timeout=30)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        return process.wait()


def _inputs_digest() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create ``.venv`` and install everything the demo and the tests need, when inputs changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before any venv exists
        sys.exit(f"micboard needs Python >= 3.11, this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _inputs_digest() and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    # PEP 735 dependency groups need a recent pip.
    run(PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip>=25.1")
    run(
        PYTHON,
        "-m",
        "pip",
        "install",
        "--quiet",
        "-e",
        "shared[embedded]",
        "-e",
        "agent",
        "-e",
        "collector",
        "--group",
        "dev",
    )
    STAMP.write_text(_inputs_digest())


def task_demo(args: list[str]) -> int:
    """Run the demo: embedded nats-server, collector on SQLite, an agent; prints the URL to open."""
    ensure_venv()
    return run(PYTHON, ROOT / "scripts" / "demo.py", *args, check=False)


def task_test(args: list[str]) -> int:
    """Run the whole test suite with the coverage gate."""
    ensure_venv()
    return run(PYTHON, "-m", "pytest", "--cov", "--cov-report=term", "--cov-report=xml", *args, check=False)


def task_load(args: list[str]) -> int:
    """Run the load tests (marked ``load``), which the default suite leaves out."""
    ensure_venv()
    return run(PYTHON, "-m", "pytest", "-m", "load", *args, check=False)


def task_lint(_args: list[str]) -> int:
    """ruff over the whole tree."""
    ensure_venv()
    return run(PYTHON, "-m", "ruff", "check", ".", check=False)


def task_typecheck(_args: list[str]) -> int:
    """mypy --strict over the three packages, the tests, benchmarks and scripts."""
    ensure_venv()
    return run(PYTHON, "-m", "mypy", check=False)


SOURCE_TREES = ("shared/src", "agent/src", "collector/src")


def task_security(_args: list[str]) -> int:
    """bandit over the shipped code (each accepted finding is justified inline)."""
    ensure_venv()
    return run(PYTHON, "-m", "bandit", "-q", "-c", "pyproject.toml", "-r", *SOURCE_TREES, check=False)


def task_docstrings(_args: list[str]) -> int:
    """interrogate: docstring coverage of the shipped code (settings in pyproject.toml)."""
    ensure_venv()
    return run(PYTHON, "-m", "interrogate", "-c", "pyproject.toml", *SOURCE_TREES, check=False)


def _coverage_percent() -> str:
    report = ROOT / "coverage.xml"
    if not report.exists():
        return "n/a"
    head = report.read_text(encoding="utf-8")[:2000]
    marker = 'line-rate="'
    start = head.find(marker)
    if start < 0:
        return "n/a"
    rate = float(head[start + len(marker) : head.index('"', start + len(marker))])
    return f"{rate * 100:.1f} % of lines"


def task_check(args: list[str]) -> int:
    """Every quality gate (lint, types, security, docstrings, tests with coverage) and one table."""
    gates: list[tuple[str, str, TaskFn]] = [
        ("lint", "ruff check, project rule set incl. security rules", task_lint),
        ("types", "mypy --strict over packages, tests, bench, scripts", task_typecheck),
        ("security", "bandit over shared/agent/collector", task_security),
        ("docstrings", "interrogate >= 95 %", task_docstrings),
        ("tests", "pytest, branch coverage >= 95 % (gate in pyproject.toml)", task_test),
    ]
    results = []
    for name, what, task in gates:
        status = task(args if task is task_test else [])
        results.append((name, what, status))
    print(f"\n{'gate':<11} {'check':<52} result")
    for name, what, status in results:
        extra = f" ({_coverage_percent()})" if name == "tests" else ""
        print(f"{name:<11} {what:<52} {'pass' if status == 0 else 'FAIL'}{extra}")
    return 0 if all(status == 0 for _n, _w, status in results) else 1


def task_bench(args: list[str]) -> int:
    """Run every benchmark in ``bench/`` (or those named) and print one table of their figures."""
    ensure_venv()
    status = 0
    rows: list[dict[str, object]] = []
    wanted = set(args)
    for script in sorted((ROOT / "bench").glob("*.py")):
        # report.py and pg.py are helpers the benchmarks import, not benchmarks.
        if script.stem in ("report", "pg") or (wanted and script.stem not in wanted):
            continue
        print(f"+ {PYTHON} {script}", flush=True)
        proc = subprocess.Popen([str(PYTHON), str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("@@bench "):
                rows.append(json.loads(line.removeprefix("@@bench ")))
            else:
                print(line, end="", flush=True)
        status |= proc.wait()
    print(f"\n{'bench':<10} {'figure':<44} {'value':>14} {'unit':<10} goal")
    for row in rows:
        value = row["value"]
        shown = f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"
        print(f"{row['bench']!s:<10} {row['metric']!s:<44} {shown:>14} {row['unit']!s:<10} {row['goal']}")
    return status


def task_install(_args: list[str]) -> int:
    """Create or refresh ``.venv`` only."""
    ensure_venv()
    return 0


TaskFn = Callable[[list[str]], int]

TASKS: dict[str, TaskFn] = {
    "demo": task_demo,
    "test": task_test,
    "lint": task_lint,
    "typecheck": task_typecheck,
    "check": task_check,
    "load": task_load,
    "security": task_security,
    "docstrings": task_docstrings,
    "bench": task_bench,
    "install": task_install,
}


def main() -> int:
    """Parse the task name and run it with the remaining arguments."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the task (e.g. pytest options)")
    ns = parser.parse_args()
    return int(TASKS[ns.task](ns.args))


if __name__ == "__main__":
    sys.exit(main())
