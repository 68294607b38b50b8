"""The nats-server configuration of a fleet: one account per agent, one for the collector.

Every agent has a NATS account of its own, holding only its NKey user. The collector's account
(:data:`FLEET_ACCOUNT`) holds the event stream and the collector's user. The accounts meet only
where the configuration joins them:

- each agent account imports, as a service from the fleet account, its own event subjects
  ``micboard.v1.<site>.<agent>.<kind>`` (every kind but ``cmd``): a JetStream publish crosses
  into the fleet account, the stream stores it, and the ack comes back to the agent's inbox;
- the fleet account imports, as a service from each agent account, that agent's ``cmd``
  subject, and the agent's answer comes back to the collector's inbox.

Why accounts rather than users of one account: NATS does not check the reply subject of a
publish against the publisher's permissions, and JetStream sends its ack to whatever reply
subject it is given. In one shared account an agent could publish its own event with another
agent's event or ``cmd`` subject as the reply, and the server itself would deliver the ack
there. Within its own account an agent can only reach itself.

Least privilege, stated per user (NATS denies whatever is not allowed):

agent ``<site>/<agent>``
    publish: its own event subjects ``micboard.v1.<site>.<agent>.<kind>`` for every kind but
    ``cmd``; nothing else, no JetStream API.
    subscribe: its own ``cmd`` subject and its own inbox prefix ``_INBOX_agent.<site>.<agent>.>``.
    responses: one reply to each request it received (``allow_responses``), within a minute,
    which is how it answers commands.

collector
    publish: ``micboard.v1.*.*.cmd`` (the only user allowed to command agents), the JetStream API
    of the event stream and its consumers (info, create, update, next, direct get), acks.
    subscribe: live meters ``micboard.v1.*.*.meter`` and its inbox prefix ``_INBOX_collector.>``
    (stream deliveries and API replies arrive there).
    both: ``micboard.live.v1.*``, on which collector processes share committed changes with each
    other's live views (:mod:`micboard.collector.live_bridge`); no agent account can reach it.

A client without a known NKey is refused: there is no ``no_auth_user``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from micboard.collector.live_bridge import LIVE_SUBJECT_PREFIX
from micboard.collector.security.identities import FleetRegistry, NatsConfigOptions
from micboard.shared.errors import ConfigError
from micboard.shared.natsauth import COLLECTOR_INBOX_PREFIX, agent_inbox_prefix
from micboard.shared.secret_files import write_secret_file
from micboard.shared.subjects import SUBJECT_PREFIX, Kind, build_subject

#: How long an agent may take to answer a command (the collector waits less than this).
RESPONSE_EXPIRES = "1m"
#: Mode of the generated configuration: it holds public keys only, but maps the whole fleet.
CONFIG_FILE_MODE = 0o640
#: The account of the collector's user and of the event stream.
FLEET_ACCOUNT = "micboard"

Permissions = dict[str, Any]


def agent_event_subjects(site: str, agent: str) -> list[str]:
    """The subjects one agent publishes its events on: every kind but ``cmd``."""
    return [build_subject(site, agent, kind) for kind in Kind if kind is not Kind.CMD]


def agent_account(site: str, agent: str) -> str:
    """The name of one agent's NATS account; ``/`` never occurs in a site or agent name."""
    return f"agent/{site}/{agent}"


def agent_permissions(site: str, agent: str) -> Permissions:
    """What the NATS user of one agent may publish and subscribe to."""
    return {
        "publish": {"allow": agent_event_subjects(site, agent)},
        "subscribe": {
            "allow": [build_subject(site, agent, Kind.CMD), f"{agent_inbox_prefix(site, agent)}.>"]
        },
        "allow_responses": {"max": 1, "expires": RESPONSE_EXPIRES},
    }


def collector_permissions(stream: str) -> Permissions:
    """What the collector's NATS user may publish and subscribe to, for event stream ``stream``."""
    api = "$JS.API"
    return {
        "publish": {
            "allow": [
                f"{SUBJECT_PREFIX}.*.*.{Kind.CMD.value}",
                f"{api}.INFO",
                f"{api}.STREAM.INFO.{stream}",
                f"{api}.STREAM.CREATE.{stream}",
                f"{api}.STREAM.UPDATE.{stream}",
                f"{api}.STREAM.MSG.GET.{stream}",
                f"{api}.DIRECT.GET.{stream}",
                f"{api}.DIRECT.GET.{stream}.>",
                f"{api}.CONSUMER.CREATE.{stream}",
                f"{api}.CONSUMER.CREATE.{stream}.>",
                f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>",
                f"{api}.CONSUMER.INFO.{stream}.>",
                f"{api}.CONSUMER.NAMES.{stream}",
                f"{api}.CONSUMER.LIST.{stream}",
                f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
                f"$JS.ACK.{stream}.>",
                f"{LIVE_SUBJECT_PREFIX}.*",
            ]
        },
        "subscribe": {
            "allow": [
                f"{SUBJECT_PREFIX}.*.*.{Kind.METER.value}",
                f"{COLLECTOR_INBOX_PREFIX}.>",
                f"{LIVE_SUBJECT_PREFIX}.*",
            ]
        },
    }


