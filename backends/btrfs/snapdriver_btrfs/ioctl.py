"""Raw btrfs ioctls that libbtrfsutil does not offer: send, inode paths, quota groups.

Each function opens the path it is given, issues one ioctl (or a few) and closes it again. Errors
are :class:`OSError` (the matching subclass, e.g. ``PermissionError``) whose message names the
ioctl and the path. Structure layouts and numbers are those of the kernel's ``uapi/btrfs.h``.
Most of these need ``CAP_SYS_ADMIN``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

_MAGIC = 0x94
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, number: int, size: int) -> int:
    """Linux ``_IOC`` encoding: direction, size, type and number in one request code."""
    return (direction << 30) | (size << 16) | (_MAGIC << 8) | number


_SEND_ARGS = struct.Struct("<qQQQQI28x")
_INO_PATH_ARGS = struct.Struct("<QQ32xQ")  # inum, size, reserved[4], fspath
_QUOTA_CTL_ARGS = struct.Struct("<QQ")  # cmd, status
_QGROUP_CREATE_ARGS = struct.Struct("<QQ")  # create, qgroupid
_QGROUP_LIMIT_ARGS = struct.Struct("<QQQQQQ")  # qgroupid, flags, max_rfer, max_excl, rsv_*
_SEARCH_KEY = struct.Struct("<7Q4I32x")  # tree, min/max objectid, offset, transid; types, count
_SEARCH_HEADER = struct.Struct("<QQQII")  # transid, objectid, offset, type, len
_SEARCH_V2_FIXED = _SEARCH_KEY.size + 8  # the key, u64 buf_size, then the result buffer
_SEARCH_BUFFER = 64 * 1024  # an item is at most a leaf (nodesize is at most 64 KiB)
_INO_LOOKUP_SIZE = 4096  # u64 treeid, u64 objectid, char name[4080]
_FS_INFO_SIZE = 1024

IOC_TREE_SEARCH_V2 = _ioc(_IOC_READ | _IOC_WRITE, 17, _SEARCH_V2_FIXED)
IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 18, _INO_LOOKUP_SIZE)
IOC_FS_INFO = _ioc(_IOC_READ, 31, _FS_INFO_SIZE)
IOC_INO_PATHS = _ioc(_IOC_READ | _IOC_WRITE, 35, _INO_PATH_ARGS.size)
IOC_SEND = _ioc(_IOC_WRITE, 38, _SEND_ARGS.size)
IOC_QUOTA_CTL = _ioc(_IOC_READ | _IOC_WRITE, 40, _QUOTA_CTL_ARGS.size)
IOC_QGROUP_CREATE = _ioc(_IOC_WRITE, 42, _QGROUP_CREATE_ARGS.size)
IOC_QGROUP_LIMIT = _ioc(_IOC_READ, 43, _QGROUP_LIMIT_ARGS.size)  # _IOR in the uapi header, sic

SEND_FLAG_NO_FILE_DATA = 0x1
SEND_FLAG_OMIT_STREAM_HEADER = 0x2
SEND_FLAG_OMIT_END_CMD = 0x4
SEND_FLAG_VERSION = 0x8
SEND_FLAG_COMPRESSED = 0x10

_QUOTA_CTL_ENABLE = 1
_QUOTA_CTL_DISABLE = 2
_QUOTA_CTL_ENABLE_SIMPLE = 4
_QGROUP_LIMIT_MAX_RFER = 1
_QGROUP_LIMIT_CLEAR = 2**64 - 1
_QGROUP_STATUS_FLAG_ON = 1

_FIRST_FREE_OBJECTID = 256  # inode number of every subvolume's root directory
_QUOTA_TREE_OBJECTID = 8
_INODE_REF_KEY = 12
_INODE_EXTREF_KEY = 13
_QGROUP_STATUS_KEY = 240
_INO_PATHS_BUFFER = 4096  # the kernel clamps the path buffer to 4 KiB
_U64_MAX = 2**64 - 1


def _error(err: OSError, what: str, path: Path | str) -> OSError:
    """``err`` again, with the ioctl name and the path in the message."""
    code = err.errno or errno.EIO
    return OSError(code, f"{what} failed: {os.strerror(code)}", os.fspath(path))


@contextlib.contextmanager
def _opened(path: Path | str, what: str) -> Iterator[int]:
    """A read-only descriptor for ``path`` (a directory or file), closed on exit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _error(err, f"{what} (open)", path) from err
    try:
        yield fd
    finally:
        os.close(fd)


