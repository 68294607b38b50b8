"""FleetView: the read model of the fleet for the API and the live feed.

Every listing is one statement (rows plus ``count(*) OVER ()`` for the total); a second one
counts only when a page past the end comes back empty. Battery states are classified here so
that the API and the WebSocket show the same thing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    FromClause,
    Integer,
    Select,
    Subquery,
    bindparam,
    case,
    cast,
    exists,
    func,
    null,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import NamedColumn

from micboard.collector.battery import (
    DEFAULT_BANDS,
    PREVIOUS_READING_WINDOW_MS,
    BatteryBands,
    classify_battery,
    previously,
)
from micboard.collector.services.alerts import THRESHOLDS_REFRESH_S, AlertThresholds
from micboard.collector.services.sync import DeviceChange, channel_rows
from micboard.collector.store.keys import composite_in
from micboard.collector.store.schema import agents, channels, devices, sites
from micboard.collector.store.schema_alerts import ACTIVE_STATES, alert_rules, alerts, history_samples

#: Ranks of a site's worst condition, worst highest; the API names them.
WORST_NAMES = {4: "critical", 3: "warning", 2: "offline", 1: "stale", 0: "ok"}
#: Transmitters at or below this many bars count as a low battery ("replace" or worse).
LOW_BATTERY_BARS = 3

_DEVICE_STATES = ("online", "offline", "stale")


def _agent_device_counts(page: Subquery) -> list[ColumnElement[Any]]:
    """How many receivers of each agent on ``page`` are online, offline and stale (by its agent index)."""
    return [
        select(func.count())
        .where(devices.c.agent == page.c.agent, devices.c.status == state)
        .scalar_subquery()
        .label(f"devices_{state}")
        for state in _DEVICE_STATES
    ]


def _alert_labels(page: Subquery) -> list[ColumnElement[Any]]:
    """What the receiver and channel of each alert on ``page`` are called now (by their keys)."""
    device = devices.c.agent == page.c.agent, devices.c.device_key == page.c.device_key
    return [
        select(func.coalesce(devices.c.name, devices.c.model))
        .where(*device)
        .scalar_subquery()
        .label("device_name"),
        select(channels.c.name)
        .select_from(channels.join(devices, channels.c.device_pk == devices.c.id))
        .where(*device, channels.c.index == page.c.channel)
        .scalar_subquery()
        .label("channel_name"),
    ]


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


@dataclass(frozen=True, slots=True)
class _SortKey:
    """One key of a listing's order: an expression and its direction."""

    expr: ColumnElement[Any]
    descending: bool = False
    nulls_last: bool = False


def _order(sort: str, columns: Mapping[str, Sequence[ColumnElement[Any]]]) -> list[_SortKey]:
    descending = sort.startswith("-")
    keys = columns[sort.lstrip("-")]
    # Only the first key follows the direction; the rest are stable tie-breakers. NULLS LAST only
    # where a NULL can be: on SQLite it keeps the sort from using an index.
    return [
        _SortKey(column, descending=descending, nulls_last=getattr(column, "nullable", True))
        if i == 0
        else _SortKey(column)
        for i, column in enumerate(keys)
    ]


def _clauses(keys: Sequence[_SortKey], exprs: Sequence[ColumnElement[Any]]) -> list[ColumnElement[Any]]:
    """``ORDER BY`` clauses of ``keys`` applied to ``exprs`` (the keys' own, or the page's copies)."""
    clauses: list[ColumnElement[Any]] = []
    for key, expr in zip(keys, exprs, strict=True):
        clause = expr.desc() if key.descending else expr.asc()
        clauses.append(clause.nulls_last() if key.nulls_last else clause)
    return clauses