#: A map or list whose one-line form is at most this long is written on one line.
_INLINE_WIDTH = 100


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_inline(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def _value(value: Any, indent: int) -> str:
    # nats-server's configuration format accepts JSON values; strings are always quoted, so a
    # subject like "$JS.API.INFO" is never read as a variable reference. Short maps and lists
    # go on one line, which keeps a fleet of a thousand agents' accounts readable.
    if not isinstance(value, dict | list):
        return _scalar(value)
    inline = _inline(value)
    if len(inline) + 2 * indent <= _INLINE_WIDTH:
        return inline
    pad = "  " * indent
    if isinstance(value, dict):
        inner = "\n".join(f"{pad}  {key}: {_value(item, indent + 1)}" for key, item in value.items())
        return "{\n" + inner + f"\n{pad}}}"
    inner = "\n".join(f"{pad}  {_value(item, indent + 1)}" for item in value)
    return "[\n" + inner + f"\n{pad}]"


def _tls_block(options: NatsConfigOptions) -> dict[str, Any] | None:
    if options.tls_cert is None and options.tls_key is None:
        if options.require_tls or options.verify_clients or options.tls_ca is not None:
            raise ConfigError("TLS options need a server certificate: give --tls-cert and --tls-key")
        return None
    if options.tls_cert is None or options.tls_key is None:
        raise ConfigError("a TLS server certificate needs both --tls-cert and --tls-key")
    if options.verify_clients and options.tls_ca is None:
        raise ConfigError("--verify-clients needs --tls-ca, the CA that signs client certificates")
    block: dict[str, Any] = {
        "cert_file": str(options.tls_cert.resolve()),
        "key_file": str(options.tls_key.resolve()),
    }
    if options.tls_ca is not None:
        block["ca_file"] = str(options.tls_ca.resolve())
    if options.verify_clients:
        block["verify"] = True
    if options.require_tls:
        # TLS from the first byte: nothing is ever sent in plaintext, so a man in the middle
        # cannot downgrade the connection by editing the server's INFO.
        block["handshake_first"] = True
    block["timeout"] = 2
    return block


def render_config(registry: FleetRegistry, options: NatsConfigOptions, stream: str) -> str:
    """The nats-server configuration for every active identity of ``registry``."""
    if registry.collector is None:
        raise ConfigError("the fleet has no collector identity yet")
    lines = [
        "# nats-server configuration of a micboard fleet, generated by `micboard-collector nats-config`.",
        f"# Generated {datetime.now(UTC).replace(microsecond=0).isoformat()}; regenerate instead of editing.",
        "# Reload the server after every change: nats-server --signal reload",
        f"listen: {json.dumps(options.listen)}",
    ]
    if options.store_dir is not None:
        lines.append(f"jetstream: {_value({'store_dir': str(options.store_dir)}, 0)}")
    else:
        lines.append("jetstream: enabled")
    tls = _tls_block(options)
    if tls is not None:
        lines.append(f"tls: {_value(tls, 0)}")
    lines.append("accounts: {")
    lines.append("  # the collector (every collector process of the fleet) and the event stream")
    collector_user = {"nkey": registry.collector.public_key, "permissions": collector_permissions(stream)}
    agents = registry.active_agents()
    fleet = {
        "jetstream": "enabled",
        "users": [collector_user],
        # Agents reach the stream and the collector's meter subscription only through these.
        "exports": [
            {"service": f"{SUBJECT_PREFIX}.*.*.{kind.value}"} for kind in Kind if kind is not Kind.CMD
        ],
        "imports": [
            {
                "service": {
                    "account": agent_account(identity.site, identity.agent),
                    "subject": build_subject(identity.site, identity.agent, Kind.CMD),
                }
            }
            for identity in agents
        ],
    }
    lines.append(f"  {json.dumps(FLEET_ACCOUNT)}: {_value(fleet, 1)}")
    for identity in agents:
        site, agent = identity.site, identity.agent
        lines.append(f"  # agent {site}/{agent}, created {identity.created.isoformat()}")
        account = {
            "users": [{"nkey": identity.public_key, "permissions": agent_permissions(site, agent)}],
            "exports": [
                {"service": build_subject(site, agent, Kind.CMD), "accounts": [FLEET_ACCOUNT]},
            ],
            "imports": [
                {"service": {"account": FLEET_ACCOUNT, "subject": subject}}
                for subject in agent_event_subjects(site, agent)
            ],
        }
        lines.append(f"  {json.dumps(agent_account(site, agent))}: {_value(account, 1)}")
    lines += ["}", ""]
    return "\n".join(lines)


def write_config(path: Path, text: str) -> None:
    """Write the configuration atomically, readable by the owner and group (nats-server's service group)."""
    write_secret_file(path, text)
    path.chmod(CONFIG_FILE_MODE)