def _call(fd: int, request: int, arg: bytes | bytearray, what: str, path: Path | str) -> bytes:
    """Issue one ioctl; a ``bytearray`` argument is updated in place, ``bytes`` come back new."""
    try:
        if isinstance(arg, bytearray):
            fcntl.ioctl(fd, request, arg, True)
            return bytes(arg)
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        raise _error(err, what, path) from err


def subvolume_id(path: Path | str) -> int:
    """The id of the subvolume that contains ``path`` (``BTRFS_IOC_INO_LOOKUP``, unprivileged)."""
    args = bytearray(_INO_LOOKUP_SIZE)
    # treeid 0 asks for the fd's own tree; objectid 256 skips the (privileged) path lookup.
    struct.pack_into("<QQ", args, 0, 0, _FIRST_FREE_OBJECTID)
    with _opened(path, "BTRFS_IOC_INO_LOOKUP") as fd:
        _call(fd, IOC_INO_LOOKUP, args, "BTRFS_IOC_INO_LOOKUP", path)
    return int.from_bytes(args[:8], "little")


def filesystem_uuid(path: Path | str) -> bytes:
    """The 16-byte fsid of the btrfs filesystem holding ``path`` (``BTRFS_IOC_FS_INFO``)."""
    with _opened(path, "BTRFS_IOC_FS_INFO") as fd:
        info = _call(fd, IOC_FS_INFO, bytearray(_FS_INFO_SIZE), "BTRFS_IOC_FS_INFO", path)
    return info[16:32]


def send(
    subvol: Path | str,
    out_fd: int,
    *,
    parent: Path | str | None = None,
    flags: int = 0,
    version: int = 0,
) -> None:
    """Write the send stream of read-only ``subvol`` to ``out_fd`` (``BTRFS_IOC_SEND``).

    With ``parent`` (a read-only subvolume of the same filesystem) the stream is incremental and
    the parent is also its clone source, as ``btrfs send -p`` does. ``version`` > 0 asks for that
    stream version. Blocks until the kernel has written everything, so ``out_fd`` must be drained
    concurrently if it is a pipe (see :func:`send_chunks`).
    """
    clone_sources = (ctypes.c_uint64 * 1)()
    count = 0
    parent_root = 0
    if parent is not None:
        if filesystem_uuid(parent) != filesystem_uuid(subvol):
            # Subvolume ids are per filesystem: the kernel would diff against the wrong tree.
            raise OSError(
                errno.EXDEV, f"send parent {parent} is on another filesystem", os.fspath(subvol)
            )
        parent_root = subvolume_id(parent)
        clone_sources[0] = parent_root
        count = 1
    if version:
        flags |= SEND_FLAG_VERSION
    args = _SEND_ARGS.pack(
        out_fd, count, ctypes.addressof(clone_sources), parent_root, flags, version
    )
    with _opened(subvol, "BTRFS_IOC_SEND") as fd:
        _call(fd, IOC_SEND, args, "BTRFS_IOC_SEND", subvol)


def send_stream(
    subvol: Path | str,
    *,
    parent: Path | str | None = None,
    flags: int = SEND_FLAG_NO_FILE_DATA,
    version: int = 0,
) -> bytes:
    """The whole send stream of ``subvol`` as bytes; by default without file data.

    Meant for no-data streams (about 70 bytes per changed inode); a stream with file data is as
    big as the data.
    """
    with send_chunks(subvol, parent=parent, flags=flags, version=version) as chunks:
        return b"".join(chunks)


