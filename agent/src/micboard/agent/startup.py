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
from micboard.shared.errors import ErrorCode, MicboardError


class StartError(MicboardError):
    """A part of the agent could not start; ``what`` names it, ``reason`` says why.

    Code ``agent.start_failed``. Its text is ``<what>: <reason>`` without the code: the one
    line ``micboard-agent run`` prints after "cannot start:".
    """

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(ErrorCode.AGENT_START_FAILED, f"{what}: {reason}")
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return self.message


def _reason(exc: BaseException) -> str:
    # A micboard error's message, without its code: the reason reads as one sentence.
    text = exc.message if isinstance(exc, MicboardError) else str(exc)
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
