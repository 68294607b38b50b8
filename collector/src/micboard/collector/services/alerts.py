"""AlertService: evaluate alert rules on applied state and meters; the alert lifecycle.

Rules (thresholds per site, defaults in :class:`AlertThresholds`):

| rule | severity | opens when | clears when |
|---|---|---|---|
| ``battery_low`` | warning | bars <= 3 or percent <= 25 ("replace") | bars >= 4 and percent >= 30 |
| ``battery_critical`` | critical | bars <= 2 or percent <= 10 | bars >= 3 and percent >= 15 |
| ``rf_loss`` | critical | transmitter on, best antenna < -90 dBm (or none) for 3 s | best >= -87 dBm |
| ``audio_clipping`` | warning | audio peak >= -1 dBFS | peak < -4 dBFS |
| ``device_offline`` | warning | the device is reported offline | the device is online again |
| ``agent_stale`` | warning | no heartbeat for 3 intervals | a heartbeat arrives |
| ``agent_offline`` | critical | nothing from the agent for 300 s | the agent is heard again |

Hysteresis: a value-based alert opens at its threshold but clears only beyond threshold plus a
margin, and only after the value stayed clear for a hold time (``resolve_hold_s``, 10 s for
clipping since peaks are held that long); readings inside the margin change nothing. Status rules
(offline, stale) follow discrete events and clear at once. A battery that turns unknown keeps its
alert ("previously critical") until ``battery_unknown_keep_s`` after its last valid reading;
the batteries of a receiver that goes offline turn unknown then.

Lifecycle: open -> acknowledged -> resolved, each step with who and when; the system resolves
open or acknowledged alerts whose condition cleared (``resolved_by="system"``).

Data flows through explicit calls: :meth:`AlertService.evaluate_device` runs inside the caller's
(ingest) transaction and returns the changes, which the caller hands to :meth:`AlertService.notify`
after commit; :meth:`evaluate_meter`, :meth:`sweep` and the lifecycle calls own their transaction
and notify themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import and_, bindparam, delete, false, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from micboard.collector.battery import BatteryBands
from micboard.collector.errors import AlertNotFoundError, InvalidAlertRulesError, InvalidTransitionError
from micboard.collector.live import LiveHub
from micboard.collector.services.sync import STALE_AFTER_INTERVALS
from micboard.collector.services.webhooks import WebhookDispatcher
from micboard.collector.store.keys import values_in
from micboard.collector.store.schema import agents, channels, devices
from micboard.collector.store.schema_alerts import ACTIVE_STATES, alert_rules, alerts
from micboard.collector.store.upsert import insert_for
from micboard.shared.envelope import MeterBody
from micboard.shared.model import Device, ReceiverChannel, Transmitter

log = logging.getLogger(__name__)

SYSTEM = "system"
"""Who resolves an alert whose condition cleared."""

# How old a process's copy of a site's thresholds may be: a change made through another
# collector process or the CLI reaches this one's alert rules (and its listings, and its live
# tiles) within this time. One small query per refresh.
THRESHOLDS_REFRESH_S = 5.0


class AlertRule(StrEnum):
    """The conditions the collector raises alerts for."""

    BATTERY_LOW = "battery_low"
    BATTERY_CRITICAL = "battery_critical"
    RF_LOSS = "rf_loss"
    AUDIO_CLIPPING = "audio_clipping"
    DEVICE_OFFLINE = "device_offline"
    AGENT_STALE = "agent_stale"
    AGENT_OFFLINE = "agent_offline"


class Severity(StrEnum):
    """How urgent an alert is."""

    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(StrEnum):
    """Where an alert is in its lifecycle."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class ChangeKind(StrEnum):
    """What happened to an alert."""

    OPENED = "opened"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


SEVERITY: Mapping[AlertRule, Severity] = {
    AlertRule.BATTERY_LOW: Severity.WARNING,
    AlertRule.BATTERY_CRITICAL: Severity.CRITICAL,
    AlertRule.RF_LOSS: Severity.CRITICAL,
    AlertRule.AUDIO_CLIPPING: Severity.WARNING,
    AlertRule.DEVICE_OFFLINE: Severity.WARNING,
    AlertRule.AGENT_STALE: Severity.WARNING,
    AlertRule.AGENT_OFFLINE: Severity.CRITICAL,
}
_BATTERY_RULES = (AlertRule.BATTERY_LOW, AlertRule.BATTERY_CRITICAL)
_METER_RULES = (AlertRule.RF_LOSS, AlertRule.AUDIO_CLIPPING)
_AGENT_RULES = frozenset({AlertRule.AGENT_STALE, AlertRule.AGENT_OFFLINE})
_AGE_REFRESH_MS = 60_000
_YIELD_EVERY = 100