@contextlib.contextmanager
def send_chunks(
    subvol: Path | str,
    *,
    parent: Path | str | None = None,
    flags: int = SEND_FLAG_NO_FILE_DATA,
    version: int = 0,
) -> Iterator[Iterator[bytes]]:
    """The send stream of ``subvol`` in pieces, as the kernel writes them.

    The ioctl blocks while it writes, so it runs in a thread, into a pipe this side reads. Leaving
    the block before the end closes the pipe, which stops the kernel's send (with ``EPIPE``, not
    raised): a reader that has seen enough does not pay for the rest. A send that fails is raised
    when the block ends, once the reader has seen the end of what the kernel wrote.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        # Fewer wake-ups with a bigger pipe; the default 64 KiB is fine too.
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    failures: list[BaseException] = []
    sender = threading.Thread(
        target=_send_into,
        args=(partial(send, subvol, write_fd, parent=parent, flags=flags, version=version),),
        kwargs={"write_fd": write_fd, "failures": failures},
        name="btrfs-send",
        daemon=True,
    )
    sender.start()
    reader = _Reader(read_fd)
    try:
        yield iter(reader)
    finally:
        os.close(read_fd)
        sender.join()
        if failures and reader.at_end:
            # Raised even over the reader's own error: a stream the kernel gave up on ends early,
            # and the kernel's reason (EPERM, ENAMETOOLONG) says more than "truncated".
            raise failures[0]


def _send_into(
    sending: Callable[[], None], *, write_fd: int, failures: list[BaseException]
) -> None:
    """Run ``sending`` (into ``write_fd``), then close it: the end of the stream for the reader."""
    try:
        sending()
    except BaseException as err:  # handed to the reading thread
        failures.append(err)
    finally:
        os.close(write_fd)


class _Reader:
    """Chunks from a pipe until its end, remembering whether the end was reached."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.at_end = False

    def __iter__(self) -> Iterator[bytes]:
        while chunk := os.read(self.fd, 1 << 20):
            yield chunk
        self.at_end = True


def inode_paths(subvol: Path | str, inode: int) -> list[str]:
    """Every name of ``inode`` in the subvolume holding ``subvol`` (``BTRFS_IOC_INO_PATHS``).

    Paths are absolute within the subvolume (``/opt/orig``), in kernel order. The kernel returns at
    most 4 KiB of names; when some do not fit (an inode with hundreds of links, such as busybox),
    the names are read from the inode's reference items instead (``BTRFS_IOC_TREE_SEARCH``).
    """
    with _opened(subvol, "BTRFS_IOC_INO_PATHS") as fd:
        paths, complete = _ino_paths(fd, subvol, inode)
        if not complete:
            paths = _paths_from_refs(fd, subvol, inode)
    return paths


def _ino_paths(fd: int, subvol: Path | str, inode: int) -> tuple[list[str], bool]:
    """Names from ``BTRFS_IOC_INO_PATHS`` and whether they are all of them."""
    buffer = ctypes.create_string_buffer(_INO_PATHS_BUFFER)
    args = _INO_PATH_ARGS.pack(inode, _INO_PATHS_BUFFER, ctypes.addressof(buffer))
    _call(fd, IOC_INO_PATHS, args, "BTRFS_IOC_INO_PATHS", subvol)
    raw = buffer.raw
    _bytes_left, bytes_missing, count, missed = struct.unpack_from("<IIII", raw)
    # Each val[i] is an offset, from the start of val[], of a NUL-terminated path.
    offsets = struct.unpack_from(f"<{count}Q", raw, 16)
    paths = []
    for offset in offsets:
        start = 16 + offset
        name = raw[start : raw.index(b"\0", start)]
        paths.append("/" + os.fsdecode(name))
    return paths, bytes_missing == 0 and missed == 0


def _paths_from_refs(fd: int, subvol: Path | str, inode: int) -> list[str]:
    """All names of ``inode`` from its INODE_REF and INODE_EXTREF items, any number of them."""
    refs: list[tuple[int, bytes]] = []
    for objectid, kind, offset, item in _tree_search(
        fd, subvol, 0, (inode, _INODE_REF_KEY, 0), (inode, _INODE_EXTREF_KEY, _U64_MAX)
    ):
        if objectid != inode:
            continue
        if kind == _INODE_REF_KEY:
            refs.extend((offset, name) for name in _inode_ref_names(item))
        elif kind == _INODE_EXTREF_KEY:
            refs.extend(_inode_extref_names(item))
    if not refs:
        raise OSError(errno.ENOENT, f"inode {inode} not found", os.fspath(subvol))
    directories: dict[int, str] = {}
    paths = []
    for directory, name in refs:
        if directory not in directories:
            directories[directory] = _directory_path(fd, subvol, directory)
        paths.append(directories[directory] + "/" + os.fsdecode(name))
    return paths


