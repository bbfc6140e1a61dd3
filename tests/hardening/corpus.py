"""Hostile layer tars, written byte by byte.

Python's ``tarfile`` refuses to write most of what is interesting here (lying size fields, bad
checksums, negative numbers, broken PAX records), so every block is made by :func:`header`, a
plain USTAR header maker that computes the checksum unless told a wrong one. Each :class:`Case`
builds its bytes from a :class:`Target`, which says where the canaries are, so that a symlink or
a name can aim straight at them.

``expect`` is what a correct, Docker-compatible plugin must answer: ``error`` (a non-200 reply)
or ``applied`` (200). ``either`` is for inputs where both are defensible (Docker itself fails
some of them only by accident of its chroot); the safety checks apply to every case anyway.
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from snapdriver.testing.trees import read_at_depth

BLOCK = 512
END = bytes(2 * BLOCK)
MTIME = 1_600_000_000
OWNED = b"owned by a hostile layer\n"
DEEP = 2000

Expect = Literal["error", "applied", "either"]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def pad(size: int) -> bytes:
    """Zeros up to the next block boundary."""
    return bytes(-size % BLOCK)


def octal(value: int, width: int) -> bytes:
    """A USTAR number: zero-padded octal digits and a NUL, ``width`` bytes in all."""
    digits = format(value, "o").encode()
    if len(digits) > width - 1:
        raise ValueError(f"{value} does not fit {width} bytes of octal")
    return digits.rjust(width - 1, b"0") + b"\0"


def _text(value: bytes, width: int) -> bytes:
    if len(value) > width:
        raise ValueError(f"{value[:40]!r}... is longer than {width} bytes")
    return value.ljust(width, b"\0")


def header(
    name: str | bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    linkname: str | bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    size_field: bytes | None = None,
    checksum: bytes | None = None,
) -> bytes:
    """One 512-byte USTAR header; ``size_field`` and ``checksum`` (raw bytes) may lie."""
    if size_field is not None and len(size_field) != 12:
        raise ValueError("the size field is 12 bytes")
    if checksum is not None and len(checksum) != 8:
        raise ValueError("the checksum field is 8 bytes")
    block = b"".join(
        (
            _text(_b(name), 100),
            octal(mode, 8),
            octal(uid, 8),
            octal(gid, 8),
            size_field if size_field is not None else octal(size, 12),
            octal(mtime, 12),
            b" " * 8,  # the checksum counts itself as spaces
            typeflag,
            _text(_b(linkname), 100),
            b"ustar\x0000",
            _text(b"root", 32),
            _text(b"root", 32),
            octal(devmajor, 8),
            octal(devminor, 8),
        )
    ).ljust(BLOCK, b"\0")
    if checksum is None:
        checksum = octal(sum(block), 7) + b" "
    return block[:148] + checksum + block[156:]


def pax_record(key: str | bytes, value: str | bytes) -> bytes:
    """``"%d %s=%s\\n"`` where the number counts the whole record, itself included."""
    body = b" " + _b(key) + b"=" + _b(value) + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax(records: bytes, typeflag: bytes = b"x") -> bytes:
    """A PAX extended header (``x``, or ``g`` for global) carrying ``records`` verbatim."""
    return (
        header(b"PaxHeaders/entry", typeflag=typeflag, size=len(records))
        + records
        + pad(len(records))
    )


def gnu_longname(name: str | bytes, typeflag: bytes = b"L") -> bytes:
    """A GNU ``././@LongLink`` entry (``L`` for the name, ``K`` for the link target)."""
    data = _b(name) + b"\0"
    return header(b"././@LongLink", typeflag=typeflag, size=len(data)) + data + pad(len(data))


def member(
    name: str | bytes,
    data: bytes = b"",
    *,
    typeflag: bytes = b"0",
    linkname: str | bytes = b"",
    mode: int = 0o644,
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """An entry with its data; names and link targets over 100 bytes go in a PAX header."""
    raw_name, raw_link = _b(name), _b(linkname)
    records = b""
    if len(raw_name) > 100:
        records += pax_record("path", raw_name)
        raw_name = raw_name[:100]
    if len(raw_link) > 100:
        records += pax_record("linkpath", raw_link)
        raw_link = raw_link[:100]
    prefix = pax(records) if records else b""
    size = len(data) if typeflag == b"0" else 0
    block = header(
        raw_name,
        typeflag=typeflag,
        size=size,
        linkname=raw_link,
        mode=mode,
        devmajor=devmajor,
        devminor=devminor,
    )
    return prefix + block + data + pad(len(data))


def directory(name: str | bytes, mode: int = 0o755) -> bytes:
    raw = _b(name)
    return member(raw if raw.endswith(b"/") else raw + b"/", typeflag=b"5", mode=mode)


def symlink(name: str | bytes, target: str | bytes) -> bytes:
    return member(name, typeflag=b"2", linkname=target, mode=0o777)


def hardlink(name: str | bytes, target: str | bytes) -> bytes:
    return member(name, typeflag=b"1", linkname=target)


def device(name: str | bytes, kind: Literal["char", "block"], major: int, minor: int) -> bytes:
    flag = b"3" if kind == "char" else b"4"
    return member(name, typeflag=flag, mode=0o666, devmajor=major, devminor=minor)


def fifo(name: str | bytes) -> bytes:
    return member(name, typeflag=b"6", mode=0o600)


def tar(*parts: bytes) -> bytes:
    """The parts and Go's end of archive (two zero blocks)."""
    return b"".join(parts) + END


