"""The send-stream reader: framing, CRC32C and typed attributes, on built and on real streams."""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from snapdriver_btrfs.sendstream import (
    MAGIC,
    Attr,
    Cmd,
    Command,
    SendStreamError,
    Timespec,
    crc32c,
    parse_chunks,
    parse_stream,
    stream_version,
)

# -- a tiny encoder, to build streams by hand ----------------------------------------------------


def header(version: int = 1) -> bytes:
    return MAGIC + struct.pack("<I", version)


def tlv(attr: int, value: bytes) -> bytes:
    return struct.pack("<HH", attr, len(value)) + value


def command(cmd: int, payload: bytes = b"", *, crc: int | None = None) -> bytes:
    head = struct.pack("<IH", len(payload), cmd)
    if crc is None:
        crc = crc32c(payload, crc32c(head + b"\0\0\0\0"))
    return head + struct.pack("<I", crc) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


END = command(Cmd.END)
SNAPSHOT_UUID = UUID("12345678-1234-5678-1234-567812345678")


def sample_stream(version: int = 1) -> bytes:
    return b"".join(
        [
            header(version),
            command(Cmd.SNAPSHOT, tlv(Attr.PATH, b"child") + tlv(Attr.UUID, SNAPSHOT_UUID.bytes)),
            command(Cmd.MKFILE, tlv(Attr.PATH, b"o257-7-0") + tlv(Attr.INO, u64(257))),
            command(Cmd.RENAME, tlv(Attr.PATH, b"o257-7-0") + tlv(Attr.PATH_TO, b"etc/new")),
            command(Cmd.CHMOD, tlv(Attr.PATH, b"etc/new") + tlv(Attr.MODE, u64(0o644))),
            command(
                Cmd.UTIMES,
                tlv(Attr.PATH, b"etc/new") + tlv(Attr.MTIME, struct.pack("<QI", 1700000000, 5)),
            ),
            END,
        ]
    )


# -- CRC32C -------------------------------------------------------------------------------------


def test_crc32c_matches_the_standard_check_value() -> None:
    # CRC-32C("123456789") = 0xE3069283 with the usual inversions, which btrfs leaves out.
    assert crc32c(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283


def test_crc32c_is_raw_and_chains() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"\0\0\0\0") == 0  # seed 0, no inversion: zeros stay zero
    assert crc32c(b"world", crc32c(b"hello ")) == crc32c(b"hello world")


# -- framing ------------------------------------------------------------------------------------


def test_parses_commands_and_typed_attributes() -> None:
    commands = list(parse_stream(sample_stream()))
    assert [c.cmd for c in commands] == [
        Cmd.SNAPSHOT,
        Cmd.MKFILE,
        Cmd.RENAME,
        Cmd.CHMOD,
        Cmd.UTIMES,
        Cmd.END,
    ]
    snapshot, mkfile, rename, chmod, utimes, _ = commands
    assert snapshot.uuid(Attr.UUID) == SNAPSHOT_UUID
    assert mkfile.path == b"o257-7-0"
    assert mkfile.uint(Attr.INO) == 257
    assert rename.raw(Attr.PATH_TO) == b"etc/new"
    assert chmod.uint(Attr.MODE) == 0o644
    assert utimes.timespec(Attr.MTIME) == Timespec(1700000000, 5)
    assert utimes.has(Attr.MTIME)
    assert not utimes.has(Attr.ATIME)


def test_typed_getters_reject_missing_and_malformed_attributes() -> None:
    cmd = Command(Cmd.CHMOD, {Attr.PATH: b"x", Attr.MODE: b"\1\2\3"})
    with pytest.raises(SendStreamError, match="CHMOD command without UID"):
        cmd.uint(Attr.UID)
    with pytest.raises(SendStreamError, match="MODE has 3 bytes"):
        cmd.uint(Attr.MODE)
    with pytest.raises(SendStreamError, match="PATH has 1 bytes"):
        cmd.timespec(Attr.PATH)
    with pytest.raises(SendStreamError):
        cmd.uuid(Attr.PATH)


