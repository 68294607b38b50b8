"""Which channels the live feed reads again after a commit: only those a channel-only delta touched."""

from __future__ import annotations

from micboard.collector.api.live_ws import _Pending, publish_committed
from micboard.collector.live import LiveHub, Topic
from micboard.collector.services.sync import DeviceChange
from micboard.shared.envelope import DeviceBody, DeviceEvent, OfflineBody, OfflineEvent
from micboard.shared.model import Device, Family, ReceiverChannel, Vendor


def _event(seq: int, body: DeviceBody | OfflineBody) -> DeviceEvent | OfflineEvent:
    if isinstance(body, OfflineBody):
        return OfflineEvent(site="s1", agent="a1", boot="b", seq=seq, ts=seq, body=body)
    return DeviceEvent(site="s1", agent="a1", boot="b", seq=seq, ts=seq, body=body)


async def test_channel_only_deltas_name_their_channels_and_everything_else_the_whole_device() -> None:
    hub = LiveHub()
    sub = hub.subscribe(topics=frozenset({Topic.DEVICE}))
    snapshot = Device(
        device_key="rx1", vendor=Vendor.SHURE, family=Family.ULXD, channels=(ReceiverChannel(index=1),)
    )
    events = [
        _event(
            1, DeviceBody(device_key="rx1", changes={"channels": {2: {"name": "HH02"}, 3: {"name": "x"}}})
        ),
        _event(2, DeviceBody(device_key="rx2", changes={"name": "Rack 2", "channels": {1: {"name": "a"}}})),
        _event(3, DeviceBody(device_key="rx3", snapshot=snapshot.model_copy(update={"device_key": "rx3"}))),
        _event(4, OfflineBody(device_key="rx4")),
    ]
    publish_committed(hub, events)
    got = [await sub.get() for _ in events]
    assert [m.data.get("channels") if m else "none" for m in got] == [[2, 3], None, None, None]


def test_pending_reads_a_whole_device_once_and_single_channels_otherwise() -> None:
    pending = _Pending()
    pending.device_changed(("a1", "rx1"), [1])
    pending.device_changed(("a1", "rx1"), [2])
    pending.device_changed(("a1", "rx2"), [1])
    pending.device_changed(("a1", "rx2"), None)  # a whole-device change covers its channels
    pending.device_changed(("a1", "rx2"), [4])
    pending.device_changed(("a1", "rx3"), ["1"])  # not a list of ints: read the whole device
    assert pending.devices == {("a1", "rx2"), ("a1", "rx3")}
    assert pending.channel_keys() == {("a1", "rx1", 1), ("a1", "rx1", 2)}


async def test_a_channel_only_delta_leaves_the_site_summary_alone_unless_counts_moved() -> None:
    hub = LiveHub()
    sub = hub.subscribe(topics=frozenset({Topic.DEVICE}))
    one = {"channels": [{"index": 1}], "status": "online"}
    two = {"channels": [{"index": 1}, {"index": 2}]}
    devices = [
        DeviceChange("s1", "a1", "rx1", one, one, "online", "online"),  # same counts
        DeviceChange("s1", "a1", "rx2", one, two, "online", "online"),  # a channel appeared
        DeviceChange("s1", "a1", "rx3", one, one, "stale", "online"),  # status moved
    ]
    delta = {"channels": {1: {"name": "HH01"}}}
    events = [_event(i, DeviceBody(device_key=f"rx{i}", changes=delta)) for i in (1, 2, 3)]
    publish_committed(hub, events, devices=devices)
    got = [await sub.get() for _ in events]
    assert [m.data.get("summary", True) if m else "none" for m in got] == [False, True, True]
