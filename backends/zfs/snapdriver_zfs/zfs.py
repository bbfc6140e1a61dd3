"""Typed calls into ZFS: OpenZFS's ``libzfs_core`` where it has the call, the ``zfs`` CLI otherwise.

``libzfs_core`` (Debian's ``python3-pyzfs``, never PyPI's ``pyzfs``) creates, clones, snapshots and
destroys single datasets without a process per call. It has no listing, property reads, diff or
recursive destroy in OpenZFS 2.1, so those run ``zfs``. Every failure is a :class:`ZfsError`
carrying the tool's own message; ``busy`` and ``missing`` classify the two cases callers act on.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Property values as libzfs_core wants them: strings for string properties, ints for numbers.
PropValue = str | int

_BUSY_TEXT = ("dataset is busy", "resource busy", "pool or dataset is busy")
_MISSING_TEXT = ("does not exist", "no such pool or dataset", "could not find any snapshots")
#: How messages say ENOSPC or EDQUOT: the CLI (libzfs) prints both as "out of space", errors it
#: passes through are strerror's words, and pyzfs's compound errors carry "No space left" or
#: "Quota exceeded" per snapshot without an errno of their own.
_NO_SPACE_TEXT = {
    "quota exceeded": errno.EDQUOT,
    "out of space": errno.ENOSPC,
    "no space left": errno.ENOSPC,
}


class ZfsError(Exception):
    """A ZFS operation failed; ``str(err)`` is the message ZFS gave."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code

    @property
    def busy(self) -> bool:
        return self.code == errno.EBUSY or any(t in str(self).lower() for t in _BUSY_TEXT)

    @property
    def missing(self) -> bool:
        return self.code == errno.ENOENT or any(t in str(self).lower() for t in _MISSING_TEXT)

    @property
    def no_space(self) -> int:
        """ENOSPC or EDQUOT if the pool or a quota is full (pyzfs's errno, or the CLI's text);
        else 0."""
        if self.code:
            return self.code if self.code in (errno.ENOSPC, errno.EDQUOT) else 0
        text = str(self).lower()
        return next((code for words, code in _NO_SPACE_TEXT.items() if words in text), 0)


@dataclass
class Dataset:
    """What :meth:`Zfs.describe` found: ``snapshots`` maps each snapshot to its clones."""

    name: str
    props: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, list[str]] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)

    @property
    def clones(self) -> list[str]:
        return [clone for clones in self.snapshots.values() for clone in clones]


@dataclass(frozen=True)
class DiffOutput:
    """What ``zfs diff`` printed; the caller decides whether any stderr text spoils it."""

    returncode: int
    stdout: bytes
    stderr: str


def load_libzfs_core(probe: str) -> tuple[ModuleType | None, str]:
    """Import and initialise ``libzfs_core``; return it (or None) and a word for ``docker info``.

    The module imports even without a kernel module: only the first call initialises the library,
    so ``probe`` (a dataset name) is looked up once to find out whether calls will work.
    """
    try:
        import libzfs_core
    except ImportError:
        return None, "not installed (install python3-pyzfs)"
    try:
        libzfs_core.lzc_exists(probe.encode())
    except Exception as err:  # ZFSInitializationFailed, or OSError from dlopen
        return None, f"unusable ({err})"
    return libzfs_core, "in use"


