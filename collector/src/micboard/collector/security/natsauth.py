"""The collector's NATS identity: connect options built from its settings."""

from __future__ import annotations

from typing import Any

from micboard.collector.settings import CollectorSettings
from micboard.shared.natsauth import COLLECTOR_INBOX_PREFIX, NatsClientSecurity, connect_options


def collector_security(settings: CollectorSettings) -> NatsClientSecurity:
    """The collector's credentials and TLS settings; the inbox prefix is the one its NATS user may use."""
    return NatsClientSecurity(
        nkey_seed_file=settings.nats_nkey_seed_file,
        creds_file=settings.nats_creds_file,
        inbox_prefix=settings.nats_inbox_prefix or COLLECTOR_INBOX_PREFIX,
        tls_ca=settings.nats_tls_ca,
        tls_cert=settings.nats_tls_cert,
        tls_key=settings.nats_tls_key,
        tls_hostname=settings.nats_tls_hostname,
        require_tls=settings.nats_require_tls,
    )


def collector_connect_options(settings: CollectorSettings, url: str) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` besides ``servers``: NKey or credentials, TLS, inbox prefix."""
    return connect_options(url, collector_security(settings))
