"""``micboard-agent`` in process: refused arguments, unusable addresses, bad secrets, silent devices."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from micboard.agent import cli
from micboard.shared.natsd import EmbeddedNats, free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MICBOARD_NATS_URL", "MICBOARD_SITE", "MICBOARD_AGENT", "MICBOARD_NATS_NKEY_SEED_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def silent_device() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


def test_simulate_refuses_unknown_kinds_and_unusable_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--device", "ulxd4", "--device", "walkie"]) == 2
    assert "unknown device kind(s) walkie" in capsys.readouterr().err
    # TEST-NET-1 is no address of this host: nothing can listen there.
    assert cli.main(["simulate", "--device", "ulxd4", "--listen", "192.0.2.1", "--no-announce"]) == 1
    assert "cannot listen on 192.0.2.1" in capsys.readouterr().err
    assert cli.main(["simulate", "--device", "ulxd4", "--device", "ad4d", "--port-base", "65535"]) == 2
    assert "port base 65535 leaves no room for 2 simulator(s)" in capsys.readouterr().err


def test_run_with_an_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('site = "Not A Token"\nagent = "pi-1"\n')
    assert cli.main(["run", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("micboard-agent: ")


def test_check_reports_a_bad_seed_file_and_no_static_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = tmp_path / "nats.nk"
    seed.write_text("SU" + "A" * 56 + "\n")
    seed.chmod(0o644)
    config = tmp_path / "agent.toml"
    config.write_text(f'site = "hall"\nagent = "pi-1"\nnats_nkey_seed_file = "{seed}"\n')
    config.chmod(0o600)  # it names a secret file: it must not be world-readable itself
    assert cli.main(["check", "--config", str(config), "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert "ok   config: " in out and "FAIL nats: " in out and "chmod 600" in out
    assert "SU" + "A" * 56 not in out  # the seed itself is never printed
    assert "ok   devices: no static devices configured" in out and "1 check(s) failed" in out


def test_check_names_a_misspelt_variable_with_the_setting_meant(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_server.url}"\n')
    # Spelt in two parts: the scan of the names the repository uses must not take it for one.
    misspelt = "MICBOARD_NATS_" + "ULR"
    monkeypatch.setenv(misspelt, "nats://192.0.2.1:4222")
    monkeypatch.setenv("MICBOARD_HTTP_PORT", "9000")  # the collector's: not unknown
    # A warning, not a failure: the variable may be another program's.
    assert cli.main(["check", "--config", str(config), "--timeout", "1"]) == 0
    out = capsys.readouterr().out
    assert f"warn config: unknown setting {misspelt} ignored; did you mean MICBOARD_NATS_URL?" in out
    assert "MICBOARD_HTTP_PORT" not in out and "ok   nats: " in out


def test_check_names_a_device_that_never_answers(
    tmp_path: Path, silent_device: int, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_server.url}"\n'
        f'[[static_devices]]\naddress = "127.0.0.1"\nport = {silent_device}\nfamily = "ulxd"\n'
    )
    assert cli.main(["check", "--config", str(config), "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "ok   nats: " in out
    assert f"FAIL device ulxd 127.0.0.1:{silent_device}: no answer" in out and "1 check(s) failed" in out


def test_check_says_what_to_do_about_a_receiver_refusing_control(
    tmp_path: Path, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    # A receiver that answers REP ERR to everything: an SLX-D before third-party control is on.
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def refuse() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn = server.accept()[0]
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    asked = conn.recv(4096).count(b"<")
                    conn.sendall(b"< REP ERR >" * asked)
                    conn.recv(4096)  # until the driver hangs up

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    port = int(server.getsockname()[1])
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_server.url}"\n'
        f'[[static_devices]]\naddress = "127.0.0.1"\nport = {port}\nfamily = "slxd"\n'
    )
    try:
        assert cli.main(["check", "--config", str(config), "--timeout", "3"]) == 1
    finally:
        stop.set()
        thread.join(5)
        server.close()
    out = capsys.readouterr().out
    assert f"FAIL device slxd 127.0.0.1:{port}: the receiver refuses control" in out
    assert "enable its Allow Third-Party Controls" in out


def test_discover_on_an_address_of_no_interface_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["discover", "--interface", "192.0.2.1", "--seconds", "0.2"]) == 1
    assert "micboard-agent discover: cannot listen on 192.0.2.1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_timeout_that_is_no_positive_number_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["check", "--timeout", value])
    assert info.value.code == 2
    assert "seconds" in capsys.readouterr().err


def _run_config(tmp_path: Path, lines: str) -> Path:
    """An agent.toml for ``run``: NATS on a port nobody listens on (the agent connects in the background)."""
    config = tmp_path / "agent.toml"
    config.write_text(f'site = "hall"\nagent = "pi-1"\nnats_url = "nats://127.0.0.1:{free_port()}"\n{lines}')
    return config


def _start_failure(err: str) -> str:
    """The one line ``run`` says about a start-up failure (the log lines around it are the journal's)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("micboard-agent run:")]
    assert len(lines) == 1, err
    return lines[0]


def test_run_that_cannot_take_its_metrics_port_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        config = _run_config(
            tmp_path, f"metrics_port = {port}\ndiscovery_mdns = false\ndiscovery_slp = false\n"
        )
        assert cli.main(["run", "--config", str(config)]) == 1
    line = _start_failure(capsys.readouterr().err)
    assert line.startswith(f"micboard-agent run: cannot start: metrics endpoint 127.0.0.1:{port}: ")
    assert "address already in use" in line.lower()


@pytest.mark.parametrize("demo", [False, True], ids=["daemon", "demo-device"])
def test_run_with_a_state_directory_it_cannot_create_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, demo: bool
) -> None:
    # A file where the state directory's parent should be: refused whoever runs the test (root too).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("MICBOARD_STATE_DIR", str(blocker / "state"))
    config = _run_config(tmp_path, "discovery_mdns = false\ndiscovery_slp = false\n")
    assert cli.main(["run", "--config", str(config), *(["--demo-device"] if demo else [])]) == 1
    line = _start_failure(capsys.readouterr().err)
    assert line.startswith(f"micboard-agent run: cannot start: outbox in {blocker / 'state'}: ")
    assert "cannot create the state directory" in line