class AlertThresholds(BaseModel):
    """Thresholds of the rules; a site's overrides are stored as JSON and validated here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    battery_replace_bars: int = Field(default=3, ge=0, le=5)
    battery_critical_bars: int = Field(default=2, ge=0, le=5)
    battery_replace_percent: int = Field(default=25, ge=0, le=100)
    battery_critical_percent: int = Field(default=10, ge=0, le=100)
    battery_margin_percent: int = Field(default=5, ge=0, le=50)
    # Times have upper bounds too: they become milliseconds in integer arithmetic, and a value
    # beyond any sensible setting (1e308 s) would overflow there, in the middle of ingest.
    battery_unknown_keep_s: float = Field(default=1800.0, ge=0, le=7 * 86_400)
    rf_min_dbm: float = Field(default=-90.0, ge=-130, le=0)
    rf_margin_db: float = Field(default=3.0, ge=0, le=30)
    rf_loss_s: float = Field(default=3.0, ge=0, le=3600)
    clip_dbfs: float = Field(default=-1.0, ge=-60, le=0)
    clip_margin_db: float = Field(default=3.0, ge=0, le=30)
    clip_resolve_hold_s: float = Field(default=10.0, ge=0, le=3600)
    resolve_hold_s: float = Field(default=30.0, ge=0, le=86_400)
    agent_stale_intervals: float = Field(default=3.0, gt=0, le=1000)
    agent_offline_s: float = Field(default=300.0, gt=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _ordered(self) -> AlertThresholds:
        if self.battery_critical_bars > self.battery_replace_bars:
            raise ValueError("battery_critical_bars must not exceed battery_replace_bars")
        if self.battery_critical_percent > self.battery_replace_percent:
            raise ValueError("battery_critical_percent must not exceed battery_replace_percent")
        return self

    @property
    def bands(self) -> BatteryBands:
        """The battery bounds of these thresholds, by which tiles classify a reading too."""
        return BatteryBands(
            self.battery_replace_bars,
            self.battery_critical_bars,
            self.battery_replace_percent,
            self.battery_critical_percent,
        )

    def hold_ms(self, rule: AlertRule) -> int:
        """How long ``rule``'s condition must stay clear before its alert resolves."""
        if rule is AlertRule.AUDIO_CLIPPING:
            return int(self.clip_resolve_hold_s * 1000)
        if rule in (*_BATTERY_RULES, AlertRule.RF_LOSS):
            return int(self.resolve_hold_s * 1000)
        return 0  # status rules follow discrete events

    def battery(self, rule: AlertRule, tx: Transmitter | None) -> bool | None:
        """``True`` breached, ``False`` clear beyond the margin, ``None`` unknown or inside the margin."""
        if tx is None:
            return None
        return self.battery_reading(rule, tx.battery_bars, tx.battery_percent)

    def battery_reading(self, rule: AlertRule, bars: int | None, percent: int | None) -> bool | None:
        """:meth:`battery` for a reading given as bars and percent."""
        if bars is None and percent is None:
            return None
        critical = rule is AlertRule.BATTERY_CRITICAL
        bars_at = self.battery_critical_bars if critical else self.battery_replace_bars
        percent_at = self.battery_critical_percent if critical else self.battery_replace_percent
        if (bars is not None and bars <= bars_at) or (percent is not None and percent <= percent_at):
            return True
        # Not breached, so any bars are above the threshold; a percent must also clear the margin.
        if percent is not None and percent < percent_at + self.battery_margin_percent:
            return None
        return False

    def rf_usable(self, rf_dbm: Sequence[float | None]) -> bool | None:
        """``True`` usable beyond the margin, ``False`` unusable, ``None`` inside the margin."""
        known = [v for v in rf_dbm if v is not None]
        best = max(known) if known else None
        if best is None or best < self.rf_min_dbm:
            return False
        return True if best >= self.rf_min_dbm + self.rf_margin_db else None

    def clipping(self, peak_dbfs: float | None) -> bool | None:
        """``True`` clipping, ``False`` clear beyond the margin, ``None`` unknown or inside the margin."""
        if peak_dbfs is None:
            return None
        if peak_dbfs >= self.clip_dbfs:
            return True
        return False if peak_dbfs < self.clip_dbfs - self.clip_margin_db else None


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert as stored."""

    id: int
    site: str
    agent: str
    device_key: str | None
    channel: int | None
    rule: AlertRule
    severity: Severity
    state: AlertState
    message: str
    value: float | None
    opened_ms: int
    observed_ms: int
    acknowledged_by: str | None
    acknowledged_ms: int | None
    resolved_by: str | None
    resolved_ms: int | None
    updated_ms: int

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Alert:
        """Build from a row of the ``alerts`` table."""
        return cls(
            id=row["id"],
            site=row["site"],
            agent=row["agent"],
            device_key=row["device_key"],
            channel=row["channel"],
            rule=AlertRule(row["rule"]),
            severity=Severity(row["severity"]),
            state=AlertState(row["state"]),
            message=row["message"],
            value=row["value"],
            opened_ms=row["opened_ms"],
            observed_ms=row["observed_ms"],
            acknowledged_by=row["acknowledged_by"],
            acknowledged_ms=row["acknowledged_ms"],
            resolved_by=row["resolved_by"],
            resolved_ms=row["resolved_ms"],
            updated_ms=row["updated_ms"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the API, live subscribers and webhooks."""
        data = asdict(self)
        data.update(rule=self.rule.value, severity=self.severity.value, state=self.state.value)
        return data


@dataclass(frozen=True, slots=True)
class AlertChange:
    """An alert that opened, was acknowledged or resolved."""

    kind: ChangeKind
    alert: Alert


@dataclass(frozen=True, slots=True)
class DeviceTransition:
    """A device's state and status before and after an applied event, as the sync path saw them."""

    site: str
    agent: str
    device_key: str
    before: Device | None
    after: Device | None
    status_before: str | None
    status_after: str


@dataclass(frozen=True, slots=True)
class _Condition:
    site: str
    agent: str
    device_key: str | None
    channel: int | None
    rule: AlertRule
    active: bool | None
    value: float | None = None
    message: str = ""

    @property
    def target(self) -> str:
        return _target(self.agent, self.device_key, self.channel)


def _channels_gone(change: DeviceTransition) -> list[str]:
    """The alert targets of the channels ``change`` took away from its device."""
    if change.before is None or change.after is None:
        return []
    kept = {c.index for c in change.after.channels}
    return [
        _target(change.agent, change.device_key, c.index)
        for c in change.before.channels
        if c.index not in kept
    ]


def _target(agent: str, device_key: str | None, channel: int | None) -> str:
    parts = [agent]
    if device_key is not None:
        parts.append(device_key)
        if channel is not None:
            parts.append(str(channel))
    return "/".join(parts)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _outcomes(thresholds: AlertThresholds, tx: Mapping[str, Any]) -> tuple[Any, ...]:
    # Each battery rule's outcome for a transmitter (JSON mode), with the value while breached
    # (an open alert shows the latest reading).
    bars, percent = tx.get("battery_bars"), tx.get("battery_percent")
    if bars is None and percent is None:
        return ()
    value = percent if percent is not None else bars
    low = thresholds.battery_reading(AlertRule.BATTERY_LOW, bars, percent)
    critical = thresholds.battery_reading(AlertRule.BATTERY_CRITICAL, bars, percent)
    return (low, critical, value if low or critical else None)


def _battery_value(tx: Transmitter | None) -> float | None:
    if tx is None:
        return None
    if tx.battery_percent is not None:
        return float(tx.battery_percent)
    return float(tx.battery_bars) if tx.battery_bars is not None else None


def _battery_key(channel: ReceiverChannel | None) -> tuple[bool, int | None, int | None]:
    tx = channel.transmitter if channel else None
    return (tx is not None, tx.battery_bars if tx else None, tx.battery_percent if tx else None)


def _channel_label(channel: ReceiverChannel | None, index: int) -> str:
    return f"channel {index}" + (f" ({channel.name})" if channel and channel.name else "")


