"""The fleet registry: which agents (and which collector) hold an NKey identity, and their seed files.

Everything lives under ``<state_dir>/security/`` with mode 0600 (directories 0700):

- ``fleet.json``: the collector's public key, every agent's site, name, public key, creation and
  revocation time, and the options of the last ``nats-config`` so that ``agent add`` and
  ``agent revoke`` can regenerate the same server configuration;
- ``collector.nk``: the collector's seed;
- ``agents/<site>.<agent>.nk``: an agent's seed, to be copied to that agent (then deleted here).

Only public keys go into the nats-server configuration; seeds never leave these files.
Revoked identities stay in the registry (with their revocation time) as an audit trail.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import nkeys
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from micboard.shared.envelope import Token
from micboard.shared.errors import ConfigError
from micboard.shared.natsauth import check_seed_file
from micboard.shared.secret_files import check_secret_file, write_secret_file

PublicUserKey = Annotated[str, Field(pattern=r"^U[A-Z2-7]{55}$")]


class AgentIdentity(BaseModel):
    """One agent's NKey identity; ``revoked`` is set when it may no longer connect."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: Token
    agent: Token
    public_key: PublicUserKey
    created: datetime
    revoked: datetime | None = None

    @property
    def active(self) -> bool:
        """Whether the identity may connect."""
        return self.revoked is None


class CollectorIdentity(BaseModel):
    """The collector's NKey identity, shared by every collector process of the fleet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    public_key: PublicUserKey
    created: datetime


class NatsConfigOptions(BaseModel):
    """The options ``nats-config`` was last run with, reused when an agent is added or revoked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path | None = None
    listen: str = "0.0.0.0:4222"
    store_dir: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    require_tls: bool = False
    verify_clients: bool = False


class FleetRegistry(BaseModel):
    """The content of ``fleet.json``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    collector: CollectorIdentity | None = None
    agents: list[AgentIdentity] = Field(default_factory=list)
    nats_config: NatsConfigOptions | None = None

    def active_agents(self) -> list[AgentIdentity]:
        """Agents that may connect, sorted by site and name."""
        return sorted((a for a in self.agents if a.active), key=lambda a: (a.site, a.agent))

    def find_active(self, site: str, agent: str) -> AgentIdentity | None:
        """The active identity of ``site``/``agent``, if any."""
        return next((a for a in self.agents if a.active and (a.site, a.agent) == (site, agent)), None)


@dataclass(frozen=True, slots=True)
class ProvisionedAgent:
    """An agent identity just created, and the file holding its seed."""

    identity: AgentIdentity
    seed_file: Path


def new_user_seed() -> bytes:
    """A fresh NKey user seed (``SU...``) from 32 random bytes."""
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    return seed


def public_key_of(seed: bytes) -> str:
    """The public key (``U...``) of an NKey user seed."""
    key_pair = nkeys.from_seed(bytearray(seed))
    try:
        public: bytes = key_pair.public_key
        return public.decode()
    finally:
        key_pair.wipe()


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Fleet:
    """The registry file and seed files of a fleet, under ``<state_dir>/security``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "security"

    @property
    def registry_path(self) -> Path:
        """Where ``fleet.json`` lives."""
        return self.dir / "fleet.json"

    @property
    def collector_seed_path(self) -> Path:
        """Where the collector's seed lives."""
        return self.dir / "collector.nk"

    def agent_seed_path(self, site: str, agent: str) -> Path:
        """Where a newly created agent seed is written by default."""
        return self.dir / "agents" / f"{site}.{agent}.nk"

    def load(self) -> FleetRegistry:
        """Read the registry; an absent one is empty."""
        path = self.registry_path
        if not path.exists():
            return FleetRegistry()
        check_secret_file(path, what="fleet registry")
        try:
            return FleetRegistry.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError) as exc:
            raise ConfigError(f"fleet registry {path} is unreadable: {exc}") from None

    def save(self, registry: FleetRegistry) -> None:
        """Write the registry (mode 0600, atomically)."""
        write_secret_file(self.registry_path, registry.model_dump_json(indent=2) + "\n")

    def ensure_collector(self, registry: FleetRegistry) -> CollectorIdentity:
        """The collector identity, created (seed file and registry entry) on first use."""
        seed_path = self.collector_seed_path
        if registry.collector is not None:
            if not seed_path.exists():
                raise ConfigError(
                    f"the registry names a collector key but its seed {seed_path} is missing; "
                    "restore it, or remove the collector entry from the registry to create a new one"
                )
            return registry.collector
        seed = new_user_seed()
        write_secret_file(seed_path, seed + b"\n")
        registry.collector = CollectorIdentity(public_key=public_key_of(seed), created=_now())
        return registry.collector

    def check_collector_seed(self, registry: FleetRegistry) -> None:
        """Raise :class:`ConfigError` unless the collector seed file matches the registry's public key."""
        seed_path = self.collector_seed_path
        check_seed_file(seed_path)
        if registry.collector is None or public_key_of(seed_path.read_bytes().strip()) != (
            registry.collector.public_key
        ):
            raise ConfigError(f"collector seed {seed_path} does not match the fleet registry")

    def add_agent(
        self,
        registry: FleetRegistry,
        site: str,
        agent: str,
        *,
        rotate: bool = False,
        seed_out: Path | None = None,
    ) -> ProvisionedAgent:
        """Create an identity for ``site``/``agent``; ``rotate`` replaces (and revokes) an active one."""
        current = registry.find_active(site, agent)
        if current is not None and not rotate:
            raise ConfigError(f"agent {site}/{agent} already has an identity; use --rotate to replace it")
        now = _now()
        if current is not None:
            registry.agents = [
                a.model_copy(update={"revoked": now}) if a is current else a for a in registry.agents
            ]
        seed = new_user_seed()
        identity = AgentIdentity(site=site, agent=agent, public_key=public_key_of(seed), created=now)
        seed_file = seed_out or self.agent_seed_path(identity.site, identity.agent)
        write_secret_file(seed_file, seed + b"\n")
        registry.agents.append(identity)
        return ProvisionedAgent(identity, seed_file)

    def revoke_agent(self, registry: FleetRegistry, site: str, agent: str) -> AgentIdentity:
        """Mark the active identity of ``site``/``agent`` revoked and delete its seed file kept here."""
        current = registry.find_active(site, agent)
        if current is None:
            raise ConfigError(f"agent {site}/{agent} has no active identity")
        revoked = current.model_copy(update={"revoked": _now()})
        registry.agents = [revoked if a is current else a for a in registry.agents]
        self.agent_seed_path(site, agent).unlink(missing_ok=True)
        return revoked