def test_v1_data_has_a_length_and_v2_data_runs_to_the_end() -> None:
    data = bytes(range(256)) * 3
    v1 = tlv(Attr.PATH, b"f") + tlv(Attr.FILE_OFFSET, u64(0)) + tlv(Attr.DATA, data)
    (write,) = [c for c in parse_stream(header(1) + command(Cmd.WRITE, v1) + END) if c.attrs]
    assert write.raw(Attr.DATA) == data
    # v2: type only, no length; a u16 length could not describe more than 64 KiB anyway.
    big = os.urandom(70_000)
    v2 = tlv(Attr.PATH, b"f") + tlv(Attr.FILE_OFFSET, u64(4096)) + struct.pack("<H", Attr.DATA)
    stream = header(2) + command(Cmd.WRITE, v2 + big) + END
    (write,) = [c for c in parse_stream(stream) if c.attrs]
    assert write.raw(Attr.DATA) == big
    assert write.uint(Attr.FILE_OFFSET) == 4096
    assert stream_version(stream) == 2


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"btrfs-strea", "bad magic"),
        (b"not-a-stream\0" + struct.pack("<I", 1) + END, "bad magic"),
        (header(7) + END, "unsupported send stream version 7"),
        (header(), "without an END"),
        (header() + command(Cmd.UTIMES, tlv(Attr.PATH, b"x")), "without an END"),
        (header() + END + END, "bytes after the END"),
        (header() + command(99) + END, "unknown send command 99"),
        (header() + command(Cmd.CHMOD, b"\x0f\x00\x10\x00abc") + END, "overruns"),
        (header() + command(Cmd.CHMOD, b"\x0f") + END, "truncated attribute"),
        (header() + command(Cmd.CHMOD, tlv(Attr.PATH, b"x"))[:-1], "runs past the end"),
        (header() + b"\1\0\0", "truncated command header"),
        (header() + command(Cmd.CHMOD, tlv(Attr.PATH, b"x"), crc=1) + END, "CRC mismatch"),
    ],
)
def test_malformed_streams_raise(stream: bytes, message: str) -> None:
    with pytest.raises(SendStreamError, match=message):
        list(parse_stream(stream))


def test_every_bit_flip_in_a_command_is_caught() -> None:
    stream = sample_stream()
    start = len(header())
    for offset in range(start, len(stream) - len(END)):
        damaged = bytearray(stream)
        damaged[offset] ^= 0x10
        with pytest.raises(SendStreamError):
            list(parse_stream(bytes(damaged)))


def pieces(data: bytes, *cuts: int) -> list[bytes]:
    """``data`` cut at ``cuts``, as a pipe might deliver it."""
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_chunks_parse_like_the_whole_stream() -> None:
    stream = sample_stream()
    whole = list(parse_stream(stream))
    for cut in range(1, len(stream)):
        assert list(parse_chunks(pieces(stream, cut))) == whole
    assert list(parse_chunks([bytes([byte]) for byte in stream])) == whole


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (header() + b"\1\0\0", "truncated command header at offset 17"),
        (header() + END + END, f"{len(END)} bytes after the END"),
        (header() + END + b"\0", "1 bytes after the END"),
        (header() + command(Cmd.CHMOD, tlv(Attr.PATH, b"x"))[:-1], "offset 17 runs past the end"),
        (header(), "without an END"),
    ],
)
def test_chunked_errors_give_stream_offsets(stream: bytes, message: str) -> None:
    """Wherever the pipe cuts the stream, the error is the one the whole stream gives."""
    for cut in range(1, len(stream)):
        with pytest.raises(SendStreamError, match=message):
            list(parse_chunks(pieces(stream, cut)))


def test_a_reader_can_stop_early() -> None:
    """Commands come as soon as they are whole: the rest of the stream is never read."""
    stream = sample_stream()

    def delivered() -> Iterator[bytes]:
        yield stream[:60]  # the header, SNAPSHOT (39 bytes) and a part of MKFILE
        raise AssertionError("read past what the reader needed")

    first = next(parse_chunks(delivered()))
    assert first.cmd == Cmd.SNAPSHOT


def test_crc_check_can_be_skipped() -> None:
    stream = header() + command(Cmd.CHMOD, tlv(Attr.PATH, b"x"), crc=1) + END
    assert [c.cmd for c in parse_stream(stream, verify_crc=False)] == [Cmd.CHMOD, Cmd.END]


# -- real streams from the kernel ---------------------------------------------------------------

btrfs = pytest.mark.btrfs


@pytest.fixture
def subvolumes(btrfs_mount: Path) -> Iterator[Path]:
    """A directory for one test's subvolumes on the session's btrfs, all deleted afterwards."""
    btrfsutil = pytest.importorskip("btrfsutil")
    base = Path(tempfile.mkdtemp(prefix="stream-", dir=btrfs_mount))
    yield base
    for entry in base.iterdir():
        if btrfsutil.is_subvolume(str(entry)):
            btrfsutil.set_subvolume_read_only(str(entry), False)
            btrfsutil.delete_subvolume(str(entry), recursive=True)
    shutil.rmtree(base)


