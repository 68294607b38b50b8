"""``micboard-collector nats-config`` and ``micboard-collector agent add|revoke|list``.

Each command sets ``handler`` on its parsed arguments; the CLI calls it. Output meant for the
operator goes to stdout; seeds are never printed, only the paths of the files that hold them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from micboard.collector.security.identities import Fleet, FleetRegistry, NatsConfigOptions
from micboard.collector.security.natsconf import render_config, write_config
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsauth import agent_inbox_prefix
from micboard.shared.settings import load_settings
from micboard.shared.subjects import validate_token

RELOAD_HINT = "reload nats-server to apply it: nats-server --signal reload (or: systemctl reload nats-server)"


def _listen(text: str) -> str:
    """``host:port`` for nats-server's ``listen`` (argparse type), checked before it is written."""
    host, sep, port = text.rpartition(":")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c.isspace() for c in host)
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port (e.g. 0.0.0.0:4222)")
    return text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``nats-config`` and ``agent`` to the collector's subcommands."""
    conf = sub.add_parser(
        "nats-config",
        help="generate the nats-server configuration of the fleet (users, permissions, TLS)",
        description="Creates the collector's NKey identity on first use. Without --out the "
        "configuration is printed. The options are remembered for `agent add` and `agent revoke`.",
    )
    conf.add_argument("--out", type=Path, help="write the configuration to this file")
    conf.add_argument(
        "--listen", type=_listen, default="0.0.0.0:4222", help="client listen address (default 0.0.0.0:4222)"
    )
    conf.add_argument("--store-dir", type=Path, help="JetStream store directory")
    conf.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    conf.add_argument("--tls-key", type=Path, help="server certificate key (PEM)")
    conf.add_argument("--tls-ca", type=Path, help="CA of client certificates (needed by --verify-clients)")
    conf.add_argument(
        "--require-tls",
        action="store_true",
        help="TLS from the first byte; clients need MICBOARD_NATS_REQUIRE_TLS",
    )
    conf.add_argument("--verify-clients", action="store_true", help="require client certificates too")
    conf.set_defaults(handler=_nats_config)

    agent = sub.add_parser("agent", help="manage agent NATS identities")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    add = agent_sub.add_parser("add", help="create an agent's NKey identity and print its config snippet")
    add.add_argument("site")
    add.add_argument("agent")
    add.add_argument("--rotate", action="store_true", help="replace (and revoke) the agent's current key")
    add.add_argument("--seed-out", type=Path, help="where to write the seed (default: the state directory)")
    add.add_argument("--nats-url", default="tls://nats.example.org:4222", help="URL the agent connects to")
    add.add_argument(
        "--agent-seed-path", default="/etc/micboard/nats.nk", help="where the seed will live on the agent"
    )
    add.add_argument(
        "--agent-ca-path", default="/etc/micboard/nats-ca.pem", help="where the CA will live on the agent"
    )
    add.set_defaults(handler=_agent_add)
    revoke = agent_sub.add_parser("revoke", help="revoke an agent's identity (then reload nats-server)")
    revoke.add_argument("site")
    revoke.add_argument("agent")
    revoke.set_defaults(handler=_agent_revoke)
    listing = agent_sub.add_parser("list", help="list agent identities")
    listing.add_argument("--all", action="store_true", help="include revoked identities")
    listing.set_defaults(handler=_agent_list)