def _inode_ref_names(item: bytes) -> Iterator[bytes]:
    """Names in a ``btrfs_inode_ref`` item: repeated ``u64 index, u16 len, name``."""
    pos = 0
    while pos + 10 <= len(item):
        length = int.from_bytes(item[pos + 8 : pos + 10], "little")
        yield item[pos + 10 : pos + 10 + length]
        pos += 10 + length


def _inode_extref_names(item: bytes) -> Iterator[tuple[int, bytes]]:
    """(directory, name) in a ``btrfs_inode_extref`` item: ``u64 dir, u64 index, u16 len, name``."""
    pos = 0
    while pos + 18 <= len(item):
        directory = int.from_bytes(item[pos : pos + 8], "little")
        length = int.from_bytes(item[pos + 16 : pos + 18], "little")
        yield directory, item[pos + 18 : pos + 18 + length]
        pos += 18 + length


def _directory_path(fd: int, subvol: Path | str, directory: int) -> str:
    """Path of directory inode ``directory`` within the fd's subvolume, "" for its root."""
    args = bytearray(_INO_LOOKUP_SIZE)
    struct.pack_into("<QQ", args, 0, 0, directory)
    _call(fd, IOC_INO_LOOKUP, args, "BTRFS_IOC_INO_LOOKUP", subvol)
    name = bytes(args[16 : args.index(b"\0", 16)])
    return "/" + os.fsdecode(name.rstrip(b"/")) if name else ""


def _tree_search(
    fd: int,
    path: Path | str,
    tree: int,
    low: tuple[int, int, int],
    high: tuple[int, int, int],
) -> Iterator[tuple[int, int, int, bytes]]:
    """Items ``(objectid, type, offset, data)`` with keys in [low, high] (``TREE_SEARCH_V2``).

    ``tree`` 0 is the subvolume of ``fd``. Keys compare as (objectid, type, offset) tuples; the
    search resumes after the last key returned until a call returns nothing. Version 1 of the
    ioctl has a 4 KiB buffer and returns bigger items (an inode's refs, for one) empty.
    """
    while True:
        args = bytearray(_SEARCH_V2_FIXED + _SEARCH_BUFFER)
        _SEARCH_KEY.pack_into(
            args, 0, tree, low[0], high[0], low[2], high[2], 0, _U64_MAX, low[1], high[1], 4096, 0
        )
        struct.pack_into("<Q", args, _SEARCH_KEY.size, _SEARCH_BUFFER)
        _call(fd, IOC_TREE_SEARCH_V2, args, "BTRFS_IOC_TREE_SEARCH_V2", path)
        count = struct.unpack_from("<I", args, 7 * 8 + 8)[0]
        if count == 0:
            return
        pos = _SEARCH_V2_FIXED
        key = low
        for _ in range(count):
            _, objectid, offset, kind, length = _SEARCH_HEADER.unpack_from(args, pos)
            pos += _SEARCH_HEADER.size
            yield objectid, kind, offset, bytes(args[pos : pos + length])
            pos += length
            key = (objectid, kind, offset)
        following = _next_key(key)
        if following is None or following > high:
            return
        low = following


