"""``micboard-collector thresholds ...`` and ``webhook ...``: alert configuration from the command line.

Each command sets ``handler`` on its parsed arguments; the CLI calls it. Changes go to the
database the collector uses: a running collector applies new thresholds within 5 s
(``THRESHOLDS_REFRESH_S``) and new or changed webhooks at the next alert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from micboard.collector.app import Collector
from micboard.collector.errors import InvalidAlertRulesError
from micboard.collector.services.alerts import AlertService, AlertThresholds
from micboard.collector.services.webhooks import Webhook, WebhookDispatcher
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import prepare
from micboard.shared.secret_files import check_secret_file
from micboard.shared.settings import load_settings
from micboard.shared.subjects import validate_token

#: The events a webhook can ask for.
WEBHOOK_EVENTS = ("alert.opened", "alert.acknowledged", "alert.resolved")

_T = TypeVar("_T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``thresholds`` and ``webhook`` to the collector's subcommands."""
    thresholds = sub.add_parser("thresholds", help="show or change alert thresholds per site")
    t_sub = thresholds.add_subparsers(dest="thresholds_command", required=True)
    show = t_sub.add_parser("show", help="the thresholds in force (defaults, or one site's)")
    show.add_argument("site", nargs="?", help="a site (default: the defaults and every site with overrides)")
    show.set_defaults(handler=_show)
    setter = t_sub.add_parser(
        "set",
        help="override thresholds of a site, e.g. battery_replace_percent=30 clip_dbfs=-0.5",
        description="Fields: " + ", ".join(AlertThresholds.model_fields),
    )
    setter.add_argument("site")
    setter.add_argument("values", nargs="+", metavar="FIELD=VALUE")
    setter.add_argument("--by", default="cli", help="who made the change (recorded)")
    setter.set_defaults(handler=_set)
    reset = t_sub.add_parser("reset", help="drop a site's overrides (all, or the fields named)")
    reset.add_argument("site")
    reset.add_argument("fields", nargs="*", metavar="FIELD")
    reset.set_defaults(handler=_reset)

    webhook = sub.add_parser("webhook", help="manage alert webhooks")
    w_sub = webhook.add_subparsers(dest="webhook_command", required=True)
    add = w_sub.add_parser("add", help="register a webhook (signed with HMAC-SHA256)")
    add.add_argument("url")
    add.add_argument(
        "--secret-file",
        required=True,
        type=Path,
        help="file holding the signing secret (at least 16 characters, not world-readable); '-' reads stdin",
    )
    add.add_argument("--event", action="append", choices=WEBHOOK_EVENTS, help="repeat; default: every event")
    add.add_argument("--disabled", action="store_true", help="register without enabling it")
    add.set_defaults(handler=_add)
    w_sub.add_parser("list", help="list webhooks (without secrets)").set_defaults(handler=_list)
    for name, helptext in (("enable", "enable a webhook"), ("disable", "disable a webhook")):
        toggle = w_sub.add_parser(name, help=helptext)
        toggle.add_argument("id", type=int)
        toggle.set_defaults(handler=_toggle, enabled=name == "enable")
    remove = w_sub.add_parser("remove", help="remove a webhook and its delivery log")
    remove.add_argument("id", type=int)
    remove.set_defaults(handler=_remove)


