"""Agent settings refuse interface and CIDR values that discovery could not use, naming the value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from micboard.agent.settings import AgentSettings

BASE = {"site": "hall", "agent": "pi-1"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("interfaces", ["eth0"], "interface 'eth0' is not an IPv4 address"),
        ("interfaces", ["::1"], "interface '::1' is not an IPv4 address"),
        ("interfaces", [], "at least one interface address is needed"),
        ("allow_cidrs", ["10.0.0.0/8", "ten"], "'ten' is not an address or network"),
        ("deny_cidrs", ["192.0.2.0/33"], "'192.0.2.0/33' is not an address or network"),
    ],
)
def test_bad_discovery_settings_are_refused(field: str, value: list[str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AgentSettings.model_validate({**BASE, field: value})


def test_good_discovery_settings_are_kept() -> None:
    settings = AgentSettings.model_validate(
        {
            **BASE,
            "interfaces": ["192.0.2.10"],
            "allow_cidrs": [" 192.0.2.0/24", "2001:db8::1"],
            "deny_cidrs": [],
        }
    )
    assert settings.interfaces == ["192.0.2.10"]
    assert settings.allow_cidrs == [" 192.0.2.0/24", "2001:db8::1"]