# -- where the corpus runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a hostile layer would like to reach, as seen from the plugin's host."""

    canary: Path  # a directory on the same btrfs, outside the plugin's Home
    host_canary: Path  # a directory on another filesystem
    layer_dir: Path  # where the layer under test lives (its parent dir is shared)
    sibling: str  # the ID of a sibling layer with content

    def up_to(self, path: Path) -> str:
        """The relative path from the layer root to ``path``, as a naive resolver would take it."""
        return os.path.relpath(path, self.layer_dir)


#: What the base layer (every case's parent) holds: names the corpus aims at.
BASE_FILES: dict[str, bytes] = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/shadow": b"root:*:19000:0:99999:7:::\n",
    "precious": b"precious in the base layer\n",
    "dir/keep": b"keep me\n",
    "bin/sh": b"#!/not/really/a/shell\n",
}
#: The sibling layer: the same names, different bytes.
SIBLING_FILES: dict[str, bytes] = {
    "precious": b"precious in the sibling layer\n",
    "etc/shadow": b"sibling:*:19000:0:99999:7:::\n",
}
#: The canary directory on the same btrfs filesystem, and the one on the host's own filesystem.
CANARY_FILES: dict[str, bytes] = {
    "precious": b"canary precious\n",
    "x": b"canary x\n",
    "etc/passwd": b"canary passwd\n",
    "etc/shadow": b"canary shadow\n",
    "sub/deeper/file": b"canary deep file\n",
}


def tree_tar(files: dict[str, bytes]) -> bytes:
    """A well-formed tar of ``files`` with their directories, as a benign layer."""
    parts: list[bytes] = []
    seen: set[str] = set()
    for name, data in sorted(files.items()):
        parent = os.path.dirname(name)
        chain: list[str] = []
        while parent and parent not in seen:
            chain.append(parent)
            seen.add(parent)
            parent = os.path.dirname(parent)
        parts.extend(directory(d) for d in reversed(chain))
        parts.append(member(name, data))
    return tar(*parts)


# -- the cases ----------------------------------------------------------------------------------

Check = Callable[[Path, Target], None]


