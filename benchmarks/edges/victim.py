"""The victim tenant: a steady predict load whose latencies the edge benchmark reads per window.

Run as its own process (so the attacks' CPU in the benchmark process does not slow the victim's
client), it opens ``--connections`` keep-alive HTTP/1.1 connections from ``--source`` (a
loopback address of its own, so no per-address bound or ban aimed at an attacker touches it)
and sends ``--rate`` predicts per second in all, spread evenly over them. Each request has a
scheduled start; its latency is measured from that schedule, not from the write, so a stalled
server is charged for the requests it kept waiting (no coordinated omission). One line per
response goes to ``--out``: ``<scheduled monotonic time> <latency s> <status>`` (status 0: a
transport error or a timeout). It runs until SIGTERM or ``--max-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import TextIO

_TIMEOUT_S = 10.0


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _connection(
    args: argparse.Namespace, request: bytes, offset: float, out: TextIO, stop: asyncio.Event
) -> None:
    period = args.connections / args.rate
    scheduled = time.monotonic() + offset
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while not stop.is_set():
        delay = scheduled - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        status = 0
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port, local_addr=(args.source, 0)), _TIMEOUT_S
                )
            assert reader is not None and writer is not None
            writer.write(request)
            status = await asyncio.wait_for(_read_response(reader), _TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if writer is not None:
                writer.close()
            reader = writer = None
        out.write(f"{scheduled:.6f} {time.monotonic() - scheduled:.6f} {status}\n")
        scheduled += period
    if writer is not None:
        writer.close()


async def _main(args: argparse.Namespace) -> None:
    body = Path(args.body_file).read_bytes()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nAuthorization: Bearer {args.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.call_later(args.max_s, stop.set)
    with open(args.out, "a", buffering=1 << 16) as out:

        async def flush() -> None:
            while not stop.is_set():
                out.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        period = args.connections / args.rate
        tasks = [_connection(args, request, i * period / args.connections, out, stop) for i in range(args.connections)]
        await asyncio.gather(flush(), *tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.3", help="local address the connections come from")
    parser.add_argument("--path", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--rate", type=float, default=80.0, help="requests per second, all connections together")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-s", type=float, default=900.0, help="stop after this long even without SIGTERM")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
