"""Layer tars written the way Docker (Go's ``archive/tar``) writes them.

The bytes of a Diff become a layer's diffID on ``docker commit`` and in builds, so the encoding is
deliberate and stable: headers as ``pkg/archive`` fills them (``st_mode`` with type bits, names
looked up on the host, octal zero device numbers, seconds-only mtimes, PAX records only where USTAR
cannot hold a value), hard links as links to the first name written, sockets skipped, AUFS
``.wh.`` whiteouts for deletions, and the archive closed by exactly two zero blocks. An empty diff
is therefore Go's 1024-byte end-of-archive, which dockerd recognises as an empty layer.

Whiteouts are the one planned difference from Docker: Docker stamps them with the current time,
which makes every commit of a deletion a new digest; we stamp them with the mtime of the directory
that held the deleted name, so the same layer state always gives the same bytes.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from snapdriver.layers.changes import CAPABILITY_XATTR, Change, ChangeKind
from snapdriver.layers.idmap import IDMapping
from snapdriver.layers.rootfs import open_dir_in_root, open_in_root

Sink = Callable[[bytes], None]

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
WHITEOUT_PREFIX = ".wh."
_CHUNK = 1 << 20
_TYPES = {
    stat.S_IFREG: b"0",
    stat.S_IFLNK: b"2",
    stat.S_IFCHR: b"3",
    stat.S_IFBLK: b"4",
    stat.S_IFDIR: b"5",
    stat.S_IFIFO: b"6",
}
_LINK_TYPE = b"1"


@lru_cache(maxsize=256)
def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@lru_cache(maxsize=256)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def _to_ascii(value: bytes) -> bytes:
    """Go's ``toASCII``: drop every non-ASCII rune (and NUL)."""
    if value.isascii() and b"\0" not in value:
        return value
    text = value.decode("utf-8", "replace")
    return "".join(c for c in text if c < "\x80" and c != "\0").encode()


def _fits_octal(width: int, value: int) -> bool:
    return value >= 0 and (width >= 22 or value < 1 << (3 * (width - 1)))


def _octal(value: int, width: int) -> bytes:
    """Go's ``formatOctal``: zero-padded digits and a NUL; values that do not fit become 0."""
    if not _fits_octal(width, value):
        value = 0
    digits = format(value, "o").encode()
    return digits.rjust(width - 1, b"0") + b"\0"


def _field(value: bytes, width: int) -> bytes:
    return value[:width].ljust(width, b"\0")


def _pax_record(key: bytes, value: bytes) -> bytes:
    size = len(key) + len(value) + 3
    size += len(str(size))
    record = b"%d %s=%s\n" % (size, key, value)
    if len(record) != size:
        record = b"%d %s=%s\n" % (len(record), key, value)
    return record


def _pad(size: int) -> bytes:
    return bytes(-size % BLOCK)