def make_pair(base: Path) -> tuple[Path, Path]:
    """A frozen parent with a few files and a frozen child with every kind of change."""
    import btrfsutil

    parent = base / "parent"
    btrfsutil.create_subvolume(str(parent))
    (parent / "dir").mkdir()
    (parent / "dir/file").write_bytes(b"a" * 100_000)
    (parent / "gone").write_bytes(b"bye")
    btrfsutil.set_subvolume_read_only(str(parent), True)
    child = base / "child"
    btrfsutil.create_snapshot(str(parent), str(child))
    with open(child / "dir/file", "r+b") as handle:
        handle.seek(70_000)
        handle.write(os.urandom(50_000))
    (child / "gone").unlink()
    (child / "dir").rename(child / "moved")
    os.symlink("moved/file", child / "link")
    os.setxattr(child / "moved/file", "user.k", b"v")
    btrfsutil.set_subvolume_read_only(str(child), True)
    return child, parent


def replay_data(commands: list[Command], path: bytes) -> dict[int, bytes]:
    return {
        c.uint(Attr.FILE_OFFSET): c.raw(Attr.DATA)
        for c in commands
        if c.cmd == Cmd.WRITE and c.path == path
    }


@btrfs
def test_no_data_stream_is_the_one_btrfs_send_writes(subvolumes: Path) -> None:
    from snapdriver_btrfs import ioctl

    child, parent = make_pair(subvolumes)
    ours = ioctl.send_stream(child, parent=parent)
    cli = subvolumes / "cli.stream"
    subprocess.run(
        ["btrfs", "send", "-q", "--no-data", "-p", str(parent), "-f", str(cli), str(child)],
        check=True,
    )
    assert ours == cli.read_bytes()
    commands = list(parse_stream(ours))
    kinds = {c.cmd for c in commands}
    assert commands[0].cmd == Cmd.SNAPSHOT
    assert {Cmd.UPDATE_EXTENT, Cmd.RENAME, Cmd.UNLINK, Cmd.SYMLINK, Cmd.SET_XATTR} <= kinds
    assert Cmd.WRITE not in kinds


@btrfs
@pytest.mark.parametrize("version", [1, 2])
def test_streams_with_data_carry_the_bytes(subvolumes: Path, version: int) -> None:
    from snapdriver_btrfs import ioctl

    child, parent = make_pair(subvolumes)
    commands = list(parse_stream(ioctl.send_stream(child, parent=parent, flags=0, version=version)))
    assert stream_version(ioctl.send_stream(child, parent=parent, version=version)) == version
    writes = replay_data(commands, b"moved/file")
    content = (child / "moved/file").read_bytes()
    assert writes, "no WRITE commands for the rewritten range"
    for offset, data in writes.items():
        assert content[offset : offset + len(data)] == data
    first, end = min(writes), max(offset + len(data) for offset, data in writes.items())
    assert first <= 70_000
    assert end >= 120_000


@btrfs
def test_full_stream_starts_with_subvol(subvolumes: Path) -> None:
    from snapdriver_btrfs import ioctl

    child, _ = make_pair(subvolumes)
    commands = list(parse_stream(ioctl.send_stream(child)))
    assert commands[0].cmd == Cmd.SUBVOL
    assert commands[0].path == b"child"


@btrfs
def test_compressed_stream_has_encoded_writes(subvolumes: Path) -> None:
    """v2 with the COMPRESSED flag sends compressed extents as ENCODED_WRITE, unpacked as-is."""
    import btrfsutil
    from snapdriver_btrfs import ioctl

    source = subvolumes / "compressed"
    btrfsutil.create_subvolume(str(source))
    target = source / "text"
    target.touch()
    subprocess.run(["btrfs", "property", "set", str(target), "compression", "zstd"], check=True)
    target.write_bytes(b"compress me " * 40_000)
    btrfsutil.set_subvolume_read_only(str(source), True)
    stream = ioctl.send_stream(source, flags=ioctl.SEND_FLAG_COMPRESSED, version=2)
    encoded = [c for c in parse_stream(stream) if c.cmd == Cmd.ENCODED_WRITE]
    assert encoded
    for write in encoded:
        assert write.path == b"text"
        assert write.uint(Attr.COMPRESSION) != 0
        assert len(write.raw(Attr.DATA)) < write.uint(Attr.UNENCODED_LEN)
