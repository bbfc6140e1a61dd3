"""ThreadReader: a worker thread reading an aiohttp body fed in small chunks, as dockerd sends."""

from __future__ import annotations

import asyncio
import random
import socket

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from snapdriver.streams import ThreadReader


class _Protocol(BaseProtocol):
    """A connection without an HTTP parser: aiohttp's own pauses the parser with the transport,
    and asserts it has one, when the body's buffer fills (a feeder ahead of a slow reader)."""

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


async def _feed(content: StreamReader, data: bytes, chunk: int) -> None:
    """Feed ``data`` in HTTP chunks of ``chunk`` bytes, yielding to the loop between them.

    A failure here reaches the reader (it would otherwise wait for the rest for ever).
    """
    try:
        for start in range(0, len(data), chunk):
            content.begin_http_chunk_receiving()
            content.feed_data(data[start : start + chunk])
            content.end_http_chunk_receiving()
            await asyncio.sleep(0)
    except Exception as err:
        content.set_exception(err)
        raise
    content.feed_eof()


async def _body() -> tuple[StreamReader, socket.socket]:
    """A request body reader on a real (idle) connection, which its flow control pauses."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    protocol = _Protocol(loop)
    await loop.connect_accepted_socket(lambda: protocol, ours)
    return StreamReader(protocol, 2**16, loop=loop), theirs


def _read_all(reader: ThreadReader, sizes: list[int]) -> bytes:
    """Read with ``read`` and ``readinto`` in turn, in the given sizes, until the end."""
    parts: list[bytes] = []
    turn = 0
    while True:
        size = sizes[turn % len(sizes)]
        if turn % 2:
            buffer = bytearray(size)
            got = reader.readinto(memoryview(buffer))
            part = bytes(buffer[:got])
        else:
            part = reader.read(size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        turn += 1


def test_thread_reader_returns_the_body_in_order() -> None:
    data = random.Random(5).randbytes(3 * 1024 * 1024 + 123)

    async def main() -> bytes:
        content, peer = await _body()
        with peer:
            reader = ThreadReader(content, asyncio.get_running_loop())
            feeding = asyncio.ensure_future(_feed(content, data, 512))
            sizes = [1 << 20, 512, 7, 100_000, 4 << 20]
            result = await asyncio.to_thread(_read_all, reader, sizes)
            await feeding
            return result

    assert asyncio.run(main()) == data


def test_thread_reader_readall_and_empty_body() -> None:
    async def main(data: bytes) -> bytes:
        content, peer = await _body()
        with peer:
            feeding = asyncio.ensure_future(_feed(content, data, 1000))
            reader = ThreadReader(content, asyncio.get_running_loop())
            result = await asyncio.to_thread(reader.read)
            await feeding
            return result

    assert asyncio.run(main(b"x" * 5000)) == b"x" * 5000
    assert asyncio.run(main(b"")) == b""
