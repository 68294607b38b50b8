#!/usr/bin/env python3
"""Command-line entry for the CalVer bump; the logic lives in ``bump_version.py`` beside it."""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__":
    # scripts/ is not a package: make the module beside this file importable wherever we run from.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(importlib.import_module("bump_version").main())
