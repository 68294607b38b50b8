"""Schemathesis against a live collector process with an admin token: no input may cause a 5xx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from micboard.shared.natsd import EmbeddedNats, free_port

TOKEN = "mbt_schemathesis-admin-token-0123456789abcdef"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def collector_url(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``micboard-collector run`` on SQLite, with the admin token given by environment."""
    state = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    env = {
        **os.environ,
        "MICBOARD_NATS_URL": nats_server.url,
        "MICBOARD_STATE_DIR": str(state),
        "MICBOARD_HTTP_PORT": str(port),
        "MICBOARD_BOOTSTRAP_TOKEN": TOKEN,
        "MICBOARD_DURABLE_NAME": "schemathesis",
        # Generated requests include bad tokens on purpose; do not let the limit turn them into 429s.
        "MICBOARD_AUTH_FAILURES_PER_MIN": "100000",
        "MICBOARD_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen([BIN / "micboard-collector", "run"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if json.load(response)["status"] == "ok":
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            assert process.poll() is None, "the collector exited"
            assert time.monotonic() < deadline, "the collector did not become healthy"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_no_input_causes_a_server_error(collector_url: str) -> None:
    # Every operation of the live document, each with a bounded number of generated cases
    # (valid and invalid): whatever comes in, the answer is never a 5xx.
    schema = schemathesis.openapi.from_url(
        f"{collector_url}/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1

        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
            generation_mode=GenerationMode.NEGATIVE
        )

        @given(case=strategy)
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Case) -> None:  # type: ignore[type-arg]
            response = case.call(
                base_url=collector_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
            )
            case.validate_response(response, checks=[not_a_server_error])

        check()
    assert operations >= 18
