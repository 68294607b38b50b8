"""The stream and durable consumer are created and updated idempotently at every start."""

from __future__ import annotations

from pathlib import Path

import nats
from nats.js.api import StreamSource

from micboard.collector.ingest import ensure_stream
from micboard.collector.settings import CollectorSettings
from micboard.shared.natsd import EmbeddedNats


async def test_restart_updates_limits_and_keeps_operator_sources(
    nats_private: EmbeddedNats, tmp_path: Path
) -> None:
    settings = CollectorSettings(nats_url=nats_private.url, state_dir=tmp_path, stream_max_age_s=3600)
    nc = await nats.connect(nats_private.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, settings)
        await js.add_stream(name="VENUE_A", subjects=["venue-a.events"])
        info = await js.stream_info(settings.stream_name)
        info.config.sources = [StreamSource(name="VENUE_A")]
        await js.update_stream(info.config)

        changed = settings.model_copy(update={"stream_max_age_s": 7200.0})
        await ensure_stream(js, changed)
        await ensure_stream(js, changed)  # twice: idempotent

        after = await js.stream_info(settings.stream_name)
        assert after.config.max_age == 7200.0
        assert [source.name for source in after.config.sources or []] == ["VENUE_A"]
        consumer = await js.consumer_info(settings.stream_name, settings.durable_name)
        assert consumer.config.durable_name == settings.durable_name
    finally:
        await nc.close()