def _run(action: Callable[[AlertService, WebhookDispatcher], Awaitable[_T]]) -> _T:
    async def run() -> _T:
        settings = load_settings(CollectorSettings)
        engine = create_engine(settings.resolved_database_url())
        try:
            await prepare(engine, settings.auto_migrate)
            alerts = AlertService(engine, defaults=Collector(settings).alert_defaults())
            return await action(alerts, WebhookDispatcher(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _json(value: Any) -> None:
    _out(json.dumps(value, indent=2, sort_keys=True))


def _fail(message: str) -> int:
    print(f"micboard-collector: {message}", file=sys.stderr)  # noqa: T201 - CLI output
    return 2


def _parse_values(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    fields = AlertThresholds.model_fields
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not raw:
            raise InvalidAlertRulesError(f"{pair!r} is not FIELD=VALUE")
        if name not in fields:
            raise InvalidAlertRulesError(f"unknown threshold {name!r}; known: {', '.join(fields)}")
        try:
            values[name] = json.loads(raw)
        except ValueError:
            raise InvalidAlertRulesError(f"{name}: {raw!r} is not a number") from None
    return values


def _show(args: argparse.Namespace) -> int:
    async def action(alerts: AlertService, _hooks: WebhookDispatcher) -> int:
        overrides = await alerts.site_overrides()
        if args.site is not None:
            validate_token(args.site, "site")
            mine = overrides.get(args.site, {})
            merged = alerts.defaults.model_copy(update=mine).model_dump()
            _json({"site": args.site, "overrides": mine, "in_force": merged})
            return 0
        _json({"defaults": alerts.defaults.model_dump(), "sites": overrides})
        return 0

    return _run(action)


def _set(args: argparse.Namespace) -> int:
    async def action(alerts: AlertService, _hooks: WebhookDispatcher) -> int:
        validate_token(args.site, "site")
        values = _parse_values(args.values)
        _, in_force = await alerts.change_site_thresholds(args.site, values, by=args.by)
        changed = {name: getattr(in_force, name) for name in values}
        _out(f"site {args.site}: {json.dumps(changed, sort_keys=True)} (collectors apply it within 5 s)")
        return 0

    return _run(action)


def _reset(args: argparse.Namespace) -> int:
    async def action(alerts: AlertService, _hooks: WebhookDispatcher) -> int:
        validate_token(args.site, "site")
        current = (await alerts.site_overrides()).get(args.site)
        if current is None:
            _out(f"site {args.site} has no overrides")
            return 0
        unknown = [f for f in args.fields if f not in current]
        if unknown:
            return _fail(f"site {args.site} does not override {', '.join(unknown)}")
        kept = {k: v for k, v in current.items() if args.fields and k not in args.fields}
        if kept:
            await alerts.set_site_thresholds(args.site, kept, by="cli")
        else:
            await alerts.clear_site_thresholds(args.site)
        now = f"overrides now {json.dumps(kept, sort_keys=True)}" if kept else "defaults"
        _out(f"site {args.site}: {now}")
        return 0

    return _run(action)


def _read_secret(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.readline().strip()
    check_secret_file(path, what="webhook secret file")
    return path.read_text(encoding="utf-8").strip()


def _describe(hook: Webhook) -> str:
    events = ",".join(hook.events) or "every event"
    return f"{hook.id:>4}  {'enabled' if hook.enabled else 'disabled':8}  {events:40}  {hook.url}"


def _add(args: argparse.Namespace) -> int:
    secret = _read_secret(args.secret_file)

    async def action(_alerts: AlertService, hooks: WebhookDispatcher) -> int:
        events = sorted(set(args.event or ()))
        hook = await hooks.add_webhook(args.url, secret, events, enabled=not args.disabled)
        _out(f"webhook {hook.id} added: {_describe(hook).strip()}")
        return 0

    return _run(action)


def _list(_args: argparse.Namespace) -> int:
    async def action(_alerts: AlertService, hooks: WebhookDispatcher) -> int:
        _out(f"{'id':>4}  {'state':8}  {'events':40}  url")
        for hook in await hooks.list_webhooks():
            _out(_describe(hook))
        return 0

    return _run(action)


def _toggle(args: argparse.Namespace) -> int:
    async def action(_alerts: AlertService, hooks: WebhookDispatcher) -> int:
        hook = await hooks.set_enabled(args.id, args.enabled)
        _out(_describe(hook))
        return 0

    return _run(action)


def _remove(args: argparse.Namespace) -> int:
    async def action(_alerts: AlertService, hooks: WebhookDispatcher) -> int:
        await hooks.remove_webhook(args.id)
        _out(f"webhook {args.id} removed")
        return 0

    return _run(action)