def _page_query(
    columns: Sequence[ColumnElement[Any]],
    conditions: Sequence[ColumnElement[bool]],
    keys: Sequence[_SortKey],
    *,
    paged: bool = True,
    source: FromClause | None = None,
    extras: Callable[[Subquery], Sequence[ColumnElement[Any]]] | None = None,
    count: Select[Any] | None = None,
) -> Select[Any]:
    """``columns`` of the rows matching ``conditions`` in ``keys`` order, cut to the page first.

    ``paged`` cuts ``LIMIT :limit OFFSET :offset``; like every value of a listing, they are bind
    parameters, so that a listing's statement is built once per shape and reused (building one
    cost as much as running it).

    The outer query adds ``extras`` (built on the page's columns, so computed only for the rows
    returned) and, with ``count``, the number of all matches as a last ``_total`` column, counted
    once. The page is sorted again outside: a subquery's order need not survive the outer query.
    """
    names = [column.name for column in columns if isinstance(column, NamedColumn)]
    if len(names) != len(columns):
        raise TypeError("page columns must be named (columns or labels)")
    inner = select(*columns, *(key.expr.label(f"_k{i}") for i, key in enumerate(keys)))
    if source is not None:
        inner = inner.select_from(source)
    inner = inner.where(*conditions).order_by(*_clauses(keys, [key.expr for key in keys]))
    if paged:
        inner = inner.limit(bindparam("limit", type_=Integer)).offset(bindparam("offset", type_=Integer))
    cut = inner.subquery("page")
    outer: list[ColumnElement[Any]] = [cut.c[name] for name in names]
    if extras is not None:
        outer += extras(cut)
    if count is not None:
        outer.append(count.scalar_subquery().label("_total"))
    return select(*outer).order_by(*_clauses(keys, [cut.c[f"_k{i}"] for i in range(len(keys))]))


