"""A reader for the btrfs send stream (``btrfs send`` / ``BTRFS_IOC_SEND`` output).

Framing, from the kernel's ``send.h``: a 17-byte header (``btrfs-stream\\0`` + ``le32`` version),
then commands, each ``le32`` payload length, ``le16`` command, ``le32`` CRC32C and a payload of
TLV attributes (``le16`` type, ``le16`` length, value). The CRC covers the command header, with
its CRC field zeroed, and the payload; it is computed with seed 0 and no final inversion. From
version 2 on, the ``DATA`` attribute carries no length: it is last and runs to the end of the
command. Anything that does not fit these rules raises :class:`SendStreamError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from uuid import UUID

MAGIC = b"btrfs-stream\0"
HEADER_SIZE = len(MAGIC) + 4
SUPPORTED_VERSIONS = (1, 2, 3)

_CMD_HEADER = struct.Struct("<IHI")
_LENGTH = struct.Struct("<I")
_TLV_HEADER = struct.Struct("<HH")
_TIMESPEC = struct.Struct("<QI")


class SendStreamError(Exception):
    """The send stream is malformed or uses something this reader does not understand.

    Callers that diff layers treat it as "use the tree walk instead".
    """


class Cmd(enum.IntEnum):
    """Command numbers (``BTRFS_SEND_C_*``); 23-25 need stream v2, 26 v3."""

    SUBVOL = 1
    SNAPSHOT = 2
    MKFILE = 3
    MKDIR = 4
    MKNOD = 5
    MKFIFO = 6
    MKSOCK = 7
    SYMLINK = 8
    RENAME = 9
    LINK = 10
    UNLINK = 11
    RMDIR = 12
    SET_XATTR = 13
    REMOVE_XATTR = 14
    WRITE = 15
    CLONE = 16
    TRUNCATE = 17
    CHMOD = 18
    CHOWN = 19
    UTIMES = 20
    END = 21
    UPDATE_EXTENT = 22
    FALLOCATE = 23
    FILEATTR = 24
    ENCODED_WRITE = 25
    ENABLE_VERITY = 26


class Attr(enum.IntEnum):
    """Attribute numbers (``BTRFS_SEND_A_*``)."""

    UUID = 1
    CTRANSID = 2
    INO = 3
    SIZE = 4
    MODE = 5
    UID = 6
    GID = 7
    RDEV = 8
    CTIME = 9
    MTIME = 10
    ATIME = 11
    OTIME = 12
    XATTR_NAME = 13
    XATTR_DATA = 14
    PATH = 15
    PATH_TO = 16
    PATH_LINK = 17
    FILE_OFFSET = 18
    DATA = 19
    CLONE_UUID = 20
    CLONE_CTRANSID = 21
    CLONE_PATH = 22
    CLONE_OFFSET = 23
    CLONE_LEN = 24
    FALLOCATE_MODE = 25
    FILEATTR = 26
    UNENCODED_FILE_LEN = 27
    UNENCODED_LEN = 28
    UNENCODED_OFFSET = 29
    COMPRESSION = 30
    ENCRYPTION = 31
    VERITY_ALGORITHM = 32
    VERITY_BLOCK_SIZE = 33
    VERITY_SALT_DATA = 34
    VERITY_SIG_DATA = 35


def _make_table() -> tuple[int, ...]:
    """Byte table for reflected CRC32C (Castagnoli, polynomial 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Raw CRC32C of ``data`` continuing from ``crc``: no inversion in or out, as btrfs uses it.

    The standard CRC32C is ``crc32c(data, 0xFFFFFFFF) ^ 0xFFFFFFFF``.
    """
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


@dataclass(frozen=True, slots=True)
class Timespec:
    """A send-stream time: seconds and nanoseconds since the epoch."""

    sec: int
    nsec: int


@dataclass(frozen=True, slots=True)
class Command:
    """One command: its number and raw attribute values, decoded on demand by typed getters."""

    cmd: Cmd
    attrs: Mapping[int, bytes]

    def has(self, attr: Attr) -> bool:
        """Whether the command carries ``attr``."""
        return attr in self.attrs

    def raw(self, attr: Attr) -> bytes:
        """The undecoded value of ``attr``."""
        try:
            return self.attrs[attr]
        except KeyError:
            raise SendStreamError(f"{self.cmd.name} command without {attr.name}") from None

    def uint(self, attr: Attr) -> int:
        """A little-endian unsigned integer attribute (u8, u16, u32 or u64)."""
        value = self.raw(attr)
        if len(value) not in (1, 2, 4, 8):
            raise SendStreamError(f"{self.cmd.name}: {attr.name} has {len(value)} bytes")
        return int.from_bytes(value, "little")

    def timespec(self, attr: Attr) -> Timespec:
        """A time attribute (u64 seconds, u32 nanoseconds)."""
        value = self.raw(attr)
        if len(value) != _TIMESPEC.size:
            raise SendStreamError(f"{self.cmd.name}: {attr.name} has {len(value)} bytes")
        sec, nsec = _TIMESPEC.unpack(value)
        return Timespec(sec, nsec)

    def uuid(self, attr: Attr) -> UUID:
        """A 16-byte UUID attribute."""
        value = self.raw(attr)
        if len(value) != 16:
            raise SendStreamError(f"{self.cmd.name}: {attr.name} has {len(value)} bytes")
        return UUID(bytes=value)

    @property
    def path(self) -> bytes:
        """``PATH``: the entry the command acts on, relative to the subvolume root."""
        return self.raw(Attr.PATH)


def stream_version(data: bytes | bytearray | memoryview) -> int:
    """The version in the stream header; raises if the header is missing or unsupported."""
    view = memoryview(data)
    if len(view) < HEADER_SIZE or bytes(view[: len(MAGIC)]) != MAGIC:
        raise SendStreamError("not a btrfs send stream (bad magic)")
    version = int.from_bytes(view[len(MAGIC) : HEADER_SIZE], "little")
    if version not in SUPPORTED_VERSIONS:
        raise SendStreamError(f"unsupported send stream version {version}")
    return version


def parse_stream(
    data: bytes | bytearray | memoryview, *, verify_crc: bool = True
) -> Iterator[Command]:
    """Yield the commands of one complete stream, up to and including ``END``.

    Raises :class:`SendStreamError` for a bad header, a CRC mismatch, an unknown command, a
    truncated stream (no ``END``) or bytes after ``END``.
    """
    return parse_chunks((bytes(data),), verify_crc=verify_crc)


def parse_chunks(chunks: Iterable[bytes], *, verify_crc: bool = True) -> Iterator[Command]:
    """:func:`parse_stream` of a stream that arrives in pieces, each command as soon as it is whole.

    A reader can stop early: the rest of the stream is then never read.
    """
    pieces = iter(chunks)
    data = b""
    while len(data) < HEADER_SIZE and (chunk := next(pieces, None)) is not None:
        data += chunk
    version = stream_version(data)
    base, data = HEADER_SIZE, data[HEADER_SIZE:]  # base: the stream offset of data[0]
    while True:
        view = memoryview(data)
        pos = 0
        while _whole_command_at(view, pos):
            command, pos = _read_command(view, pos, version, verify_crc, base)
            yield command
            if command.cmd == Cmd.END:
                extra = len(view) - pos + sum(len(rest) for rest in pieces)
                if extra:
                    raise SendStreamError(f"{extra} bytes after the END command")
                return
        base, data = base + pos, bytes(view[pos:])
        chunk = next(pieces, None)
        if chunk is None:
            if data:  # a command cut short: let the decoder say how
                _read_command(memoryview(data), 0, version, verify_crc, base)
            raise SendStreamError("stream ends without an END command")
        data += chunk


def _whole_command_at(view: memoryview, pos: int) -> bool:
    if pos + _CMD_HEADER.size > len(view):
        return False
    (length,) = _LENGTH.unpack_from(view, pos)
    return bool(pos + _CMD_HEADER.size + length <= len(view))


def _read_command(
    view: memoryview, pos: int, version: int, verify_crc: bool, base: int = 0
) -> tuple[Command, int]:
    """Decode the command at ``pos``; return it and the offset of the next one.

    ``base`` is the stream offset of ``view[0]``, for the messages.
    """
    where = base + pos
    if pos + _CMD_HEADER.size > len(view):
        raise SendStreamError(f"truncated command header at offset {where}")
    length, number, crc = _CMD_HEADER.unpack_from(view, pos)
    start = pos + _CMD_HEADER.size
    end = start + length
    if end > len(view):
        raise SendStreamError(f"command at offset {where} runs past the end of the stream")
    if verify_crc:
        header = bytes(view[pos : pos + 6]) + b"\0\0\0\0"
        actual = crc32c(view[start:end], crc32c(header))
        if actual != crc:
            raise SendStreamError(f"CRC mismatch at offset {where}: {actual:#010x} != {crc:#010x}")
    try:
        cmd = Cmd(number)
    except ValueError:
        raise SendStreamError(f"unknown send command {number} at offset {where}") from None
    return Command(cmd, _read_attrs(view[start:end], version, where)), end


def _read_attrs(payload: memoryview, version: int, where: int) -> dict[int, bytes]:
    """Split a payload into attributes (the last one wins if an attribute repeats)."""
    attrs: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        if pos + 2 > len(payload):
            raise SendStreamError(f"truncated attribute in command at offset {where}")
        kind = int.from_bytes(payload[pos : pos + 2], "little")
        if kind == Attr.DATA and version >= 2:
            # v2+: DATA has no length field and takes the rest of the command.
            attrs[kind] = bytes(payload[pos + 2 :])
            break
        if pos + _TLV_HEADER.size > len(payload):
            raise SendStreamError(f"truncated attribute in command at offset {where}")
        _, length = _TLV_HEADER.unpack_from(payload, pos)
        value_end = pos + _TLV_HEADER.size + length
        if value_end > len(payload):
            raise SendStreamError(f"attribute {kind} overruns command at offset {where}")
        attrs[kind] = bytes(payload[pos + _TLV_HEADER.size : value_end])
        pos = value_end
    return attrs