def _next_key(key: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The smallest key after ``key``, or None past the last possible key."""
    objectid, kind, offset = key
    if offset < _U64_MAX:
        return objectid, kind, offset + 1
    if kind < 255:
        return objectid, kind + 1, 0
    if objectid < _U64_MAX:
        return objectid + 1, 0, 0
    return None


def enable_quota(path: Path | str, *, simple: bool = False) -> None:
    """Enable quota groups on the filesystem holding ``path`` (``BTRFS_IOC_QUOTA_CTL``).

    ``simple`` asks for simple quotas (kernel 6.7+), which track extent owners instead of
    running full backref accounting. Enabling when already enabled succeeds.
    """
    command = _QUOTA_CTL_ENABLE_SIMPLE if simple else _QUOTA_CTL_ENABLE
    with _opened(path, "BTRFS_IOC_QUOTA_CTL") as fd:
        _call(fd, IOC_QUOTA_CTL, _QUOTA_CTL_ARGS.pack(command, 0), "BTRFS_IOC_QUOTA_CTL", path)


def disable_quota(path: Path | str) -> None:
    """Disable quota groups filesystem-wide, dropping every qgroup and limit (tests, tooling).

    A storage driver should never call this on shutdown: it wipes limits the user set.
    """
    with _opened(path, "BTRFS_IOC_QUOTA_CTL") as fd:
        args = _QUOTA_CTL_ARGS.pack(_QUOTA_CTL_DISABLE, 0)
        _call(fd, IOC_QUOTA_CTL, args, "BTRFS_IOC_QUOTA_CTL", path)


def quota_enabled(path: Path | str) -> bool:
    """Whether quota groups are on for the filesystem holding ``path``.

    Reads the qgroup status item from the quota tree (``BTRFS_IOC_TREE_SEARCH_V2``); that tree
    only exists while quotas are enabled.
    """
    key = (0, _QGROUP_STATUS_KEY, 0)
    with _opened(path, "BTRFS_IOC_TREE_SEARCH_V2") as fd:
        try:
            items = list(_tree_search(fd, path, _QUOTA_TREE_OBJECTID, key, key))
        except FileNotFoundError:
            return False
    for _, kind, _, item in items:
        if kind == _QGROUP_STATUS_KEY and len(item) >= 24:
            flags = int.from_bytes(item[16:24], "little")  # version, generation, flags, ...
            return bool(flags & _QGROUP_STATUS_FLAG_ON)
    return False


def limit_referenced(subvol: Path | str, max_referenced: int | None) -> None:
    """Limit the referenced bytes of the subvolume holding ``subvol`` (``QGROUP_LIMIT``).

    Sets ``MAX_RFER`` on the subvolume's own level-0 qgroup; ``None`` removes the limit. Note that
    referenced bytes include data shared with the snapshot's source. Quotas must be enabled.
    """
    if max_referenced is not None and not 0 < max_referenced < _QGROUP_LIMIT_CLEAR:
        raise ValueError(f"qgroup limit must be a positive byte count, not {max_referenced}")
    limit = _QGROUP_LIMIT_CLEAR if max_referenced is None else max_referenced
    args = _QGROUP_LIMIT_ARGS.pack(0, _QGROUP_LIMIT_MAX_RFER, limit, 0, 0, 0)  # qgroupid 0: fd's
    with _opened(subvol, "BTRFS_IOC_QGROUP_LIMIT") as fd:
        _call(fd, IOC_QGROUP_LIMIT, args, "BTRFS_IOC_QGROUP_LIMIT", subvol)


def qgroup_create(path: Path | str, qgroupid: int) -> None:
    """Create qgroup ``qgroupid`` (``level << 48 | id``) on the filesystem of ``path``."""
    _qgroup_create_ioctl(path, qgroupid, create=True)


def qgroup_destroy(path: Path | str, qgroupid: int) -> None:
    """Destroy qgroup ``qgroupid``; for a level-0 qgroup, only once its subvolume is gone.

    The kernel answers ``EBUSY`` while the subvolume still exists (or is not yet cleaned up) and
    ``ENOENT`` for an unknown qgroup.
    """
    _qgroup_create_ioctl(path, qgroupid, create=False)


def forget_qgroup(path: Path | str, subvol_id: int) -> bool:
    """Best effort: destroy the level-0 qgroup of deleted subvolume ``subvol_id``.

    Call it after deleting the subvolume; ``path`` is any path on the filesystem. Returns whether
    the qgroup is gone. Quotas off, an unknown qgroup, or ``EBUSY`` (the cleaner has not dropped
    the subvolume yet) are not errors: recent kernels remove the qgroup themselves once the
    subvolume is dropped, older ones leave it ``<stale>`` for ``btrfs qgroup clear-stale``.
    Deliberately no rescan wait, unlike moby.
    """
    if not quota_enabled(path):
        return True
    try:
        qgroup_destroy(path, subvol_id)
    except FileNotFoundError:
        return True
    except OSError as err:
        if err.errno == errno.EBUSY:
            return False
        raise
    return True


def _qgroup_create_ioctl(path: Path | str, qgroupid: int, *, create: bool) -> None:
    args = _QGROUP_CREATE_ARGS.pack(int(create), qgroupid)
    with _opened(path, "BTRFS_IOC_QGROUP_CREATE") as fd:
        _call(fd, IOC_QGROUP_CREATE, args, "BTRFS_IOC_QGROUP_CREATE", path)