@dataclass
class Header:
    """The fields of one tar entry, as Docker's ``FileInfoHeader`` would set them."""

    name: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    typeflag: bytes = b"0"
    linkname: bytes = b""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def pax_records(self) -> dict[bytes, bytes]:
        """What USTAR cannot hold, as Go's ``allowedFormats`` decides for FormatPAX."""
        records: dict[bytes, bytes] = {}
        for key, value, width in ((b"path", self.name, 100), (b"linkpath", self.linkname, 100)):
            if len(value) > width or not value.isascii():
                records[key] = value
        for key, text in ((b"uname", self.uname), (b"gname", self.gname)):
            if len(text.encode()) > 32 or not text.isascii():
                records[key] = text.encode()
        for key, number, width in ((b"uid", self.uid, 8), (b"gid", self.gid, 8)):
            if not _fits_octal(width, number):
                records[key] = str(number).encode()
        if not _fits_octal(12, self.size):
            records[b"size"] = str(self.size).encode()
        if not _fits_octal(12, self.mtime):
            records[b"mtime"] = str(self.mtime).encode()
        for key, value in self.xattrs.items():
            records[b"SCHILY.xattr." + key] = value
        return records

    def block(self, ustar_dev: bool = True) -> bytes:
        """The 512-byte header block (checksum filled in)."""
        dev = _octal(self.devmajor, 8) + _octal(self.devminor, 8) if ustar_dev else bytes(16)
        raw = b"".join(
            (
                _field(_to_ascii(self.name), 100),
                _octal(self.mode, 8),
                _octal(self.uid, 8),
                _octal(self.gid, 8),
                _octal(self.size, 12),
                _octal(self.mtime, 12),
                b" " * 8,
                self.typeflag,
                _field(_to_ascii(self.linkname), 100),
                b"ustar\x0000",
                _field(_to_ascii(self.uname.encode()), 32),
                _field(_to_ascii(self.gname.encode()), 32),
                dev,
            )
        )
        raw = raw.ljust(BLOCK, b"\0")
        checksum = b"%06o\0" % sum(raw)
        return raw[:148] + checksum + raw[155:]

    def encode(self) -> bytes:
        """Header block, preceded by a PAX extended header when one is needed."""
        records = self.pax_records()
        if not records:
            return self.block()
        data = b"".join(_pax_record(k, records[k]) for k in sorted(records))
        directory, _, base = self.name.rstrip(b"/").rpartition(b"/")
        if self.name.endswith(b"/"):
            directory, base = self.name.rstrip(b"/"), b""
        pax_name = b"/".join(p for p in (directory, b"PaxHeaders.0", base) if p)
        pax = Header(name=_to_ascii(pax_name)[:100].rstrip(b"/"), size=len(data), typeflag=b"x")
        return pax.block(ustar_dev=False) + data + _pad(len(data)) + self.block()