class Zfs:
    """One handle on ZFS. Thread-safe: libzfs_core serialises its own initialisation."""

    def __init__(self, command: str = "zfs", lzc: ModuleType | None = None) -> None:
        self.command = command
        self.lzc = lzc

    # -- the CLI ---------------------------------------------------------------------------------

    def run(self, *args: str) -> str:
        """Run ``zfs ARGS``; return stdout, raise :class:`ZfsError` with stderr on failure."""
        proc = subprocess.run(
            [self.command, *args],
            capture_output=True,
            text=True,
            errors="surrogateescape",
            check=False,
        )
        if proc.returncode != 0:
            message = proc.stderr.strip() or f"zfs {args[0]} exited with {proc.returncode}"
            raise ZfsError(message)
        return proc.stdout

    def _lzc_call(self, name: str, *args: Any) -> None:
        assert self.lzc is not None
        try:
            getattr(self.lzc, name)(*args)
        except self.lzc.exceptions.ZFSError as err:
            raise ZfsError(_lzc_message(name, args, err), getattr(err, "errno", 0) or 0) from err

    # -- reading -----------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if self.lzc is not None:
            return bool(self.lzc.lzc_exists(name.encode()))
        try:
            self.run("list", "-H", "-o", "name", "-t", "all", name)
        except ZfsError as err:
            if err.missing:
                return False
            raise
        return True

    def get(self, name: str, *props: str) -> dict[str, str]:
        """Parsable (``-p``) values of ``props``; ``-`` stands for "none"."""
        out = self.run("get", "-H", "-p", "-o", "property,value", ",".join(props), name)
        values: dict[str, str] = {}
        for line in out.splitlines():
            prop, _, value = line.partition("\t")
            values[prop] = value
        return values

    def children(self, name: str, *props: str) -> list[list[str]]:
        """Rows ``[name, *props]`` of the filesystems directly below ``name``."""
        out = self.run(
            "list",
            "-H",
            "-p",
            "-o",
            ",".join(("name", *props)),
            "-t",
            "filesystem",
            "-d",
            "1",
            name,
        )
        rows = [line.split("\t") for line in out.splitlines() if line]
        return [row for row in rows if row[0] != name]

    def snapshots_below(self, name: str) -> list[list[str]]:
        """Rows ``[snapshot, clones]`` of ``name`` and of the filesystems directly below it."""
        out = self.run("list", "-H", "-p", "-o", "name,clones", "-t", "snapshot", "-d", "2", name)
        return [line.split("\t") for line in out.splitlines() if line]

    def describe(self, name: str, *props: str) -> Dataset | None:
        """A filesystem with ``props``, its snapshots and child filesystems; None if missing.

        One ``zfs list`` answers all of it, which matters where every process costs.
        """
        columns = ",".join(("name", "clones", *props))
        try:
            out = self.run(
                "list", "-H", "-p", "-o", columns, "-t", "filesystem,snapshot", "-d", "1", name
            )
        except ZfsError as err:
            if err.missing:
                return None
            raise
        found = Dataset(name)
        for line in out.splitlines():
            row = line.split("\t")
            if row[0] == name:
                found.props.update(zip(props, row[2:], strict=False))
            elif "@" in row[0]:
                found.snapshots[row[0]] = [c for c in row[1].split(",") if c and c != "-"]
            else:
                found.children.append(row[0])
        return found

    def diff(self, snapshot: str, target: str) -> DiffOutput:
        """``zfs diff -FH``: one line per changed object, names ``\\ooo``-escaped, unsorted."""
        proc = subprocess.run(
            [self.command, "diff", "-F", "-H", snapshot, target], capture_output=True, check=False
        )
        stderr = proc.stderr.decode(errors="replace").strip()
        return DiffOutput(proc.returncode, proc.stdout, stderr)

    def zpool(self, *args: str) -> str:
        """Run ``zpool ARGS`` (the one beside ``zfs``, if there is one); stdout, or ZfsError."""
        zpool = os.path.join(os.path.dirname(self.command), "zpool")
        proc = subprocess.run(
            [zpool if os.path.exists(zpool) else "zpool", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise ZfsError(proc.stderr.strip() or f"zpool {args[0]} exited with {proc.returncode}")
        return proc.stdout

    def pool_health(self, pool: str) -> str:
        """``zpool list -o health``: ONLINE, DEGRADED, ..."""
        return self.zpool("list", "-H", "-o", "health", pool).strip()

    def pool_freeing(self, pool: str) -> int:
        """Bytes of destroyed datasets the pool is still freeing in the background."""
        value = self.zpool("get", "-H", "-p", "-o", "value", "freeing", pool).strip()
        try:
            return int(value)
        except ValueError:
            raise ZfsError(f"zpool get freeing {pool}: not a number: {value!r}") from None

    # -- writing -----------------------------------------------------------------------------

    def create(self, name: str, props: Mapping[str, PropValue]) -> None:
        if self.lzc is not None:
            self._lzc_call("lzc_create", name.encode(), "zfs", _lzc_props(props))
        else:
            self.run("create", *_cli_props(props), name)

    def snapshot(self, name: str) -> None:
        if self.lzc is not None:
            self._lzc_call("lzc_snapshot", [name.encode()])
        else:
            self.run("snapshot", name)

    def clone(self, origin: str, name: str, props: Mapping[str, PropValue]) -> None:
        if self.lzc is not None:
            self._lzc_call("lzc_clone", name.encode(), origin.encode(), _lzc_props(props))
        else:
            self.run("clone", *_cli_props(props), origin, name)

    def destroy(self, name: str) -> None:
        """Destroy one filesystem that has no snapshots or children."""
        if self.lzc is not None:
            self._lzc_call("lzc_destroy", name.encode())
        else:
            self.run("destroy", name)

    def destroy_recursive(self, name: str) -> None:
        """Destroy a filesystem with its snapshots and children (not their clones elsewhere)."""
        self.run("destroy", "-r", name)

    def destroy_snapshots(self, names: Sequence[str], *, defer: bool) -> None:
        """Destroy snapshots; missing ones are ignored; ``defer`` waits for their clones to go."""
        if not names:
            return
        if self.lzc is not None:
            self._lzc_call("lzc_destroy_snaps", [n.encode() for n in names], defer)
            return
        for name in names:
            try:
                self.run("destroy", *(["-d"] if defer else []), name)
            except ZfsError as err:
                if not err.missing:
                    raise

    def set(self, name: str, props: Mapping[str, str]) -> None:
        """Set properties of an existing dataset (libzfs_core has no call for it)."""
        self.run("set", *(f"{k}={v}" for k, v in props.items()), name)

    def rename(self, name: str, new_name: str) -> None:
        """Rename a filesystem or snapshot (works while a detached mount still holds it)."""
        self.run("rename", name, new_name)


def _lzc_props(props: Mapping[str, PropValue]) -> dict[bytes, bytes | int]:
    return {k.encode(): v.encode() if isinstance(v, str) else v for k, v in props.items()}


def _cli_props(props: Mapping[str, PropValue]) -> list[str]:
    return [arg for k, v in props.items() for arg in ("-o", f"{k}={v}")]


def _lzc_message(call: str, args: tuple[Any, ...], err: Exception) -> str:
    """pyzfs messages name the error class only; add the call and the dataset it concerned."""
    target = args[0] if args else b""
    if isinstance(target, list):
        target = b", ".join(target)
    name = target.decode(errors="replace") if isinstance(target, bytes) else str(target)
    details = getattr(err, "errors", None)  # compound errors list one exception per snapshot
    reason = "; ".join(str(e) for e in details) if details else str(err)
    return f"{call} {name}: {reason}"


def find_command(name: str = "zfs") -> str | None:
    return shutil.which(name)
