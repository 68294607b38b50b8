"""The remembered device keys: a small JSON file, atomic, bounded, and never a reason to crash."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from micboard.agent.identities import DEVICE_KEYS_FILE, DeviceKeyMemory

DAY = 24 * 3600.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def saved(path: Path) -> dict[str, dict[str, float | str]]:
    body = json.loads(path.read_text(encoding="utf-8"))
    assert body["version"] == 1
    keys: dict[str, dict[str, float | str]] = body["keys"]
    return keys


def test_what_is_learned_is_read_back_by_the_next_run(tmp_path: Path) -> None:
    memory = DeviceKeyMemory.in_state_dir(tmp_path)
    assert len(memory) == 0 and not memory
    memory.remember("id:sennheiser:123", "ewdx-10.0.0.7-45")
    memory.remember("id:shure:CID", "shure-cid")
    memory.remember("id:shure:RX1", "shure-cid")
    memory.remember("at:10.0.0.7:45", "ewdx-10.0.0.7-45")  # an address is no identity: not kept
    again = DeviceKeyMemory.in_state_dir(tmp_path)
    assert again.key_for("id:sennheiser:123") == "ewdx-10.0.0.7-45"
    assert again.identities_of("shure-cid") == {"id:shure:CID", "id:shure:RX1"}
    assert again.identities("id:shure:") == ["id:shure:CID", "id:shure:RX1"]
    assert again.key_for("at:10.0.0.7:45") is None and len(again) == 3
    # A key given to an id again moves it: the old key is nobody's any more.
    again.remember("id:sennheiser:123", "ewdx-10.0.0.8-45")
    assert again.identities_of("ewdx-10.0.0.7-45") == frozenset()
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed


def test_no_state_dir_keeps_nothing_on_disk() -> None:
    memory = DeviceKeyMemory.in_state_dir(None)
    memory.remember("id:sennheiser:1", "k")
    assert memory.key_for("id:sennheiser:1") == "k" and memory.writes == 0


def test_the_file_is_rewritten_only_for_news_or_a_day_old_entry(tmp_path: Path) -> None:
    clock = Clock()
    memory = DeviceKeyMemory(tmp_path / DEVICE_KEYS_FILE, clock=clock)
    memory.remember("id:sennheiser:1", "k")
    memory.remember("id:sennheiser:1", "k")
    clock.now += DAY - 1
    memory.remember("id:sennheiser:1", "k")
    assert memory.writes == 1
    clock.now += 1
    memory.remember("id:sennheiser:1", "k")
    assert memory.writes == 2 and saved(tmp_path / DEVICE_KEYS_FILE)["id:sennheiser:1"]["seen"] == clock.now


def test_bounded_by_age_and_by_count(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / DEVICE_KEYS_FILE
    memory = DeviceKeyMemory(path, clock=clock, max_entries=3, max_age_s=90 * DAY)
    memory.remember("id:sennheiser:old", "old")
    clock.now += 91 * DAY
    for n in range(4):
        clock.now += 1
        memory.remember(f"id:sennheiser:{n}", f"k{n}")
    # Unseen for 90 days: forgotten; then the most recently seen three are kept.
    assert sorted(saved(path)) == ["id:sennheiser:1", "id:sennheiser:2", "id:sennheiser:3"]
    # Read back 90 days after the newest was seen: the older ones are dropped when read.
    clock.now += 90 * DAY
    assert len(DeviceKeyMemory(path, clock=clock, max_age_s=90 * DAY)) == 1


def test_a_clock_that_starts_in_the_past_does_not_age_what_was_learned(tmp_path: Path) -> None:
    # A Pi without a real-time clock may start in the past until NTP answers.
    path = tmp_path / DEVICE_KEYS_FILE
    DeviceKeyMemory(path, clock=Clock(1_700_000_000.0)).remember("id:sennheiser:1", "k1")
    early = DeviceKeyMemory(path, clock=Clock(0.0))
    early.remember("id:sennheiser:2", "k2")
    assert saved(path)["id:sennheiser:2"]["seen"] == 1_700_000_000.0
    later = DeviceKeyMemory(path, clock=Clock(1_700_000_000.0 + DAY))
    assert len(later) == 2


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff not json",
        b'{"version": 1, "keys": {"id:sennheiser:1": ',
        b"[1, 2, 3]",
        b'{"version": 2, "keys": {}}',
        b'{"version": 1, "keys": []}',
    ],
)
def test_an_unreadable_file_is_moved_aside_and_the_memory_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / DEVICE_KEYS_FILE
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="micboard.agent.identities"):
        memory = DeviceKeyMemory(path)
    assert len(memory) == 0
    assert "remembered device keys unreadable" in caplog.text
    assert not path.exists() and (tmp_path / f"{DEVICE_KEYS_FILE}.corrupt").read_bytes() == content
    memory.remember("id:sennheiser:1", "k")
    assert saved(path)["id:sennheiser:1"]["key"] == "k"


def test_malformed_entries_are_skipped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / DEVICE_KEYS_FILE
    now = 1_700_000_000
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "keys": {
                    "id:sennheiser:good": {"key": "k", "seen": now},
                    "at:10.0.0.1:45": {"key": "k2", "seen": now},
                    "id:sennheiser:nokey": {"seen": now},
                    "id:sennheiser:emptykey": {"key": "", "seen": now},
                    "id:sennheiser:longkey": {"key": "k" * 200, "seen": now},
                    "id:sennheiser:badseen": {"key": "k3", "seen": "yesterday"},
                    "id:sennheiser:boolseen": {"key": "k4", "seen": True},
                    "id:sennheiser:notadict": "k5",
                },
            }
        ),
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="micboard.agent.identities"):
        memory = DeviceKeyMemory(path, clock=Clock(float(now)))
    assert memory.identities() == ["id:sennheiser:good"]
    assert "malformed entries skipped" in caplog.text
    assert path.exists()  # the file is not thrown away for a few bad entries


def test_a_file_that_cannot_be_written_is_logged_and_the_memory_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be", encoding="utf-8")
    memory = DeviceKeyMemory.in_state_dir(blocker)
    with caplog.at_level(logging.WARNING, logger="micboard.agent.identities"):
        memory.remember("id:sennheiser:1", "k")
    assert memory.key_for("id:sennheiser:1") == "k"
    assert memory.write_errors == 1 and memory.writes == 0
    assert "remembered device keys not saved" in caplog.text


def test_a_missing_file_is_an_empty_memory(tmp_path: Path) -> None:
    memory = DeviceKeyMemory.in_state_dir(tmp_path / "absent")
    assert len(memory) == 0 and memory.key_for("id:sennheiser:1") is None
    memory.remember("id:sennheiser:1", "k")
    assert saved(tmp_path / "absent" / DEVICE_KEYS_FILE)["id:sennheiser:1"]["key"] == "k"


def test_bad_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        DeviceKeyMemory(tmp_path / DEVICE_KEYS_FILE, max_entries=0)
