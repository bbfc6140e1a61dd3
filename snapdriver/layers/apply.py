"""Unpacking a layer tar with Docker's rules (``pkg/archive.UnpackLayer``), confined to the layer.

What Docker does, and so do we: names are cleaned and ``..`` breakouts refused; a missing parent
is made with mode 0600; ``.wh.NAME`` deletes NAME; ``.wh..wh..opq`` empties its directory of
everything not unpacked from this same tar; other ``.wh..wh.*`` names are skipped; an existing path
is replaced unless both are directories; ownership, then xattrs, then mode, then times are set
(``chown`` clears setuid bits, so mode comes after it); directory times are set last. The size
returned is the sum of the header sizes, which dockerd records as the layer size.

What Docker gets from its chroot we get from ``openat2(RESOLVE_IN_ROOT)``: every lookup resolves
inside the layer (see :mod:`snapdriver.layers.rootfs`). On top, whiteouts that name the layer
root or its parent and hard links into AUFS's private ``.wh..wh.plnk`` are refused.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
from typing import IO

from snapdriver.errors import NO_SPACE_ERRNOS, ArchiveError, NoSpaceError
from snapdriver.layers.idmap import IDMapping
from snapdriver.layers.rootfs import (
    lstat_at,
    make_dirs_in_root,
    open_dir_in_root,
    prune_tree,
    remove_at,
    split,
)
from snapdriver.layers.tarread import TarSource, members, open_stream

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
_XATTR_PREFIX = "SCHILY.xattr."
_CHUNK = 1 << 20
_NODE_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}


class UnpackNoSpaceError(NoSpaceError):
    """The filesystem or quota filled up while unpacking, after ``unpacked`` bytes of content."""

    def __init__(self, reason: str, unpacked: int) -> None:
        super().__init__(f"{reason} after {unpacked} bytes")
        self.reason = reason
        self.unpacked = unpacked


def clean_name(name: str) -> str:
    """Go's ``filepath.Clean`` plus the breakout check: a relative path, ``""`` for the root."""
    rooted = name.startswith("/")
    cleaned = posixpath.normpath(name) if name else "."
    if rooted:
        cleaned = cleaned.lstrip("/")
    if cleaned == ".." or cleaned.startswith("../"):
        raise ArchiveError(f"tar entry {name!r} points outside the layer")
    return "" if cleaned in (".", "") else cleaned