def test_run_with_a_dns_sd_type_zeroconf_refuses_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _run_config(tmp_path, 'discovery_slp = false\nextra_service_types = ["_ssc._tcp", "ssc-tcp"]\n')
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("micboard-agent: [config.invalid] invalid settings: extra_service_types: ")
    assert "'ssc-tcp' is not a DNS-SD service type" in err


def test_check_binds_what_run_binds_and_names_what_it_cannot(
    tmp_path: Path, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    free = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_server.url}"\nmetrics_port = {free}\n'
        'interfaces = ["127.0.0.1"]\n'
    )
    assert cli.main(["check", "--config", str(config), "--timeout", "2"]) == 0
    out = capsys.readouterr().out
    assert f"ok   metrics: 127.0.0.1:{free} free to listen on" in out
    assert "ok   interface 127.0.0.1: an address of this host" in out and "all checks passed" in out

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = int(taken.getsockname()[1])
        config.write_text(
            f'site = "hall"\nagent = "pi-1"\nnats_url = "{nats_server.url}"\nmetrics_port = {port}\n'
            'interfaces = ["127.0.0.1", "192.0.2.1"]\n'
        )
        assert cli.main(["check", "--config", str(config), "--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL metrics: cannot listen on 127.0.0.1:{port}: " in out
    assert "is the agent already running?" in out
    assert "FAIL interface 192.0.2.1: not usable for discovery: " in out
    assert "ok   nats: " in out and "2 check(s) failed" in out
