"""shared knows each program's setting names without importing the program (nor SQLAlchemy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from micboard.agent.settings import AgentSettings
from micboard.collector.settings import CollectorSettings
from micboard.shared.settings import AGENT_SETTINGS, COLLECTOR_SETTINGS, MicboardSettings

# Misspelt on purpose, and put together so that the check of every MICBOARD_* name used in the
# repository (test_settings_unknown_variables.py) does not take them for settings.
HTTP_PROT = "MICBOARD_" + "HTTP_PROT"
SITTE = "MICBOARD_" + "SITTE"


@pytest.mark.parametrize(
    ("listed", "cls"),
    [(AGENT_SETTINGS, AgentSettings), (COLLECTOR_SETTINGS, CollectorSettings)],
    ids=["agent", "collector"],
)
def test_the_lists_in_shared_are_the_programs_settings(
    listed: frozenset[str], cls: type[MicboardSettings]
) -> None:
    """A setting added to a program is added to its list in micboard.shared.settings too.

    Otherwise the other program calls its variable an unknown setting when both share an
    environment (the demo, a .env made from .env.example).
    """
    own = set(cls.model_fields) - set(MicboardSettings.model_fields)
    assert sorted(own - listed) == [], "add to the list in shared/src/micboard/shared/settings.py"
    assert sorted(listed - own) == [], "remove from the list in shared/src/micboard/shared/settings.py"


def _load_in_a_fresh_interpreter(tmp_path: Path, code: str, **env: str) -> dict[str, object]:
    clean = {name: value for name, value in os.environ.items() if not name.upper().startswith("MICBOARD_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # no .env of the checkout
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_loading_the_agent_settings_imports_no_collector_code_nor_sqlalchemy(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from micboard.agent.settings import AgentSettings, load_agent_settings\n"
        "from micboard.shared.settings import unknown_variables\n"
        "settings = load_agent_settings()\n"
        "unknown = unknown_variables(AgentSettings)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'"
        " or m == 'micboard.collector' or m.startswith('micboard.collector.'))\n"
        "print(json.dumps({'site': settings.site, 'unknown': unknown, 'imported': bad}))\n"
    )
    # The collector's variables are known all the same: no warning for them, a suggestion from them.
    result = _load_in_a_fresh_interpreter(
        tmp_path,
        code,
        MICBOARD_SITE="hall",
        MICBOARD_HTTP_PORT="9000",
        MICBOARD_NATS_SERVER_BIN="/opt/nats/nats-server",
        **{HTTP_PROT: "9001"},
    )
    assert result == {"site": "hall", "unknown": [[HTTP_PROT, "MICBOARD_HTTP_PORT"]], "imported": []}


def test_loading_the_collector_settings_imports_no_agent_code(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from micboard.collector.settings import CollectorSettings\n"
        "from micboard.shared.settings import load_settings, unknown_variables\n"
        "settings = load_settings(CollectorSettings)\n"
        "unknown = unknown_variables(CollectorSettings)\n"
        "bad = sorted(m for m in sys.modules if m == 'micboard.agent' or m.startswith('micboard.agent.'))\n"
        "print(json.dumps({'port': settings.http_port, 'unknown': unknown, 'imported': bad}))\n"
    )
    result = _load_in_a_fresh_interpreter(
        tmp_path, code, MICBOARD_HTTP_PORT="9000", MICBOARD_SITE="hall", **{SITTE: "hall"}
    )
    assert result == {"port": 9000, "unknown": [[SITTE, "MICBOARD_SITE"]], "imported": []}
