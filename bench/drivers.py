"""How many Shure SAMPLE lines one core parses and normalizes per second.

A realistic mix of ULX-D, Axient Digital and SLX-D metering, packed several lines per read as
receivers send them, goes through the frame reader and the dialect into ``ChannelMeter``. A bare
``bytes.split(b'>')`` of the same reads runs in the same process as the floor to compare with.
Run: ``.venv/bin/python bench/drivers.py [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from micboard.agent.drivers.shure.dialects import AXIENT, SLXD, ULXD, Dialect
from micboard.agent.drivers.shure.protocol import FrameReader, Sample
from report import emit

LINES_PER_READ = 8


def _ulxd(rnd: random.Random, channel: int) -> bytes:
    ant = rnd.choice(("AX", "XB", "XX"))
    return f"< SAMPLE {channel} ALL {ant} {rnd.randrange(116):03d} {rnd.randrange(51):03d} >".encode()


def _axient(rnd: random.Random, channel: int) -> bytes:
    if rnd.random() < 0.1:
        return f"< SAMPLE {channel} ALL 255 000 005 033 XX 00 011 00 012 >".encode()
    a, b = rnd.randrange(40, 100), rnd.randrange(40, 100)
    return (
        f"< SAMPLE {channel} ALL 005 031 {rnd.randrange(60, 120):03d} {rnd.randrange(60, 120):03d} "
        f"BB 31 {a:03d} 31 {b:03d} >"
    ).encode()


def _slxd(rnd: random.Random, channel: int) -> bytes:
    peak, rms, rssi = rnd.randrange(121), rnd.randrange(121), rnd.randrange(121)
    return f"< SAMPLE {channel} ALL {peak:03d} {rms:03d} {rssi:03d} >".encode()


def make_reads(count: int, seed: int = 1) -> list[tuple[Dialect, bytes, int]]:
    """``count`` reads of ``LINES_PER_READ`` lines each, a third per family, one family per read."""
    rnd = random.Random(seed)
    makers: list[tuple[Dialect, Callable[[random.Random, int], bytes]]] = [
        (ULXD, _ulxd),
        (AXIENT, _axient),
        (SLXD, _slxd),
    ]
    reads = []
    for i in range(count):
        dialect, make = makers[i % 3]
        reads.append((dialect, b"".join(make(rnd, 1 + n % 4) for n in range(LINES_PER_READ)), LINES_PER_READ))
    return reads


def run_parser(reads: list[tuple[Dialect, bytes, int]], seconds: float) -> tuple[float, int]:
    """Feed the reads through frame reader and dialect for about ``seconds``; lines per second."""
    readers = {d.family: FrameReader() for d, _, _ in reads}
    lines = 0
    meters = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for dialect, data, count in reads:
            meter = dialect.meter
            for message in readers[dialect.family].feed(data):
                if type(message) is Sample and meter(message.channel, message.fields) is not None:
                    meters += 1
            lines += count
    elapsed = time.perf_counter() - start
    return lines / elapsed, meters


def run_split(reads: list[tuple[Dialect, bytes, int]], seconds: float) -> float:
    """Only ``bytes.split(b'>')`` on the same reads: the floor any parser is compared with."""
    lines = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _, data, count in reads:
            data.split(b">")
            lines += count
    return lines / (time.perf_counter() - start)


def main() -> None:
    """Print parsed-and-normalized lines/s next to bare split lines/s and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    reads = make_reads(3000)
    run_parser(reads[:300], 0.2)  # warm-up
    parsed, meters = run_parser(reads, args.seconds)
    split = run_split(reads, args.seconds)
    emit("drivers", "Shure SAMPLE parse+normalize", round(parsed), "lines/s", ">= 100,000")
    emit("drivers", "bare split / parse", round(split / parsed, 1), "x")
    print(f"shure SAMPLE parse+normalize : {parsed:12,.0f} lines/s (one core, {LINES_PER_READ} lines/read)")
    print(f"bare bytes.split(b'>')       : {split:12,.0f} lines/s")
    print(f"ratio split/parse            : {split / parsed:12.1f}x")
    verdict = "met" if parsed >= 100_000 else "NOT met"
    print(f"goal >= 100,000 lines/s      : {verdict} ({meters:,} meters built)")


if __name__ == "__main__":
    main()
