"""One line per figure that ``tasks.py bench`` collects into a single table.

Each benchmark prints its own human-readable output and, for every headline figure, one
``@@bench {json}`` line made by :func:`emit`.
"""

from __future__ import annotations

import json

MARKER = "@@bench"


def emit(bench: str, metric: str, value: float, unit: str, goal: str = "") -> None:
    """Print one machine-readable figure: which benchmark, what, how much, in what, against what."""
    record = {"bench": bench, "metric": metric, "value": value, "unit": unit, "goal": goal}
    print(f"{MARKER} {json.dumps(record)}", flush=True)
