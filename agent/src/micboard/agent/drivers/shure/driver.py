"""The driver of Shure receivers that speak command strings over TCP 2202."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random
from tenacity.wait import wait_base

from micboard.shared.envelope import CommandAction, CommandOutcome
from micboard.shared.logs import LogThrottle
from micboard.shared.model import ChannelMeter, Device, Family, Vendor

from ..base import CommandReply, DeviceListener, DeviceTarget, DriverCommand, DriverOptions, ReceiverDriver
from .dialects import Dialect, dialect_for
from .protocol import FrameReader, Rep, RepErr, Sample

logger = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
# A session that breaks sooner than this after reading the device in full is retried with
# backoff, so that a device that accepts and hangs up at once is not hammered. One that lasted
# longer was healthy: the backoff starts over after it.
_STABLE_SESSION_S = 1.0
#: The link-down reason of a receiver that sends values of its own but answers no question.
UNANSWERED_REASON = "silent: the receiver sends values but answered none of the driver's questions"
#: How often a session asks ``GET 0 ALL`` again when what came back is not its answer (only
#: values the receiver pushed on its own) before it goes with what it has.
_SYNC_ASKS = 3
#: How often bad device input (junk, oversized or unparseable lines, unusable values) is logged
#: again while it keeps coming: a receiver that babbles must not flood the log.
BAD_INPUT_LOG_EVERY_S = 30.0
#: The link-down reason of a receiver that answers ``REP ERR`` to ``GET 0 ALL``.
REFUSED_REASON = (
    "connect_failed: the receiver refuses control (REP ERR to GET 0 ALL); "
    "enable its Allow Third-Party Controls"
)
#: The link-down reason of an SLX-D that accepts the connection and never says a word: what it
#: does, rather than answering ``REP ERR``, until its Allow Third-Party Controls is enabled.
SLXD_MUTE_REASON = (
    "silent: the receiver accepted the connection but never answered; an SLX-D does this until "
    "its Allow Third-Party Controls is enabled"
)
# Parameters that change at metering speed: they belong to ChannelMeter, not to state.
_METER_PARAMS = frozenset({"RSSI", "CHAN_QUALITY", "METER_RATE", "AUDIO_LEVEL", "RF_LEVEL"})
_FORBIDDEN_NAME_CHARS = frozenset("{}<>")

# Every bounded wait here uses ``asyncio.timeout()``, never ``asyncio.wait_for()``: on Python 3.11
# ``wait_for`` returns the inner result when a cancellation arrives in the same loop iteration as
# that result (a SAMPLE, say), and the cancellation is lost. A cancelled driver then keeps its
# session running forever and whoever awaits it hangs.


class _LinkDownError(Exception):
    """The connection failed before the device was read in full; retried with backoff."""


@dataclass(slots=True)
class _Waiter:
    """A command waiting for the REP that confirms it."""

    channel: int | None
    param: str
    value: str
    future: asyncio.Future[CommandReply] = field(repr=False)

    def matches(self, rep: Rep) -> bool:
        return (
            rep.channel == self.channel
            and rep.param == self.param
            and rep.position is None
            and rep.value.rstrip() == self.value
        )


@dataclass(slots=True)
class _Request:
    """A request sent after the initial read, answered by one REP or one ``REP ERR``, in order.

    ``REP ERR`` names nothing, so it is matched to the oldest request still unanswered: this
    keeps the error of a metering SET or a probe (or a command that already timed out) from
    failing the command sent after it.

    ``sent_after`` is the number of reads handled when the request was written: only bytes read
    later can answer it. Without that, the ``REP n METER_RATE 00000`` of the full read, handled
    in the same read that makes the driver ask for metering, was taken for the answer to the
    metering SET; when the device then refused that SET, its ``REP ERR`` failed the next command
    and that command's own ``REP ERR`` failed the one after it.
    """

    channel: int | None
    param: str
    sent_after: int
    waiter: _Waiter | None = None

    def answered_by(self, rep: Rep, read: int) -> bool:
        if read <= self.sent_after:
            return False
        if self.waiter is not None:
            return self.waiter.matches(rep)
        return rep.channel == self.channel and rep.param == self.param


#: Requests remembered as unanswered; a device that never answers cannot grow the queue past it.
_MAX_UNANSWERED = 64


def _meter_rate(interval_ms: int) -> str:
    # The device takes 00100..65535 (00000 is off).
    return f"{min(max(interval_ms, 100), 65535):05d}"


class ShureDriver(ReceiverDriver):
    """One TCP connection to a ULX-D, QLX-D, Axient Digital or SLX-D receiver.

    Reads the full state on connect, meters every channel, applies every pushed REP, and
    reconnects with capped, jittered exponential backoff after a dead link.
    """

    def __init__(
        self,
        target: DeviceTarget,
        listener: DeviceListener,
        options: DriverOptions | None = None,
    ) -> None:
        super().__init__(target, listener, options)
        dialect = dialect_for(target.family)
        if dialect is None:
            raise ValueError(f"family {target.family} does not speak Shure command strings")
        self.dialect: Dialect = dialect
        self._frames = FrameReader(self.options.max_line_bytes)
        self._bad_values = 0
        self._bad_input_log = LogThrottle(BAD_INPUT_LOG_EVERY_S)
        self._device_raw: dict[str, str] = {}
        self._channels_raw: dict[int, dict[str, str]] = {}
        self._metered: set[int] = set()
        self._device: Device | None = None
        self._dirty = False
        self._synced = False
        self._pending_identity: list[str] = []
        # Whether this session's GET 0 ALL was answered with REPs, or refused with REP ERR.
        self._all_answered = False
        self._all_refused = False
        self._online = False
        self._link_known = False
        self._last_rx = 0.0
        self._writer: asyncio.StreamWriter | None = None
        self._waiters: list[_Waiter] = []
        self._unanswered: deque[_Request] = deque(maxlen=_MAX_UNANSWERED)
        # How many reads _handle() has taken in: orders requests against the bytes that answer them.
        self._reads = 0
        self._command_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._running = False
        self._done = asyncio.Event()

    # -- ReceiverDriver ----------------------------------------------------------------

    @property
    def device(self) -> Device | None:
        """The latest normalized state, or ``None`` before the first full read."""
        return self._device

    @property
    def online(self) -> bool:
        """Whether the device is answering now."""
        return self._online

    async def run(self) -> None:
        """Connect, read and meter, reconnecting with backoff, until cancelled or stopped."""
        if self._running:
            raise RuntimeError("ShureDriver.run() is already running")
        self._running = True
        self._done.clear()
        try:
            while not self._stopping.is_set():
                # A fresh backoff after every healthy session, however it ended (closed or
                # silent): one backoff kept for the whole run counted every failure since start,
                # so after a few drops, each after hours of good service, every blip waited the cap.
                retrying = AsyncRetrying(
                    wait=self._backoff(),
                    retry=retry_if_exception_type(_LinkDownError),
                    sleep=self._pause,
                )
                async for attempt in retrying:
                    with attempt:
                        await self._session()
        finally:
            self._close_writer()
            self._fail_waiters("driver stopped")
            self._running = False
            self._done.set()

    async def stop(self) -> None:
        """Stop politely (switch metering off, close the socket); safe to call twice."""
        self._stopping.set()
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(self._meter_off_bytes())
            self._metered.clear()
            # A device that stopped reading must not hold stop() up: every wait is bounded.
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.options.command_timeout_s):
                    await writer.drain()
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.options.command_timeout_s):
                    await writer.wait_closed()
        if self._running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.connect_timeout_s + 1.0):
                    await self._done.wait()
        self._online = False

    async def execute(self, command: DriverCommand) -> CommandReply:
        """Carry out rename / identify / mute / unmute and wait for the confirming REP."""
        dialect = self.dialect
        action = command.action
        if action is CommandAction.RENAME:
            checked = self._check_channel(command.channel)
            if checked is not None:
                return checked
            problem = self._check_name(command.value)
            if problem is not None:
                return CommandReply(CommandOutcome.INVALID, problem)
            name = (command.value or "").rstrip()
            line = f"< SET {command.channel} CHAN_NAME {dialect.format_value('CHAN_NAME', name)} >"
            waiter = (command.channel, "CHAN_NAME", name)
        elif action is CommandAction.IDENTIFY:
            if not dialect.supports_flash:
                return CommandReply(CommandOutcome.NOT_SUPPORTED, f"{dialect.family} has no FLASH")
            line = "< SET FLASH ON >"
            waiter = (None, "FLASH", "ON")
        elif action in (CommandAction.MUTE, CommandAction.UNMUTE):
            if not dialect.supports_mute:
                return CommandReply(CommandOutcome.NOT_SUPPORTED, f"{dialect.family} has no AUDIO_MUTE")
            checked = self._check_channel(command.channel)
            if checked is not None:
                return checked
            value = "ON" if action is CommandAction.MUTE else "OFF"
            line = f"< SET {command.channel} AUDIO_MUTE {value} >"
            waiter = (command.channel, "AUDIO_MUTE", value)
        else:
            return CommandReply(CommandOutcome.NOT_SUPPORTED, f"{action} is not a receiver command")
        return await self._send_and_confirm(line, *waiter)

    # -- commands ----------------------------------------------------------------------

    def _check_channel(self, channel: int | None) -> CommandReply | None:
        if channel is None:
            return CommandReply(CommandOutcome.INVALID, "a channel is required")
        if not self._online or self._device is None:
            return CommandReply(CommandOutcome.DEVICE_OFFLINE, "device is not connected")
        if self._device.channel(channel) is None:
            return CommandReply(CommandOutcome.INVALID, f"no channel {channel}")
        return None

    def _check_name(self, value: str | None) -> str | None:
        if value is None:
            return "a name is required"
        name = value.rstrip()
        if not name:
            return "a name must not be empty or blank"
        if any(not " " <= c <= "~" or c in _FORBIDDEN_NAME_CHARS for c in name):
            return "names are printable ASCII without braces or angle brackets"
        if len(name) > self.dialect.name_width:
            return f"names are at most {self.dialect.name_width} characters on {self.dialect.family}"
        return None

    async def _send_and_confirm(self, line: str, channel: int | None, param: str, value: str) -> CommandReply:
        async with self._command_lock:
            writer = self._writer
            if not self._online or writer is None or writer.is_closing():
                return CommandReply(CommandOutcome.DEVICE_OFFLINE, "device is not connected")
            future: asyncio.Future[CommandReply] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(channel, param, value, future)
            self._waiters.append(waiter)
            # Stays queued after a timeout: its late answer must not be taken for the next command's.
            self._unanswered.append(_Request(channel, param, self._reads, waiter))
            try:
                writer.write(line.encode("ascii"))
                async with asyncio.timeout(self.options.command_timeout_s):
                    return await future
            except TimeoutError:
                return CommandReply(
                    CommandOutcome.FAILED, f"no confirmation within {self.options.command_timeout_s} s"
                )
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _resolve_first(self, reply: CommandReply) -> bool:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_result(reply)
                return True
        return False

    def _fail_waiters(self, detail: str) -> None:
        while self._resolve_first(CommandReply(CommandOutcome.FAILED, detail)):
            pass

    # -- connection --------------------------------------------------------------------

    def _backoff(self) -> wait_base:
        """Waits from ``backoff_initial_s`` doubling up to ``backoff_max_s``, each jittered.

        The jitter (up to ``backoff_initial_s``) is inside the cap, so that waits at the cap still
        differ: receivers that dropped together (a switch rebooting) are not retried in lockstep.
        """
        options = self.options
        jitter = min(options.backoff_initial_s, options.backoff_max_s)
        exponential = wait_exponential(
            multiplier=options.backoff_initial_s, max=max(options.backoff_max_s - jitter, 0.0)
        )
        return exponential + wait_random(0.0, jitter)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _session(self) -> None:
        """One connection: returns after a healthy session ended, raises ``_LinkDownError`` otherwise.

        Healthy: the device was read in full and the link then lasted ``_STABLE_SESSION_S``,
        whether it ended closed or silent.
        """
        if self._stopping.is_set():
            return
        options = self.options
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(options.connect_timeout_s):
                reader, writer = await asyncio.open_connection(self.target.address, self.target.port)
        except (OSError, TimeoutError) as exc:
            self._set_link(False, "connect_failed")
            raise _LinkDownError("connect_failed") from exc
        connected_at = loop.time()
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self._writer = writer
        self._frames.reset()
        self._unanswered.clear()
        self._metered.clear()
        self._synced = False
        self._pending_identity = list(self.dialect.identity_params)
        self._all_answered = self._all_refused = False
        # What the last session learned may not hold: a receiver swapped for another at the same
        # address (or reconfigured) answers GET 0 ALL in full, and only that is reported.
        self._device_raw = {}
        self._channels_raw = {}
        # After a blip the silence clock keeps running from the last bytes of the old link.
        if not self._online:
            self._last_rx = connected_at
        synced_at: float | None = None
        got_bytes = False
        probed = False
        logger.info("shure connected", extra={"device_key": self.target.device_key})
        try:
            writer.write(self._sync_request())
            sync_deadline = connected_at + options.command_timeout_s
            asks = 1
            while not self._stopping.is_set():
                now = loop.time()
                silence_at = self._last_rx + options.silence_timeout_s
                wake_at = silence_at if probed else self._last_rx + options.silence_timeout_s / 2
                if not self._synced and got_bytes:
                    wake_at = min(wake_at, sync_deadline)
                try:
                    async with asyncio.timeout(max(wake_at - now, 0.001)):
                        data = await reader.read(_READ_SIZE)
                except TimeoutError:
                    now = loop.time()
                    if not self._synced and got_bytes and now >= sync_deadline:
                        if self._unanswered_sync():
                            # Only values the receiver pushed came back: the questions were lost
                            # (asked into a silence it has just come out of). Asked again rather
                            # than reporting those few values as the receiver's whole state.
                            if asks >= _SYNC_ASKS:
                                self._set_link(False, UNANSWERED_REASON)
                                raise _LinkDownError("unanswered") from None
                            asks += 1
                            self._pending_identity = list(self.dialect.identity_params)
                            writer.write(self._sync_request())
                            sync_deadline = now + options.command_timeout_s
                        else:
                            # Some devices never answer one of the identity GETs: go with what we have.
                            self._finish_sync()
                            self._raise_if_refused()
                            synced_at = now
                    if now >= silence_at:
                        mute = not got_bytes and self.target.family is Family.SLXD
                        self._set_link(False, SLXD_MUTE_REASON if mute else "silent")
                        self._fail_waiters("device went silent")
                        if synced_at is not None and now - synced_at >= _STABLE_SESSION_S:
                            # Healthy until now: reconnect at once, then back off from the start.
                            logger.info(
                                "shure connection silent", extra={"device_key": self.target.device_key}
                            )
                            return
                        raise _LinkDownError("silent") from None
                    if not probed and now >= self._last_rx + options.silence_timeout_s / 2:
                        # A device that has nothing to report gets asked something it must answer.
                        writer.write(b"< GET DEVICE_ID >")
                        self._unanswered.append(_Request(None, "DEVICE_ID", self._reads))
                        probed = True
                    continue
                except OSError:
                    data = b""
                if not data:
                    break
                got_bytes = True
                probed = False
                self._last_rx = loop.time()
                self._handle(data)
                self._raise_if_refused()
                if self._synced and synced_at is None:
                    synced_at = self._last_rx
            if self._stopping.is_set():
                return
            self._fail_waiters("connection closed")
            if synced_at is None:
                # Hung up before answering in full: the device is not usable, whatever it was.
                self._set_link(False, "connect_failed")
                raise _LinkDownError("closed")
            if loop.time() - synced_at < _STABLE_SESSION_S:
                raise _LinkDownError("closed")
            logger.info("shure connection closed", extra={"device_key": self.target.device_key})
        finally:
            self._close_writer()

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(data)

    def _meter_off_bytes(self) -> bytes:
        return b"".join(f"< SET {n} METER_RATE 00000 >".encode("ascii") for n in sorted(self._metered))

    def _close_writer(self) -> None:
        writer = self._writer
        self._writer = None
        if writer is None or writer.is_closing():
            return
        # Stopping metering before hanging up: some receivers lock up otherwise.
        if self._metered:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(self._meter_off_bytes())
            self._metered.clear()
        writer.close()

    def _set_link(self, online: bool, reason: str) -> None:
        if self._link_known and self._online == online:
            return
        self._link_known = True
        self._online = online
        logger.info(
            "shure link changed",
            extra={"device_key": self.target.device_key, "online": online, "reason": reason},
        )
        self.listener.link_changed(self.target.device_key, online, reason)

    # -- incoming ----------------------------------------------------------------------

    def _handle(self, data: bytes) -> None:
        self._reads += 1
        frames = self._frames
        errors_before, dropped_before = frames.parse_errors + self._bad_values, frames.dropped_bytes
        messages = frames.feed(data)
        meters: list[ChannelMeter] = []
        meter = self.dialect.meter
        for message in messages:
            if type(message) is Sample:
                value = meter(message.channel, message.fields)
                if value is None:
                    self._bad_values += 1
                else:
                    meters.append(value)
            elif type(message) is Rep:
                self._apply_rep(message)
            elif type(message) is RepErr:
                self.stats.device_errors += 1
                if not self._synced and not self._all_answered and not self._all_refused:
                    # Answers are in the order asked, and GET 0 ALL was asked first.
                    self._all_refused = True
                elif self._pending_identity and not self._synced:
                    self._pending_identity.pop(0)
                    if not self._pending_identity:
                        self._finish_sync()
                elif self._unanswered and self._unanswered[0].sent_after < self._reads:
                    # Requests are answered in the order sent: if the oldest was written after
                    # these bytes were read, this REP ERR answers nothing the driver tracks.
                    waiter = self._unanswered.popleft().waiter
                    if waiter is not None and not waiter.future.done():
                        waiter.future.set_result(
                            CommandReply(CommandOutcome.FAILED, "device answered REP ERR")
                        )
            else:
                # A device never sends GET or SET.
                self._bad_values += 1
        stats = self.stats
        stats.messages = frames.messages
        stats.parse_errors = frames.parse_errors + self._bad_values
        stats.dropped_bytes = frames.dropped_bytes
        if meters:
            stats.meters += len(meters)
            self.listener.meters_updated(self.target.device_key, meters)
        if self._synced and self._dirty:
            self._publish(force=False)
        errors = frames.parse_errors + self._bad_values - errors_before
        dropped = frames.dropped_bytes - dropped_before
        if errors or dropped:
            self._log_bad_input(errors, dropped)

    def _log_bad_input(self, errors: int, dropped: int) -> None:
        # The parser only counts (it stays pure); saying so here, at most once per
        # BAD_INPUT_LOG_EVERY_S, tells why the counters grow. Debug, as the SSC driver's
        # rejected datagrams: the counters are the metric, this line is for diagnosis.
        repeated = self._bad_input_log.due("bad input")
        if repeated is None:
            return
        logger.debug(
            "shure bad input skipped",
            extra={
                "device_key": self.target.device_key,
                "bad_messages": errors,
                "dropped_bytes": dropped,
                **({"repeated": repeated} if repeated else {}),
            },
        )

    def _apply_rep(self, rep: Rep) -> None:
        self._all_answered = True
        channel = rep.channel
        if channel is None:
            if rep.position is None:
                self._store(self._device_raw, rep.param, rep.value)
            if not self._synced and rep.param in self._pending_identity:
                self._pending_identity.remove(rep.param)
                if not self._pending_identity:
                    self._finish_sync()
        elif 1 <= channel <= 64:
            raw = self._channels_raw.get(channel)
            if raw is None:
                raw = self._channels_raw[channel] = {}
                self._dirty = True
            if channel not in self._metered and self.options.meter_interval_ms > 0:
                self._metered.add(channel)
                rate = _meter_rate(self.options.meter_interval_ms)
                self._write(f"< SET {channel} METER_RATE {rate} >".encode("ascii"))
                self._unanswered.append(_Request(channel, "METER_RATE", self._reads))
            if rep.position is None and rep.param not in _METER_PARAMS:
                self._store(raw, rep.param, rep.value)
        elif channel != 0:
            self._bad_values += 1
            return
        for request in self._unanswered:
            if request.answered_by(rep, self._reads):
                self._unanswered.remove(request)
                break
        for waiter in self._waiters:
            if not waiter.future.done() and waiter.matches(rep):
                waiter.future.set_result(CommandReply(CommandOutcome.OK))

    def _store(self, raw: dict[str, str], param: str, value: str) -> None:
        if raw.get(param) != value:
            raw[param] = value
            self._dirty = True

    def _sync_request(self) -> bytes:
        """``GET 0 ALL`` and the identity GETs: what a session asks before it reports the receiver."""
        return b"< GET 0 ALL >" + b"".join(
            f"< GET {p} >".encode("ascii") for p in self.dialect.identity_params
        )

    def _unanswered_sync(self) -> bool:
        """Whether neither ``GET 0 ALL`` nor any identity GET has been answered yet.

        A receiver answers ``GET 0 ALL`` with every channel's name; what it pushes unasked (a
        battery level, a mute) carries none. No identity answered and no channel name known
        means nothing asked was answered; a refusal (``REP ERR``) is an answer.
        """
        if self._all_refused:
            return False
        identity_unanswered = len(self._pending_identity) == len(self.dialect.identity_params)
        no_names = not any("CHAN_NAME" in raw for raw in self._channels_raw.values())
        return identity_unanswered and no_names

    def _finish_sync(self) -> None:
        self._synced = True
        self._pending_identity = []
        if not self._refused():
            self._publish(force=True)
            self._set_link(True, "connected")

    def _refused(self) -> bool:
        # A receiver refusing third-party control (an SLX-D until "Allow Third-Party Controls"
        # is on) answers REP ERR to GET 0 ALL: not a receiver to show online with no channels.
        return self._all_refused and not self._channels_raw

    def _raise_if_refused(self) -> None:
        if self._synced and self._refused():
            # Offline with the reason, and retried with backoff until control is allowed.
            self._set_link(False, REFUSED_REASON)
            raise _LinkDownError("refused")

    def _publish(self, *, force: bool) -> None:
        self._dirty = False
        device = self._build_device()
        if device is None:
            return
        if force or device != self._device:
            self._device = device
            self.listener.device_updated(device)

    def _build_device(self) -> Device | None:
        dialect = self.dialect
        raw: Mapping[str, str] = self._device_raw
        try:
            channels = tuple(
                dialect.channel(index, values, raw) for index, values in sorted(self._channels_raw.items())
            )
            device_id = _text(raw.get("DEVICE_ID"))
            return Device(
                device_key=self.target.device_key,
                vendor=Vendor.SHURE,
                family=dialect.family,
                model=dialect.device_model(raw, len(channels)),
                device_id=device_id,
                firmware=_text(raw.get("FW_VER")),
                rf_band=_text(raw.get("RF_BAND")),
                address=self.target.address,
                port=self.target.port,
                name=self.target.name or device_id,
                channels=channels,
            )
        except ValidationError:  # pragma: no cover - the dialects keep every value in range
            self._bad_values += 1
            logger.warning("shure state rejected", extra={"device_key": self.target.device_key})
            return None


def _text(raw: str | None) -> str | None:
    if raw is None:
        return None
    text = raw.strip()
    return text[:128] or None
