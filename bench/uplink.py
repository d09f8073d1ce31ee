"""A link emulator: a loopback TCP proxy with a real uplink's latency and bandwidth,
and a destination's service time per request.

Between a forwarder and a DICOMweb server on 127.0.0.1 (loopback hides both
latency and bandwidth), it adds per direction:

* a fixed delay of half the round trip (``--rtt-ms``);
* a bandwidth cap (``--mbit``), one per direction, shared by every connection
  (it is one link): a chunk leaves when the link has sent the chunks before
  it, and the proxy reads no more from that connection meanwhile, so the
  sender feels the cap as TCP would;
* a service time (``--service-ms``) before each HTTP response: the first bytes
  coming back on a connection after request bytes went out are held that much
  longer (the Healthcare API takes 100-300 ms per STOW-RS request; each
  request waits its own, however many run at once). This assumes HTTP/1.1
  without pipelining, which is what the forwarder and the baselines speak.

    python bench/uplink.py --port 18043 --target-port 8042 --profile clinic

``PROFILES`` are the benchmark's (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass

#: bytes read from a connection at a time (16 KiB: 6.5 ms on a 20 Mbit/s link)
CHUNK = 16 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    mbit: float
    rtt_ms: float
    service_ms: float = 150.0

    @property
    def bytes_per_second(self) -> float:
        return self.mbit * 1e6 / 8

    def args(self) -> list[str]:
        return [
            "--mbit",
            str(self.mbit),
            "--rtt-ms",
            str(self.rtt_ms),
            "--service-ms",
            str(self.service_ms),
        ]


PROFILES = {
    p.name: p
    for p in (
        Profile("clinic", 20, 40),
        Profile("hospital", 200, 20),
        Profile("datacenter", 1000, 2),
    )
}


#: bytes the link may send at once after it was idle: the proxy's own delays
#: (a late wake-up, a short read) must not lower the rate below the cap
BURST = 64 * 1024


class Link:
    """One direction of the link: when each chunk has been put on the wire."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self.busy_until = 0.0

    def send(self, size: int) -> float:
        """Reserve the wire for ``size`` bytes; returns when they are all sent."""
        idle_credit = BURST / self.bytes_per_second
        start = max(time.monotonic() - idle_credit, self.busy_until)
        self.busy_until = start + size / self.bytes_per_second
        return self.busy_until


class Emulator:
    def __init__(self, target_port: int, mbit: float, rtt_ms: float, service_ms: float) -> None:
        self.target_port = target_port
        self.delay = rtt_ms / 2000
        self.service = service_ms / 1000
        self.up = Link(mbit * 1e6 / 8)
        self.down = Link(mbit * 1e6 / 8)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            return
        # Set by the request direction, cleared by the response that follows it.
        awaiting_response = asyncio.Event()
        await asyncio.gather(
            self._pipe(reader, target_writer, self.up, awaiting_response, request=True),
            self._pipe(target_reader, writer, self.down, awaiting_response, request=False),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: Link,
        awaiting_response: asyncio.Event,
        *,
        request: bool,
    ) -> None:
        """Copy ``source`` to ``sink`` through ``link`` and the delay line, in order."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(line, sink))
        try:
            while data := await source.read(CHUNK):
                extra = 0.0
                if request:
                    awaiting_response.set()
                elif awaiting_response.is_set():
                    awaiting_response.clear()
                    extra = self.service
                sent = link.send(len(data))
                line.put_nowait((max(sent, time.monotonic()) + self.delay + extra, data))
                # The link is busy with this chunk until ``sent``: read no more meanwhile.
                wait = sent - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
        except (ConnectionError, OSError):
            pass
        finally:
            line.put_nowait(None)
            with contextlib.suppress(Exception):
                await deliver

    @staticmethod
    async def _deliver(
        line: asyncio.Queue[tuple[float, bytes] | None], sink: asyncio.StreamWriter
    ) -> None:
        try:
            while (item := await line.get()) is not None:
                at, data = item
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()


async def serve(port: int, emulator: Emulator) -> None:
    server = await asyncio.start_server(emulator.handle, "127.0.0.1", port, backlog=256)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="where to listen (127.0.0.1)")
    parser.add_argument("--target-port", type=int, required=True, help="where to relay to")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="clinic, hospital, ...")
    parser.add_argument("--mbit", type=float, help="bandwidth cap per direction, Mbit/s")
    parser.add_argument("--rtt-ms", type=float, help="round trip time added, ms")
    parser.add_argument("--service-ms", type=float, help="added before each HTTP response, ms")
    args = parser.parse_args(argv)
    base = PROFILES[args.profile] if args.profile else Profile("custom", 1000, 0, 0)
    emulator = Emulator(
        args.target_port,
        args.mbit if args.mbit is not None else base.mbit,
        args.rtt_ms if args.rtt_ms is not None else base.rtt_ms,
        args.service_ms if args.service_ms is not None else base.service_ms,
    )
    asyncio.run(serve(args.port, emulator))
    return 0


if __name__ == "__main__":
    sys.exit(main())