@dataclass(frozen=True)
class Case:
    id: str
    expect: Expect
    build: Callable[[Target], bytes]
    check: Check | None = None  # run on the layer's directory when the apply succeeded
    deep: bool = False  # then also Changes, DiffSize, Diff and a re-apply of that Diff
    why: str = ""


CASES: list[Case] = []


def case(
    case_id: str, expect: Expect, check: Check | None = None, deep: bool = False, why: str = ""
) -> Callable[[Callable[[Target], bytes]], Callable[[Target], bytes]]:
    def register(build: Callable[[Target], bytes]) -> Callable[[Target], bytes]:
        if any(c.id == case_id for c in CASES):
            raise ValueError(f"duplicate case {case_id}")
        CASES.append(Case(case_id, expect, build, check, deep, why))
        return build

    return register


def _bytes_at(path: Path, data: bytes) -> Check:
    def check(layer: Path, target: Target) -> None:
        found = layer / path
        assert found.is_file() and not found.is_symlink(), f"{found} is not a regular file"
        assert found.read_bytes() == data

    return check


def _absent(*names: str) -> Check:
    def check(layer: Path, target: Target) -> None:
        for name in names:
            assert not os.path.lexists(layer / name), f"{name} should not be in the layer"

    return check


def _only(*names: str) -> Check:
    def check(layer: Path, target: Target) -> None:
        assert sorted(os.listdir(layer)) == sorted(names)

    return check


def _kind(name: str, test: Callable[[int], bool], rdev: tuple[int, int] | None = None) -> Check:
    def check(layer: Path, target: Target) -> None:
        st = os.lstat(layer / name)
        assert test(st.st_mode), f"{name} has mode {oct(st.st_mode)}"
        if rdev is not None:
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == rdev

    return check


def _same_inode(first: str, second: str) -> Check:
    def check(layer: Path, target: Target) -> None:
        a, b = os.lstat(layer / first), os.lstat(layer / second)
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), f"{first} and {second} differ"

    return check


def _inside(relative_to_canary: str) -> Check:
    """The write meant for the canary landed at the canary's path *inside* the layer."""

    def check(layer: Path, target: Target) -> None:
        inner = layer / str(target.canary).lstrip("/") / relative_to_canary
        assert inner.read_bytes() == OWNED

    return check


def _all(*checks: Check) -> Check:
    def check(layer: Path, target: Target) -> None:
        for each in checks:
            each(layer, target)

    return check


# .. traversal


@case("dotdot-file", "error")
def _(t: Target) -> bytes:
    return tar(member("../x", OWNED))


@case("dotdot-nested", "error")
def _(t: Target) -> bytes:
    return tar(member("a/../../x", OWNED))


@case("dot-slash-dotdot", "error")
def _(t: Target) -> bytes:
    return tar(member("./../x", OWNED))


@case("dotdot-directory", "error")
def _(t: Target) -> bytes:
    return tar(directory("../escaped-dir"))


@case("dotdot-to-canary", "error")
def _(t: Target) -> bytes:
    return tar(member("a/b/" + t.up_to(t.canary / "precious"), OWNED))


@case("dotdot-symlink-name", "error")
def _(t: Target) -> bytes:
    return tar(symlink("../link", "/"))


@case("dotdot-name-with-newline", "error", why="the error message must stay one line")
def _(t: Target) -> bytes:
    return tar(member("../evil\nsecond line", OWNED))


@case("dotdot-name-not-utf8", "error")
def _(t: Target) -> bytes:
    return tar(member(b"../\xff\xfe", OWNED))


# absolute names


@case("absolute-etc-passwd", "applied", _bytes_at(Path("etc/passwd"), OWNED))
def _(t: Target) -> bytes:
    return tar(member("/etc/passwd", OWNED))


@case("absolute-canary-path", "applied", _inside("precious"))
def _(t: Target) -> bytes:
    return tar(member(str(t.canary / "precious"), OWNED))


