"""``micboard-collector token create|list|revoke``: manage API tokens from the command line.

Each command sets ``handler`` on its parsed arguments; the CLI calls it. A new token is printed
once, on stdout, and never again: only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from micboard.collector.api.auth import Role, TokenStore
from micboard.collector.settings import CollectorSettings
from micboard.collector.store.database import create_engine
from micboard.collector.store.migrate import prepare
from micboard.shared.settings import load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token`` to the collector's subcommands."""
    token = sub.add_parser("token", help="manage API tokens (viewer, operator, admin)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token and print it (shown once)")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", default=None, help="who or what uses it (default: the role)")
    create.set_defaults(handler=_create)
    listing = token_sub.add_parser("list", help="list tokens (without their secrets)")
    listing.set_defaults(handler=_list)
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(handler=_revoke)


def _with_store(action: Callable[[TokenStore], Awaitable[int]]) -> int:
    async def run() -> int:
        settings = load_settings(CollectorSettings)
        engine = create_engine(settings.resolved_database_url())
        try:
            await prepare(engine, settings.auto_migrate)
            return await action(TokenStore(engine))
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _create(args: argparse.Namespace) -> int:
    role = Role(args.role)

    async def action(store: TokenStore) -> int:
        record, secret = await store.create(args.name or role.value, role)
        sys.stdout.write(secret + "\n")
        sys.stdout.flush()
        print(  # noqa: T201 - CLI output
            f"token {record.id} ({record.name}, {record.role.value}) created; it is not shown again",
            file=sys.stderr,
        )
        return 0

    return _with_store(action)


def _list(_args: argparse.Namespace) -> int:
    async def action(store: TokenStore) -> int:
        sys.stdout.write(f"{'id':>4}  {'role':8}  {'state':7}  {'last used (ms)':>14}  name\n")
        for record in await store.list_tokens():
            state = "revoked" if record.revoked else "active"
            last = str(record.last_used_ms) if record.last_used_ms is not None else "-"
            sys.stdout.write(f"{record.id:>4}  {record.role.value:8}  {state:7}  {last:>14}  {record.name}\n")
        return 0

    return _with_store(action)


def _revoke(args: argparse.Namespace) -> int:
    async def action(store: TokenStore) -> int:
        if not await store.revoke(args.id):
            # As for an unknown webhook: a wrong argument, exit 2.
            print(f"micboard-collector: [token.not_found] no token {args.id}", file=sys.stderr)  # noqa: T201
            return 2
        sys.stdout.write(f"token {args.id} revoked\n")
        return 0

    return _with_store(action)
