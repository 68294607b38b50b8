"""A simulated EW-DX EM 2 / EM 4 or EM 6000 speaking SSC v1 over UDP, as the hardware does.

Queries get their ``null`` leaves filled in, sets are validated and echoed, unknown addresses
get inline 404/454 errors, a switched-off transmitter gets 424, ``osc.xid`` is echoed and
meters are pushed to subscribers until the subscription's lifetime ends. Everything random
comes from generators seeded with ``seed``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from micboard.agent.drivers.sennheiser.mapping import channel_name_problem
from micboard.agent.drivers.sennheiser.protocol import (
    SSC_PORT,
    SSC_SERVICE_TYPE,
    SscRejected,
    SscStatus,
    Tree,
    decode_datagram,
    encode_message,
    error_tree,
    is_finite_number,
)
from micboard.agent.drivers.simulation import Announcement, ReceiverSimulator
from micboard.shared.model import Family, Vendor

log = logging.getLogger(__name__)

Address = tuple[str, int]
_Problem = tuple[int, str]

NO_SIGNAL_DBFS = -138.5
NOISE_FLOOR_DBM = -104.0
IDENTIFY_S = 5.0
MAX_SUBSCRIPTIONS = 64
MAX_DEVICE_NAME = 18
_RX = re.compile(r"^rx([1-9]\d?)$")
_TX = re.compile(r"^tx([1-9]\d?)$")
_PERSONS = ("Ana", "Ben", "Eva", "Ida", "Kai", "Lea", "Max", "Tom", "Zoe", "Noa")


@dataclass(frozen=True, slots=True)
class SscKind:
    """What one simulated product is: its identity, channels and the transmitters it pairs with."""

    kind: str
    product: str
    family: Family
    channels: int
    firmware: str
    transmitter_types: tuple[str, str]  # (hand-held, body-pack)
    battery_type: str
    battery_full_min: int
    frequency_low_khz: int
    frequency_high_khz: int


SSC_SIMULATOR_KINDS: Mapping[str, SscKind] = MappingProxyType(
    {
        "ewdx-em2": SscKind(
            "ewdx-em2", "EW-DX EM 2", Family.EWDX, 2, "3.3.1", ("SKM", "SK"), "BA 70", 720, 470_200, 550_000
        ),
        "ewdx-em4": SscKind(
            "ewdx-em4", "EW-DX EM 4", Family.EWDX, 4, "3.3.1", ("SKM", "SK"), "BA 70", 720, 470_200, 550_000
        ),
        "em6000": SscKind(
            "em6000",
            "EM 6000",
            Family.D6000,
            2,
            "4.1.2",
            ("SKM 6000", "SK 6000"),
            "BA 60",
            330,
            470_200,
            558_000,
        ),
    }
)


@dataclass(slots=True)
class SimulatedTransmitter:
    """The transmitter paired with one channel; the battery drains while it is on."""

    on: bool
    model: str
    name: str
    muted: bool
    trim_db: int
    battery_type: str
    battery_full_min: float
    battery_remaining_min: float
    gauge_known: bool = True
    lifetime_known: bool = True

    @property
    def gauge_percent(self) -> int | None:
        """What ``battery/gauge`` reads, ``None`` when the transmitter cannot tell."""
        if not self.gauge_known:
            return None
        return max(0, min(100, round(100 * self.battery_remaining_min / self.battery_full_min)))

    @property
    def lifetime_min(self) -> int | None:
        """What ``battery/lifetime`` reads: remaining minutes, ``None`` when unknown."""
        return int(self.battery_remaining_min) if self.lifetime_known else None


@dataclass(slots=True)
class SimulatedChannel:
    """One receive channel: configuration, its transmitter and the state of its RF/audio model."""

    index: int
    name: str
    frequency_khz: int
    gain_db: int
    muted: bool
    transmitter: SimulatedTransmitter
    rf_base_dbm: float
    extra_warnings: list[str] = field(default_factory=list)
    divi: int = 1
    fade_ticks: int = 0
    af_dbfs: float = -40.0


@dataclass(slots=True)
class _Subscription:
    key: tuple[Address, str]
    address: Address
    tree: Tree
    interval_s: float
    expires_at: float
    remaining: int
    last_state: str = ""
    task: asyncio.Task[None] | None = None


class _SscServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, simulator: SscSimulator) -> None:
        self._simulator = simulator

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self._simulator._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("ssc simulator socket error", extra={"error": str(exc)})


class SscSimulator(ReceiverSimulator):
    """A simulated SSC v1 receiver of ``kind`` (see :data:`SSC_SIMULATOR_KINDS`) on UDP ``host:port``.

    The default port is the protocol's 45, which needs privileges; tests pass ``port=0``.
    """

    vendor = Vendor.SENNHEISER

    def __init__(
        self,
        kind: str = "ewdx-em2",
        *,
        host: str = "127.0.0.1",
        port: int = SSC_PORT,
        seed: int = 0,
        time_scale: float = 1.0,
        name: str | None = None,
    ) -> None:
        if kind not in SSC_SIMULATOR_KINDS:
            raise ValueError(f"unknown SSC simulator kind {kind!r}; known: {', '.join(SSC_SIMULATOR_KINDS)}")
        super().__init__(host=host, port=port, seed=seed, time_scale=time_scale)
        self.kind = SSC_SIMULATOR_KINDS[kind]
        self.family = self.kind.family
        self._fault_random = random.Random(seed ^ 0x55C)  # noqa: S311 - simulation, not security  # nosec B311
        self.serial = f"{self.random.randrange(10**9, 10**10)}"
        self.device_name = name or f"{self.kind.kind.upper()}-{self.serial[-4:]}"
        self.channels = [self._new_channel(index) for index in range(1, self.kind.channels + 1)]
        self.identify_count = 0
        self.requests = 0
        self.locked = False
        self._identify_until = 0.0
        self._clock = time.monotonic()
        self._transport: asyncio.DatagramTransport | None = None
        self._subscriptions: dict[tuple[Address, str], _Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.TimerHandle] = set()

    def _new_channel(self, index: int) -> SimulatedChannel:
        rng = self.random
        handheld = rng.random() < 0.5
        prefix = "HH" if handheld else "BP"
        steps = (self.kind.frequency_high_khz - self.kind.frequency_low_khz) // 25
        remaining = rng.uniform(0.35, 1.0) * self.kind.battery_full_min
        transmitter = SimulatedTransmitter(
            on=True,
            model=self.kind.transmitter_types[0 if handheld else 1],
            name=f"{prefix}{index:02d}",
            muted=False,
            trim_db=rng.choice((-6, -3, 0, 0, 0, 3)),
            battery_type=self.kind.battery_type,
            battery_full_min=float(self.kind.battery_full_min),
            battery_remaining_min=remaining,
        )
        return SimulatedChannel(
            index=index,
            name=f"{prefix}{index:02d} {rng.choice(_PERSONS)}",
            frequency_khz=self.kind.frequency_low_khz + 25 * rng.randrange(steps),
            gain_db=rng.choice((0, 3, 6, 9, 12)),
            muted=False,
            transmitter=transmitter,
            rf_base_dbm=rng.uniform(-65.0, -40.0),
            divi=rng.choice((1, 2)),
        )

    # ---- the ReceiverSimulator face -------------------------------------------------------

    @property
    def model(self) -> str:
        """The product the device reports in ``device/identity/product``."""
        return self.kind.product

    @property
    def device_id(self) -> str:
        """The serial number the device reports."""
        return self.serial

    @property
    def subscription_count(self) -> int:
        """How many subscriptions are live now."""
        return len(self._subscriptions)

    async def start(self) -> None:
        """Bind the UDP socket; afterwards ``port`` is the bound port."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _SscServerProtocol(self), local_addr=(self.host, self.port)
        )
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        log.info("ssc simulator listening", extra={"kind": self.kind.kind, "port": self.port})

    async def stop(self) -> None:
        """Close the socket, end every subscription and forget delayed replies; safe to call twice."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()
        await self.drop_connections()

    async def drop_connections(self) -> None:
        """Forget every subscriber (UDP has no connections to close)."""
        self._subscriptions.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def announcement(self) -> Announcement:
        """The DNS-SD record: ``_ssc._udp.local.`` with the product in TXT."""
        instance = f"{self.kind.product.replace(' ', '-')}-{self.serial}"
        return Announcement(
            SSC_SERVICE_TYPE, instance, self.port, properties={"product": self.kind.product}, slp_dcid=None
        )

    # ---- knobs for tests and demos --------------------------------------------------------

    def channel(self, index: int) -> SimulatedChannel:
        """The simulated channel ``index`` (1-based); raises ``IndexError`` when there is none."""
        if not 1 <= index <= len(self.channels):
            raise IndexError(f"{self.kind.kind} has no channel {index}")
        return self.channels[index - 1]

    def set_transmitter_on(self, index: int, on: bool) -> None:
        """Switch the transmitter of channel ``index`` on or off."""
        self._advance()
        self.channel(index).transmitter.on = on

    def set_battery(self, index: int, percent: int | None, minutes: int | None) -> None:
        """Set the battery of channel ``index``'s transmitter; ``None`` makes that reading unknown."""
        self._advance()
        transmitter = self.channel(index).transmitter
        transmitter.gauge_known = percent is not None
        transmitter.lifetime_known = minutes is not None
        if minutes is not None:
            transmitter.battery_remaining_min = float(minutes)
            if percent:
                transmitter.battery_full_min = minutes * 100 / percent
        elif percent is not None:
            transmitter.battery_remaining_min = percent / 100 * transmitter.battery_full_min

    def set_channel_name(self, index: int, name: str) -> None:
        """Rename channel ``index`` as if done at the front panel."""
        self.channel(index).name = name

    def set_warnings(self, index: int, warnings: list[str]) -> None:
        """Raise extra warnings (e.g. ``AfPeak``) on channel ``index``."""
        self.channel(index).extra_warnings = list(warnings)

    def tree(self) -> Tree:
        """Everything a query can read now, as the device's JSON tree (meters excluded)."""
        self._advance()
        now = time.monotonic()
        tree: Tree = {
            "device": {
                "identity": {
                    "product": self.kind.product,
                    "serial": self.serial,
                    "version": self.kind.firmware,
                },
                "name": self.device_name,
                "identification": {"visual": now < self._identify_until},
            },
            "mates": {},
        }
        for channel in self.channels:
            tx = channel.transmitter
            warnings = list(channel.extra_warnings)
            low = tx.on and tx.gauge_percent is not None and tx.gauge_percent <= 10
            if low and "LowBattery" not in warnings:
                warnings.append("LowBattery")
            tree[f"rx{channel.index}"] = {
                "name": channel.name,
                "frequency": channel.frequency_khz,
                "mute": channel.muted,
                "gain": channel.gain_db,
                "warnings": warnings,
                "identification": {"visual": now < self._identify_until},
            }
            if tx.on:
                tree["mates"][f"tx{channel.index}"] = {
                    "battery": {
                        "gauge": tx.gauge_percent,
                        "lifetime": tx.lifetime_min,
                        "type": tx.battery_type,
                    },
                    "name": tx.name,
                    "mute": tx.muted,
                    "type": tx.model,
                    "trim": tx.trim_db,
                    "warnings": ["LowBattery"] if low else [],
                }
        return tree

    def meters(self) -> Tree:
        """Advance the RF/audio model by one step and return ``{"rxN": {rssi, rsqi, divi, af}}``."""
        return {f"rx{channel.index}": self._meter(channel) for channel in self.channels}

    # ---- the simulated world --------------------------------------------------------------

    def _advance(self) -> None:
        now = time.monotonic()
        elapsed_min = (now - self._clock) * self.time_scale / 60.0
        self._clock = now
        for channel in self.channels:
            tx = channel.transmitter
            if tx.on:
                tx.battery_remaining_min = max(0.0, tx.battery_remaining_min - elapsed_min)
                if tx.battery_remaining_min <= 0.0:
                    tx.on = False  # a flat battery switches the transmitter off

    def _meter(self, channel: SimulatedChannel) -> Tree:
        rng = self.random
        if not channel.transmitter.on:
            rssi = NOISE_FLOOR_DBM + rng.uniform(-2.0, 2.0)
            return {"rssi": round(rssi, 1), "rsqi": 0, "divi": 0, "af": NO_SIGNAL_DBFS}
        if channel.fade_ticks > 0:
            channel.fade_ticks -= 1
        elif rng.random() < 0.02:
            channel.fade_ticks = rng.randint(3, 12)
        fading = channel.fade_ticks > 0
        rssi = channel.rf_base_dbm + rng.gauss(0.0, 1.5) - (rng.uniform(18.0, 35.0) if fading else 0.0)
        rssi = max(-107.0, min(0.0, rssi))
        # Diversity changes antenna mostly while the active one fades.
        if rng.random() < (0.25 if fading else 0.01):
            channel.divi = 3 - channel.divi if channel.divi in (1, 2) else 1
        rsqi = max(1, min(100, round((rssi + 92.0) * 2.4)))
        if channel.transmitter.muted:
            af = NO_SIGNAL_DBFS
        else:
            talking = rng.random() < 0.7
            target = rng.uniform(-32.0, -8.0) if talking else rng.uniform(-70.0, -55.0)
            # A shout near full scale: at 10 meters a second, about once per channel in eight
            # minutes (clipping alerts in a demo now and then, not every few seconds).
            if rng.random() < 0.0002:
                target = rng.uniform(-3.0, 0.0)
            channel.af_dbfs += (target - channel.af_dbfs) * 0.5
            af = channel.af_dbfs
        return {"rssi": round(rssi, 1), "rsqi": rsqi, "divi": channel.divi, "af": round(af, 1)}

    # ---- answering ------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        if self.faults.silent:
            return
        self.requests += 1
        message = decode_datagram(data)
        if isinstance(message, SscRejected):
            self._reply({"osc": {"error": [{"desc": f"bad request: {message.reason}", "code": 400}]}}, addr)
            return
        reply: Tree = {}
        errors: list[Any] = []
        if self.faults.rep_err:
            errors = [
                error_tree((key,), SscStatus.INTERNAL_ERROR, "internal server error") for key in message.tree
            ] or [{"desc": "internal server error", "code": 500}]
        else:
            state = self.tree()
            for key, value in message.tree.items():
                if key == "osc":
                    self._answer_osc(value, reply, errors, addr)
                elif key == "m":
                    errors.append(
                        error_tree(
                            ("m",), SscStatus.NOT_ACCEPTABLE, "meters are only available by subscription"
                        )
                    )
                else:
                    self._walk({key: value}, state, (), reply, errors, allow_set=True)
        osc: Tree = reply.setdefault("osc", {})
        if errors:
            osc["error"] = errors
        if message.xid is not None:
            osc["xid"] = message.xid
        if not osc:
            del reply["osc"]
        self._reply(reply, addr)

    def _walk(
        self,
        request: Tree,
        state: Any,
        path: tuple[str, ...],
        out: Tree,
        errors: list[Any],
        *,
        allow_set: bool,
    ) -> None:
        for key, value in request.items():
            here = (*path, key)
            if not isinstance(state, dict) or key not in state:
                errors.append(error_tree(here, *self._missing(here, value)))
                continue
            current = state[key]
            if isinstance(value, dict):
                if not isinstance(current, dict):
                    errors.append(error_tree(here, SscStatus.BAD_REQUEST, "address is a parameter"))
                    continue
                answer: Tree = {}
                self._walk(value, current, here, answer, errors, allow_set=allow_set)
                if answer:
                    out[key] = answer
            elif value is None:
                out[key] = copy.deepcopy(current)
            elif isinstance(current, dict):
                errors.append(error_tree(here, SscStatus.BAD_REQUEST, "address is a node, not a parameter"))
            elif not allow_set:
                errors.append(error_tree(here, SscStatus.BAD_REQUEST, "a subscription takes null leaves"))
            else:
                problem = self._set(here, value)
                if problem is None:
                    out[key] = value
                else:
                    errors.append(error_tree(here, *problem))

    def _missing(self, path: tuple[str, ...], value: Any) -> _Problem:
        if len(path) == 2 and path[0] == "mates":
            match = _TX.match(path[1])
            if match is not None and 1 <= int(match.group(1)) <= len(self.channels):
                return SscStatus.FAILED_DEPENDENCY, "failed dependency: the transmitter is off"
        if len(path) == 1 or isinstance(value, dict):
            return SscStatus.NOT_FOUND, "address not found"
        return SscStatus.PARAMETER_NOT_FOUND, "parameter address not found"

    def _set(self, path: tuple[str, ...], value: Any) -> _Problem | None:
        if self.locked:
            return SscStatus.LOCKED, "locked"
        if path == ("device", "name"):
            if not isinstance(value, str):
                return SscStatus.BAD_REQUEST, "expected a string"
            if not 1 <= len(value) <= MAX_DEVICE_NAME or not all("!" <= c <= "~" for c in value):
                return SscStatus.NOT_ACCEPTABLE, f"1-{MAX_DEVICE_NAME} printable characters, no blanks"
            self.device_name = value
            return None
        if path == ("device", "identification", "visual"):
            if not isinstance(value, bool):
                return SscStatus.BAD_REQUEST, "expected a boolean"
            if value:
                self.identify_count += 1
            self._identify_until = time.monotonic() + IDENTIFY_S if value else 0.0
            return None
        match = _RX.match(path[0])
        if match is None or len(path) != 2:
            return SscStatus.NOT_ACCEPTABLE, "read only"
        return self._set_channel(self.channel(int(match.group(1))), path[1], value)

    def _set_channel(self, channel: SimulatedChannel, key: str, value: Any) -> _Problem | None:
        if key == "name":
            if not isinstance(value, str):
                return SscStatus.BAD_REQUEST, "expected a string"
            problem = channel_name_problem(value, self.family)
            if problem is not None:
                return SscStatus.NOT_ACCEPTABLE, problem
            channel.name = value
        elif key == "mute":
            if not isinstance(value, bool):
                return SscStatus.BAD_REQUEST, "expected a boolean"
            channel.muted = value
        elif key == "frequency":
            if not isinstance(value, int) or isinstance(value, bool):
                return SscStatus.BAD_REQUEST, "expected an integer (kHz)"
            in_band = self.kind.frequency_low_khz <= value <= self.kind.frequency_high_khz
            if not in_band or value % 25:
                return SscStatus.NOT_ACCEPTABLE, "frequency outside the band or off the 25 kHz raster"
            channel.frequency_khz = value
        elif key == "gain":
            if not isinstance(value, int) or isinstance(value, bool):
                return SscStatus.BAD_REQUEST, "expected an integer (dB)"
            if not -3 <= value <= 42 or value % 3:
                return SscStatus.NOT_ACCEPTABLE, "gain is -3..42 dB in 3 dB steps"
            channel.gain_db = value
        else:
            return SscStatus.NOT_ACCEPTABLE, "read only"
        return None

    # ---- subscriptions --------------------------------------------------------------------

    def _answer_osc(self, value: Any, reply: Tree, errors: list[Any], addr: Address) -> None:
        if not isinstance(value, dict):
            errors.append(error_tree(("osc",), SscStatus.BAD_REQUEST, "osc is a node"))
            return
        for key, item in value.items():
            if key == "version" and item is None:
                reply.setdefault("osc", {})["version"] = "1.0"
            elif key == "state" and isinstance(item, dict) and set(item) == {"subscribe"}:
                result = self._subscribe(item["subscribe"], addr, errors)
                reply.setdefault("osc", {})["state"] = {"subscribe": result}
            else:
                errors.append(error_tree(("osc", key), *self._missing(("osc", key), item)))

    def _subscribe(self, items: Any, addr: Address, errors: list[Any]) -> list[Any]:
        here = ("osc", "state", "subscribe")
        if not isinstance(items, list):
            errors.append(error_tree(here, SscStatus.BAD_REQUEST, "subscribe takes a list"))
            return []
        answered: list[Any] = []
        for item in items:
            params = item.get("#", {}) if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(params, dict):
                errors.append(error_tree(here, SscStatus.BAD_REQUEST, "a subscription is an object"))
                continue
            if params.get("cancel") is True:
                self._cancel(addr)
                answered.append({"#": {"cancel": True}})
                continue
            checked = self._subscription_params(params)
            if isinstance(checked, str):
                errors.append(error_tree(here, SscStatus.BAD_REQUEST, checked))
                continue
            request = {key: part for key, part in item.items() if key != "#"}
            filled = self._fill(request, errors)
            if not filled:
                continue
            key = (addr, json.dumps(request, sort_keys=True))
            if key not in self._subscriptions and len(self._subscriptions) >= MAX_SUBSCRIPTIONS:
                errors.append(error_tree(here, SscStatus.CONFLICT, "too many subscriptions"))
                continue
            self._start_subscription(key, addr, request, checked)
            answered.append({"#": params, **filled})
        return answered

    @staticmethod
    def _subscription_params(params: Mapping[str, Any]) -> tuple[float, float, int] | str:
        lifetime = params.get("lifetime", 10)
        min_ms = params.get("min", 100)
        count = params.get("count", 1000)
        if not is_finite_number(lifetime) or not 0 < lifetime <= 3600:
            return "lifetime is 0 < seconds <= 3600"
        if not is_finite_number(min_ms) or not 10 <= min_ms <= 60_000:
            return "min is 10..60000 ms"
        max_ms = params.get("max", min_ms)
        if not is_finite_number(max_ms) or max_ms < min_ms:
            return "max is a number of ms not below min"
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            return "count is a positive integer"
        return float(lifetime), min_ms / 1000.0, count

    def _fill(self, request: Tree, errors: list[Any]) -> Tree:
        state = self.tree()
        state["m"] = self.meters()
        filled: Tree = {}
        self._walk(request, state, (), filled, errors, allow_set=False)
        return filled

    def _start_subscription(
        self, key: tuple[Address, str], addr: Address, request: Tree, params: tuple[float, float, int]
    ) -> None:
        lifetime_s, interval_s, count = params
        expires_at = asyncio.get_running_loop().time() + lifetime_s
        existing = self._subscriptions.get(key)
        if existing is not None:  # the same subscription again renews it
            existing.expires_at, existing.interval_s, existing.remaining = expires_at, interval_s, count
            return
        subscription = _Subscription(key, addr, request, interval_s, expires_at, count)
        self._subscriptions[key] = subscription
        task = asyncio.create_task(self._push(subscription), name=f"ssc-sim-push-{addr[1]}")
        subscription.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _cancel(self, addr: Address) -> None:
        for key, subscription in list(self._subscriptions.items()):
            if subscription.address == addr:
                del self._subscriptions[key]
                if subscription.task is not None:
                    subscription.task.cancel()

    async def _push(self, subscription: _Subscription) -> None:
        loop = asyncio.get_running_loop()
        try:
            while subscription.remaining > 0:
                await asyncio.sleep(subscription.interval_s)
                if loop.time() >= subscription.expires_at:
                    break
                if self.faults.silent:
                    continue
                payload = self._fill(subscription.tree, [])
                # Meters are pushed every time; other state only when it changed.
                state = {key: part for key, part in payload.items() if key != "m"}
                state_text = json.dumps(state, sort_keys=True)
                if state_text == subscription.last_state:
                    payload = {key: part for key, part in payload.items() if key == "m"}
                subscription.last_state = state_text
                if payload:
                    subscription.remaining -= 1
                    self._send(encode_message(payload), subscription.address)
        finally:
            if self._subscriptions.get(subscription.key) is subscription:
                del self._subscriptions[subscription.key]

    # ---- sending --------------------------------------------------------------------------

    def _reply(self, tree: Tree, addr: Address) -> None:
        data = encode_message(tree)
        delay_s = self.faults.delay_s
        if delay_s > 0:
            handle: asyncio.TimerHandle | None = None

            def later() -> None:
                if handle is not None:
                    self._delayed.discard(handle)
                self._send(data, addr)

            handle = asyncio.get_running_loop().call_later(delay_s, later)
            self._delayed.add(handle)
        else:
            self._send(data, addr)

    def _send(self, data: bytes, addr: Address) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self.faults.silent:
            return
        if self.faults.loss > 0 and self._fault_random.random() < self.faults.loss:
            return
        if self.faults.garbage:
            transport.sendto(self._junk(data), addr)
        transport.sendto(data, addr)

    def _junk(self, data: bytes) -> bytes:
        rng = self._fault_random
        choice = rng.randrange(6)
        if choice == 0:
            return rng.randbytes(rng.randint(1, 64))
        if choice == 1:
            return data[: max(1, len(data) // 2)]
        if choice == 2:
            return b"\xff\xfe\xc3\x28" + data
        if choice == 3:
            return b'[{"rx1":' + b"[" * 200 + b"]" * 200 + b"}]"
        if choice == 4:
            return b'{"m":{"rx99":{"af":-3},"tx1":[],"rx1":{"rssi":"loud","rsqi":[1]}},"osc":{"xid":"?"}}'
        return b'{"osc":{"error":[{"rx1":{"name":[{"desc":"address not found","code":404}]}}]}}'
