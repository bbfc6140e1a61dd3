"""The tar stream reader's parts: the buffered source and the header checksums."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path
from typing import IO, cast

import pytest

from snapdriver.layers import tarread
from snapdriver.layers.tarread import TarSource, header_checksums


class Trickle(io.RawIOBase):
    """A stream that returns at most ``most`` bytes per read, as a network body does."""

    def __init__(self, data: bytes, most: int) -> None:
        self._data, self._at, self._most = data, 0, most

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._most if size < 0 else min(size, self._most)
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return chunk


@pytest.mark.parametrize("most", [1, 7, 512, 1 << 20])
def test_source_reads_seeks_and_copies_like_a_file(tmp_path: Path, most: int) -> None:
    data = random.Random(most).randbytes(3000)
    source = TarSource(cast(IO[bytes], Trickle(data, most)))
    assert source.read(0) == b""
    assert source.read(100) == data[:100]
    assert source.seek(600) == 600 and source.tell() == 600
    assert source.read(10) == data[600:610]
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert source.copy_to(fd, 1000) == 1000
    finally:
        os.close(fd)
    assert target.read_bytes() == data[610:1610]
    assert source.tell() == 1610
    with pytest.raises(tarfile.StreamError):
        source.seek(0)
    assert source.read() == data[1610:]
    assert source.read(5) == b"" and source.tell() == 3000
    assert source.seek(5000) == 3000, "a seek past the end stops at the end, as tarfile's"


def test_source_copy_stops_at_the_end(tmp_path: Path) -> None:
    source = TarSource(cast(IO[bytes], Trickle(b"abc", 2)))
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert source.copy_to(fd, 10) == 3
    finally:
        os.close(fd)


def test_checksums_match_tarfile() -> None:
    original = tarread._calc_chksums
    rng = random.Random(3)
    headers = [tarfile.TarInfo(f"dir/é{i}").tobuf(format=tarfile.GNU_FORMAT) for i in range(20)]
    headers += [rng.randbytes(512) for _ in range(500)]
    headers += [
        bytes(rng.choice((0, 0x30, 0x7F, 0x80, 0xFF)) for _ in range(512)) for _ in range(500)
    ]
    headers += [bytes(512), b"\xff" * 512, b"\x80" * 600]
    for header in headers:
        assert header_checksums(header) == original(header)
    assert tarfile.calc_chksums is header_checksums  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="unpack_from"):
        header_checksums(b"short")