class _DeferredUpdates:
    """Plain ``UPDATE alerts SET ... WHERE id = ?`` writes of a batch, run as one executemany per shape.

    A batch of battery readings changes the value of thousands of open alerts; one statement
    each is one database round trip each (through aiosqlite's thread, or to the PostgreSQL server).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, dict[str, Any]] = {}

    def __contains__(self, alert_id: object) -> bool:
        return alert_id in self._by_id

    def add(self, alert_id: int, values: Mapping[str, Any]) -> None:
        """Hold back ``UPDATE alerts SET values WHERE id = alert_id``."""
        # Every such write sets constants, never an expression of the row, so writes to one row
        # compose by overriding columns: merging them in order is exactly running them in order
        # (the later value of a column wins, a column only the earlier sets keeps its value).
        self._by_id.setdefault(alert_id, {}).update(values)

    async def flush(self, conn: AsyncConnection) -> None:
        """Run the held writes: one statement per set of columns written; then hold nothing."""
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for alert_id, values in self._by_id.items():
            params = {"b_id": alert_id, **{f"b_{column}": value for column, value in values.items()}}
            shapes.setdefault(tuple(sorted(values)), []).append(params)
        self._by_id.clear()
        for columns, rows in shapes.items():
            # Bound names differ from the column names: SQLAlchemy reserves those for the SET clause.
            statement = (
                update(alerts)
                .where(alerts.c.id == bindparam("b_id"))
                .values({column: bindparam(f"b_{column}") for column in columns})
            )
            await conn.execute(statement, rows)


class AlertService:
    """Evaluates alert rules and runs the alert lifecycle; publishes changes to live views and webhooks."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        hub: LiveHub | None = None,
        webhooks: WebhookDispatcher | None = None,
        rules_cache_s: float = THRESHOLDS_REFRESH_S,
        defaults: AlertThresholds | None = None,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.webhooks = webhooks
        self.rules_cache_s = rules_cache_s
        # What a site without overrides gets (the collector's settings); overrides are merged on top.
        self.defaults = defaults or AlertThresholds()
        self._default_values = self.defaults.model_dump(exclude_defaults=True)
        self._rules: dict[str, tuple[AlertThresholds, float]] = {}
        # Sites whose receivers' alerts the next sweep judges again on the stored state: their
        # battery thresholds moved (here, another collector or the CLI), so alerts follow as
        # tiles do, or one of their alerts was resolved by hand while its condition may hold.
        self._rejudge: set[str] = set()
        # Meter-driven state kept in memory because meters are never persisted: since when each
        # channel has had no usable RF, whether each channel has a transmitter, and which meter
        # alerts are in force (alert id, clear-since) so that most meters touch no database.
        self._rf_bad_since: dict[str, int] = {}
        self._tx_present: dict[tuple[str, str], dict[int, bool]] = {}
        self._meter_alerts: dict[tuple[str, AlertRule], tuple[int, int | None]] | None = None

    # -- thresholds ---------------------------------------------------------------------------

    async def thresholds_for(self, conn: AsyncConnection, site: str) -> AlertThresholds:
        """The thresholds in force at ``site`` (defaults merged with its overrides), cached briefly."""
        cached = self._rules.get(site)
        if cached is not None and time.monotonic() - cached[1] < self.rules_cache_s:
            return cached[0]
        await self._load_thresholds(conn, [site])
        return self._rules[site][0]

    def _keep(self, site: str, thresholds: AlertThresholds | None, moment: float) -> None:
        """Cache ``site``'s thresholds in force (``None``: the defaults, uncached), noting a battery move."""
        old = self._rules.get(site)
        was = old[0] if old is not None else self.defaults
        now = thresholds if thresholds is not None else self.defaults
        if (was.bands, was.battery_margin_percent) != (now.bands, now.battery_margin_percent):
            self._rejudge.add(site)
        if thresholds is None:
            self._rules.pop(site, None)
        else:
            self._rules[site] = (thresholds, moment)

    async def _load_thresholds(self, conn: AsyncConnection, sites: Sequence[str]) -> None:
        """Load the thresholds of ``sites`` not cached (or cached too long) in one query."""
        moment = time.monotonic()
        stale = sorted(
            {s for s in sites if (c := self._rules.get(s)) is None or moment - c[1] >= self.rules_cache_s}
        )
        if not stale:
            return
        rows = await conn.execute(
            select(alert_rules.c.site, alert_rules.c.thresholds).where(alert_rules.c.site.in_(stale))
        )
        stored = {row[0]: row[1] for row in rows.all()}
        for site in stale:
            self._keep(site, self._merged(site, stored.get(site) or {}), moment)

    def _merged(self, site: str, overrides: Mapping[str, Any]) -> AlertThresholds:
        try:
            return AlertThresholds.model_validate({**self._default_values, **overrides})
        except ValidationError:
            # Stored overrides were validated on write; a row edited by hand must not stop alerts.
            log.error("invalid stored alert thresholds, using defaults", extra={"site": site})
            return self.defaults

    def _checked(self, site: str, overrides: Mapping[str, Any]) -> AlertThresholds:
        """The thresholds ``overrides`` put in force at ``site``, or :class:`InvalidAlertRulesError`."""
        try:
            return AlertThresholds.model_validate({**self._default_values, **overrides})
        except ValidationError as exc:
            first = exc.errors()[0]
            # Name the threshold (a check across thresholds names them in its message).
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidAlertRulesError(
                f"invalid thresholds for site {site!r}: {where + ': ' if where else ''}{first['msg']}"
            ) from None

    async def set_site_thresholds(
        self, site: str, overrides: Mapping[str, Any], *, by: str | None = None
    ) -> AlertThresholds:
        """Validate and store ``site``'s overrides (replacing earlier ones); returns what is in force."""
        thresholds = self._checked(site, overrides)
        values = {"thresholds": dict(overrides), "updated_by": by, "updated_ms": _now_ms()}
        async with self.engine.begin() as conn:
            # One upsert: two first writes at once must not both insert.
            await conn.execute(
                insert_for(conn, alert_rules)
                .values(site=site, **values)
                .on_conflict_do_update(index_elements=[alert_rules.c.site], set_=values)
            )
        self._keep(site, thresholds, time.monotonic())
        return thresholds

    async def site_thresholds(self, site: str) -> tuple[dict[str, Any], AlertThresholds]:
        """``site``'s stored overrides and the thresholds they put in force (read now, not cached)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(alert_rules.c.thresholds).where(alert_rules.c.site == site))
            ).first()
        overrides = dict(row[0] or {}) if row is not None else {}
        return overrides, self._merged(site, overrides)

    async def change_site_thresholds(
        self, site: str, values: Mapping[str, Any], reset: Iterable[str] = (), *, by: str | None = None
    ) -> tuple[dict[str, Any], AlertThresholds]:
        """Set ``values`` and drop the overrides named in ``reset``; the rest of ``site``'s stay.

        Returns the overrides now stored and what is in force. Nothing is stored when a name is
        unknown or the result does not validate (:class:`InvalidAlertRulesError`).
        """
        dropped = set(reset)
        unknown = sorted((set(values) | dropped) - set(AlertThresholds.model_fields))
        if unknown:
            known = ", ".join(AlertThresholds.model_fields)
            raise InvalidAlertRulesError(f"unknown threshold {', '.join(map(repr, unknown))}; known: {known}")
        now = _now_ms()
        async with self.engine.begin() as conn:
            # The site's row first, made if missing: on SQLite this takes the write lock, on
            # PostgreSQL the row (FOR UPDATE) until commit. Two changes at once then apply one
            # after the other, each on what the other stored, instead of the later one writing
            # back what it read before the earlier one committed.
            await conn.execute(
                insert_for(conn, alert_rules)
                .values(site=site, thresholds={}, updated_by=by, updated_ms=now)
                .on_conflict_do_nothing(index_elements=[alert_rules.c.site])
            )
            row = (
                await conn.execute(
                    select(alert_rules.c.thresholds).where(alert_rules.c.site == site).with_for_update()
                )
            ).one()
            current = dict(row[0] or {})
            merged = {k: v for k, v in current.items() if k not in dropped} | dict(values)
            if not merged:
                await conn.execute(delete(alert_rules).where(alert_rules.c.site == site))
                stored: dict[str, Any] = {}
                in_force = self._merged(site, {})
            else:
                # Refused: the transaction rolls back, the row made above with it.
                in_force = self._checked(site, merged)
                # Stored as the model reads them (2.0 for a count of bars is stored as 2).
                stored = {name: getattr(in_force, name) for name in merged}
                await conn.execute(
                    update(alert_rules)
                    .where(alert_rules.c.site == site)
                    .values(thresholds=stored, updated_by=by, updated_ms=now)
                )
        self._keep(site, in_force if stored else None, time.monotonic())
        return stored, in_force

    async def site_overrides(self) -> dict[str, dict[str, Any]]:
        """Every site's stored overrides, by site."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(alert_rules.c.site, alert_rules.c.thresholds))).all()
        return {row[0]: dict(row[1] or {}) for row in rows}

    async def clear_site_thresholds(self, site: str) -> bool:
        """Drop ``site``'s overrides (the defaults apply again); returns whether it had any."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(alert_rules).where(alert_rules.c.site == site))
        self._keep(site, None, time.monotonic())
        return bool(result.rowcount)

    # -- evaluation ---------------------------------------------------------------------------

    async def evaluate_device(
        self, conn: AsyncConnection, change: DeviceTransition, *, now_ms: int | None = None
    ) -> list[AlertChange]:
        """Evaluate device and battery rules on an applied device event, in the caller's transaction.

        Touches the database only when status, transmitter presence or battery changed. Hand the
        result to :meth:`notify` after the transaction commits.
        """
        return await self.evaluate_devices(conn, [change], now_ms=now_ms)

    def needs_evaluation(
        self,
        site: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any],
        status_before: str | None,
        status_after: str,
    ) -> bool:
        """Whether a device write (states in JSON mode) can change an alert; cheap, no query.

        ``False`` when status, transmitter presence and every battery rule's outcome are as they
        were (a battery still clear, or still breached at the same value): evaluating would
        find nothing to do, and a held resolution is the sweep's. Unknown sites say ``True``.
        """
        if before is None or status_before != status_after:
            return True
        cached = self._rules.get(site)
        if cached is None:
            return True
        thresholds = cached[0]
        old_channels, new_channels = before["channels"], after["channels"]
        if len(old_channels) != len(new_channels):
            return True
        for old, new in zip(old_channels, new_channels, strict=True):
            # The sync path copies a channel before writing it: the same object is unchanged.
            if old is new:
                continue
            if old["index"] != new["index"]:
                return True
            old_tx, new_tx = old.get("transmitter"), new.get("transmitter")
            if old_tx is new_tx:
                continue
            if old_tx is None or new_tx is None:
                return True
            if _outcomes(thresholds, old_tx) != _outcomes(thresholds, new_tx):
                return True
        return False

    async def evaluate_devices(
        self, conn: AsyncConnection, changes: Sequence[DeviceTransition], *, now_ms: int | None = None
    ) -> list[AlertChange]:
        """:meth:`evaluate_device` for the devices of a whole batch: at most one query of active alerts.

        Give one transition per device (several of the same device are evaluated in order, but
        against the alerts active before the first).
        """
        now = _now_ms() if now_ms is None else now_ms
        await self._load_thresholds(
            conn, [c.site for c in changes if c.after is not None and c.status_after == "online"]
        )
        planned: list[tuple[DeviceTransition, list[_Condition], list[_Condition]]] = []
        gone: set[str] = set()
        keys: set[tuple[str, str]] = set()
        for change in changes:
            conditions, unknown_now = self._device_conditions(change)
            if conditions or unknown_now:
                planned.append((change, conditions, unknown_now))
                keys.add((change.agent, change.device_key))
            taken = _channels_gone(change)
            if taken:
                gone.update(taken)
                keys.add((change.agent, change.device_key))
        if not keys:
            return []
        active = await self._active_for_devices(conn, keys)
        results: list[AlertChange] = []
        if gone:
            results += await self._resolve_gone(conn, active, gone, now)
        # Value, hold and "last seen" writes to alerts in force run together at the end of the batch.
        deferred = _DeferredUpdates()
        for change in changes:
            if change.status_after == "offline" and change.status_before != "offline":
                # A receiver gone offline says nothing of its batteries any more: as for a
                # transmitter switched off, its battery alerts are "previously ..." from now and
                # age out after battery_unknown_keep_s unless it comes back.
                for (_target, rule), alert_row in active.items():
                    if (
                        rule in _BATTERY_RULES
                        and alert_row["agent"] == change.agent
                        and alert_row["device_key"] == change.device_key
                    ):
                        deferred.add(alert_row["id"], {"observed_ms": now})
        for _change, conditions, unknown_now in planned:
            if gone:
                conditions = [c for c in conditions if c.target not in gone]
                unknown_now = [c for c in unknown_now if c.target not in gone]
            for condition in conditions:
                result = await self._apply(conn, active, condition, now, deferred)
                if result is not None:
                    results.append(result)
            for condition in unknown_now:
                # Just turned unknown: the last valid reading was now, so "previously ..." starts here.
                row = active.get((condition.target, condition.rule))
                if row is not None:
                    deferred.add(row["id"], {"observed_ms": now})
        await deferred.flush(conn)
        return results

    async def _resolve_gone(
        self,
        conn: AsyncConnection,
        active: Mapping[tuple[str, AlertRule], Mapping[Any, Any]],
        gone: set[str],
        now: int,
    ) -> list[AlertChange]:
        """Resolve every alert in force on channels their device no longer has.

        A receiver reconfigured or swapped for a smaller one: no reading will ever clear them.
        """
        results: list[AlertChange] = []
        for (target, rule), row in active.items():
            if target not in gone:
                continue
            result = await self._resolve_row(conn, row, SYSTEM, now)
            if result is not None:
                results.append(result)
            if self._meter_alerts is not None:
                self._meter_alerts.pop((target, rule), None)
        for target in gone:
            self._rf_bad_since.pop(target, None)
        return results

    def _device_conditions(self, change: DeviceTransition) -> tuple[list[_Condition], list[_Condition]]:
        """The conditions ``change`` decides (breached or clear) and those it makes unknown."""
        before, after = change.before, change.after
        if after is not None:
            self._tx_present[change.agent, change.device_key] = {
                c.index: c.transmitter is not None for c in after.channels
            }
        status_changed = before is None or change.status_before != change.status_after
        conditions: list[_Condition] = []
        unknown_now: list[_Condition] = []
        if status_changed and change.status_after in ("online", "offline"):
            offline = change.status_after == "offline"
            conditions.append(
                _Condition(
                    change.site,
                    change.agent,
                    change.device_key,
                    None,
                    AlertRule.DEVICE_OFFLINE,
                    offline,
                    message=f"device {change.device_key} is offline",
                )
            )
        if after is not None and change.status_after == "online":
            cached = self._rules.get(change.site)
            thresholds = cached[0] if cached is not None else self.defaults
            indexes = {c.index for c in after.channels} | {
                c.index for c in (before.channels if before else ())
            }
            for index in sorted(indexes):
                old = before.channel(index) if before else None
                new = after.channel(index)
                if before is not None and not status_changed and _battery_key(old) == _battery_key(new):
                    continue
                tx = new.transmitter if new else None
                if tx is None:
                    self._rf_bad_since.pop(_target(change.agent, change.device_key, index), None)
                for rule in _BATTERY_RULES:
                    state = thresholds.battery(rule, tx)
                    condition = _Condition(
                        change.site,
                        change.agent,
                        change.device_key,
                        index,
                        rule,
                        state,
                        _battery_value(tx),
                        f"battery {'critical' if rule is AlertRule.BATTERY_CRITICAL else 'low'} on "
                        f"{_channel_label(new, index)} of {change.device_key}",
                    )
                    (conditions if state is not None else unknown_now).append(condition)
        return conditions, unknown_now

    async def agents_changed(
        self,
        conn: AsyncConnection,
        *,
        stale: Sequence[tuple[str, str]] = (),
        back: Sequence[tuple[str, str]] = (),
        now_ms: int | None = None,
    ) -> list[AlertChange]:
        """Open ``agent_stale`` for agents (site, agent) that went stale, resolve it for those heard again.

        Runs in the caller's transaction (the one that changed the agents' status); hand the
        result to :meth:`notify` after commit. :meth:`sweep` applies the same rule by age.
        """
        if not stale and not back:
            return []
        now = _now_ms() if now_ms is None else now_ms
        names = sorted({agent for _site, agent in (*stale, *back)})
        rows = (
            (
                await conn.execute(
                    select(alerts).where(
                        alerts.c.agent.in_(names),
                        alerts.c.device_key.is_(None),
                        alerts.c.rule == AlertRule.AGENT_STALE.value,
                        alerts.c.state.in_(ACTIVE_STATES),
                    )
                )
            )
            .mappings()
            .all()
        )
        active = {(row["target"], AlertRule(row["rule"])): row for row in rows}
        await self._load_thresholds(conn, sorted({site for site, _agent in stale}))
        # The store marks an agent stale after STALE_AFTER_INTERVALS; a site that set a longer
        # wait gets its alert from the sweep when that wait is over, not now (opened now, the
        # next sweep would find it "not stale yet" and resolve it, then open it again later).
        stale = [
            (site, agent)
            for site, agent in stale
            if self._rules[site][0].agent_stale_intervals <= STALE_AFTER_INTERVALS
        ]
        results: list[AlertChange] = []
        for (site, agent), breached in [*((s, True) for s in stale), *((b, False) for b in back)]:
            condition = _Condition(
                site,
                agent,
                None,
                None,
                AlertRule.AGENT_STALE,
                breached,
                message=f"agent {agent}: no heartbeat",
            )
            result = await self._apply(conn, active, condition, now)
            if result is not None:
                results.append(result)
        return results

    async def evaluate_meter(
        self, site: str, agent: str, meter: MeterBody, *, now_ms: int | None = None
    ) -> list[AlertChange]:
        """Evaluate RF loss and clipping on one meter message; most meters touch no database.

        Once the alerts in force, the device's transmitters and the site's thresholds are
        known, a meter that changes no alert opens no transaction at all.
        """
        now = _now_ms() if now_ms is None else now_ms
        present = self._tx_present.get((agent, meter.device_key))
        cached = self._rules.get(site)
        if (
            self._meter_alerts is not None
            and present is not None
            and cached is not None
            and time.monotonic() - cached[1] < self.rules_cache_s
        ):
            conditions = self._meter_conditions(site, agent, meter, present, cached[0], now)
            if not any(self._meter_would_write(c, cached[0], now) for c in conditions):
                return []
        changes: list[AlertChange] = []
        async with self.engine.begin() as conn:
            if self._meter_alerts is None:
                await self._load_meter_alerts(conn)
            if present is None:
                present = await self._load_tx_present(conn, agent, meter.device_key)
            thresholds = await self.thresholds_for(conn, site)
            for condition in self._meter_conditions(site, agent, meter, present, thresholds, now):
                result = await self._apply_meter(conn, condition, thresholds, now)
                if result is not None:
                    changes.append(result)
        self.notify(changes)
        return changes

    def _meter_conditions(
        self,
        site: str,
        agent: str,
        meter: MeterBody,
        present: Mapping[int, bool],
        thresholds: AlertThresholds,
        now: int,
    ) -> list[_Condition]:
        """RF loss and clipping of each metered channel (keeps the in-memory RF timers)."""
        conditions: list[_Condition] = []
        for channel in meter.channels:
            target = _target(agent, meter.device_key, channel.index)
            known = [v for v in channel.rf_dbm if v is not None]
            best = max(known) if known else None
            rf_state: bool | None
            if not present.get(channel.index, False):
                self._rf_bad_since.pop(target, None)
                rf_state = False
            else:
                usable = thresholds.rf_usable(channel.rf_dbm)
                if usable is False:
                    since = self._rf_bad_since.setdefault(target, now)
                    # An alert already in force is simply still true: that restarts its clear timer.
                    in_force = (target, AlertRule.RF_LOSS) in (self._meter_alerts or {})
                    rf_state = True if in_force or now - since >= thresholds.rf_loss_s * 1000 else None
                else:
                    self._rf_bad_since.pop(target, None)
                    rf_state = False if usable else None
            peak = channel.audio_peak_dbfs if channel.audio_peak_dbfs is not None else channel.audio_dbfs
            for rule, state, value, message in (
                (AlertRule.RF_LOSS, rf_state, best, f"no usable RF on channel {channel.index}"),
                (
                    AlertRule.AUDIO_CLIPPING,
                    thresholds.clipping(peak),
                    peak,
                    f"audio clipping on channel {channel.index}",
                ),
            ):
                conditions.append(
                    _Condition(
                        site,
                        agent,
                        meter.device_key,
                        channel.index,
                        rule,
                        state,
                        value,
                        f"{message} of {meter.device_key}",
                    )
                )
        return conditions

    def _meter_would_write(self, condition: _Condition, thresholds: AlertThresholds, now: int) -> bool:
        """Whether :meth:`_apply_meter` would change anything for ``condition`` (mirrors it)."""
        assert self._meter_alerts is not None
        if condition.active is None:
            return False
        known = self._meter_alerts.get((condition.target, condition.rule))
        if condition.active:
            return known is None or known[1] is not None
        if known is None:
            return False
        clear_since, hold = known[1], thresholds.hold_ms(condition.rule)
        return clear_since is None or now - clear_since >= hold

    async def sweep(self, *, now_ms: int | None = None) -> list[AlertChange]:
        """Periodic job: agent stale/offline, clear-hold resolutions, aged-out unknown batteries."""
        now = _now_ms() if now_ms is None else now_ms
        changes: list[AlertChange] = []
        async with self.engine.begin() as conn:
            changes += await self._sweep_agents(conn, now)
            changes += await self._sweep_holds(conn, now)
            changes += await self._sweep_unknown_batteries(conn, now)
            await self._load_meter_alerts(conn)
        changes += await self._judge_again(now)
        self.notify(changes)
        return changes

    async def _judge_again(self, now: int) -> list[AlertChange]:
        """Device and battery rules of the sites in :attr:`_rejudge`, on their receivers' stored state.

        A battery alert is otherwise judged when its reading changes, which a bars-only receiver
        may not do for hours: a tile would turn "replace" at once under new thresholds while its
        alert waited, and an alert resolved by hand while the battery is still low would stay
        resolved. One transaction per site, so a large fleet's sites do not hold the store
        together.
        """
        changes: list[AlertChange] = []
        while self._rejudge:
            site = min(self._rejudge)
            self._rejudge.discard(site)
            async with self.engine.begin() as conn:
                rows = (
                    await conn.execute(
                        select(
                            devices.c.agent, devices.c.device_key, devices.c.state, devices.c.status
                        ).where(devices.c.site == site, devices.c.status.in_(("online", "offline")))
                    )
                ).all()
                transitions = []
                for agent, device_key, state, status in rows:
                    try:
                        device = Device.model_validate(state)
                    except ValidationError:
                        continue  # a row no reading of which can be trusted: left as it is
                    transitions.append(
                        DeviceTransition(site, agent, device_key, None, device, status, status)
                    )
                changes += await self.evaluate_devices(conn, transitions, now_ms=now)
        return changes

    async def _sweep_agents(self, conn: AsyncConnection, now: int) -> list[AlertChange]:
        rows = (await conn.execute(select(agents))).mappings().all()
        active_rows = (
            (
                await conn.execute(
                    select(alerts).where(
                        alerts.c.device_key.is_(None),
                        alerts.c.rule.in_([AlertRule.AGENT_STALE.value, AlertRule.AGENT_OFFLINE.value]),
                        alerts.c.state.in_(ACTIVE_STATES),
                    )
                )
            )
            .mappings()
            .all()
        )
        active = {(row["target"], AlertRule(row["rule"])): row for row in active_rows}
        # Every site's thresholds in one query, not one per agent.
        await self._load_thresholds(conn, sorted({row["site"] for row in rows}))
        # The ages of silent agents are refreshed together (once a minute each, so many at once).
        deferred = _DeferredUpdates()
        changes: list[AlertChange] = []
        for index, row in enumerate(rows):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                # Agents whose state does not change cost no statement, so nothing else would
                # suspend this loop: a fleet of a thousand agents would stall the API for ~100 ms.
                await asyncio.sleep(0)
            thresholds = await self.thresholds_for(conn, row["site"])
            # Anything from the agent counts as heard, as for the agent's stale status in the store.
            heard_ms = max(row["last_heartbeat_ms"] or 0, row["last_seen_ms"] or 0)
            age_s = (now - heard_ms) / 1000
            stale_after_s = thresholds.agent_stale_intervals * float(row["heartbeat_interval_s"] or 10.0)
            stale, offline = age_s > stale_after_s, age_s > thresholds.agent_offline_s
            target = _target(row["agent"], None, None)
            if not (stale or offline or any((target, rule) in active for rule in _AGENT_RULES)):
                continue  # heard lately, nothing open: neither rule changes anything (most agents)
            for rule, breached, message in (
                (AlertRule.AGENT_STALE, stale, f"agent {row['agent']}: no heartbeat"),
                (AlertRule.AGENT_OFFLINE, offline, f"agent {row['agent']} is offline"),
            ):
                condition = _Condition(
                    row["site"], row["agent"], None, None, rule, breached, round(age_s, 1), message
                )
                result = await self._apply(conn, active, condition, now, deferred)
                if result is not None:
                    changes.append(result)
        # Before the hold sweep, which reads clear_since_ms.
        await deferred.flush(conn)
        return changes

    async def _sweep_holds(self, conn: AsyncConnection, now: int) -> list[AlertChange]:
        rows = (
            (
                await conn.execute(
                    select(alerts).where(
                        alerts.c.state.in_(ACTIVE_STATES), alerts.c.clear_since_ms.is_not(None)
                    )
                )
            )
            .mappings()
            .all()
        )
        await self._load_thresholds(conn, sorted({row["site"] for row in rows}))
        changes: list[AlertChange] = []
        for row in rows:
            thresholds = await self.thresholds_for(conn, row["site"])
            if now - row["clear_since_ms"] >= thresholds.hold_ms(AlertRule(row["rule"])):
                result = await self._resolve_row(conn, row, SYSTEM, now)
                if result is not None:
                    changes.append(result)
        return changes

    async def _sweep_unknown_batteries(self, conn: AsyncConnection, now: int) -> list[AlertChange]:
        query = (
            select(
                alerts,
                channels.c.tx_present,
                channels.c.battery_bars,
                channels.c.battery_percent,
                devices.c.status.label("device_status"),
            )
            .select_from(
                alerts.outerjoin(
                    devices,
                    and_(devices.c.agent == alerts.c.agent, devices.c.device_key == alerts.c.device_key),
                ).outerjoin(
                    channels, and_(channels.c.device_pk == devices.c.id, channels.c.index == alerts.c.channel)
                )
            )
            .where(
                alerts.c.state.in_(ACTIVE_STATES),
                alerts.c.rule.in_([r.value for r in _BATTERY_RULES]),
                # Only batteries reading unknown (or gone): a fleet's open battery alerts are
                # mostly known readings, and turning every one into a row on each sweep stalled
                # the event loop for tens of milliseconds.
                or_(
                    channels.c.tx_present.is_(None),
                    channels.c.tx_present.is_(false()),
                    and_(channels.c.battery_bars.is_(None), channels.c.battery_percent.is_(None)),
                    devices.c.status == "offline",
                ),
            )
        )
        rows = (await conn.execute(query)).mappings().all()
        changes: list[AlertChange] = []
        for row in rows:
            unknown = (
                not row["tx_present"]
                or (row["battery_bars"] is None and row["battery_percent"] is None)
                or row["device_status"] == "offline"
            )
            if not unknown:
                continue
            thresholds = await self.thresholds_for(conn, row["site"])
            if now - row["observed_ms"] >= thresholds.battery_unknown_keep_s * 1000:
                result = await self._resolve_row(conn, row, SYSTEM, now)
                if result is not None:
                    changes.append(result)
        return changes

    # -- applying conditions ------------------------------------------------------------------

    async def _active_for_devices(
        self, conn: AsyncConnection, keys: set[tuple[str, str]]
    ) -> dict[tuple[str, AlertRule], Mapping[Any, Any]]:
        # By agent (an index prefix), then filtered here: portable, and one statement per batch.
        rows = (
            (
                await conn.execute(
                    select(alerts).where(
                        values_in(alerts.c.agent, {agent for agent, _key in keys}, conn.dialect.name),
                        alerts.c.device_key.is_not(None),
                        alerts.c.state.in_(ACTIVE_STATES),
                    )
                )
            )
            .mappings()
            .all()
        )
        return {
            (row["target"], AlertRule(row["rule"])): row
            for row in rows
            if (row["agent"], row["device_key"]) in keys
        }

    async def _apply(
        self,
        conn: AsyncConnection,
        active: Mapping[tuple[str, AlertRule], Mapping[Any, Any]],
        condition: _Condition,
        now: int,
        deferred: _DeferredUpdates | None = None,
    ) -> AlertChange | None:
        """Open, update, start the hold of or resolve the alert of ``condition``.

        With ``deferred``, the plain updates of alerts in force are held there for the caller to
        flush; opening and resolving run at once (their outcome is returned). Holding back is
        safe: a plain update never changes an alert's state, so an insert's conflict and a
        resolution's guard decide the same either way.
        """
        row = active.get((condition.target, condition.rule))
        if condition.active is None:
            return None
        if condition.active:
            if row is None:
                return await self._open(conn, condition, now)
            if row["clear_since_ms"] is not None or (
                row["value"] != condition.value
                # An agent's silence grows every sweep: its age is written once a minute.
                and (condition.rule not in _AGENT_RULES or now - row["observed_ms"] >= _AGE_REFRESH_MS)
            ):
                values = {
                    "clear_since_ms": None,
                    "value": condition.value,
                    "observed_ms": now,
                    "updated_ms": now,
                }
                await self._update_row(conn, row["id"], values, deferred)
            return None
        if row is None:
            return None
        thresholds = await self.thresholds_for(conn, condition.site)
        hold = thresholds.hold_ms(condition.rule)
        clear_since = row["clear_since_ms"]
        if clear_since is None and hold > 0:
            await self._update_row(conn, row["id"], {"clear_since_ms": now, "updated_ms": now}, deferred)
            return None
        if clear_since is None or now - clear_since >= hold:
            if deferred is not None and row["id"] in deferred:
                # The same alert was updated earlier in the batch (two transitions of one device):
                # write that first, so the row sees its statements in the order they were decided.
                await deferred.flush(conn)
            return await self._resolve_row(conn, row, SYSTEM, now)
        return None

    async def _update_row(
        self,
        conn: AsyncConnection,
        alert_id: int,
        values: Mapping[str, Any],
        deferred: _DeferredUpdates | None,
    ) -> None:
        """``UPDATE alerts SET values WHERE id = alert_id``, now or held in ``deferred``."""
        if deferred is not None:
            deferred.add(alert_id, values)
        else:
            await conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))

    async def _apply_meter(
        self, conn: AsyncConnection, condition: _Condition, thresholds: AlertThresholds, now: int
    ) -> AlertChange | None:
        assert self._meter_alerts is not None
        key = (condition.target, condition.rule)
        known = self._meter_alerts.get(key)
        if condition.active is None:
            return None
        if condition.active:
            if known is None:
                result = await self._open(conn, condition, now)
                if result is not None:
                    self._meter_alerts[key] = (result.alert.id, None)
                else:
                    await self._load_meter_alerts(conn)
                return result
            if known[1] is not None:
                await conn.execute(
                    update(alerts).where(alerts.c.id == known[0]).values(clear_since_ms=None, updated_ms=now)
                )
                self._meter_alerts[key] = (known[0], None)
            return None
        if known is None:
            return None
        alert_id, clear_since = known
        hold = thresholds.hold_ms(condition.rule)
        if clear_since is None and hold > 0:
            await conn.execute(
                update(alerts).where(alerts.c.id == alert_id).values(clear_since_ms=now, updated_ms=now)
            )
            self._meter_alerts[key] = (alert_id, now)
            return None
        if clear_since is None or now - clear_since >= hold:
            del self._meter_alerts[key]
            row = (await conn.execute(select(alerts).where(alerts.c.id == alert_id))).mappings().first()
            return await self._resolve_row(conn, row, SYSTEM, now) if row is not None else None
        return None

    async def _load_meter_alerts(self, conn: AsyncConnection) -> None:
        rows = (
            await conn.execute(
                select(alerts.c.id, alerts.c.target, alerts.c.rule, alerts.c.clear_since_ms).where(
                    alerts.c.state.in_(ACTIVE_STATES), alerts.c.rule.in_([r.value for r in _METER_RULES])
                )
            )
        ).all()
        self._meter_alerts = {(row.target, AlertRule(row.rule)): (row.id, row.clear_since_ms) for row in rows}

    async def _load_tx_present(self, conn: AsyncConnection, agent: str, device_key: str) -> dict[int, bool]:
        rows = (
            await conn.execute(
                select(channels.c.index, channels.c.tx_present)
                .select_from(channels.join(devices, devices.c.id == channels.c.device_pk))
                .where(
                    devices.c.agent == agent, devices.c.device_key == device_key, devices.c.status == "online"
                )
            )
        ).all()
        present = {int(row[0]): bool(row[1]) for row in rows}
        self._tx_present[agent, device_key] = present
        return present

    async def _open(self, conn: AsyncConnection, condition: _Condition, now: int) -> AlertChange | None:
        values: dict[str, Any] = {
            "site": condition.site,
            "agent": condition.agent,
            "device_key": condition.device_key,
            "channel": condition.channel,
            "target": condition.target,
            "rule": condition.rule.value,
            "severity": SEVERITY[condition.rule].value,
            "state": AlertState.OPEN.value,
            "message": condition.message,
            "value": condition.value,
            "opened_ms": now,
            "observed_ms": now,
            "updated_ms": now,
        }
        # Another collector may have opened the same alert: the partial unique index turns that
        # into a no-op instead of a failed ingest transaction.
        statement = insert_for(conn, alerts).values(**values).on_conflict_do_nothing().returning(alerts.c.id)
        alert_id = (await conn.execute(statement)).scalar()
        if alert_id is None:
            return None
        alert = Alert.from_row(
            {**values, "id": alert_id, "acknowledged_by": None, "acknowledged_ms": None}
            | {"resolved_by": None, "resolved_ms": None}
        )
        log.info(
            "alert opened",
            extra={"alert_id": alert_id, "rule": condition.rule.value, "target": condition.target},
        )
        return AlertChange(ChangeKind.OPENED, alert)

    async def _resolve_row(
        self, conn: AsyncConnection, row: Mapping[Any, Any], by: str, now: int
    ) -> AlertChange | None:
        result = await conn.execute(
            update(alerts)
            .where(alerts.c.id == row["id"], alerts.c.state.in_(ACTIVE_STATES))
            .values(state=AlertState.RESOLVED.value, resolved_by=by, resolved_ms=now, updated_ms=now)
        )
        if result.rowcount == 0:
            return None  # resolved meanwhile by someone else
        alert = Alert.from_row(
            {
                **row,
                "state": AlertState.RESOLVED.value,
                "resolved_by": by,
                "resolved_ms": now,
                "updated_ms": now,
            }
        )
        log.info("alert resolved", extra={"alert_id": alert.id, "rule": alert.rule.value, "by": by})
        return AlertChange(ChangeKind.RESOLVED, alert)

    # -- lifecycle ----------------------------------------------------------------------------

    async def get(self, alert_id: int) -> Alert:
        """One alert, or :class:`AlertNotFoundError`."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(alerts).where(alerts.c.id == alert_id))).mappings().first()
        if row is None:
            raise AlertNotFoundError(alert_id)
        return Alert.from_row(row)

    async def list_alerts(
        self,
        *,
        site: str | None = None,
        states: Iterable[AlertState] | None = None,
        agent: str | None = None,
        limit: int = 500,
    ) -> list[Alert]:
        """Alerts matching the filters, newest first, in one query."""
        query = select(alerts).order_by(alerts.c.opened_ms.desc(), alerts.c.id.desc()).limit(limit)
        if site is not None:
            query = query.where(alerts.c.site == site)
        if agent is not None:
            query = query.where(alerts.c.agent == agent)
        if states is not None:
            query = query.where(alerts.c.state.in_([AlertState(s).value for s in states]))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [Alert.from_row(row) for row in rows]

    async def acknowledge(self, alert_id: int, by: str, *, now_ms: int | None = None) -> Alert:
        """Acknowledge an open alert; :class:`InvalidTransitionError` if it is acknowledged or resolved."""
        if not by:
            raise ValueError("who acknowledges must be named")
        now = _now_ms() if now_ms is None else now_ms
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id, alerts.c.state == AlertState.OPEN.value)
                .values(
                    state=AlertState.ACKNOWLEDGED.value,
                    acknowledged_by=by,
                    acknowledged_ms=now,
                    updated_ms=now,
                )
            )
            row = (await conn.execute(select(alerts).where(alerts.c.id == alert_id))).mappings().first()
        if row is None:
            raise AlertNotFoundError(alert_id)
        if result.rowcount == 0:
            raise InvalidTransitionError(alert_id, row["state"], "acknowledged")
        alert = Alert.from_row(row)
        self.notify([AlertChange(ChangeKind.ACKNOWLEDGED, alert)])
        return alert

    async def resolve(self, alert_id: int, by: str, *, now_ms: int | None = None) -> Alert:
        """Resolve an open or acknowledged alert by hand; a condition still true opens a new alert.

        A new alert comes with the next reading for meter rules, and at the next sweep for the
        others (acknowledge an alert to keep it quiet instead).
        """
        if not by:
            raise ValueError("who resolves must be named")
        now = _now_ms() if now_ms is None else now_ms
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id, alerts.c.state.in_(ACTIVE_STATES))
                .values(state=AlertState.RESOLVED.value, resolved_by=by, resolved_ms=now, updated_ms=now)
            )
            row = (await conn.execute(select(alerts).where(alerts.c.id == alert_id))).mappings().first()
        if row is None:
            raise AlertNotFoundError(alert_id)
        if result.rowcount == 0:
            raise InvalidTransitionError(alert_id, row["state"], "resolved")
        alert = Alert.from_row(row)
        if self._meter_alerts is not None:
            self._meter_alerts.pop((row["target"], alert.rule), None)
        if alert.rule in (*_BATTERY_RULES, AlertRule.DEVICE_OFFLINE):
            # Judged on events that may not come again (a battery that holds its reading, a
            # receiver that stays offline): the next sweep looks at the stored state instead.
            # Meter rules see the next meter, agent rules the sweep's ages.
            self._rejudge.add(alert.site)
        self.notify([AlertChange(ChangeKind.RESOLVED, alert)])
        return alert

    async def resolve_forgotten(
        self,
        conn: AsyncConnection,
        agent: str,
        device_key: str | None = None,
        *,
        by: str,
        now_ms: int | None = None,
    ) -> list[AlertChange]:
        """Resolve every alert in force on a device (without ``device_key``: an agent) being forgotten.

        Runs in the caller's transaction; hand the result to :meth:`notify` after commit. What
        the rules remember of it in memory goes too: reported again later, it starts afresh.
        """
        now = _now_ms() if now_ms is None else now_ms
        query = select(alerts).where(alerts.c.agent == agent, alerts.c.state.in_(ACTIVE_STATES))
        if device_key is not None:
            query = query.where(alerts.c.device_key == device_key)
        rows = (await conn.execute(query)).mappings().all()
        changes = []
        for row in rows:
            change = await self._resolve_row(conn, row, by, now)
            if change is not None:
                changes.append(change)
                if self._meter_alerts is not None:
                    self._meter_alerts.pop((row["target"], change.alert.rule), None)
        for key in [k for k in self._tx_present if k[0] == agent and device_key in (None, k[1])]:
            del self._tx_present[key]
        prefix = _target(agent, device_key, None) + "/"
        for target in [t for t in self._rf_bad_since if t.startswith(prefix)]:
            del self._rf_bad_since[target]
        return changes

    # -- notification -------------------------------------------------------------------------

    def notify(self, changes: Iterable[AlertChange]) -> None:
        """Push committed changes to live subscribers and webhooks (never blocks)."""
        for change in changes:
            data = {"change": change.kind.value, "alert": change.alert.to_dict()}
            if self.hub is not None:
                self.hub.publish_alert(change.alert.site, data)
            if self.webhooks is not None:
                self.webhooks.submit(f"alert.{change.kind.value}", data, alert_id=change.alert.id)