class TarWriter:
    """Writes entries to ``sink`` in large chunks; :meth:`close` adds the end-of-archive.

    With ``idmap`` (userns-remap), owners are written as container IDs, as Docker's
    ``tarAppender`` does; user and group names are still those of the host IDs, as there.
    """

    def __init__(self, sink: Sink, idmap: IDMapping | None = None) -> None:
        self._sink = sink
        self._idmap = idmap
        self._buffer = bytearray()
        self._seen_inodes: dict[tuple[int, int], bytes] = {}

    def _emit(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _CHUNK:
            self._sink(bytes(self._buffer))
            self._buffer.clear()

    def add_header(self, header: Header) -> None:
        self._emit(header.encode())

    def add_whiteout(self, name: bytes, mtime: int) -> None:
        self.add_header(Header(name=name, mtime=mtime))

    def add_entry(self, root_fd: int, rel: str) -> None:
        """Add the entry at ``rel`` (relative, no leading ``/``) below ``root_fd``."""
        parent, _, base = rel.rpartition("/")
        dir_fd = open_dir_in_root(root_fd, parent)
        try:
            self._add_at(dir_fd, base, os.fsencode(rel))
        finally:
            os.close(dir_fd)

    def _add_at(self, dir_fd: int, base: str, name: bytes) -> None:
        try:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # gone since the change list was made; Docker skips it too
        kind = stat.S_IFMT(st.st_mode)
        if kind not in _TYPES:
            return  # sockets: Go's tar cannot hold them and Docker skips them
        uid, gid = st.st_uid, st.st_gid
        if self._idmap is not None:
            uid, gid = self._idmap.to_container(uid, gid)
        header = Header(
            name=name + b"/" if kind == stat.S_IFDIR else name,
            mode=st.st_mode,
            uid=uid,
            gid=gid,
            size=st.st_size if kind == stat.S_IFREG else 0,
            mtime=int(st.st_mtime),
            typeflag=_TYPES[kind],
            uname=_user_name(st.st_uid),
            gname=_group_name(st.st_gid),
        )
        if kind == stat.S_IFLNK:
            header.linkname = os.fsencode(os.readlink(base, dir_fd=dir_fd))
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            header.devmajor, header.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        capability = _capability_at(dir_fd, base)
        if capability is not None:
            header.xattrs[CAPABILITY_XATTR.encode()] = capability
        if kind != stat.S_IFDIR and st.st_nlink > 1:
            first = self._seen_inodes.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                header.typeflag, header.linkname, header.size = _LINK_TYPE, first, 0
        self.add_header(header)
        if header.typeflag == b"0" and header.size:
            self._copy_data(dir_fd, base, header.size)

    def _copy_data(self, dir_fd: int, base: str, size: int) -> None:
        fd = open_in_root(dir_fd, base, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            remaining = size
            while remaining:
                chunk = os.read(fd, min(_CHUNK, remaining))
                if not chunk:
                    break
                self._emit(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        # A file that shrank while we read it is padded, so the archive stays well formed.
        self._emit(bytes(remaining) + _pad(size))

    def close(self) -> None:
        self._emit(END_OF_ARCHIVE)
        if self._buffer:
            self._sink(bytes(self._buffer))
            self._buffer.clear()


def _capability_at(dir_fd: int, base: str) -> bytes | None:
    """Docker's ``ReadSecurityXattrToTarHeader``: a v3 capability is written as v2."""
    try:
        value = bytearray(
            os.getxattr(f"/proc/self/fd/{dir_fd}/{base}", CAPABILITY_XATTR, follow_symlinks=False)
        )
    except OSError:
        return None
    if len(value) > 3 and value[3] == 3:
        value[3] = 2
        del value[20:]
    return bytes(value)


def export_changes(
    root: str | os.PathLike[str],
    changes: Iterable[Change],
    sink: Sink,
    idmap: IDMapping | None = None,
) -> None:
    """Docker's ``ExportChanges``: the entries of ``changes``, sorted, from the layer ``root``.

    Whiteouts are owned by 0:0 whatever ``idmap`` says: Docker does not remap them either.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    writer = TarWriter(sink, idmap)
    try:
        for change in sorted(changes, key=Change.sort_key):
            rel = change.path.lstrip("/")
            if change.kind == ChangeKind.DELETE:
                parent, _, base = rel.rpartition("/")
                name = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
                writer.add_whiteout(os.fsencode(name), _dir_mtime(root_fd, parent))
            else:
                writer.add_entry(root_fd, rel)
        writer.close()
    finally:
        os.close(root_fd)


def _dir_mtime(root_fd: int, rel: str) -> int:
    try:
        fd = open_dir_in_root(root_fd, rel)
    except OSError:
        return 0
    try:
        return int(os.fstat(fd).st_mtime)
    finally:
        os.close(fd)


def export_tree(root: str | os.PathLike[str], sink: Sink, idmap: IDMapping | None = None) -> None:
    """Docker's ``archive.Tar(dir)``: every entry below ``root`` in ``filepath.Walk`` order.

    ``idmap`` shifts owners back to container IDs. Docker's NaiveDiffDriver passes no maps for
    a layer without a parent (and so writes host IDs); dockerd never asks for such a Diff in
    practice, and container IDs are what a layer tar must hold.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    writer = TarWriter(sink, idmap)
    try:
        stack: list[tuple[int, list[str], str]] = [(root_fd, _sorted_names(root_fd), "")]
        while stack:
            dir_fd, names, prefix = stack[-1]
            if not names:
                stack.pop()
                if dir_fd != root_fd:
                    os.close(dir_fd)
                continue
            base = names.pop()
            rel = prefix + base
            writer._add_at(dir_fd, base, os.fsencode(rel))
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                child = open_in_root(dir_fd, base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                stack.append((child, _sorted_names(child), rel + "/"))
        writer.close()
    finally:
        for dir_fd, _, _ in stack:
            if dir_fd != root_fd:
                os.close(dir_fd)
        os.close(root_fd)


def _sorted_names(dir_fd: int) -> list[str]:
    """Names in reverse byte order, so ``pop()`` yields Go's lexical walk order."""
    return sorted(os.listdir(dir_fd), key=os.fsencode, reverse=True)