def _like(text: str) -> str:
    """``text`` escaped for ``LIKE ... ESCAPE '/'`` (as SQLAlchemy's ``autoescape`` does for literals)."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _contains(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """Case-insensitive substring match of bind parameter ``name`` (given through :func:`_like`)."""
    return column.icontains(bindparam(name), escape="/")


#: How long a site's battery bands (its alert thresholds) are used before being read again: as
#: long as the alert rules keep them, so that a tile and an alert change together.
BANDS_CACHE_S = THRESHOLDS_REFRESH_S


@functools.lru_cache(maxsize=4096)
def _battery_state(
    bars: int | None, percent: int | None, last_bars: int | None, bands: BatteryBands, current: bool = True
) -> str:
    # A channel's state depends only on these (the reading lookup only returns readings inside
    # the window, so "now" stands for their time): classify each combination once, not per row.
    now_ms = 0
    state = classify_battery(
        bars,
        percent=percent,
        last_bars=last_bars,
        last_reading_ms=now_ms if last_bars is not None else None,
        now_ms=now_ms,
        bands=bands,
    )
    # The stored reading of a receiver that is offline or stale is what it last said, not what
    # the battery holds now: shown as such, as for a transmitter that went off.
    return (state if current else previously(state)).value


class FleetView:
    """Reads sites, agents, devices and channels as the API and live views present them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # A listing's (query, count) statements by shape (which filters, which order): bounded by
        # the API's filter and sort combinations.
        self._statements: dict[Hashable, tuple[Select[Any], Select[Any]]] = {}
        # Battery bands of the sites whose alert thresholds override them (the rest: defaults).
        self._bands: dict[str, BatteryBands] = {}
        self._bands_read = -BANDS_CACHE_S
        self._bands_loaded = False
        # Sites whose bands a read found changed since the read before (whoever changed them:
        # this process, another collector, the CLI), until the live feed takes them.
        self._bands_moved: set[str] = set()

    def forget_bands(self) -> None:
        """Read the sites' battery bands again at the next listing (this process changed them)."""
        self._bands_read = -BANDS_CACHE_S

    def take_moved_bands(self) -> set[str]:
        """The sites whose battery bands changed since this was last asked (as reads found them)."""
        moved, self._bands_moved = self._bands_moved, set()
        return moved

    async def fresh_bands(self, *, now: bool = False) -> None:
        """Read the sites' battery bands again if they were read too long ago (one small query).

        ``now``: read them whatever the age of the last read.
        """
        moment = time.monotonic()
        if not now and moment - self._bands_read < BANDS_CACHE_S:
            return
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(alert_rules.c.site, alert_rules.c.thresholds))).all()
        bands: dict[str, BatteryBands] = {}
        for site, overrides in rows:
            try:
                found = AlertThresholds.model_validate(overrides or {}).bands
            except ValidationError:
                found = DEFAULT_BANDS  # as the alert rules do with a row that does not validate
            if found != DEFAULT_BANDS:
                bands[site] = found
        if self._bands_loaded:
            old = self._bands
            self._bands_moved.update(
                site for site in old.keys() | bands.keys() if old.get(site) != bands.get(site)
            )
        self._bands, self._bands_read, self._bands_loaded = bands, moment, True

    def _statement(
        self, shape: Hashable, build: Callable[[], tuple[Select[Any], Select[Any]]]
    ) -> tuple[Select[Any], Select[Any]]:
        found = self._statements.get(shape)
        if found is None:
            found = self._statements[shape] = build()
        return found

    async def _page(
        self, statements: tuple[Select[Any], Select[Any]], page: PageRequest, binds: Mapping[str, Any]
    ) -> tuple[Sequence[Sequence[Any]], int]:
        """Rows of a :func:`_page_query` with its count (the total last) and the number of all matches."""
        query, count = statements
        params = {**binds, "limit": page.limit, "offset": page.offset}
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query, params)).all()
            if rows:
                return rows, int(rows[0][-1])
            if page.offset == 0:
                return [], 0
            total = (await conn.execute(count, params)).scalar_one()
        return [], int(total)

    # -- sites ----------------------------------------------------------------------------------

    def _site_query(self, only: bool = False) -> Select[Any]:
        """Every site's summary; with ``only``, of the sites in bind parameter ``only`` alone.

        The filter goes into each aggregate, not around the result: the live feed asks for the few
        sites a flush touched, and aggregating the whole fleet for them cost most of a flush.
        """

        def within(column: ColumnElement[Any]) -> list[ColumnElement[bool]]:
            return [column.in_(bindparam("only", expanding=True))] if only else []

        dev = (
            select(
                devices.c.site.label("site"),
                func.sum(case((devices.c.status == "online", 1), else_=0)).label("online"),
                func.sum(case((devices.c.status == "offline", 1), else_=0)).label("offline"),
                func.sum(case((devices.c.status == "stale", 1), else_=0)).label("stale"),
            )
            .where(*within(devices.c.site))
            .group_by(devices.c.site)
            .subquery("dev")
        )
        chan = (
            select(devices.c.site.label("site"), func.count().label("channels"))
            .select_from(channels.join(devices, devices.c.id == channels.c.device_pk))
            .where(*within(devices.c.site))
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
            .where(alerts.c.state.in_(ACTIVE_STATES), *within(alerts.c.site))
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
        query = select(
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
        return query.where(*within(sites.c.site))

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
        binds: dict[str, Any] = {}
        if worst is not None:
            binds["worst_rank"] = {name: rank for rank, name in WORST_NAMES.items()}[worst]
        if only is not None:
            binds["only"] = list(only)
        statements = self._statement(
            ("sites", frozenset(binds), sort), lambda: self._sites_statements(binds, sort)
        )
        rows, total = await self._page(statements, page, binds)
        return Listing([self._site_item(row) for row in rows], total)

    def _sites_statements(self, binds: Mapping[str, Any], sort: str) -> tuple[Select[Any], Select[Any]]:
        inner = self._site_query(only="only" in binds).subquery("s")
        conditions: list[ColumnElement[bool]] = []
        if "worst_rank" in binds:
            conditions.append(inner.c.worst_rank == bindparam("worst_rank"))
        by_site = _SortKey(inner.c.site)
        orders: dict[str, list[_SortKey]] = {
            "worst": [_SortKey(inner.c.worst_rank, descending=True), by_site],
            "-worst": [_SortKey(inner.c.worst_rank), by_site],
            "site": [by_site],
            "-site": [_SortKey(inner.c.site, descending=True)],
            "last_seen_ms": [_SortKey(inner.c.last_seen_ms), by_site],
            "-last_seen_ms": [_SortKey(inner.c.last_seen_ms, descending=True), by_site],
        }
        if "worst_rank" in binds:
            count = select(func.count()).select_from(select(inner).where(*conditions).subquery())
        else:
            # Without a filter on the computed rank, the sites table alone says how many there are.
            count = select(func.count()).select_from(sites)
            if "only" in binds:
                count = count.where(sites.c.site.in_(bindparam("only", expanding=True)))
        query = _page_query(list(inner.c), conditions, orders[sort], source=inner, count=count)
        return query, count

    # -- agents ---------------------------------------------------------------------------------

    _AGENT_COLUMNS = (
        agents.c.agent,
        agents.c.site,
        agents.c.status,
        agents.c.version,
        agents.c.hostname,
        agents.c.last_seen_ms,
        agents.c.outbox_depth,
        agents.c.dropped,
        agents.c.started_ms,
    )
    # Plain str: orjson takes no str subclass as a key.
    _AGENT_NAMES = tuple(str(c.name) for c in _AGENT_COLUMNS)

    async def list_agents(
        self, page: PageRequest, *, site: str | None = None, status: str | None = None, sort: str = "site"
    ) -> Listing:
        """Agents with their last heartbeat's outbox figures."""
        binds = {k: v for k, v in (("site", site), ("status", status)) if v is not None}

        def build() -> tuple[Select[Any], Select[Any]]:
            conditions = [agents.c[name] == bindparam(name) for name in sorted(binds)]
            order = _order(
                sort,
                {
                    "agent": [agents.c.agent],
                    "site": [agents.c.site, agents.c.agent],
                    "last_seen_ms": [agents.c.last_seen_ms, agents.c.agent],
                },
            )
            count = select(func.count()).select_from(agents).where(*conditions)
            query = _page_query(
                self._AGENT_COLUMNS,
                conditions,
                order,
                source=agents,
                extras=_agent_device_counts,
                count=count,
            )
            return query, count

        rows, total = await self._page(
            self._statement(("agents", frozenset(binds), sort), build), page, binds
        )
        names, width = self._AGENT_NAMES, len(self._AGENT_NAMES)
        items = []
        for row in rows:
            item = dict(zip(names, row[:width], strict=True))
            item["devices"] = dict(zip(_DEVICE_STATES, row[width : width + 3], strict=True))
            items.append(item)
        return Listing(items, total)

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

    _DEVICE_NAMES = tuple(str(c.name) for c in _DEVICE_COLUMNS)

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
        given = (
            ("site", site),
            ("status", status),
            ("vendor", vendor),
            ("q", None if q is None else _like(q)),
        )
        binds = {k: v for k, v in given if v is not None}

        def build() -> tuple[Select[Any], Select[Any]]:
            conditions: list[ColumnElement[bool]] = [
                devices.c[name] == bindparam(name) for name in ("site", "status", "vendor") if name in binds
            ]
            if "q" in binds:
                conditions.append(
                    or_(
                        _contains(devices.c.name, "q"),
                        _contains(devices.c.model, "q"),
                        _contains(devices.c.device_key, "q"),
                        _contains(devices.c.address, "q"),
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
            count = select(func.count()).select_from(devices).where(*conditions)
            query = _page_query(
                self._DEVICE_COLUMNS,
                conditions,
                order,
                source=devices,
                extras=lambda cut: [
                    select(func.count())
                    .where(channels.c.device_pk == cut.c.id)
                    .scalar_subquery()
                    .label("channel_count")
                ],
                count=count,
            )
            return query, count

        shape = ("devices", frozenset(binds), low_battery, sort)
        rows, total = await self._page(self._statement(shape, build), page, binds)
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

    #: Positional: :meth:`_channel_items` unpacks the rows in this order, then the last battery
    #: reading :meth:`_channel_extras` adds.
    _CHANNEL_COLUMNS = (
        devices.c.id.label("device_id"),
        devices.c.site,
        devices.c.agent,
        devices.c.device_key,
        devices.c.name.label("device_name"),
        devices.c.model,
        devices.c.status,
        devices.c.updated_ms,
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
        channels.c.group_channel,
        channels.c.battery_type,
    )
    _CHANNEL_SOURCE = channels.join(devices, devices.c.id == channels.c.device_pk)

    @staticmethod
    def _channel_extras(cut: Subquery) -> list[ColumnElement[Any]]:
        """A page's channels' last battery reading since ``:since_ms``."""
        # Looked up after the page is cut, and only for channels that read unknown now (CASE
        # short-circuits), so the common case costs nothing.
        last_bars = (
            select(history_samples.c.battery_bars)
            .where(
                history_samples.c.agent == cut.c.agent,
                history_samples.c.device_key == cut.c.device_key,
                history_samples.c.channel == cut.c.index,
                history_samples.c.battery_bars.is_not(None),
                history_samples.c.bucket_ms >= bindparam("since_ms", type_=BigInteger),
            )
            .order_by(history_samples.c.bucket_ms.desc())
            .limit(1)
            .scalar_subquery()
        )
        return [case((cut.c.battery_bars.is_(None), last_bars), else_=null()).label("last_bars")]

    def _channel_items(self, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
        """The JSON-ready channel items of rows of :data:`_CHANNEL_COLUMNS` and :meth:`_channel_extras`."""
        items: list[dict[str, Any]] = []
        bands = self._bands
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
                group_channel,
                battery_type,
                last_bars,
            ) = row[:22]
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
                    "battery_state": _battery_state(
                        battery_bars,
                        battery_percent,
                        last_bars,
                        bands.get(site, DEFAULT_BANDS),
                        status == "online",
                    ),
                    "updated_ms": updated_ms,
                }
            )
        return items

    def committed_channel_items(
        self, change: DeviceChange, indexes: Iterable[int]
    ) -> tuple[list[dict[str, Any]], set[int]]:
        """Items of channels ``indexes`` of a device state just committed, built as a listing would.

        The values are those ``change`` wrote to the ``channels`` and ``devices`` rows (the same
        :func:`channel_rows`), so nothing needs reading back. Returns the items and the indexes
        that must be read instead: a battery that reads unknown (its last reading is history's,
        unless the transmitter went in this change) or a channel the state does not hold.
        """
        wanted = set(indexes)
        if change.pk is None or change.updated_ms is None:
            return [], wanted
        state = change.after
        # The device's columns, in the order of _DEVICE_NAMES.
        head = (
            change.pk, change.site, change.agent, change.device_key, state.get("name"),
            state.get("model"), change.status_after, change.updated_ms,
        )  # fmt: skip
        # A transmitter gone in this very change: its reading just before is the last valid one,
        # newer than anything history has written yet (history is flushed every few seconds).
        before_bars: dict[int, int] = {}
        for channel in (change.before or {}).get("channels", ()):
            before_tx = channel.get("transmitter")
            if before_tx and before_tx.get("battery_bars") is not None:
                before_bars[channel["index"]] = before_tx["battery_bars"]
        rows: list[tuple[Any, ...]] = []
        for row in channel_rows(change.pk, state, wanted):
            index = row["index"]
            if index not in wanted:
                continue
            last_bars = None  # only read for a battery that reads unknown
            if row["battery_bars"] is None:
                last_bars = before_bars.get(index)
                if last_bars is None:
                    continue  # read: history knows the last reading
            rows.append((*head, *_CHANNEL_PART(row), last_bars))
            wanted.discard(index)
        return self._channel_items(rows), wanted

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
        given = (
            ("site", site),
            ("device_id", device_id),
            ("status", status),
            ("q", None if q is None else _like(q)),
        )
        binds: dict[str, Any] = {k: v for k, v in given if v is not None}

        def build() -> tuple[Select[Any], Select[Any]]:
            conditions: list[ColumnElement[bool]] = []
            if "site" in binds:
                conditions.append(devices.c.site == bindparam("site"))
            if "device_id" in binds:
                conditions.append(devices.c.id == bindparam("device_id"))
            if "status" in binds:
                conditions.append(devices.c.status == bindparam("status"))
            if "q" in binds:
                conditions.append(or_(_contains(channels.c.name, "q"), _contains(devices.c.name, "q")))
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
            count = select(func.count()).select_from(self._CHANNEL_SOURCE).where(*conditions)
            query = _page_query(
                self._CHANNEL_COLUMNS,
                conditions,
                order,
                source=self._CHANNEL_SOURCE,
                extras=self._channel_extras,
                count=count,
            )
            return query, count

        statements = self._statement(("channels", frozenset(binds), sort), build)
        binds["since_ms"] = _now_ms() - PREVIOUS_READING_WINDOW_MS
        await self.fresh_bands()
        rows, total = await self._page(statements, page, binds)
        return Listing(self._channel_items(rows), total)

    async def channels_where(
        self,
        *,
        site: str | None = None,
        device_keys: Iterable[tuple[str, str]] | None = None,
        pairs: Iterable[tuple[int, int]] | None = None,
        channel_keys: Iterable[tuple[str, str, int]] | None = None,
    ) -> list[dict[str, Any]]:
        """Channels of a site, of some ``(agent, device_key)``, ``(device_id, index)`` pairs or
        ``(agent, device_key, index)``."""
        conditions: list[ColumnElement[bool]] = []
        dialect = self.engine.dialect.name
        if site is not None:
            conditions.append(devices.c.site == site)
        if device_keys is not None:
            keys = list(device_keys)
            if not keys:
                return []
            conditions.append(composite_in((devices.c.agent, devices.c.device_key), keys, dialect))
        if pairs is not None:
            wanted = list(pairs)
            if not wanted:
                return []
            conditions.append(composite_in((channels.c.device_pk, channels.c.index), wanted, dialect))
        if channel_keys is not None:
            triples = list(channel_keys)
            if not triples:
                return []
            key = (devices.c.agent, devices.c.device_key, channels.c.index)
            conditions.append(composite_in(key, triples, dialect))
        order = [
            _SortKey(column)
            for column in (devices.c.site, devices.c.agent, devices.c.device_key, channels.c.index)
        ]
        query = _page_query(
            self._CHANNEL_COLUMNS,
            conditions,
            order,
            paged=False,
            source=self._CHANNEL_SOURCE,
            extras=self._channel_extras,
        )
        await self.fresh_bands()
        params = {"since_ms": _now_ms() - PREVIOUS_READING_WINDOW_MS}
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query, params)).all()
        return self._channel_items(rows)

    async def device_keys(
        self, keys: Iterable[tuple[str, str]] | None = None
    ) -> dict[tuple[str, str], tuple[int, str]]:
        """``(agent, device_key) -> (device id, site)`` for the given devices (or all)."""
        query = select(devices.c.agent, devices.c.device_key, devices.c.id, devices.c.site)
        if keys is not None:
            wanted = list(keys)
            if not wanted:
                return {}
            query = query.where(
                composite_in((devices.c.agent, devices.c.device_key), wanted, self.engine.dialect.name)
            )
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
    _ALERT_NAMES = tuple(str(c.name) for c in _ALERT_COLUMNS)

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
        binds = {k: v for k, v in (("state", state), ("site", site), ("severity", severity)) if v is not None}

        def build() -> tuple[Select[Any], Select[Any]]:
            conditions = [
                alerts.c[name] == bindparam(name) for name in ("state", "site", "severity") if name in binds
            ]
            rank = case((alerts.c.severity == "critical", 2), (alerts.c.severity == "warning", 1), else_=0)
            order = _order(
                sort,
                {
                    "opened_ms": [alerts.c.opened_ms, alerts.c.id],
                    "severity": [rank, alerts.c.opened_ms, alerts.c.id],
                },
            )
            count = select(func.count()).select_from(alerts).where(*conditions)
            query = _page_query(
                self._ALERT_COLUMNS, conditions, order, source=alerts, extras=_alert_labels, count=count
            )
            return query, count

        rows, total = await self._page(
            self._statement(("alerts", frozenset(binds), sort), build), page, binds
        )
        names = (*self._ALERT_NAMES, "device_name", "channel_name")
        return Listing([dict(zip(names, row, strict=False)) for row in rows], total)


#: The names of a channel row's positions, as :meth:`FleetView._channel_items` unpacks them.
_CHANNEL_ROW_NAMES = (*(column.name for column in FleetView._CHANNEL_COLUMNS), "last_bars")
# A committed channel row's positions: the device's columns, then the channel row's (channel_rows).
_DEVICE_NAMES = ("device_id", "site", "agent", "device_key", "device_name", "model", "status", "updated_ms")
if _CHANNEL_ROW_NAMES[: len(_DEVICE_NAMES)] != _DEVICE_NAMES:  # pragma: no cover - a coding error
    raise RuntimeError("FleetView._CHANNEL_COLUMNS must start with the device's columns")
_CHANNEL_PART = itemgetter(*_CHANNEL_ROW_NAMES[len(_DEVICE_NAMES) : -1])
