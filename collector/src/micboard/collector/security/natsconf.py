"""The nats-server configuration of a fleet: one NKey user per agent and one for the collector.

Least privilege, stated per user (NATS denies whatever is not allowed):

agent ``<site>/<agent>``
    publish: its own event subjects ``micboard.v1.<site>.<agent>.<kind>`` for every kind but
    ``cmd``; nothing else, no JetStream API. A JetStream publish is a plain publish that the
    stream captures; the ack comes back to the reply inbox, so no ``$JS.API`` right is needed.
    subscribe: its own ``cmd`` subject and its own inbox prefix ``_INBOX_agent.<site>.<agent>.>``.
    responses: one reply to each request it received (``allow_responses``), within a minute,
    which is how it answers commands.

collector
    publish: ``micboard.v1.*.*.cmd`` (the only user allowed to command agents), the JetStream API
    of the event stream and its consumers (info, create, update, next, direct get), acks.
    subscribe: live meters ``micboard.v1.*.*.meter`` and its inbox prefix ``_INBOX_collector.>``
    (stream deliveries and API replies arrive there).
    both: ``micboard.live.v1.*``, on which collector processes share committed changes with each
    other's live views (:mod:`micboard.collector.live_bridge`); no agent may publish there.

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

Permissions = dict[str, Any]


def agent_permissions(site: str, agent: str) -> Permissions:
    """What the NATS user of one agent may publish and subscribe to."""
    return {
        "publish": {"allow": [build_subject(site, agent, kind) for kind in Kind if kind is not Kind.CMD]},
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


def _value(value: Any, indent: int) -> str:
    # nats-server's configuration format accepts JSON values; strings are always quoted, so a
    # subject like "$JS.API.INFO" is never read as a variable reference.
    pad = "  " * indent
    if isinstance(value, dict):
        inner = "\n".join(f"{pad}  {key}: {_value(item, indent + 1)}" for key, item in value.items())
        return "{\n" + inner + f"\n{pad}}}"
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            inner = "\n".join(f"{pad}  {json.dumps(item)}" for item in value)
            return "[\n" + inner + f"\n{pad}]"
        inner = "\n".join(f"{pad}  {_value(item, indent + 1)}" for item in value)
        return "[\n" + inner + f"\n{pad}]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


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
    lines += ["authorization: {", "  users: ["]
    lines.append("    # collector (every collector process of the fleet)")
    collector_user = {"nkey": registry.collector.public_key, "permissions": collector_permissions(stream)}
    lines.append(f"    {_value(collector_user, 2)}")
    for identity in registry.active_agents():
        lines.append(f"    # agent {identity.site}/{identity.agent}, created {identity.created.isoformat()}")
        user = {"nkey": identity.public_key, "permissions": agent_permissions(identity.site, identity.agent)}
        lines.append(f"    {_value(user, 2)}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def write_config(path: Path, text: str) -> None:
    """Write the configuration atomically, readable by the owner and group (nats-server's service group)."""
    write_secret_file(path, text)
    path.chmod(CONFIG_FILE_MODE)
