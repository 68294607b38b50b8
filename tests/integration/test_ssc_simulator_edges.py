"""The SSC simulator answers malformed and refused requests as the SSC spec says, over real UDP."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from micboard.agent.drivers.sennheiser import SscSimulator


class Client(asyncio.DatagramProtocol):
    """A raw SSC client: sends JSON datagrams, collects the decoded replies."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.replies.put_nowait(json.loads(data))

    async def ask(self, tree: Any) -> Any:
        assert self.transport is not None
        self.transport.sendto(json.dumps(tree).encode())
        return await asyncio.wait_for(self.replies.get(), 5)


@pytest.fixture
async def ssc() -> AsyncIterator[tuple[SscSimulator, Client]]:
    simulator = SscSimulator("ewdx-em2", port=0, seed=3)
    await simulator.start()
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", simulator.port))
    client.transport = transport
    try:
        yield simulator, client
    finally:
        transport.close()
        await simulator.stop()


def error_of(reply: Any, *path: str) -> dict[str, Any]:
    """The one error the reply's ``osc.error`` list holds for ``path``."""
    for tree in reply["osc"]["error"]:
        node = tree
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            [error] = node
            return dict(error)
    raise AssertionError(f"no error for {path} in {reply}")


async def test_wrong_types_and_read_only_addresses_are_refused(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    before = simulator.channel(1).frequency_khz
    reply = await client.ask(
        {
            "device": {"name": 7, "identification": {"visual": "yes"}, "identity": {"serial": "X"}},
            "rx1": {"frequency": "high", "gain": 4, "warnings": ["x"]},
            "rx2": {"gain": 45, "mute": "no", "name": {"deep": None}},
        }
    )
    assert error_of(reply, "device", "name") == {"desc": "expected a string", "code": 400}
    assert error_of(reply, "device", "identification", "visual")["desc"] == "expected a boolean"
    assert error_of(reply, "device", "identity", "serial") == {"desc": "read only", "code": 406}
    assert error_of(reply, "rx1", "frequency")["desc"] == "expected an integer (kHz)"
    assert error_of(reply, "rx1", "gain")["desc"] == "gain is -3..42 dB in 3 dB steps"
    assert error_of(reply, "rx1", "warnings")["code"] == 406
    assert error_of(reply, "rx2", "gain")["code"] == 406
    assert error_of(reply, "rx2", "mute")["desc"] == "expected a boolean"
    assert error_of(reply, "rx2", "name")["desc"] == "address is a parameter"
    assert simulator.channel(1).frequency_khz == before and simulator.channel(2).gain_db != 45


async def test_good_settings_are_applied_and_echoed(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    reply = await client.ask(
        {"rx1": {"gain": 9, "mute": True}, "device": {"identification": {"visual": True}}}
    )
    assert reply == {"rx1": {"gain": 9, "mute": True}, "device": {"identification": {"visual": True}}}
    assert simulator.channel(1).gain_db == 9 and simulator.channel(1).muted
    assert simulator.identify_count == 1


async def test_osc_and_subscription_refusals(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    reply = await client.ask({"osc": "version"})
    assert error_of(reply, "osc")["desc"] == "osc is a node"
    reply = await client.ask({"osc": {"state": {"subscribe": {"rx1": None}}}, "m": None})
    assert error_of(reply, "osc", "state", "subscribe")["desc"] == "subscribe takes a list"
    assert error_of(reply, "m")["desc"] == "meters are only available by subscription"
    bad_items = [
        "rx1",
        {"#": {"lifetime": 0}, "rx1": {"name": None}},
        {"#": {"min": 1}, "rx1": {"name": None}},
        {"#": {"count": True}, "rx1": {"name": None}},
        {"#": {"min": 20_000, "max": 10_000}, "rx1": {"name": None}},
        {"#": {}, "rx1": {"name": "set"}},
    ]
    reply = await client.ask({"osc": {"state": {"subscribe": bad_items}}})
    descriptions = sorted(
        e["osc"]["state"]["subscribe"][0]["desc"] for e in reply["osc"]["error"] if "osc" in e
    )
    assert descriptions == [
        "a subscription is an object",
        "count is a positive integer",
        "lifetime is 0 < seconds <= 3600",
        "max is a number of ms not below min",
        "min is 10..60000 ms",
    ]
    assert error_of(reply, "rx1", "name")["desc"] == "a subscription takes null leaves"
    assert reply["osc"]["state"] == {"subscribe": []} and simulator.subscription_count == 0


async def test_a_transmitter_switched_off_is_a_failed_dependency(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    simulator.set_transmitter_on(2, False)
    reply = await client.ask({"mates": {"tx2": {"battery": {"gauge": None}}, "tx9": {"name": None}}})
    assert error_of(reply, "mates", "tx2") == {
        "desc": "failed dependency: the transmitter is off",
        "code": 424,
    }
    assert error_of(reply, "mates", "tx9")["code"] == 404
    # Front-panel changes show in the next query.
    simulator.set_channel_name(1, "VOX")
    simulator.set_battery(1, None, 90)
    reply = await client.ask({"rx1": {"name": None}, "mates": {"tx1": {"battery": {"gauge": None}}}})
    assert reply["rx1"]["name"] == "VOX" and reply["mates"]["tx1"]["battery"]["gauge"] is None


async def test_a_flat_battery_switches_the_transmitter_off(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    simulator.set_battery(2, 40, None)  # a gauge only: the runtime follows from it
    reply = await client.ask({"mates": {"tx2": {"battery": {"gauge": None, "lifetime": None}}}})
    assert reply["mates"]["tx2"]["battery"]["gauge"] == 40
    assert reply["mates"]["tx2"]["battery"]["lifetime"] is None
    simulator.set_battery(1, None, 0)
    reply = await client.ask({"mates": {"tx1": {"name": None}}})
    assert error_of(reply, "mates", "tx1")["code"] == 424 and not simulator.channel(1).transmitter.on


async def test_identify_off_and_too_many_subscriptions(ssc: tuple[SscSimulator, Client]) -> None:
    simulator, client = ssc
    assert await client.ask({"device": {"identification": {"visual": False}}}) == {
        "device": {"identification": {"visual": False}}
    }
    assert simulator.identify_count == 0
    # The same request again only renews its subscription.
    again = [{"#": {"lifetime": 60, "min": 60_000, "count": n}, "rx1": {"name": None}} for n in (1, 2)]
    reply = await client.ask({"osc": {"state": {"subscribe": again}}})
    assert len(reply["osc"]["state"]["subscribe"]) == 2 and simulator.subscription_count == 1
    # Distinct requests from one client: the device keeps 64 and refuses the next.
    leaves = [(rx, key) for rx in ("rx1", "rx2") for key in ("name", "frequency", "mute", "gain", "warnings")]
    requests: list[dict[str, Any]] = []
    for size in (1, 2, 3):
        for combo in itertools.combinations(leaves, size):
            tree: dict[str, Any] = {"#": {"lifetime": 60, "min": 60_000}}
            for rx, key in combo:
                tree.setdefault(rx, {})[key] = None
            requests.append(tree)
    reply = await client.ask({"osc": {"state": {"subscribe": requests[:65]}}})
    # The first renews the subscription above; 63 are new; the 65th is refused.
    assert len(reply["osc"]["state"]["subscribe"]) == 64
    assert error_of(reply, "osc", "state", "subscribe") == {"desc": "too many subscriptions", "code": 409}
    assert simulator.subscription_count == 64
    cancel = await client.ask({"osc": {"state": {"subscribe": [{"#": {"cancel": True}}]}}})
    assert cancel["osc"]["state"]["subscribe"] == [{"#": {"cancel": True}}]
    assert simulator.subscription_count == 0
