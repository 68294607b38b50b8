"""The agent's NATS ping settings: defaults, bounds, and that every connection of the agent gets them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from micboard.agent.natsauth import agent_connect_options
from micboard.agent.settings import AgentSettings
from micboard.shared.settings import AGENT_SETTINGS


def test_a_dead_link_is_noticed_within_40_s_by_default() -> None:
    settings = AgentSettings()
    assert settings.nats_ping_interval_s == 10.0
    assert settings.nats_max_outstanding_pings == 3
    options = agent_connect_options(settings)
    # The sender and `check` connect with these options: both get the pings.
    assert options["ping_interval"] == 10.0
    assert options["max_outstanding_pings"] == 3
    assert {"nats_ping_interval_s", "nats_max_outstanding_pings"} <= AGENT_SETTINGS


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nats_ping_interval_s": 0}, "greater than 0"),
        ({"nats_ping_interval_s": -1}, "greater than 0"),
        ({"nats_max_outstanding_pings": 0}, "greater than or equal to 1"),
        ({"nats_ping_interval_s": 300, "nats_max_outstanding_pings": 3}, "must be noticed within 600 s"),
    ],
)
def test_pings_that_would_never_notice_a_dead_link_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AgentSettings(**values)


def test_small_values_for_tests_and_quick_failover_are_taken() -> None:
    settings = AgentSettings(nats_ping_interval_s=0.5, nats_max_outstanding_pings=1)
    options = agent_connect_options(settings)
    assert (options["ping_interval"], options["max_outstanding_pings"]) == (0.5, 1)
