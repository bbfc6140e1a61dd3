"""Reading a layer tar stream with Go's end-of-archive rules (``archive/tar.Reader.Next``).

Python's ``tarfile`` takes any unreadable header after the first entry as the end of the
archive: a checksum error, a truncated header, a lone zero block followed by more entries. Go's
reader, which dockerd uses to unpack, fails on each of these, so a layer cut short or corrupted
in transit is refused instead of applied in part and reported as complete. What Go accepts as
the end, so do we: no more bytes at a block boundary, or a zero block followed by either another
one or no more bytes.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

from snapdriver.errors import ArchiveError

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
#: How much of the stream is read at a time.
_READ = 1 << 20
# tarfile's header errors (there since Python 3.2); typeshed does not declare them.
_EmptyHeaderError: type[Exception] = vars(tarfile)["EmptyHeaderError"]
_EOFHeaderError: type[Exception] = vars(tarfile)["EOFHeaderError"]
_TruncatedHeaderError: type[Exception] = vars(tarfile)["TruncatedHeaderError"]


def header_checksums(buf: bytes) -> tuple[int, int]:
    """``tarfile.calc_chksums`` at C speed: the sums of a header's bytes read as unsigned and as
    signed, with the checksum field counted as eight spaces (256).

    ``tarfile`` unpacks each byte into a Python int, twice: on a layer of small files that was
    a quarter of the unpacking thread's time. Here a signed sum is the unsigned one less 256 for
    each byte of 0x80 or more. Installed as ``tarfile.calc_chksums`` below, for every header.
    """
    if len(buf) < _BLOCK:
        return _calc_chksums(buf)  # raises struct.error, as tarfile's own does
    head, tail = buf[:148], buf[156:_BLOCK]
    unsigned = 256 + sum(head) + sum(tail)
    high = (
        len(head) + len(tail) - len(head.translate(None, _HIGH)) - len(tail.translate(None, _HIGH))
    )
    return unsigned, unsigned - 256 * high


_HIGH = bytes(range(0x80, 0x100))
_calc_chksums: Callable[[bytes], tuple[int, int]] = vars(tarfile)["calc_chksums"]
# The same results (tests/unit/test_tarread.py compares both), for every TarFile in the process.
tarfile.calc_chksums = header_checksums  # type: ignore[attr-defined]


class _GoTarFile(tarfile.TarFile):
    """A stream-mode ``TarFile`` whose ``next`` ends or fails where Go's reader would."""

    def next(self) -> tarfile.TarInfo | None:
        if self._loaded:  # type: ignore[has-type]  # the end was read: the stream is past it
            return None
        first: tarfile.TarInfo | None = self.firstmember  # type: ignore[has-type]
        if first is not None:  # read by open() to check the format
            self.firstmember = None
            return first
        self._skip_data()
        member: tarfile.TarInfo | None
        try:
            member = self.tarinfo.fromtarfile(self)
        except _EmptyHeaderError:
            member = None  # no bytes at a block boundary: Go's io.EOF
        except _EOFHeaderError:
            self._check_end_after_zero_block()
            member = None
        except _TruncatedHeaderError as err:
            raise ArchiveError(f"invalid layer tar: it ends inside a header ({err})") from None
        except tarfile.HeaderError as err:  # invalid, or a broken PAX/GNU continuation
            message = f"invalid layer tar: bad header at byte {self.offset} ({err})"
            raise ArchiveError(message) from None
        if member is None:
            self._loaded = True
        return member

    def _skip_data(self) -> None:
        """Move past what is left of the previous entry's data and padding."""
        assert self.fileobj is not None
        if self.offset != self.fileobj.tell():
            self.fileobj.seek(self.offset - 1)
            if not self.fileobj.read(1):
                raise ArchiveError("invalid layer tar: it ends inside an entry's data")

    def _check_end_after_zero_block(self) -> None:
        assert self.fileobj is not None
        block = self.fileobj.read(_BLOCK)
        if block and block != _ZERO_BLOCK:
            what = "it ends inside" if len(block) < _BLOCK else "data follows"
            raise ArchiveError(f"invalid layer tar: {what} its end-of-archive marker")


class TarSource:
    """The layer stream as ``tarfile`` reads it: ``read``, ``tell`` and forward ``seek``.

    It replaces ``tarfile``'s own stream wrapper, which reads in blocks of 10 KiB and copies its
    whole buffer on every read, with one buffer of :data:`_READ` bytes read at a time, and lets
    :meth:`copy_to` write an entry's data from that buffer straight into a file.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._buf = b""
        self._at = 0  # the read position in _buf
        self._base = 0  # the stream offset of _buf[0]

    def tell(self) -> int:
        return self._base + self._at

    def _fill(self) -> bool:
        """Move on to the next block of the stream; False at its end."""
        self._base += len(self._buf)
        self._buf = self._stream.read(_READ)
        self._at = 0
        return bool(self._buf)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left if negative); fewer only at the end."""
        end = self._at + size
        if size >= 0 and end <= len(self._buf):
            self._at = end
            return self._buf[end - size : end]
        parts = [self._buf[self._at :]]
        got = len(parts[0])
        self._at = len(self._buf)
        while (size < 0 or got < size) and self._fill():
            take = len(self._buf) if size < 0 else min(size - got, len(self._buf))
            parts.append(self._buf[:take])
            self._at = take
            got += take
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move forward to ``offset`` (to the end, if the stream is shorter)."""
        if whence != 0 or offset < self.tell():
            raise tarfile.StreamError("seeking backwards is not allowed")
        while offset > self._base + len(self._buf):
            if not self._fill():
                return self.tell()
        self._at = offset - self._base
        return offset

    def copy_to(self, fd: int, size: int) -> int:
        """Write the next ``size`` bytes to ``fd``; returns how many there were."""
        left = size
        while left:
            if self._at == len(self._buf) and not self._fill():
                break
            end = min(len(self._buf), self._at + left)
            view = memoryview(self._buf)[self._at : end]
            while view:
                view = view[os.write(fd, view) :]
            left -= end - self._at
            self._at = end
        return size - left


def open_stream(stream: IO[bytes]) -> tarfile.TarFile:
    """An uncompressed tar stream, read once from the start; an empty stream is an empty
    archive, as in Go. Its ``fileobj`` is a :class:`TarSource`."""
    try:
        # Not tarfile's stream mode ("r|"): that wraps the stream in its own slower reader.
        return _GoTarFile(fileobj=TarSource(stream), mode="r")  # type: ignore[arg-type]
    except tarfile.TarError as err:
        raise ArchiveError(f"invalid layer tar: {err}") from err


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries in stream order, without the index ``TarFile`` would otherwise keep."""
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as err:  # e.g. a stream that ends inside an extended header
            raise ArchiveError(f"invalid layer tar: {err}") from err
        if member is None:
            return
        if member.size < 0:
            raise ArchiveError(f"tar entry {member.name!r} has a negative size")
        tar.members.clear()  # type: ignore[attr-defined]
        yield member