class _Unpacker:
    def __init__(self, root_fd: int, tar: tarfile.TarFile, idmap: IDMapping | None) -> None:
        self.root_fd = root_fd
        self.idmap = idmap
        self.tar = tar
        assert isinstance(tar.fileobj, TarSource)
        self.source = tar.fileobj
        self.unpacked: set[str] = set()
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []
        self._parent: tuple[str, int] | None = None

    def parent_fd(self, parent: str) -> int:
        """The directory ``parent``, made if missing (mode 0600, as Docker's MkdirAll).

        It stays open while consecutive entries share it (tars list a directory's entries
        together), saving two lookups per entry. The cached directory cannot be replaced
        meanwhile: only an entry naming it or an ancestor could do that, and such an entry has
        another parent, which switches the cache first.
        """
        if self._parent is not None and self._parent[0] == parent:
            return self._parent[1]
        self.close()
        fd = make_dirs_in_root(self.root_fd, parent, 0o600) if parent else os.dup(self.root_fd)
        self._parent = (parent, fd)
        return fd

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def entry(self, member: tarfile.TarInfo) -> None:
        rel = clean_name(member.name)
        parent, base = split(rel)
        if rel:
            self.parent_fd(parent)
        if rel.startswith(WHITEOUT_META_PREFIX) and rel != WHITEOUT_OPAQUE:
            return  # AUFS metadata such as .wh..wh.plnk: Docker skips it
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(parent, base)
            return
        self.create(rel, member)

    def whiteout(self, parent: str, base: str) -> None:
        if base == WHITEOUT_OPAQUE:
            self.opaque(parent)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise ArchiveError(f"whiteout {posixpath.join(parent, base)!r} names no entry")
        remove_at(self.parent_fd(parent), target)

    def opaque(self, parent: str) -> None:
        """Remove everything below ``parent`` that this tar did not unpack."""
        # A fresh fd: a btrfs directory fd opened earlier may list only what existed then.
        dir_fd = open_dir_in_root(self.root_fd, parent)
        try:
            prune_tree(dir_fd, parent, self.unpacked.__contains__)
        finally:
            os.close(dir_fd)

    def create(self, rel: str, member: tarfile.TarInfo) -> None:
        parent, base = split(rel)
        if self.idmap is not None:  # the one place owners change: every chown below reads them
            member.uid, member.gid = self.idmap.to_host(member.uid, member.gid)
        if not rel:
            self._root_metadata(member)
        elif member.isreg():
            # Most entries: the existence check is the O_EXCL open, metadata goes through the fd.
            self._write_file(self.parent_fd(parent), base, member)
        else:
            dir_fd = self.parent_fd(parent)
            existing = lstat_at(dir_fd, base)
            if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
                remove_at(dir_fd, base)
            self._make(dir_fd, base, member)
            self._metadata(dir_fd, base, member)
        if member.isdir():
            self.dirs.append((rel, member))
        self.unpacked.add(rel)

    def _make(self, dir_fd: int, base: str, member: tarfile.TarInfo) -> None:
        mode = member.mode & 0o7777
        if member.isdir():
            st = lstat_at(dir_fd, base)
            if st is None:
                os.mkdir(base, mode, dir_fd=dir_fd)
        elif member.issym():
            os.symlink(member.linkname, base, dir_fd=dir_fd)
        elif member.islnk():
            self._hard_link(dir_fd, base, member)
        elif member.type in _NODE_TYPES:
            device = os.makedev(member.devmajor, member.devminor)
            os.mknod(base, mode | _NODE_TYPES[member.type], device, dir_fd=dir_fd)
        elif member.isfifo():
            os.mknod(base, mode | stat.S_IFIFO, dir_fd=dir_fd)
        else:
            raise ArchiveError(f"tar entry {member.name!r} has unsupported type {member.type!r}")

    def _write_file(self, dir_fd: int, base: str, member: tarfile.TarInfo) -> None:
        """A regular file, replacing whatever is at ``base``, with its metadata set by fd."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            remove_at(dir_fd, base)
            fd = os.open(base, flags, 0o600, dir_fd=dir_fd)
        try:
            self._write_data(fd, member)
            # The order of _metadata; by fd, each saves a path lookup.
            os.fchown(fd, member.uid, member.gid)
            self._xattrs(fd, member)
            os.fchmod(fd, member.mode & 0o7777)
            os.utime(fd, ns=_times(member))
        finally:
            os.close(fd)

    def _write_data(self, fd: int, member: tarfile.TarInfo) -> None:
        if member.sparse is None:
            # Straight from the stream's buffer: the entry's data is the next member.size bytes.
            self.source.seek(member.offset_data)
            if self.source.copy_to(fd, member.size) < member.size:
                raise ArchiveError("invalid layer tar: unexpected end of data")
            return
        source = self.tar.extractfile(member)  # GNU sparse: tarfile maps the holes
        while source is not None and (chunk := _read(source)):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]

    def _hard_link(self, dir_fd: int, base: str, member: tarfile.TarInfo) -> None:
        target = clean_name(member.linkname)
        if not target or target.startswith(WHITEOUT_META_PREFIX):
            raise ArchiveError(f"hard link {member.name!r} -> {member.linkname!r} is not supported")
        target_parent, target_base = split(target)
        try:
            target_fd = open_dir_in_root(self.root_fd, target_parent)
        except OSError as err:
            raise ArchiveError(f"hard link {member.name!r}: target {target!r}: {err}") from err
        try:
            os.link(
                target_base,
                base,
                src_dir_fd=target_fd,
                dst_dir_fd=dir_fd,
                follow_symlinks=False,
            )
        except FileNotFoundError as err:
            raise ArchiveError(
                f"hard link {member.name!r} points to {member.linkname!r}, which does not exist"
            ) from err
        finally:
            os.close(target_fd)

    def _metadata(self, dir_fd: int, base: str, member: tarfile.TarInfo) -> None:
        os.chown(base, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        self._xattrs(f"/proc/self/fd/{dir_fd}/{base}", member)
        is_link = member.issym()
        if member.islnk():  # a hard link to a symlink is a symlink: no chmod for it
            st = lstat_at(dir_fd, base)
            is_link = st is not None and stat.S_ISLNK(st.st_mode)
        if not is_link:
            os.chmod(base, member.mode & 0o7777, dir_fd=dir_fd)
        if not member.isdir():
            os.utime(base, ns=_times(member), dir_fd=dir_fd, follow_symlinks=False)

    def _root_metadata(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise ArchiveError(f"tar entry {member.name!r} would replace the layer root")
        os.fchown(self.root_fd, member.uid, member.gid)
        self._xattrs(f"/proc/self/fd/{self.root_fd}", member)
        os.fchmod(self.root_fd, member.mode & 0o7777)

    @staticmethod
    def _xattrs(path: str | int, member: tarfile.TarInfo) -> None:
        # A path must not be followed; an fd is the file itself (and may not be told so).
        follow = isinstance(path, int)
        for key, value in member.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            name = key[len(_XATTR_PREFIX) :]
            try:
                os.setxattr(
                    path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=follow
                )
            except OSError as err:
                # Docker ignores filesystems (and xattr namespaces) that refuse xattrs.
                if err.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise

    def finish(self) -> None:
        """Directory times last: creating entries inside would have changed them."""
        for rel, member in reversed(self.dirs):
            try:
                fd = open_dir_in_root(self.root_fd, rel)
            except OSError:
                continue  # removed by a later whiteout
            try:
                os.utime(fd, ns=_times(member))
            finally:
                os.close(fd)


def _read(source: IO[bytes]) -> bytes:
    try:
        return source.read(_CHUNK)
    except (tarfile.TarError, EOFError) as err:
        raise ArchiveError(f"invalid layer tar: {err}") from err


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    mtime = int(float(member.mtime) * 1e9)
    atime_text = member.pax_headers.get("atime")
    atime = int(float(atime_text) * 1e9) if atime_text else mtime
    return max(atime, mtime), mtime


def apply_tar(
    root: str | os.PathLike[str], stream: IO[bytes], idmap: IDMapping | None = None
) -> int:
    """Unpack the uncompressed tar ``stream`` into the layer directory ``root``.

    With ``idmap`` (userns-remap), entry owners are container IDs and are stored as host IDs;
    an owner outside the maps fails the apply, as in Docker.

    Returns the sum of the entries' header sizes. Raises :class:`ArchiveError` for a malformed or
    hostile archive; the caller decides what happens to a partly applied layer.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    total = 0
    try:
        tar = open_stream(stream)
        unpacker = _Unpacker(root_fd, tar, idmap)
        try:
            for member in members(tar):
                _unpack(unpacker, member, total)
                total += member.size
        finally:
            unpacker.close()
        try:
            unpacker.finish()
        except OSError as err:
            if err.errno in NO_SPACE_ERRNOS:
                raise UnpackNoSpaceError(os.strerror(err.errno).lower(), total) from err
            raise
        return total
    finally:
        os.close(root_fd)


def _unpack(unpacker: _Unpacker, member: tarfile.TarInfo, unpacked: int) -> None:
    """One entry; errors become ArchiveError, except a full disk (``unpacked`` bytes so far)."""
    try:
        unpacker.entry(member)
    except ArchiveError:
        raise
    except OSError as err:
        if err.errno in NO_SPACE_ERRNOS:
            raise UnpackNoSpaceError(os.strerror(err.errno).lower(), unpacked) from err
        raise ArchiveError(f"cannot unpack {member.name!r}: {err.strerror or err}") from err
    except (ValueError, OverflowError) as err:  # NUL in a name, absurd ids or times
        raise ArchiveError(f"cannot unpack {member.name!r}: {err}") from err
