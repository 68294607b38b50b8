"""Shure receivers that speak command strings over TCP 2202: ULX-D, QLX-D, Axient Digital, SLX-D."""

from __future__ import annotations

from .driver import ShureDriver
from .simulator import SIMULATOR_KINDS as SHURE_SIMULATOR_KINDS
from .simulator import ShureSimulator

__all__ = ["SHURE_SIMULATOR_KINDS", "ShureDriver", "ShureSimulator"]
