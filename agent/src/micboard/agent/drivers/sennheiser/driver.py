"""The SSC v1 driver: one connected UDP socket to one EW-DX or Digital 6000 receiver.

It reads identity and every channel's ``rxN`` and ``mates/txN`` trees, subscribes to the
meters and renews the subscription before its lifetime ends, polls ``device/name`` for
liveness and re-reads the channels every poll. Requests carry an ``osc.xid`` and are resent
when a datagram is lost; a device that answers nothing (not even meters) within the command
timeout is reported offline with reason ``silent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from micboard.agent.drivers.base import (
    CommandReply,
    DeviceListener,
    DeviceTarget,
    DriverCommand,
    DriverOptions,
    ReceiverDriver,
)
from micboard.agent.drivers.sennheiser.mapping import (
    channel_count,
    channel_from_ssc,
    channel_name_problem,
    device_from_ssc,
    meter_from_ssc,
)
from micboard.agent.drivers.sennheiser.protocol import (
    METER_FIELDS,
    METER_MAX_MS,
    SscMessage,
    SscRejected,
    SscStatus,
    Tree,
    cancel_subscriptions,
    channel_query,
    decode_datagram,
    encode_message,
    identify_set,
    identity_query,
    is_finite_number,
    liveness_query,
    mate_query,
    meter_subscription,
    mute_set,
    rename_set,
)
from micboard.shared.envelope import CommandAction, CommandOutcome
from micboard.shared.model import Device

log = logging.getLogger(__name__)

_RX = re.compile(r"^rx([1-9]\d?)$")
PRESENCE_RECHECK_S = 1.0  # at most one triggered re-read per channel per second
_SUPPORTED = frozenset(
    {CommandAction.RENAME, CommandAction.IDENTIFY, CommandAction.MUTE, CommandAction.UNMUTE}
)


def _describe(reply: SscMessage) -> str:
    return "; ".join(error.describe() for error in reply.errors)


def _without_errors(node: Tree, reply: SscMessage, prefix: tuple[str, ...]) -> Tree:
    """``node`` (the reply's tree at ``prefix``) without the leaves the reply's errors name."""
    paths = [e.path[len(prefix) :] for e in reply.errors if e.within(*prefix) and len(e.path) > len(prefix)]
    if not paths:
        return node
    kept: Tree = dict(node)
    for path in paths:
        parent: Any = kept
        for key in path[:-1]:
            child = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(child, dict):
                parent = None
                break
            parent[key] = child = dict(child)  # copied: the reply's tree stays as received
            parent = child
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return kept


def _overlay(old: Tree | None, new: Tree) -> Tree:
    """``new`` over ``old``, object by object: what ``new`` lacks keeps its value in ``old``."""
    if not old:
        return new
    merged = dict(old)
    for key, value in new.items():
        before = merged.get(key)
        merged[key] = (
            _overlay(before, value) if isinstance(before, dict) and isinstance(value, dict) else value
        )
    return merged


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[SscMessage]
    addresses: frozenset[str]


class _SscClientProtocol(asyncio.DatagramProtocol):
    def __init__(self, driver: SscDriver) -> None:
        self._driver = driver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._driver._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP "port unreachable" and the like: the silence watchdog decides about liveness.
        log.debug("ssc socket error", extra={"device_key": self._driver.target.device_key, "error": str(exc)})


class SscDriver(ReceiverDriver):
    """Sennheiser SSC v1 over UDP for EW-DX EM 2 / EM 4 and EM 6000.

    ``subscription_lifetime_s`` is the meter subscription's lifetime (renewed ``command_timeout_s``
    before it ends, at the latest half-way); ``request_attempts`` is how often a request is sent
    within its timeout when datagrams are lost.
    """

    def __init__(
        self,
        target: DeviceTarget,
        listener: DeviceListener,
        options: DriverOptions | None = None,
        *,
        subscription_lifetime_s: float = 10.0,
        request_attempts: int = 3,
    ) -> None:
        super().__init__(target, listener, options)
        if subscription_lifetime_s <= 0:
            raise ValueError("subscription_lifetime_s must be positive")
        self.subscription_lifetime_s = subscription_lifetime_s
        self.request_attempts = max(1, request_attempts)
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, _Pending] = {}
        self._xid = 0
        self._online = False
        self._link_reported = False
        self._sessions = 0
        self._subscribed = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._renewal: asyncio.Task[None] | None = None
        self._device: Device | None = None
        self._identity: Any = None
        self._device_name: Any = None
        self._channel_count = 0
        self._rx: dict[int, Tree] = {}
        self._mates: dict[int, Tree | None] = {}
        self._meters: dict[int, dict[str, float]] = {}
        self._dirty: set[int] = set()
        self._presence_checked: dict[int, float] = {}
        self._last_rx = 0.0

    @property
    def device(self) -> Device | None:
        """The latest normalized state, or ``None`` before the first full read."""
        return self._device

    @property
    def online(self) -> bool:
        """Whether the device is answering now."""
        return self._online

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Read, meter and watch the device, starting over with backoff when it falls silent."""
        initial = self.options.backoff_initial_s
        ceiling = max(initial, min(self.options.backoff_max_s, self.options.poll_interval_s))
        backoff = initial
        try:
            while not self._stopping:
                if self._transport is None and not await self._open():
                    self._offline("connect_failed")
                elif await self._start_session():
                    backoff = initial
                    await self._watch()
                    await self._end_session()
                    if not self._stopping:
                        self._offline("silent")
                    continue
                elif not self._stopping:
                    self._offline("connect_failed")
                await self._pause(backoff)
                backoff = min(backoff * 2, ceiling)
        finally:
            await self._close()

    async def stop(self) -> None:
        """Cancel the meter subscription and close the socket; safe to call twice."""
        self._stopping = True
        self._wake.set()
        for pending in list(self._pending.values()):
            pending.future.cancel()
        await self._close()

    async def _open(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_datagram_endpoint(
                    lambda: _SscClientProtocol(self), remote_addr=(self.target.address, self.target.port)
                ),
                timeout=self.options.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            log.warning("ssc socket failed", extra={"device_key": self.target.device_key, "error": str(exc)})
            return False
        self._transport = transport
        return True

    async def _close(self) -> None:
        self._online = False  # stopped: commands now answer DEVICE_OFFLINE
        renewal, self._renewal = self._renewal, None
        if renewal is not None and renewal is not asyncio.current_task():
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
        transport, self._transport = self._transport, None
        if transport is not None:
            if self._subscribed and not transport.is_closing():
                transport.sendto(encode_message(cancel_subscriptions()))
            self._subscribed = False
            transport.close()

    def _offline(self, reason: str) -> None:
        # Report the first failure and every fall from online, not each retry while offline.
        if self._online or not self._link_reported:
            self._online = False
            self._link_reported = True
            log.warning("ssc device offline", extra={"device_key": self.target.device_key, "reason": reason})
            self.listener.link_changed(self.target.device_key, False, reason)

    async def _pause(self, delay_s: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, delay_s))
        self._wake.clear()

    # ---- a session: from the first answer to silence --------------------------------------

    async def _start_session(self) -> bool:
        reply = await self._request(identity_query(), self.options.connect_timeout_s)
        if reply is None:
            return False
        if reply.errors or reply.node("device", "identity") is None:
            self.stats.device_errors += 1
            log.warning(
                "ssc identity refused",
                extra={"device_key": self.target.device_key, "errors": _describe(reply)},
            )
            return False
        self._identity = reply.node("device", "identity")
        self._device_name = reply.lookup("device", "name")
        product = self._identity.get("product") if isinstance(self._identity, dict) else None
        count = channel_count(self.target.family, product if isinstance(product, str) else None)
        if count != self._channel_count:
            self._rx.clear()
            self._mates.clear()
            self._meters.clear()
            self._channel_count = count
        await self._read_channels(range(1, count + 1))
        if self._stopping:
            return False
        self.stats.connects += 1
        if self._sessions:
            self.stats.reconnects += 1
        self._sessions += 1
        self._online = True
        self._link_reported = True
        log.info("ssc device online", extra={"device_key": self.target.device_key, "product": product})
        self.listener.link_changed(self.target.device_key, True, "answering")
        self._publish(force=True)
        if self.options.meter_interval_ms > 0:  # 0: metering off, as METER_RATE 00000 on Shure
            sent_at = time.monotonic()
            answered = await self._subscribe()
            self._renewal = asyncio.create_task(
                self._renew_loop(sent_at if answered else None), name=f"ssc-renew-{self.target.device_key}"
            )
        return True

    async def _end_session(self) -> None:
        renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)

    async def _watch(self) -> None:
        """Poll and re-read until the device stays silent for a whole probe (or we stop)."""
        options = self.options
        next_poll = time.monotonic() + options.poll_interval_s
        # Probe early enough that silence is reported within the silence timeout.
        quiet_s = max(0.0, options.silence_timeout_s - options.command_timeout_s)
        while not self._stopping:
            if self._dirty:
                channels, self._dirty = sorted(self._dirty), set()
                await self._read_channels(channels)
                self._publish()
                continue
            now = time.monotonic()
            due = min(next_poll, self._last_rx + quiet_s)
            if now < due:
                await self._pause(due - now)
                continue
            if not await self._probe():
                return
            if now >= next_poll:
                await self._read_channels(range(1, self._channel_count + 1))
                self._publish()
                next_poll = time.monotonic() + options.poll_interval_s

    async def _probe(self) -> bool:
        started = time.monotonic()
        reply = await self._request(liveness_query(), self.options.command_timeout_s)
        if reply is not None:
            if reply.contains("device", "name"):
                self._device_name = reply.lookup("device", "name")
            return True
        # Meters that kept arriving prove the device alive even if the poll itself was lost.
        return self._last_rx >= started

    async def _renew_loop(self, answered_at: float | None) -> None:
        """Renew the meter subscription before it lapses, until the session cancels this task.

        ``answered_at``: when the last answered subscribe was sent; ``None`` if it went unanswered.
        """
        lifetime = self.subscription_lifetime_s
        # The device counts a lifetime from when a subscribe reaches it, which is no earlier than
        # when it was sent: renewals are due a fixed time after the last answered one was sent.
        # Sleeping a period after each reply instead pushed every renewal later by the reply's
        # latency, and the subscription lapsed whenever a reply took longer than the slack left.
        # The lead gives a renewal all its resends (the whole command timeout) before the lapse;
        # with a short lifetime it is at most half of it.
        lead = min(self.options.command_timeout_s, lifetime / 2)
        # An unanswered renewal may not have reached the device: ask again after one resend
        # interval, not a whole period, or the meters may stay stopped for most of a lifetime.
        retry_s = self.options.command_timeout_s / self.request_attempts
        due = time.monotonic() + retry_s if answered_at is None else answered_at + lifetime - lead
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent_at = time.monotonic()
            answered = await self._subscribe()
            due = sent_at + lifetime - lead if answered else time.monotonic() + retry_s

    async def _subscribe(self) -> bool:
        """Subscribe to the meters (or renew); whether the device answered, accepting or refusing.

        A refusal counts as answered: asking again at once would only repeat it (and its
        warning), so it is retried when the next renewal is due.
        """
        # Within what a subscription takes: "min" may not exceed its "max" (10 s).
        interval_ms = min(max(10, self.options.meter_interval_ms), METER_MAX_MS)
        count = max(1000, int(self.subscription_lifetime_s * 1000 / interval_ms) + 10)
        tree = meter_subscription(
            range(1, self._channel_count + 1),
            lifetime_s=self.subscription_lifetime_s,
            min_ms=interval_ms,
            count=count,
        )
        # Even an unanswered subscribe may have reached the device: cancel it when stopping.
        self._subscribed = True
        reply = await self._request(tree, self.options.command_timeout_s)
        if reply is None:
            log.info("ssc subscription unanswered", extra={"device_key": self.target.device_key})
            return False
        if reply.errors:
            self.stats.device_errors += 1
            log.warning(
                "ssc subscription refused",
                extra={"device_key": self.target.device_key, "errors": _describe(reply)},
            )
        return True

    async def _read_channels(self, channels: Iterable[int]) -> None:
        await asyncio.gather(*(self._read_channel(channel) for channel in channels))

    async def _read_channel(self, channel: int) -> None:
        rx_reply, mate_reply = await asyncio.gather(
            self._request(channel_query(channel), self.options.command_timeout_s),
            self._request(mate_query(channel), self.options.command_timeout_s),
        )
        # An error inline is about the leaves it names: the other leaves of the reply are good
        # (a model without "gain" still says its name and frequency). An errored leaf keeps the
        # value it had, so that a passing error (423 locked, 500) does not blank it.
        if rx_reply is not None:
            if rx_reply.errors:
                self.stats.device_errors += 1
            rx = (f"rx{channel}",)
            if (node := rx_reply.node(*rx)) is not None:
                self._rx[channel] = _overlay(self._rx.get(channel), _without_errors(node, rx_reply, rx))
        if mate_reply is not None:
            tx = ("mates", f"tx{channel}")
            if any(e.code == SscStatus.FAILED_DEPENDENCY and e.within(*tx) for e in mate_reply.errors):
                self._mates[channel] = None  # 424: the linked transmitter is off - no transmitter
            elif (node := mate_reply.node(*tx)) is not None:
                if mate_reply.errors:
                    self.stats.device_errors += 1
                    node = _overlay(self._mates.get(channel), _without_errors(node, mate_reply, tx))
                self._mates[channel] = node
            elif mate_reply.errors:
                self.stats.device_errors += 1

    def _publish(self, *, force: bool = False) -> None:
        if self._identity is None:
            return
        channels = [
            channel_from_ssc(index, self._rx.get(index), self._mates.get(index))
            for index in range(1, self._channel_count + 1)
        ]
        device = device_from_ssc(
            device_key=self.target.device_key,
            family=self.target.family,
            address=self.target.address,
            port=self.target.port,
            identity=self._identity,
            # The name configured for a static device wins over the one the device reports,
            # as with Shure: it is what the operator chose to see.
            name=self.target.name or self._device_name,
            channels=channels,
        )
        if force or device != self._device:
            self._device = device
            self.listener.device_updated(device)

    # ---- requests and datagrams -----------------------------------------------------------

    async def _request(self, tree: Tree, timeout_s: float) -> SscMessage | None:
        """Send ``tree`` with a fresh xid, resending on loss; the reply, or ``None`` on timeout."""
        if self._transport is None:
            return None
        self._xid = self._xid % 0x7FFF_FFFF + 1
        xid = self._xid
        future: asyncio.Future[SscMessage] = asyncio.get_running_loop().create_future()
        self._pending[xid] = _Pending(future, frozenset(tree))
        data = encode_message(tree, xid=xid)
        try:
            for _ in range(self.request_attempts):
                transport = self._transport
                if transport is None or transport.is_closing():
                    return None
                transport.sendto(data)
                done, _ = await asyncio.wait({future}, timeout=timeout_s / self.request_attempts)
                if done:
                    return None if future.cancelled() else future.result()
            return None
        finally:
            self._pending.pop(xid, None)
            future.cancel()

    def _match(self, message: SscMessage) -> _Pending | None:
        if message.xid is not None:
            return self._pending.get(message.xid) if isinstance(message.xid, int) else None
        # Without an xid, the oldest request about the same addresses takes the reply.
        addresses = message.addresses | ({"osc"} if "osc" in message.tree else set())
        for pending in self._pending.values():
            if pending.addresses & addresses and not pending.future.done():
                return pending
        return None

    def _on_datagram(self, data: bytes) -> None:
        message = decode_datagram(data, max_bytes=self.options.max_line_bytes)
        if isinstance(message, SscRejected):
            self.stats.parse_errors += 1
            self.stats.dropped_bytes += len(data)
            log.debug(
                "ssc datagram rejected",
                extra={"device_key": self.target.device_key, "reason": message.reason},
            )
            return
        self.stats.messages += 1
        self._last_rx = time.monotonic()
        pending = self._match(message)
        if pending is not None:
            if not pending.future.done():
                pending.future.set_result(message)
        elif message.errors:
            self.stats.device_errors += 1
        meters = message.node("m")
        if meters is not None and self._online:
            self._on_meters(meters)

    def _on_meters(self, tree: Tree) -> None:
        updated = []
        invalid = False
        for key, values in tree.items():
            match = _RX.match(key)
            index = int(match.group(1)) if match is not None else 0
            if not 1 <= index <= self._channel_count or not isinstance(values, dict):
                invalid = True
                continue
            current = self._meters.setdefault(index, {})
            for name in METER_FIELDS:
                if name not in values:
                    continue
                value = values[name]
                if value is None:
                    current.pop(name, None)
                elif is_finite_number(value):
                    current[name] = value
                else:
                    invalid = True
            updated.append(meter_from_ssc(index, current))
            self._check_presence(index, current.get("rsqi"))
        if invalid:
            self.stats.parse_errors += 1
        if updated:
            self.stats.meters += 1
            self.listener.meters_updated(self.target.device_key, updated)

    def _check_presence(self, index: int, rsqi: float | None) -> None:
        # rsqi 0 means no transmitter: a disagreement with the last read asks for a re-read now.
        if rsqi is None or index not in self._mates or (rsqi > 0) == (self._mates[index] is not None):
            return
        now = time.monotonic()
        if now - self._presence_checked.get(index, float("-inf")) >= PRESENCE_RECHECK_S:
            self._presence_checked[index] = now
            self._dirty.add(index)
            self._wake.set()

    # ---- commands -------------------------------------------------------------------------

    async def execute(self, command: DriverCommand) -> CommandReply:
        """Rename, identify, mute or unmute; other actions are ``NOT_SUPPORTED``."""
        if command.action not in _SUPPORTED:
            return CommandReply(CommandOutcome.NOT_SUPPORTED, f"{command.action} is not supported over SSC")
        if not self._online or self._transport is None:
            return CommandReply(CommandOutcome.DEVICE_OFFLINE, "the device is not answering")
        channel = command.channel
        if command.action is CommandAction.IDENTIFY:
            tree = identify_set()
        elif channel is None or not 1 <= channel <= self._channel_count:
            return CommandReply(CommandOutcome.INVALID, f"channel must be 1..{self._channel_count}")
        elif command.action is CommandAction.RENAME:
            name = command.value
            problem = "a name is required" if name is None else channel_name_problem(name, self.target.family)
            if problem is not None or name is None:
                return CommandReply(CommandOutcome.INVALID, problem)
            tree = rename_set(channel, name)
        else:
            tree = mute_set(channel, command.action is CommandAction.MUTE)
        reply = await self._request(tree, self.options.command_timeout_s)
        if reply is None:
            timeout_s = self.options.command_timeout_s
            return CommandReply(CommandOutcome.FAILED, f"no answer within {timeout_s:g} s")
        if reply.errors:
            self.stats.device_errors += 1
            return CommandReply(CommandOutcome.FAILED, _describe(reply))
        if channel is not None and (node := reply.node(f"rx{channel}")) is not None:
            self._rx[channel] = {**self._rx.get(channel, {}), **node}
            self._publish()
        return CommandReply(CommandOutcome.OK)
