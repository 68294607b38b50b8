"""The agent's NATS identity: connect options from its settings, and which commands it accepts.

Who may command an agent is decided by the NATS server: the configuration that
``micboard-collector nats-config`` generates lets only the collector's user publish on
``micboard.v1.*.*.cmd``, and lets each agent subscribe to its own ``cmd`` subject only. A command
that reaches the agent therefore came from the collector. :func:`command_allowed` adds a check
of the envelope on top, so that a mis-addressed or forged envelope is refused even on a server
configured without permissions (the embedded demo server, say).
"""

from __future__ import annotations

from typing import Any

from micboard.agent.settings import AgentSettings
from micboard.shared.envelope import AnyEvent
from micboard.shared.natsauth import NatsClientSecurity, agent_inbox_prefix, connect_options
from micboard.shared.subjects import Kind, build_subject

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def agent_security(settings: AgentSettings) -> NatsClientSecurity:
    """The agent's credentials and TLS settings; the inbox prefix defaults to the one its NATS user has."""
    return NatsClientSecurity(
        nkey_seed_file=settings.nats_nkey_seed_file,
        creds_file=settings.nats_creds_file,
        inbox_prefix=settings.nats_inbox_prefix or agent_inbox_prefix(settings.site, settings.agent),
        tls_ca=settings.nats_tls_ca,
        tls_cert=settings.nats_tls_cert,
        tls_key=settings.nats_tls_key,
        tls_hostname=settings.nats_tls_hostname,
        require_tls=settings.nats_require_tls,
    )


def agent_connect_options(settings: AgentSettings) -> dict[str, Any]:
    """Keyword arguments for :func:`micboard.agent.publisher.connect` (and ``nats.connect``).

    NKey, TLS and inbox prefix, and how often the client pings the server: a link that died
    without a word is declared lost after ``max_outstanding_pings`` unanswered PINGs.

    Raises :class:`~micboard.shared.errors.ConfigError` when a secret file is readable by every
    user, or when TLS is required and the URL is plaintext.
    """
    options = connect_options(settings.nats_url or DEFAULT_NATS_URL, agent_security(settings))
    # nats-py sleeps ping_interval seconds between PINGs: a float is fine (typed int there).
    options["ping_interval"] = settings.nats_ping_interval_s
    options["max_outstanding_pings"] = settings.nats_max_outstanding_pings
    return options


def command_allowed(event: AnyEvent, site: str, agent: str, subject: str | None = None) -> bool:
    """Whether ``event`` is a command addressed to this agent (and arrived on its ``cmd`` subject)."""
    if event.kind != Kind.CMD.value or event.site != site or event.agent != agent:
        return False
    return subject is None or subject == build_subject(site, agent, Kind.CMD)
