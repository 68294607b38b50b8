"""Start-up failures of the agent, named by the part that could not start.

What the agent opens at start can fail for reasons of the host, not of the code: an interface
address the host does not have, a metrics port another process holds, a state directory it
cannot write. ``micboard-agent run`` reports such a failure as one line naming the part and
the reason (and exits non-zero) instead of a traceback that systemd would restart forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from zeroconf import Error as ZeroconfError

from micboard.agent.outbox import OutboxError


class StartError(Exception):
    """A part of the agent could not start; ``what`` names it, ``reason`` says why."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


@contextlib.contextmanager
def starting(what: str) -> Iterator[None]:
    """Turn what a part raises when the host refuses it into a :class:`StartError` naming ``what``.

    Only host-side failures are translated (sockets, the outbox, zeroconf); a bug still raises
    as itself, with its traceback.
    """
    try:
        yield
    except (OSError, OutboxError, ZeroconfError) as exc:
        raise StartError(what, _reason(exc)) from exc
