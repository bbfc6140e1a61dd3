"""Bridges between aiohttp's async byte streams and the blocking tar code running in threads.

Both directions keep memory bounded: the reader pulls about a MiB at a time; the writer
holds at most ``_QUEUE_DEPTH`` chunks (about a MiB each) between the producing thread and the
socket, so a slow dockerd slows the producer instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable, Callable

from aiohttp import StreamReader

Sink = Callable[[bytes], None]
_QUEUE_DEPTH = 4
#: The most a :class:`ThreadReader` gathers per trip to the event loop.
_GATHER = 1 << 20


class ThreadReader(io.RawIOBase):
    """A blocking, read-only file object over an aiohttp request body, for a worker thread.

    dockerd sends a layer in small HTTP chunks (one per read its tar reader makes: a 512-byte
    header, the data, the padding), so fetching one chunk per trip to the event loop would cost a
    thread hand-off per chunk. Each trip instead gathers what has arrived until ``len(buffer)``
    bytes (at most :data:`_GATHER`) are there or the body ends.
    """

    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if not self._pending:
            want = min(len(buffer), _GATHER)
            future = asyncio.run_coroutine_threadsafe(self._gather(want), self._loop)
            self._pending = memoryview(future.result())
            if not self._pending:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, as received: what is gathered comes back without a copy."""
        if size < 0:
            return self.readall()
        if not self._pending:
            future = asyncio.run_coroutine_threadsafe(self._gather(min(size, _GATHER)), self._loop)
            data = future.result()
            if len(data) <= size:
                return data
            self._pending = memoryview(data)
        chunk = self._pending[:size]
        self._pending = self._pending[size:]
        return chunk.tobytes()

    async def _gather(self, want: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < want and (data := await self._content.readany()):
            parts.append(data)
            size += len(data)
        return b"".join(parts)  # one part is returned as it is, not copied


class _Stopped(Exception):
    """The consumer went away; the producer thread unwinds with this."""


async def stream_from_thread(
    produce: Callable[[Sink], None], consume: Callable[[bytes], Awaitable[None]]
) -> None:
    """Run ``produce(sink)`` in a thread and feed every chunk it sinks to ``consume``.

    An exception in either side stops both and is raised here; the thread never blocks forever.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_DEPTH)
    stopped = False

    def sink(chunk: bytes) -> None:
        if stopped:
            raise _Stopped
        asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()

    def run() -> None:
        try:
            produce(sink)
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        while (chunk := await queue.get()) is not None:
            await consume(chunk)
    except BaseException:
        stopped = True
        # Drain, so a producer blocked on the full queue wakes up and stops at its next chunk.
        while await queue.get() is not None:
            pass
        with contextlib.suppress(Exception):
            await worker
        raise
    await worker  # re-raises what the producer raised
