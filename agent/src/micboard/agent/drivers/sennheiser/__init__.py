"""Sennheiser Sound Control Protocol v1 (JSON over UDP 45): EW-DX EM 2 / EM 4 and EM 6000."""

from micboard.agent.drivers.sennheiser.driver import SscDriver
from micboard.agent.drivers.sennheiser.simulator import SSC_SIMULATOR_KINDS, SscSimulator

__all__ = ["SSC_SIMULATOR_KINDS", "SscDriver", "SscSimulator"]
