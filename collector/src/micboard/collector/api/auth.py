"""Bearer API tokens with roles, stored hashed, and the limit on failed attempts.

A token is ``mbt_`` followed by 32 random bytes (urlsafe base64); only its sha256 is stored.
Verified tokens are cached for :data:`TOKEN_CACHE_S` so that a busy dashboard does not cost a
query per request; a revocation made through this process takes effect at once, one made by
another process (the CLI) within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from micboard.collector.api.errors import ApiError, ApiErrorCode
from micboard.collector.store.schema_api import api_tokens

log = logging.getLogger(__name__)

TOKEN_PREFIX = "mbt_"  # noqa: S105  # nosec B105  # a public prefix, not a secret
#: How long a verified token is trusted without asking the database again.
TOKEN_CACHE_S = 5.0
#: ``last_used_ms`` is written at most this often per token, to keep reads free of writes.
LAST_USED_WRITE_INTERVAL_MS = 60_000
_MAX_TOKEN_CHARS = 256


class Role(StrEnum):
    """What a token may do: viewers read, operators also act on alerts and devices, admins manage tokens."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Order of privilege: viewer < operator < admin."""
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """Whether this role includes ``needed``."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's id, name and role."""

    token_id: int
    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token, without its secret."""

    id: int
    name: str
    role: Role
    created_ms: int
    last_used_ms: int | None
    revoked: bool


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The sha256 hex digest under which ``token`` is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TokenStore:
    """Creates, lists, revokes and verifies API tokens."""

    def __init__(self, engine: AsyncEngine, *, cache_s: float = TOKEN_CACHE_S) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        # Told of each token revoked here at once (the live feed closes its connections).
        self.on_revoke: list[Callable[[int], None]] = []

    async def create(self, name: str, role: Role, *, token: str | None = None) -> tuple[TokenRecord, str]:
        """Store a new token (random unless given) and return its record and the token itself."""
        secret = token or new_token()
        now = _now_ms()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(api_tokens).values(
                    name=name, role=role.value, hash=hash_token(secret), created_ms=now, revoked=False
                )
            )
            token_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        assert isinstance(token_id, int)
        return TokenRecord(token_id, name, role, now, None, False), secret

    async def ensure(self, token: str, *, name: str, role: Role) -> bool:
        """Create ``token`` unless a token with its hash exists; returns whether it was created."""
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(select(api_tokens.c.id).where(api_tokens.c.hash == hash_token(token)))
            ).first()
        if found is not None:
            return False
        await self.create(name, role, token=token)
        return True

    async def list_tokens(self) -> list[TokenRecord]:
        """Every token, oldest first."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(api_tokens).order_by(api_tokens.c.id))).mappings().all()
        return [
            TokenRecord(
                row["id"],
                row["name"],
                Role(row["role"]),
                row["created_ms"],
                row["last_used_ms"],
                bool(row["revoked"]),
            )
            for row in rows
        ]

    async def get(self, token_id: int) -> TokenRecord | None:
        """The token with ``token_id``, or ``None``."""
        return next((t for t in await self.list_tokens() if t.id == token_id), None)

    async def revoke(self, token_id: int) -> bool:
        """Revoke a token; returns whether it existed."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(api_tokens).where(api_tokens.c.id == token_id).values(revoked=True)
            )
        self._cache = {k: v for k, v in self._cache.items() if v[0].token_id != token_id}
        if result.rowcount:
            for listener in self.on_revoke:
                listener(token_id)
        return bool(result.rowcount)

    async def gone(self, token_ids: Iterable[int]) -> set[int]:
        """Those of ``token_ids`` revoked or deleted since (by this process, another or the CLI)."""
        wanted = set(token_ids)
        if not wanted:
            return set()
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(api_tokens.c.id).where(
                        api_tokens.c.id.in_(wanted), api_tokens.c.revoked.is_(False)
                    )
                )
            ).all()
        return wanted - {row[0] for row in rows}

    async def verify(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token, or ``None``."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = hash_token(token)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        async with self.engine.connect() as conn:
            row = (
                (await conn.execute(select(api_tokens).where(api_tokens.c.hash == digest))).mappings().first()
            )
        # Compare the digests in constant time even though the lookup was by digest: cheap insurance.
        if row is None or row["revoked"] or not hmac.compare_digest(row["hash"], digest):
            self._cache.pop(digest, None)
            return None
        principal = Principal(row["id"], row["name"], Role(row["role"]))
        now = _now_ms()
        if row["last_used_ms"] is None or now - row["last_used_ms"] > LAST_USED_WRITE_INTERVAL_MS:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(api_tokens).where(api_tokens.c.id == row["id"]).values(last_used_ms=now)
                )
        self._cache[digest] = (principal, time.monotonic() + self.cache_s)
        return principal


class FailedAuthLimiter:
    """At most ``limit`` failed attempts per client address per minute; then 429 until the window moves.

    Bounded: at most ``max_clients`` addresses are tracked; the least recently failing is forgotten.
    """

    WINDOW_S = 60.0

    def __init__(self, limit: int, *, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.max_clients = max_clients
        self.refused = 0
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after_s(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or ``None`` if it may now."""
        failures = self._failures.get(client)
        if failures is None:
            return None
        now = time.monotonic()
        while failures and failures[0] <= now - self.WINDOW_S:
            failures.popleft()
        if len(failures) < self.limit:
            return None
        return max(failures[0] + self.WINDOW_S - now, 0.001)

    def record_failure(self, client: str) -> None:
        """Count one failed attempt of ``client``."""
        failures = self._failures.pop(client, None) or deque()
        failures.append(time.monotonic())
        while len(failures) > self.limit:
            failures.popleft()
        self._failures[client] = failures
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


