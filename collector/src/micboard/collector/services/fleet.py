"""FleetView: the read model of the fleet for the API and the live feed.

Every listing is one statement (rows plus ``count(*) OVER ()`` for the total); a second one
counts only when a page past the end comes back empty. Battery states are classified here so
that the API and the WebSocket show the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Text,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.battery import PREVIOUS_READING_WINDOW_MS, classify_battery
from micboard.collector.store.schema import agents, channels, devices, sites
from micboard.collector.store.schema_alerts import ACTIVE_STATES, alerts, history_samples

#: Ranks of a site's worst condition, worst highest; the API names them.
WORST_NAMES = {4: "critical", 3: "warning", 2: "offline", 1: "stale", 0: "ok"}
#: Transmitters at or below this many bars count as a low battery ("replace" or worse).
LOW_BATTERY_BARS = 3


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Which slice of a listing to return."""

    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Listing:
    """A page of JSON-ready items and the number of all matching items."""

    items: list[dict[str, Any]]
    total: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _order(sort: str, columns: Mapping[str, Sequence[ColumnElement[Any]]]) -> list[ColumnElement[Any]]:
    descending = sort.startswith("-")
    keys = columns[sort.lstrip("-")]
    ordered: list[ColumnElement[Any]] = []
    for i, column in enumerate(keys):
        # Only the first key follows the direction; the rest are stable tie-breakers.
        if i == 0:
            ordered.append(column.desc().nulls_last() if descending else column.asc().nulls_last())
        else:
            ordered.append(column.asc())
    return ordered


