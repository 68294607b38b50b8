"""Framing and parsing of Shure command strings: ``< VERB [channel] PARAM [index] [value] >``.

The reader splits the byte stream on ``>``, keeps a bounded remainder for a message cut across
reads, and turns every message into a typed tuple. It never raises on device bytes: junk,
truncation, non-ASCII and oversized lines are counted and skipped.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_MAX_LINE_BYTES = 64 * 1024


class Rep(NamedTuple):
    """A reply or unsolicited change report: ``< REP [ch] PARAM [index] value >``.

    ``value`` is the text inside the braces for string values, padding included.
    """

    channel: int | None
    param: str
    position: int | None
    value: str


class RepErr(NamedTuple):
    """``< REP ERR >``: the device did not understand or refused the last command."""

    channel: int | None = None


class Sample(NamedTuple):
    """A metering line ``< SAMPLE ch ALL f1 f2 ... >``; the fields are read by the dialect."""

    channel: int
    fields: tuple[str, ...]


class Get(NamedTuple):
    """A query from a controller: ``< GET [ch] PARAM [index] >``."""

    channel: int | None
    param: str
    position: int | None


class Set(NamedTuple):
    """A change from a controller: ``< SET [ch] PARAM [index] value >``."""

    channel: int | None
    param: str
    position: int | None
    value: str


Message = Rep | RepErr | Sample | Get | Set


def _tokens(text: str) -> list[str] | None:
    # Only a brace string may hold spaces, so the common case is a plain split.
    open_at = text.find("{")
    if open_at < 0:
        return text.split()
    close_at = text.find("}", open_at)
    if close_at < 0:
        return None
    tail = text[close_at + 1 :].split()
    if tail:
        return None
    return [*text[:open_at].split(), "{" + text[open_at + 1 : close_at]]


def _number(token: str) -> int | None:
    # ``isdigit`` alone accepts non-ASCII digits; callers only pass ASCII-decoded text.
    return int(token) if token.isdigit() and len(token) <= 6 else None


def _unbrace(token: str) -> str:
    return token[1:] if token.startswith("{") else token


def parse_message(text: str) -> Message | None:
    """Parse the text between ``<`` and ``>`` (exclusive); ``None`` if it is not a message."""
    tokens = _tokens(text)
    if not tokens or len(tokens) < 2:
        return None
    verb = tokens[0]
    channel = _number(tokens[1])
    if verb == "SAMPLE":
        if channel is None or len(tokens) < 4 or tokens[2] != "ALL":
            return None
        return Sample(channel, tuple(tokens[3:]))
    if channel is None:
        if tokens[1].isdigit():
            return None
        rest = tokens[1:]
    else:
        rest = tokens[2:]
    if not rest or rest[0].startswith("{"):
        return None
    param = rest[0]
    args = rest[1:]
    if verb == "REP":
        if param == "ERR" and not args:
            return RepErr(channel)
        index, value = _index_value(args)
        if value is None:
            return None
        return Rep(channel, param, index, value)
    if verb == "GET":
        if not args:
            return Get(channel, param, None)
        if len(args) == 1:
            index = _number(args[0])
            return None if index is None else Get(channel, param, index)
        return None
    if verb == "SET":
        index, value = _index_value(args)
        if value is None:
            return None
        return Set(channel, param, index, value)
    return None


def _index_value(args: list[str]) -> tuple[int | None, str | None]:
    if len(args) == 1:
        return None, _unbrace(args[0])
    if len(args) == 2:
        index = _number(args[0])
        if index is None:
            return None, None
        return index, _unbrace(args[1])
    return None, None


class FrameReader:
    """Turns a stream of bytes into messages; bounded, and never raises on what it is fed.

    Bound: at most ``max_line_bytes`` are held while waiting for a ``>``. Policy: a longer
    line is dropped whole. Counters: ``messages``, ``parse_errors``, ``dropped_bytes``.
    """

    __slots__ = ("_buffer", "_discarding", "dropped_bytes", "max_line_bytes", "messages", "parse_errors")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = b""
        self._discarding = False
        self.messages = 0
        self.parse_errors = 0
        self.dropped_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """How many bytes wait for the ``>`` that ends their message."""
        return len(self._buffer)

    def reset(self) -> None:
        """Forget a partial message (after a reconnect the stream starts over)."""
        self._buffer = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[Message]:
        """Add ``data`` from the stream and return the complete messages it finishes."""
        if self._buffer:
            data = self._buffer + data
        parts = data.split(b">")
        tail = parts.pop()
        out: list[Message] = []
        if parts and self._discarding:
            # The rest of a line already dropped as too long; a message may start inside it.
            self._discarding = False
            first = parts[0]
            start = first.rfind(b"<")
            if start < 0:
                self.dropped_bytes += len(first) + 1
                del parts[0]
            else:
                self.dropped_bytes += start
                parts[0] = first[start:]
        limit = self.max_line_bytes
        for part in parts:
            if len(part) > limit:
                self._drop(len(part) + 1)
                continue
            message = self._parse_part(part)
            if message is not None:
                out.append(message)
        if len(tail) > limit:
            if not self._discarding:
                self.parse_errors += 1
            self.dropped_bytes += len(tail)
            self._discarding = True
            tail = b""
        self._buffer = tail
        return out

    def _drop(self, size: int) -> None:
        self.parse_errors += 1
        self.dropped_bytes += size

    def _parse_part(self, part: bytes) -> Message | None:
        start = part.rfind(b"<")
        if start < 0:
            if part.strip():
                self._drop(len(part) + 1)
            return None
        if start and part[:start].strip():
            # Junk before the start of a message: the message itself is still good.
            self.dropped_bytes += start
        try:
            text = part[start + 1 :].decode("ascii")
        except UnicodeDecodeError:
            self._drop(len(part) - start + 1)
            return None
        message = parse_message(text)
        if message is None:
            self._drop(len(part) - start + 1)
            return None
        self.messages += 1
        return message


def encode(message: Message) -> bytes:
    """The wire form of ``message``, with brace strings passed through as given."""
    if isinstance(message, Sample):
        return f"< SAMPLE {message.channel} ALL {' '.join(message.fields)} >".encode("ascii")
    if isinstance(message, RepErr):
        return b"< REP ERR >"
    parts: list[str] = []
    if isinstance(message, Rep):
        parts.append("REP")
    elif isinstance(message, Get):
        parts.append("GET")
    else:
        parts.append("SET")
    if message.channel is not None:
        parts.append(str(message.channel))
    parts.append(message.param)
    if message.position is not None:
        parts.append(str(message.position))
    if not isinstance(message, Get):
        parts.append(message.value)
    return ("< " + " ".join(parts) + " >").encode("ascii")


def brace(text: str, width: int) -> str:
    """A brace string space-padded to ``width`` as the hardware sends it: ``{Vox 1   }``."""
    return "{" + text[:width].ljust(width) + "}"