class Authenticator:
    """Checks a request's bearer token and role, counting and limiting failures per address."""

    def __init__(self, tokens: TokenStore, limiter: FailedAuthLimiter) -> None:
        self.tokens = tokens
        self.limiter = limiter
        self.failures = 0

    async def check_token(self, client: str, token: str | None) -> Principal:
        """The principal of ``token``; raises 401 or 429 :class:`ApiError` (shared by HTTP and WebSocket).

        A valid token passes even from an address over the failed-attempt limit: behind a
        reverse proxy or a venue's NAT everyone shares one address, and one user's typos must
        not lock out the rest. Guessing a token (32 random bytes) is hopeless either way; the
        limit keeps a guesser slow and its answers uninformative (429, not 401).
        """
        principal = await self.tokens.verify(token) if token else None
        if principal is not None:
            return principal
        wait = self.limiter.retry_after_s(client)
        if wait is not None:
            self.limiter.refused += 1
            raise ApiError(
                429,
                ApiErrorCode.AUTH_RATE_LIMITED,
                "too many failed authentication attempts; retry later",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
            )
        if not token:
            # No token is not a guess: it is logged but does not count towards the limit, so that
            # a page opened before its token was entered cannot lock its desk out.
            log.info("authentication failed", extra={"client": client, "reason": "missing"})
            raise ApiError(
                401,
                ApiErrorCode.AUTH_MISSING,
                "an API token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self._fail(client, "invalid")
        raise ApiError(
            401,
            ApiErrorCode.AUTH_INVALID,
            "the API token is not valid",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    async def authenticate(self, request: web.Request, role: Role) -> Principal:
        """The principal of ``request`` if its token has at least ``role``; else raises 401/403/429."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else None
        principal = await self.check_token(request.remote or "-", token)
        if not principal.role.allows(role):
            raise ApiError(
                403,
                ApiErrorCode.AUTH_FORBIDDEN,
                f"this needs the {role.value} role; the token is {principal.role.value}",
            )
        return principal

    def _fail(self, client: str, reason: str) -> None:
        """Count and log a failed attempt, without the token."""
        self.failures += 1
        self.limiter.record_failure(client)
        log.info("authentication failed", extra={"client": client, "reason": reason})
