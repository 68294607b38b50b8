"""Agent settings refuse interface and CIDR values that discovery could not use, naming the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from micboard.agent.settings import AgentSettings, load_agent_settings
from micboard.shared.errors import ConfigError
from micboard.shared.settings import load_settings

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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.10", ["192.0.2.10"]),
        ("192.0.2.10, 198.51.100.7,", ["192.0.2.10", "198.51.100.7"]),
        ('["192.0.2.11"]', ["192.0.2.11"]),
    ],
)
def test_list_settings_from_the_environment_take_commas_or_json(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: list[str]
) -> None:
    # What an operator writes in agent.env: a plain address, several, or the JSON form.
    monkeypatch.setenv("MICBOARD_INTERFACES", text)
    monkeypatch.setenv("MICBOARD_DENY_CIDRS", "192.0.2.99/32,198.51.100.0/24")
    settings = load_settings(AgentSettings, **BASE)
    assert settings.interfaces == expected
    assert settings.deny_cidrs == ["192.0.2.99/32", "198.51.100.0/24"]


def test_unparseable_settings_from_the_environment_are_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MICBOARD_INTERFACES", "[192.0.2.10")
    with pytest.raises(ConfigError, match=r"interfaces: .*not a JSON list.*separated by commas"):
        load_settings(AgentSettings, **BASE)
    monkeypatch.delenv("MICBOARD_INTERFACES")
    monkeypatch.setenv("MICBOARD_STATIC_DEVICES", "192.0.2.10")  # a list of objects: JSON only
    with pytest.raises(ConfigError, match='invalid settings: error parsing value for field "static_devices"'):
        load_settings(AgentSettings, **BASE)


def test_a_misspelt_key_in_the_config_file_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'site = "hall"\nagent = "pi-1"\ninterface = ["192.0.2.10"]\nheartbeat_intervall_s = 5\n'
    )
    config.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        load_agent_settings(config)
    message = str(info.value)
    assert "unknown setting 'heartbeat_intervall_s' (did you mean 'heartbeat_interval_s'?)" in message
    assert "'interface' (did you mean 'interfaces'?)" in message
    config.write_text('site = "hall"\nagent = "pi-1"\nflavour = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'flavour'$"):
        load_agent_settings(config)


def test_the_command_deadline_stays_below_the_collectors_request_timeout() -> None:
    # The collector waits 5 s for a reply: the agent's "no result within ..." must arrive first.
    assert AgentSettings.model_validate(BASE).command_timeout_s == 4.0
    assert AgentSettings.model_validate({**BASE, "command_timeout_s": 4.9}).command_timeout_s == 4.9
    for late in (5, 5.0, 30):
        with pytest.raises(ValidationError, match=r"must stay below 5 s, the collector's request timeout"):
            AgentSettings.model_validate({**BASE, "command_timeout_s": late})
    with pytest.raises(ValidationError, match="greater than 0"):
        AgentSettings.model_validate({**BASE, "command_timeout_s": 0})


@pytest.mark.parametrize(
    ("written", "browsed"),
    [
        ("_ssc._tcp", "_ssc._tcp.local."),
        ("_ssc._tcp.", "_ssc._tcp.local."),
        ("_ssc._tcp.local", "_ssc._tcp.local."),
        ("_ssc._tcp.local.", "_ssc._tcp.local."),
        (" _shure._tcp.LOCAL. ", "_shure._tcp.LOCAL."),
    ],
)
def test_dns_sd_types_are_taken_in_the_forms_the_docs_show(written: str, browsed: str) -> None:
    settings = AgentSettings.model_validate(
        {**BASE, "extra_service_types": [written], "mdns_service_types": [written, "_ssc._udp"]}
    )
    assert settings.extra_service_types == [browsed]
    assert settings.mdns_service_types == [browsed, "_ssc._udp.local."]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("extra_service_types", "ssc._tcp"),
        ("extra_service_types", "_ssc._sctp"),
        ("extra_service_types", "_sennheisercontrol._udp"),
        ("mdns_service_types", "_ssc"),
        ("mdns_service_types", ""),
    ],
)
def test_a_bad_dns_sd_type_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    # From agent.env, as an operator writes it: one clear error, not a zeroconf traceback at start.
    monkeypatch.setenv(f"MICBOARD_{field.upper()}", f"_ssc._udp,{value}" if value else '[""]')
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings, **BASE)
    message = str(info.value)
    assert message.startswith(f"[config.invalid] invalid settings: {field}: ")
    assert f"{value!r} is not a DNS-SD service type" in message