class FleetView:
    """Reads sites, agents, devices and channels as the API and live views present them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def _page(
        self, query: Select[Any], page: PageRequest, count_query: Select[Any]
    ) -> tuple[Sequence[Sequence[Any]], int]:
        """Rows of ``query``'s page (positional, the total last) and the number of all matches."""
        query = query.add_columns(func.count().over().label("_total")).limit(page.limit).offset(page.offset)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            if rows:
                return rows, int(rows[0][-1])
            if page.offset == 0:
                return [], 0
            total = (await conn.execute(count_query)).scalar_one()
        return [], int(total)

    # -- sites ----------------------------------------------------------------------------------

    def _site_query(self) -> Select[Any]:
        dev = (
            select(
                devices.c.site.label("site"),
                func.sum(case((devices.c.status == "online", 1), else_=0)).label("online"),
                func.sum(case((devices.c.status == "offline", 1), else_=0)).label("offline"),
                func.sum(case((devices.c.status == "stale", 1), else_=0)).label("stale"),
            )
            .group_by(devices.c.site)
            .subquery("dev")
        )
        chan = (
            select(devices.c.site.label("site"), func.count().label("channels"))
            .select_from(channels.join(devices, devices.c.id == channels.c.device_pk))
            .group_by(devices.c.site)
            .subquery("chan")
        )
        severity_rank = case(
            (alerts.c.severity == "critical", 2), (alerts.c.severity == "warning", 1), else_=0
        )
        al = (
            select(
                alerts.c.site.label("site"),
                func.count().label("open_alerts"),
                func.max(severity_rank).label("severity"),
            )
            .where(alerts.c.state.in_(ACTIVE_STATES))
            .group_by(alerts.c.site)
            .subquery("al")
        )
        offline = func.coalesce(dev.c.offline, 0)
        stale = func.coalesce(dev.c.stale, 0)
        worst = case(
            (al.c.severity == 2, 4),
            (al.c.severity == 1, 3),
            (offline > 0, 2),
            (stale > 0, 1),
            else_=0,
        ).label("worst_rank")
        return select(
            sites.c.site,
            sites.c.last_seen_ms,
            cast(func.coalesce(dev.c.online, 0), Integer).label("online"),
            cast(offline, Integer).label("offline"),
            cast(stale, Integer).label("stale"),
            cast(func.coalesce(chan.c.channels, 0), Integer).label("channels"),
            cast(func.coalesce(al.c.open_alerts, 0), Integer).label("open_alerts"),
            worst,
        ).select_from(
            sites.outerjoin(dev, dev.c.site == sites.c.site)
            .outerjoin(chan, chan.c.site == sites.c.site)
            .outerjoin(al, al.c.site == sites.c.site)
        )

    @staticmethod
    def _site_item(row: Sequence[Any]) -> dict[str, Any]:
        # Positional, in the order of :meth:`_site_query`'s columns.
        site, last_seen_ms, online, offline, stale, channel_count, open_alerts, worst_rank = row[:8]
        return {
            "site": site,
            "devices": {"online": online, "offline": offline, "stale": stale},
            "channels": channel_count,
            "open_alerts": open_alerts,
            "worst": WORST_NAMES[int(worst_rank)],
            "last_seen_ms": last_seen_ms,
        }

    async def list_sites(
        self,
        page: PageRequest,
        *,
        sort: str = "worst",
        worst: str | None = None,
        only: Iterable[str] | None = None,
    ) -> Listing:
        """Sites with device counts by state, channel count and open alerts; worst first by default."""
        inner = self._site_query().subquery("s")
        query = select(inner)
        if worst is not None:
            rank = {name: rank for rank, name in WORST_NAMES.items()}[worst]
            query = query.where(inner.c.worst_rank == rank)
        if only is not None:
            query = query.where(inner.c.site.in_(list(only)))
        orders: dict[str, list[ColumnElement[Any]]] = {
            "worst": [inner.c.worst_rank.desc(), inner.c.site],
            "-worst": [inner.c.worst_rank.asc(), inner.c.site],
            "site": [inner.c.site.asc()],
            "-site": [inner.c.site.desc()],
            "last_seen_ms": [inner.c.last_seen_ms.asc(), inner.c.site],
            "-last_seen_ms": [inner.c.last_seen_ms.desc(), inner.c.site],
        }
        order = orders[sort]
        count = select(func.count()).select_from(query.subquery())
        rows, total = await self._page(query.order_by(*order), page, count)
        return Listing([self._site_item(row) for row in rows], total)

    # -- agents ---------------------------------------------------------------------------------

    async def list_agents(
        self, page: PageRequest, *, site: str | None = None, status: str | None = None, sort: str = "site"
    ) -> Listing:
        """Agents with their last heartbeat's outbox figures."""
        conditions: list[ColumnElement[bool]] = []
        if site is not None:
            conditions.append(agents.c.site == site)
        if status is not None:
            conditions.append(agents.c.status == status)
        order = _order(
            sort,
            {
                "agent": [agents.c.agent],
                "site": [agents.c.site, agents.c.agent],
                "last_seen_ms": [agents.c.last_seen_ms, agents.c.agent],
            },
        )
        columns = [
            agents.c.agent,
            agents.c.site,
            agents.c.status,
            agents.c.version,
            agents.c.hostname,
            agents.c.last_seen_ms,
            agents.c.outbox_depth,
            agents.c.dropped,
        ]
        query = select(*columns).where(*conditions).order_by(*order)
        count = select(func.count()).select_from(agents).where(*conditions)
        rows, total = await self._page(query, page, count)
        names = [c.name for c in columns]
        return Listing([dict(zip(names, row, strict=False)) for row in rows], total)

    # -- devices --------------------------------------------------------------------------------

    _DEVICE_COLUMNS = (
        devices.c.id,
        devices.c.site,
        devices.c.agent,
        devices.c.device_key,
        devices.c.vendor,
        devices.c.family,
        devices.c.model,
        devices.c.name,
        devices.c.status,
        devices.c.address,
        devices.c.firmware,
        devices.c.updated_ms,
    )

    @staticmethod
    def _channel_count() -> Any:
        return (
            select(func.count())
            .where(channels.c.device_pk == devices.c.id)
            .correlate(devices)
            .scalar_subquery()
            .label("channel_count")
        )

    _DEVICE_NAMES = tuple(c.name for c in _DEVICE_COLUMNS)

    def _device_item(self, row: Sequence[Any]) -> dict[str, Any]:
        """The item of a row holding :attr:`_DEVICE_COLUMNS` then the channel count."""
        names = self._DEVICE_NAMES
        item = dict(zip(names, row, strict=False))
        item["channel_count"] = int(row[len(names)])
        return item

    async def list_devices(
        self,
        page: PageRequest,
        *,
        site: str | None = None,
        status: str | None = None,
        vendor: str | None = None,
        q: str | None = None,
        low_battery: bool | None = None,
        sort: str = "site",
    ) -> Listing:
        """Devices matching the filters, without their full state."""
        conditions: list[ColumnElement[bool]] = []
        if site is not None:
            conditions.append(devices.c.site == site)
        if status is not None:
            conditions.append(devices.c.status == status)
        if vendor is not None:
            conditions.append(devices.c.vendor == vendor)
        if q is not None:
            conditions.append(
                or_(
                    devices.c.name.icontains(q, autoescape=True),
                    devices.c.model.icontains(q, autoescape=True),
                    devices.c.device_key.icontains(q, autoescape=True),
                    devices.c.address.icontains(q, autoescape=True),
                )
            )
        if low_battery is not None:
            low = exists().where(
                channels.c.device_pk == devices.c.id, channels.c.battery_bars <= LOW_BATTERY_BARS
            )
            conditions.append(low if low_battery else ~low)
        order = _order(
            sort,
            {
                "id": [devices.c.id],
                "site": [devices.c.site, devices.c.agent, devices.c.device_key],
                "name": [devices.c.name, devices.c.id],
                "model": [devices.c.model, devices.c.id],
                "status": [devices.c.status, devices.c.id],
                "updated_ms": [devices.c.updated_ms, devices.c.id],
            },
        )
        query = select(*self._DEVICE_COLUMNS, self._channel_count()).where(*conditions).order_by(*order)
        count = select(func.count()).select_from(devices).where(*conditions)
        rows, total = await self._page(query, page, count)
        return Listing([self._device_item(row) for row in rows], total)

    async def get_device(self, device_id: int) -> dict[str, Any] | None:
        """A device with its full normalized state under ``device``, or ``None``."""
        query = select(*self._DEVICE_COLUMNS, self._channel_count(), devices.c.state).where(
            devices.c.id == device_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return {**self._device_item(row), "device": row[-1]}

    async def device_exists(self, device_id: int) -> tuple[str, str, str] | None:
        """``(site, agent, device_key)`` of a device, or ``None``."""
        query = select(devices.c.site, devices.c.agent, devices.c.device_key).where(devices.c.id == device_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (row[0], row[1], row[2])

    # -- channels -------------------------------------------------------------------------------

    def _channel_select(self, now_ms: int) -> Select[Any]:
        # The last valid battery reading within the window, looked up only for channels that read
        # unknown now (CASE short-circuits), so the common case costs nothing.
        last_bars = (
            select(history_samples.c.battery_bars)
            .where(
                history_samples.c.agent == devices.c.agent,
                history_samples.c.device_key == devices.c.device_key,
                history_samples.c.channel == channels.c.index,
                history_samples.c.battery_bars.is_not(None),
                history_samples.c.bucket_ms >= now_ms - PREVIOUS_READING_WINDOW_MS,
            )
            .order_by(history_samples.c.bucket_ms.desc())
            .limit(1)
            .correlate(devices, channels)
            .scalar_subquery()
        )
        # Positional: :meth:`_channel_items` unpacks the rows in this order. The state comes as
        # text so that each device's is decoded once, not once per channel row.
        return select(
            devices.c.id.label("device_id"),
            devices.c.site,
            devices.c.agent,
            devices.c.device_key,
            devices.c.name.label("device_name"),
            devices.c.model,
            devices.c.status,
            devices.c.updated_ms,
            cast(devices.c.state, Text).label("state"),
            channels.c.index,
            channels.c.name,
            channels.c.name_id,
            channels.c.name_person,
            channels.c.frequency_khz,
            channels.c.tx_present,
            channels.c.tx_model,
            channels.c.battery_bars,
            channels.c.battery_percent,
            channels.c.runtime_min,
            channels.c.tx_muted,
            case((channels.c.battery_bars.is_(None), last_bars), else_=literal(None)).label("last_bars"),
        ).select_from(channels.join(devices, devices.c.id == channels.c.device_pk))

    @staticmethod
    def _channel_details(raw_state: str | None) -> dict[Any, tuple[Any, Any]]:
        """``index -> (group_channel, battery_type)`` of the channels in a device's stored state."""
        details: dict[Any, tuple[Any, Any]] = {}
        state = orjson.loads(raw_state) if raw_state is not None else None
        listed = state.get("channels") if isinstance(state, dict) else None
        if not isinstance(listed, list):
            return details
        for detail in listed:
            if not isinstance(detail, dict):
                continue
            index = detail.get("index")
            # The first entry of an index wins; only numbers can equal a channel's index.
            if not isinstance(index, int | float) or index in details:
                continue
            tx_state = detail.get("transmitter")
            battery_type = tx_state.get("battery_type") if isinstance(tx_state, dict) else None
            details[index] = (detail.get("group_channel"), battery_type)
        return details

    @classmethod
    def _channel_items(cls, rows: Iterable[Sequence[Any]], now_ms: int) -> list[dict[str, Any]]:
        """The JSON-ready channel items of rows of :meth:`_channel_select`."""
        items: list[dict[str, Any]] = []
        by_device: dict[int, dict[Any, tuple[Any, Any]]] = {}
        for row in rows:
            (
                device_id,
                site,
                agent,
                device_key,
                device_name,
                model,
                status,
                updated_ms,
                raw_state,
                index,
                name,
                name_id,
                name_person,
                frequency_khz,
                tx_present,
                tx_model,
                battery_bars,
                battery_percent,
                runtime_min,
                tx_muted,
                last_bars,
            ) = row[:21]
            details = by_device.get(device_id)
            if details is None:
                details = by_device[device_id] = cls._channel_details(raw_state)
            group_channel, battery_type = details.get(index, (None, None))
            tx = None
            if tx_present:
                tx = {
                    "model": tx_model,
                    "battery_bars": battery_bars,
                    "battery_percent": battery_percent,
                    "runtime_min": runtime_min,
                    "battery_type": battery_type,
                    "muted": tx_muted,
                }
            battery_state = classify_battery(
                battery_bars,
                last_bars=last_bars,
                # The subquery only returns readings inside the window, so "now" stands for their time.
                last_reading_ms=now_ms if last_bars is not None else None,
                now_ms=now_ms,
            )
            items.append(
                {
                    "device_id": device_id,
                    "site": site,
                    "agent": agent,
                    "device_key": device_key,
                    "device_name": device_name,
                    "model": model,
                    "status": status,
                    "index": index,
                    "name": name,
                    "name_id": name_id,
                    "name_person": name_person,
                    "frequency_khz": frequency_khz,
                    "group_channel": group_channel,
                    "tx": tx,
                    "battery_state": battery_state.value,
                    "updated_ms": updated_ms,
                }
            )
        return items

    async def list_channels(
        self,
        page: PageRequest,
        *,
        site: str | None = None,
        device_id: int | None = None,
        status: str | None = None,
        q: str | None = None,
        sort: str = "site",
    ) -> Listing:
        """Channels with their transmitter and battery state."""
        conditions: list[ColumnElement[bool]] = []
        if site is not None:
            conditions.append(devices.c.site == site)
        if device_id is not None:
            conditions.append(devices.c.id == device_id)
        if status is not None:
            conditions.append(devices.c.status == status)
        if q is not None:
            conditions.append(
                or_(
                    channels.c.name.icontains(q, autoescape=True),
                    devices.c.name.icontains(q, autoescape=True),
                )
            )
        tie = [devices.c.agent, devices.c.device_key, channels.c.index]
        order = _order(
            sort,
            {
                "site": [devices.c.site, *tie],
                "name": [channels.c.name, *tie],
                "battery_percent": [channels.c.battery_percent, *tie],
                "updated_ms": [devices.c.updated_ms, *tie],
            },
        )
        now = _now_ms()
        query = self._channel_select(now).where(*conditions).order_by(*order)
        count = (
            select(func.count())
            .select_from(channels.join(devices, devices.c.id == channels.c.device_pk))
            .where(*conditions)
        )
        rows, total = await self._page(query, page, count)
        return Listing(self._channel_items(rows, now), total)

    async def channels_where(
        self,
        *,
        site: str | None = None,
        device_keys: Iterable[tuple[str, str]] | None = None,
        pairs: Iterable[tuple[int, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Channels of a site, of some ``(agent, device_key)`` or of ``(device_id, index)`` pairs."""
        now = _now_ms()
        query = self._channel_select(now)
        if site is not None:
            query = query.where(devices.c.site == site)
        if device_keys is not None:
            keys = list(device_keys)
            if not keys:
                return []
            query = query.where(tuple_(devices.c.agent, devices.c.device_key).in_(keys))
        if pairs is not None:
            wanted = list(pairs)
            if not wanted:
                return []
            query = query.where(tuple_(channels.c.device_pk, channels.c.index).in_(wanted))
        query = query.order_by(devices.c.site, devices.c.agent, devices.c.device_key, channels.c.index)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return self._channel_items(rows, now)

    async def device_keys(
        self, keys: Iterable[tuple[str, str]] | None = None
    ) -> dict[tuple[str, str], tuple[int, str]]:
        """``(agent, device_key) -> (device id, site)`` for the given devices (or all)."""
        query = select(devices.c.agent, devices.c.device_key, devices.c.id, devices.c.site)
        if keys is not None:
            wanted = list(keys)
            if not wanted:
                return {}
            query = query.where(tuple_(devices.c.agent, devices.c.device_key).in_(wanted))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {(row[0], row[1]): (row[2], row[3]) for row in rows}

    async def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Devices by status and alerts in force by severity (for metrics), in two queries."""
        async with self.engine.connect() as conn:
            by_status = (
                await conn.execute(select(devices.c.status, func.count()).group_by(devices.c.status))
            ).all()
            by_severity = (
                await conn.execute(
                    select(alerts.c.severity, func.count())
                    .where(alerts.c.state.in_(ACTIVE_STATES))
                    .group_by(alerts.c.severity)
                )
            ).all()
        return {str(r[0]): int(r[1]) for r in by_status}, {str(r[0]): int(r[1]) for r in by_severity}

    # -- alerts ---------------------------------------------------------------------------------

    _ALERT_COLUMNS = (
        alerts.c.id,
        alerts.c.site,
        alerts.c.agent,
        alerts.c.device_key,
        alerts.c.channel,
        alerts.c.rule,
        alerts.c.severity,
        alerts.c.state,
        alerts.c.message,
        alerts.c.opened_ms,
        alerts.c.acknowledged_by,
        alerts.c.acknowledged_ms,
        alerts.c.resolved_by,
        alerts.c.resolved_ms,
    )

    async def list_alerts(
        self,
        page: PageRequest,
        *,
        state: str | None = None,
        site: str | None = None,
        severity: str | None = None,
        sort: str = "-opened_ms",
    ) -> Listing:
        """Alerts matching the filters, newest first by default."""
        conditions: list[ColumnElement[bool]] = []
        if state is not None:
            conditions.append(alerts.c.state == state)
        if site is not None:
            conditions.append(alerts.c.site == site)
        if severity is not None:
            conditions.append(alerts.c.severity == severity)
        rank = case((alerts.c.severity == "critical", 2), (alerts.c.severity == "warning", 1), else_=0)
        order = _order(
            sort,
            {
                "opened_ms": [alerts.c.opened_ms, alerts.c.id],
                "severity": [rank, alerts.c.opened_ms, alerts.c.id],
            },
        )
        query = select(*self._ALERT_COLUMNS).where(*conditions).order_by(*order)
        count = select(func.count()).select_from(alerts).where(*conditions)
        rows, total = await self._page(query, page, count)
        names = [c.name for c in self._ALERT_COLUMNS]
        return Listing([dict(zip(names, row, strict=False)) for row in rows], total)