def _say(text: str, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(text + "\n")


def _settings() -> CollectorSettings:
    return load_settings(CollectorSettings)


def _regenerate(fleet: Fleet, registry: FleetRegistry, settings: CollectorSettings, out: TextIO) -> None:
    options = registry.nats_config
    if options is None or options.out is None:
        _say("run `micboard-collector nats-config --out FILE` to regenerate the server configuration", out)
        return
    write_config(options.out, render_config(registry, options, settings.stream_name))
    _say(f"nats-server configuration regenerated: {options.out}; {RELOAD_HINT}", out)


def _nats_config(args: argparse.Namespace) -> int:
    settings = _settings()
    fleet = Fleet(settings.state_dir)
    registry = fleet.load()
    fleet.ensure_collector(registry)
    options = NatsConfigOptions(
        out=args.out.resolve() if args.out else None,
        listen=args.listen,
        store_dir=args.store_dir,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        require_tls=args.require_tls,
        verify_clients=args.verify_clients,
    )
    text = render_config(registry, options, settings.stream_name)
    registry.nats_config = options
    fleet.save(registry)
    # The configuration goes to stdout when no file is given; the hints must not mix into it.
    notes = sys.stderr if args.out is None else sys.stdout
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_config(args.out, text)
        _say(f"nats-server configuration written: {args.out}; {RELOAD_HINT}", notes)
    _say("collector settings:", notes)
    for line in _tls_lines(options, ca_path=str(options.tls_ca or "/path/to/ca.pem")):
        _say(f"  {line}", notes)
    _say(f"  MICBOARD_NATS_NKEY_SEED_FILE={fleet.collector_seed_path.resolve()}", notes)
    return 0


def _tls_lines(options: NatsConfigOptions | None, ca_path: str) -> list[str]:
    if options is None or options.tls_cert is None:
        return []
    lines = [f"MICBOARD_NATS_TLS_CA={ca_path}"]
    if options.require_tls:
        lines.append("MICBOARD_NATS_REQUIRE_TLS=true")
    if options.verify_clients:
        lines += [
            "MICBOARD_NATS_TLS_CERT=/path/to/client-cert.pem",
            "MICBOARD_NATS_TLS_KEY=/path/to/client-key.pem",
        ]
    return lines


def _agent_add(args: argparse.Namespace) -> int:
    site, agent = validate_token(args.site, "site"), validate_token(args.agent, "agent")
    settings = _settings()
    fleet = Fleet(settings.state_dir)
    registry = fleet.load()
    fleet.ensure_collector(registry)
    provisioned = fleet.add_agent(registry, site, agent, rotate=args.rotate, seed_out=args.seed_out)
    fleet.save(registry)
    out = sys.stdout
    _say(f"agent {site}/{agent}: public key {provisioned.identity.public_key}", out)
    _say(
        f"copy {provisioned.seed_file} to {args.agent_seed_path} on the agent (owner: the agent's user, "
        "mode 0600), then delete it here. Agent settings:",
        out,
    )
    snippet = [
        f"MICBOARD_SITE={site}",
        f"MICBOARD_AGENT={agent}",
        f"MICBOARD_NATS_URL={args.nats_url}",
        f"MICBOARD_NATS_NKEY_SEED_FILE={args.agent_seed_path}",
        f"MICBOARD_NATS_INBOX_PREFIX={agent_inbox_prefix(site, agent)}",
        *_tls_lines(registry.nats_config, args.agent_ca_path),
    ]
    for line in snippet:
        _say(f"  {line}", out)
    _regenerate(fleet, registry, settings, out)
    return 0


def _agent_revoke(args: argparse.Namespace) -> int:
    settings = _settings()
    fleet = Fleet(settings.state_dir)
    registry = fleet.load()
    revoked = fleet.revoke_agent(registry, args.site, args.agent)
    fleet.save(registry)
    _say(f"agent {revoked.site}/{revoked.agent}: key {revoked.public_key} revoked", sys.stdout)
    _regenerate(fleet, registry, settings, sys.stdout)
    return 0


def _agent_list(args: argparse.Namespace) -> int:
    registry = Fleet(_settings().state_dir).load()
    agents = registry.agents if args.all else registry.active_agents()
    for identity in agents:
        state = f"revoked {identity.revoked.isoformat()}" if identity.revoked else "active"
        _say(
            f"{identity.site}/{identity.agent}\t{identity.public_key}\t"
            f"created {identity.created.isoformat()}\t{state}",
            sys.stdout,
        )
    return 0