@case("absolute-dotdot-etc-shadow", "applied", _bytes_at(Path("etc/shadow"), OWNED))
def _(t: Target) -> bytes:
    return tar(member("/../../../etc/shadow", OWNED))


# symlinks


@case("symlink-abs-host-dir-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("hostdir", str(t.host_canary)), member("hostdir/pwned", OWNED))


@case("symlink-abs-canary-dir-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("cdir", str(t.canary)), member("cdir/precious", OWNED))


@case("symlink-abs-etc-write", "applied", _bytes_at(Path("etc/shadow"), OWNED))
def _(t: Target) -> bytes:
    # /etc exists in the base layer: the write lands in the layer's own etc.
    return tar(symlink("etclink", "/etc"), member("etclink/shadow", OWNED))


@case(
    "symlink-abs-file-replaced-by-file",
    "applied",
    _bytes_at(Path("evil"), OWNED),
    why="a file entry replaces a symlink, never writes through it",
)
def _(t: Target) -> bytes:
    return tar(symlink("evil", str(t.canary / "precious")), member("evil", OWNED))


@case("symlink-dotdot-write", "applied", _bytes_at(Path("escaped"), OWNED))
def _(t: Target) -> bytes:
    return tar(symlink("up", "../../.."), member("up/escaped", OWNED))


@case("symlink-rel-canary-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("c", t.up_to(t.canary)), member("c/precious", OWNED))


@case("symlink-rel-sibling-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("s", "../" + t.sibling), member("s/precious", OWNED))


@case("symlink-dotdot-then-directory", "applied", _kind("made-dir", stat.S_ISDIR))
def _(t: Target) -> bytes:
    return tar(symlink("d", "../../../../.."), directory("d/made-dir"))


@case("symlink-abs-dir-replaced-by-dir", "applied", _kind("d", stat.S_ISDIR))
def _(t: Target) -> bytes:
    return tar(symlink("d", str(t.canary)), directory("d", mode=0o777))


@case("symlink-chain-to-root-write", "applied", _bytes_at(Path("chained"), OWNED))
def _(t: Target) -> bytes:
    return tar(
        symlink("c3", "../../../../../.."),
        symlink("c2", "c3"),
        symlink("c1", "c2"),
        member("c1/chained", OWNED),
    )


@case("symlink-chain-to-canary-write", "either")
def _(t: Target) -> bytes:
    return tar(
        symlink("c3", str(t.canary)),
        symlink("c2", "c3"),
        symlink("c1", "c2"),
        member("c1/precious", OWNED),
    )


@case("symlink-loop-write", "error")
def _(t: Target) -> bytes:
    return tar(symlink("a", "b"), symlink("b", "a"), member("a/x", OWNED))


@case("symlink-self-loop-write", "error")
def _(t: Target) -> bytes:
    return tar(symlink("self", "self"), member("self/x", OWNED))


@case("symlink-loop-replaced-by-file", "applied", _bytes_at(Path("a"), OWNED))
def _(t: Target) -> bytes:
    return tar(symlink("a", "b"), symlink("b", "a"), member("a", OWNED))


@case("symlink-proc-self-root-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("p", "/proc/self/root"), member("p/etc/pwned-by-layer", OWNED))


@case("symlink-proc-self-cwd-write", "either")
def _(t: Target) -> bytes:
    return tar(symlink("p", "/proc/self/cwd"), member("p/pwned-by-layer", OWNED))


@case("symlink-with-xattrs-and-mode", "applied", _kind("evil", stat.S_ISLNK))
def _(t: Target) -> bytes:
    # xattrs and times go on the link itself; a chmod must not follow it to the canary.
    records = (
        pax_record("SCHILY.xattr.trusted.pwned", "1")
        + pax_record("mtime", "1.5")
        + pax_record("linkpath", str(t.canary / "precious"))
    )
    return tar(pax(records) + header("evil", typeflag=b"2", linkname="placeholder", mode=0o4777))


# hard links


@case("hardlink-dotdot", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", "../outside"))


@case("hardlink-dotdot-to-canary", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", t.up_to(t.canary / "precious")))


@case("hardlink-abs-etc-shadow", "applied", _same_inode("h", "etc/shadow"))
def _(t: Target) -> bytes:
    return tar(hardlink("h", "/etc/shadow"))


@case("hardlink-abs-canary", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", str(t.canary / "precious")))


@case("hardlink-missing-target", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", "no/such/file"))


@case("hardlink-to-directory", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", "etc"))


@case("hardlink-to-layer-root", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", "/"))


@case("hardlink-through-dotdot-symlink", "applied", _same_inode("h", "etc/shadow"))
def _(t: Target) -> bytes:
    return tar(symlink("up", "../../../../.."), hardlink("h", "up/etc/shadow"))


@case("hardlink-through-abs-symlink", "error")
def _(t: Target) -> bytes:
    return tar(symlink("cs", str(t.canary)), hardlink("h", "cs/precious"))


@case(
    "hardlink-to-outward-symlink-then-write",
    "applied",
    _all(_bytes_at(Path("h"), OWNED), _kind("s", stat.S_ISLNK)),
)
def _(t: Target) -> bytes:
    return tar(symlink("s", str(t.canary / "precious")), hardlink("h", "s"), member("h", OWNED))


@case("hardlink-into-aufs-plnk", "error")
def _(t: Target) -> bytes:
    return tar(hardlink("h", ".wh..wh.plnk/123.456"))


# whiteouts


@case("whiteout-dotdot", "error")
def _(t: Target) -> bytes:
    return tar(member("../.wh.x"))


@case("whiteout-dotdot-to-canary", "error")
def _(t: Target) -> bytes:
    return tar(member(t.up_to(t.canary) + "/.wh.precious"))


@case("whiteout-abs-canary", "applied")
def _(t: Target) -> bytes:
    return tar(member(str(t.canary / ".wh.precious")))


@case("whiteout-through-abs-symlink", "either")
def _(t: Target) -> bytes:
    return tar(symlink("sym", str(t.canary)), member("sym/.wh.precious"))


@case("whiteout-through-rel-symlink-to-canary", "either")
def _(t: Target) -> bytes:
    return tar(symlink("sym", t.up_to(t.canary)), member("sym/.wh.precious"))


@case("whiteout-through-dotdot-symlink", "applied", _absent("precious"))
def _(t: Target) -> bytes:
    # resolves to the layer root: it deletes the layer's own copy, nothing else
    return tar(symlink("sym", "../../../../.."), member("sym/.wh.precious"))


@case("whiteout-empty-name", "error")
def _(t: Target) -> bytes:
    return tar(member(".wh."))


@case("whiteout-dot", "error")
def _(t: Target) -> bytes:
    return tar(member(".wh.."))


@case("whiteout-dot-slash-dot", "error")
def _(t: Target) -> bytes:
    return tar(member("./.wh.."))


@case("whiteout-dotdot-name", "error")
def _(t: Target) -> bytes:
    return tar(member(".wh..."))


@case("whiteout-subdir-dotdot-name", "error")
def _(t: Target) -> bytes:
    return tar(member("dir/.wh..."))


@case("whiteout-of-etc", "applied", _absent("etc"))
def _(t: Target) -> bytes:
    return tar(member(".wh.etc"))


@case("aufs-metadata-is-skipped", "applied", _absent(".wh..wh.aufs", ".wh..wh.orph"))
def _(t: Target) -> bytes:
    return tar(
        member(".wh..wh.aufs"),
        directory(".wh..wh.orph"),
        member(".wh..wh.plnk/123.456", OWNED),
    )


# opaque markers


@case("opaque-at-root", "applied", _only())
def _(t: Target) -> bytes:
    return tar(member(".wh..wh..opq"))


@case("opaque-at-root-keeps-new", "applied", _only("new"))
def _(t: Target) -> bytes:
    return tar(member("new", OWNED), member(".wh..wh..opq"))


@case("opaque-in-abs-symlinked-dir", "either")
def _(t: Target) -> bytes:
    return tar(symlink("sym", str(t.canary)), member("sym/.wh..wh..opq"))


@case("opaque-in-rel-symlinked-canary", "either")
def _(t: Target) -> bytes:
    return tar(symlink("sym", t.up_to(t.canary)), member("sym/.wh..wh..opq"))


@case("opaque-in-dotdot-symlinked-dir", "applied", why="prunes the layer root: still inside")
def _(t: Target) -> bytes:
    return tar(symlink("sym", "../../../../.."), member("sym/.wh..wh..opq"))


@case("opaque-as-directory-entry", "either")
def _(t: Target) -> bytes:
    return tar(directory(".wh..wh..opq"), directory("dir/.wh..wh..opq"))


@case("opaque-as-symlink-entry", "either")
def _(t: Target) -> bytes:
    return tar(symlink("dir/.wh..wh..opq", str(t.canary)))


@case("opaque-twice", "applied", _all(_kind("dir", stat.S_ISDIR), _absent("dir/keep")))
def _(t: Target) -> bytes:
    return tar(member("dir/.wh..wh..opq"), member("dir/.wh..wh..opq"))


@case("opaque-in-missing-dir", "applied", _kind("newdir", stat.S_ISDIR))
def _(t: Target) -> bytes:
    return tar(member("newdir/.wh..wh..opq"))


@case(
    "opaque-after-implied-parent",
    "applied",
    _only(),
    why="Docker's walk removes a/, made only as a parent (not an entry), whatever the fs",
)
def _(t: Target) -> bytes:
    return tar(member("a/b/file", OWNED), member(".wh..wh..opq"))


@case("opaque-dotdot", "error")
def _(t: Target) -> bytes:
    return tar(member("../.wh..wh..opq"))


# devices and fifos


@case("char-device", "applied", _kind("dev/evilnull", stat.S_ISCHR, (1, 3)))
def _(t: Target) -> bytes:
    return tar(directory("dev"), device("dev/evilnull", "char", 1, 3))


@case("block-device", "applied", _kind("dev/evilloop", stat.S_ISBLK, (7, 0)))
def _(t: Target) -> bytes:
    return tar(device("dev/evilloop", "block", 7, 0))


@case("char-device-absolute-name", "applied", _kind("dev/mem", stat.S_ISCHR, (1, 1)))
def _(t: Target) -> bytes:
    return tar(device("/dev/mem", "char", 1, 1))


@case("device-through-host-dev-symlink", "either")
def _(t: Target) -> bytes:
    return tar(symlink("d", "/dev"), device("d/snapdriver-hostile-null", "char", 1, 3))


@case("fifo", "applied", _kind("fifo", stat.S_ISFIFO))
def _(t: Target) -> bytes:
    return tar(fifo("fifo"))


@case("fifo-through-abs-symlink", "either")
def _(t: Target) -> bytes:
    return tar(symlink("d", str(t.host_canary)), fifo("d/fifo"))


@case("unknown-typeflag", "error")
def _(t: Target) -> bytes:
    return tar(header("weird", typeflag=b"Z"))


# broken streams

_FIRST = member("first", b"A" * 1000)
_SECOND = member("second", b"B" * 10_000)


@case("truncated-inside-first-header", "error")
def _(t: Target) -> bytes:
    return _FIRST[:300]


@case("truncated-inside-second-header", "error", why="Go's reader: io.ErrUnexpectedEOF")
def _(t: Target) -> bytes:
    return _FIRST + _SECOND[:300]


@case("truncated-inside-data", "error")
def _(t: Target) -> bytes:
    return _FIRST + _SECOND[:4000]


@case("truncated-inside-padding", "either")
def _(t: Target) -> bytes:
    return _FIRST + _SECOND[: BLOCK + 10_000 + 10]


@case("no-end-of-archive", "applied", _bytes_at(Path("first"), b"A" * 1000))
def _(t: Target) -> bytes:
    return _FIRST


@case("garbage-text", "error")
def _(t: Target) -> bytes:
    return b"this is not a tar stream at all\n" * 200


@case("garbage-random", "error")
def _(t: Target) -> bytes:
    return random.Random(1).randbytes(64 * 1024)


@case("zero-block-then-entry", "error", why="Go: a zero block then a header is tar.ErrHeader")
def _(t: Target) -> bytes:
    return member("first", OWNED) + bytes(BLOCK) + tar(member("second", OWNED))


@case("garbage-after-first-entry", "error", why="Go's reader: tar.ErrHeader (bad checksum)")
def _(t: Target) -> bytes:
    return _FIRST + random.Random(2).randbytes(4 * BLOCK) + END


@case("size-lies-bigger-than-data", "error")
def _(t: Target) -> bytes:
    return header("liar", size=1 << 20) + b"x" * 10 + pad(10) + END


@case("size-negative-octal", "error", why="Go: ParseUint fails, tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(header("neg", size_field=b"-0000000001\0") + bytes(BLOCK), member("after", OWNED))


@case("size-overflowing-octal", "error")
def _(t: Target) -> bytes:
    return header("huge", size_field=b"777777777777") + b"x" * 100 + pad(100) + END


@case("size-invalid-octal", "error")
def _(t: Target) -> bytes:
    return tar(header("bad", size_field=b"0000000009\0\0"))


@case("size-base256", "applied", _bytes_at(Path("b256"), b"hello"))
def _(t: Target) -> bytes:
    data = b"hello"
    return tar(header("b256", size_field=b"\x80" + len(data).to_bytes(11, "big")) + data + pad(5))


@case("size-base256-negative", "error", why="Go: hdr.Size < 0 is tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(header("neg256", size_field=b"\xff" * 12), member("after", OWNED))


@case("size-base256-huge", "error")
def _(t: Target) -> bytes:
    return header("huge256", size_field=b"\x80" + b"\xff" * 11) + b"x" * 100 + pad(100) + END


@case("checksum-bad-first", "error")
def _(t: Target) -> bytes:
    return tar(header("bad", size=0, checksum=b"0000000\0"))


@case("checksum-bad-second", "error", why="Go's reader: tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(member("first", OWNED), header("second", checksum=b"0000000\0"))


# long names and PAX


@case("pax-path-10000-chars", "error")
def _(t: Target) -> bytes:
    return tar(member("a" * 10_000, OWNED))


@case("pax-path-10000-chars-of-components", "either")
def _(t: Target) -> bytes:
    return tar(member(("abcdefgh/" * 1112)[:9_999] + "z", OWNED))


@case("gnu-longname-300", "applied", _bytes_at(Path("x" * 99, "y" * 99, "z" * 100), OWNED))
def _(t: Target) -> bytes:
    name = "x" * 99 + "/" + "y" * 99 + "/" + "z" * 100
    return tar(gnu_longname(name), header("short", size=len(OWNED)) + OWNED + pad(len(OWNED)))


@case("gnu-longname-dotdot", "error")
def _(t: Target) -> bytes:
    name = "../" * 40 + "escaped"
    return tar(gnu_longname(name), header("short", size=len(OWNED)) + OWNED + pad(len(OWNED)))


@case("gnu-longname-10000", "error")
def _(t: Target) -> bytes:
    return tar(gnu_longname("b" * 10_000), header("short"))


@case("gnu-longname-truncated", "error")
def _(t: Target) -> bytes:
    return header(b"././@LongLink", typeflag=b"L", size=5000) + b"c" * 700


@case("gnu-longlink-dotdot-hardlink", "error")
def _(t: Target) -> bytes:
    return tar(gnu_longname("../" * 40 + "etc/shadow", b"K"), header("h", typeflag=b"1"))


@case("pax-huge-record", "either")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("comment", "c" * (8 << 20))), member("after-comment", OWNED))


@case("pax-huge-xattr", "either")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("SCHILY.xattr.user.big", "v" * (1 << 20))), header("xattr-file"))


@case("pax-record-length-too-big", "error", why="Go: parsePAXRecord, tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(b"99999 path=x\n"), header("plain"))


@case("pax-record-length-zero", "error")
def _(t: Target) -> bytes:
    return tar(pax(b"0 path=x\n"), header("plain"))


@case("pax-record-length-zero-second", "error", why="Go: tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(member("first", OWNED), pax(b"0 path=x\n"), header("plain"))


@case("pax-record-garbage", "error", why="Go: tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(b"abc path=x\n" * 10), header("plain"))


@case("pax-path-with-nul", "error", why="Go: NUL in a PAX path is tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("path", "a\0b")), header("plain"))


@case("pax-size-negative", "error", why="Go: tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("size", "-5")), header("plain"), member("after", OWNED))


@case("pax-uid-overflow", "error", why="Go: uid out of range, tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("uid", "9" * 30)), header("bigid"))


@case("pax-mtime-infinite", "error", why="Go: parsePAXTime fails, tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("mtime", "1e400")), header("inf"))


@case("pax-mtime-nan", "error", why="Go: parsePAXTime fails, tar.ErrHeader")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("mtime", "nan")), header("nan"))


@case("pax-global-header", "either")
def _(t: Target) -> bytes:
    return tar(pax(pax_record("path", "../global-escape"), b"g"), member("after-global", OWNED))


# empty-ish bodies


@case("zero-byte-body", "applied", _only(*sorted({n.split("/")[0] for n in BASE_FILES})))
def _(t: Target) -> bytes:
    return b""


@case("one-mib-of-zeros", "applied", _only(*sorted({n.split("/")[0] for n in BASE_FILES})))
def _(t: Target) -> bytes:
    return bytes(1 << 20)


@case("root-entry-as-file", "error")
def _(t: Target) -> bytes:
    return tar(member("./", OWNED))


# very deep trees

_DEEP_NAMES = ["d/" * i for i in range(1, DEEP + 1)]
_DEEP_DIRS = b"".join(directory(name) for name in _DEEP_NAMES)


def _deep_file(layer: Path, target: Target) -> None:
    assert read_at_depth(layer, "d", DEEP, "bottom") == OWNED


@case("deep-2000-directories", "applied", _deep_file, deep=True)
def _(t: Target) -> bytes:
    return tar(_DEEP_DIRS, member("d/" * DEEP + "bottom", OWNED))


@case("deep-2000-file-without-directories", "applied", _deep_file)
def _(t: Target) -> bytes:
    return tar(member("d/" * DEEP + "bottom", OWNED))


@case("deep-2000-then-whiteout", "applied", _absent("d"))
def _(t: Target) -> bytes:
    return tar(_DEEP_DIRS, member(".wh.d"))


@case("deep-2000-replaced-by-file", "applied", _bytes_at(Path("d"), OWNED))
def _(t: Target) -> bytes:
    return tar(_DEEP_DIRS, member("d", OWNED))


@case(
    "deep-2000-then-opaque-parent",
    "applied",
    _all(_kind("dir/d", stat.S_ISDIR), _absent("dir/keep")),
    why="the opaque prune walks the 2,000 directories this tar made",
)
def _(t: Target) -> bytes:
    # Under dir/ (from the base layer), so the prune lists dir/ afresh and sees the new tree.
    deep = b"".join(directory("dir/" + name) for name in _DEEP_NAMES)
    return tar(deep, member("dir/.wh..wh..opq"))
