"""Reading a layer tar stream with Go's end-of-archive rules (``archive/tar.Reader.Next``).

Python's ``tarfile`` takes any unreadable header after the first entry as the end of the
archive: a checksum error, a truncated header, a lone zero block followed by more entries. Go's
reader, which dockerd uses to unpack, fails on each of these, so a layer cut short or corrupted
in transit is refused instead of applied in part and reported as complete. What Go accepts as
the end, so do we: no more bytes at a block boundary, or a zero block followed by either another
one or no more bytes.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

from snapdriver.errors import ArchiveError

_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
# tarfile's header errors (there since Python 3.2); typeshed does not declare them.
_EmptyHeaderError: type[Exception] = vars(tarfile)["EmptyHeaderError"]
_EOFHeaderError: type[Exception] = vars(tarfile)["EOFHeaderError"]
_TruncatedHeaderError: type[Exception] = vars(tarfile)["TruncatedHeaderError"]


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


def open_stream(stream: IO[bytes]) -> tarfile.TarFile:
    """An uncompressed tar stream, read once from the start; an empty stream is an empty
    archive, as in Go."""
    try:
        # tarfile copies its whole buffer on every small read: keep it at the default size.
        return _GoTarFile.open(fileobj=stream, mode="r|")
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
