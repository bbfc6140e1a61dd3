"""Tar export (Go-like bytes) and safe apply, on real directories."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from snapdriver.errors import ArchiveError
from snapdriver.layers.apply import apply_tar
from snapdriver.layers.archive import Header, export_changes, export_tree
from snapdriver.layers.changes import Change, ChangeKind, walk_changes


def tar_bytes(write: object) -> bytes:
    chunks: list[bytes] = []
    write(chunks.append)  # type: ignore[operator]
    return b"".join(chunks)


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def entry(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


def sample_tree(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    os.link(root / "etc" / "hosts", root / "etc" / "hosts.bak")
    os.symlink("../etc/hosts", root / "etc" / "link")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / "long-named-file").write_bytes(os.urandom(3000))
    os.mkfifo(root / "fifo")
    os.chmod(root / "etc", 0o750)


def test_empty_diff_is_go_end_of_archive(tmp_path: Path) -> None:
    assert tar_bytes(lambda sink: export_changes(tmp_path, [], sink)) == bytes(1024)


def test_headers_are_go_like() -> None:
    block = Header(name=b"etc/", mode=0o40755, uname="root", gname="root", typeflag=b"5").block()
    assert block[100:108] == b"0040755\0", "mode carries the file type bits"
    assert block[329:345] == b"0000000\0" * 2, "device numbers are octal zeros"
    assert block[257:265] == b"ustar\x0000"
    assert block[265:269] == b"root"
    assert tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape").name == "etc"


def test_export_then_apply_reproduces_the_tree(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    sample_tree(source)
    data = tar_bytes(lambda sink: export_tree(source, sink))
    assert data == tar_bytes(lambda sink: export_tree(source, sink)), "output must be stable"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["etc/hosts.bak"].islnk() and members["etc/hosts.bak"].linkname == "etc/hosts"
    size = apply_tar(target, io.BytesIO(data))
    assert size == sum(m.size for m in members.values())
    assert walk_changes(target, source) == [], "apply(export(tree)) must equal the tree"
    assert (target / "etc" / "hosts").stat().st_ino == (target / "etc" / "hosts.bak").stat().st_ino


def test_whiteouts_name_deleted_entries(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    changes = [Change("/dir", ChangeKind.MODIFY), Change("/dir/gone", ChangeKind.DELETE)]
    data = tar_bytes(lambda sink: export_changes(tmp_path, changes, sink))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["dir", "dir/.wh.gone"]


def test_apply_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "old").write_text("x")
    (tmp_path / "gone").write_text("x")
    (tmp_path / "opaque").mkdir()
    (tmp_path / "opaque" / "hidden").write_text("x")
    data = make_tar(
        entry(".wh.gone"),
        entry("opaque", tarfile.DIRTYPE),
        entry("opaque/.wh..wh..opq"),
        entry("opaque/new", data=b"fresh"),
        entry("keep/added", data=b"a"),
    )
    apply_tar(tmp_path, io.BytesIO(data))
    assert not (tmp_path / "gone").exists()
    assert sorted(os.listdir(tmp_path / "opaque")) == ["new"]
    assert sorted(os.listdir(tmp_path / "keep")) == ["added", "old"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([entry("../escape", data=b"x")], "outside the layer"),
        ([entry("a/../../escape", data=b"x")], "outside the layer"),
        ([entry(".wh.")], "names no entry"),
        ([entry("sub/.wh..")], "names no entry"),
        ([entry("link", tarfile.LNKTYPE, linkname="missing")], "does not exist"),
    ],
)
def test_hostile_entries_are_refused(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    with pytest.raises(ArchiveError, match=message):
        apply_tar(layer, io.BytesIO(make_tar(*members)))
    assert sorted(os.listdir(tmp_path)) == ["layer"], "nothing may appear outside the layer"


def test_symlinks_resolve_inside_the_layer(tmp_path: Path) -> None:
    layer, outside = tmp_path / "layer", tmp_path / "outside"
    layer.mkdir()
    outside.mkdir()
    data = make_tar(
        entry("etc", tarfile.SYMTYPE, linkname=str(outside)),
        entry("etc/passwd", data=b"owned"),
        entry("up", tarfile.SYMTYPE, linkname="../../../.."),
        entry("up/tmp-file", data=b"owned"),
        entry("hard", tarfile.LNKTYPE, linkname="../outside/x"),
    )
    with pytest.raises(ArchiveError):
        apply_tar(layer, io.BytesIO(data))
    assert os.listdir(outside) == [], "a symlink let the tar write outside the layer"


def test_absolute_names_are_layer_relative(tmp_path: Path) -> None:
    apply_tar(tmp_path, io.BytesIO(make_tar(entry("/etc/motd", data=b"hi"))))
    assert (tmp_path / "etc" / "motd").read_bytes() == b"hi"
    assert oct((tmp_path / "etc").stat().st_mode & 0o777) == oct(0o600), "Docker's MkdirAll mode"


@pytest.mark.parametrize("garbage", [b"not a tar at all" * 64, b"\0" * 100 + b"x" * 900])
def test_garbage_is_an_archive_error(tmp_path: Path, garbage: bytes) -> None:
    with pytest.raises(ArchiveError, match="invalid layer tar"):
        apply_tar(tmp_path, io.BytesIO(garbage))


def test_truncated_stream_is_an_archive_error(tmp_path: Path) -> None:
    data = make_tar(entry("big", data=os.urandom(10_000)))
    with pytest.raises(ArchiveError):
        apply_tar(tmp_path, io.BytesIO(data[:4000]))


def test_empty_stream_is_an_empty_layer(tmp_path: Path) -> None:
    assert apply_tar(tmp_path, io.BytesIO(b"")) == 0


def test_ownership_mode_and_setuid_survive(tmp_path: Path) -> None:
    data = make_tar(entry("tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000))
    apply_tar(tmp_path, io.BytesIO(data))
    st = (tmp_path / "tool").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o4755)


def two_entries() -> bytes:
    """``a`` (header at 0, data at 512) then ``b`` (header at 1024), then the end marker."""
    data = make_tar(entry("a", data=b"x" * 100), entry("b", data=b"y"))
    assert data[1024 + 257 : 1024 + 262] == b"ustar"  # b's header is where the cases cut
    return data


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("cut-in-second-header", "ends inside a header"),
        ("bad-checksum-second", "bad header at byte 1024"),
        ("zero-block-then-entry", "data follows its end-of-archive marker"),
        ("zero-block-then-partial", "ends inside its end-of-archive marker"),
    ],
)
def test_damage_after_the_first_entry_is_refused_as_go_does(
    tmp_path: Path, case: str, message: str
) -> None:
    data = bytearray(two_entries())
    if case == "cut-in-second-header":
        data = data[: 1024 + 100]
    elif case == "bad-checksum-second":
        data[1024 + 148 : 1024 + 156] = b"0000000\0"
    elif case == "zero-block-then-entry":
        data[1024:1024] = bytes(512)
    else:
        data = data[:1024] + bytes(512) + b"\1" * 100
    with pytest.raises(ArchiveError, match=f"invalid layer tar: .*{message}"):
        apply_tar(tmp_path, io.BytesIO(bytes(data)))


@pytest.mark.parametrize("end", ["no-marker", "one-zero-block", "two-zero-blocks-and-junk"])
def test_ends_go_accepts(tmp_path: Path, end: str) -> None:
    body = two_entries()[: 1536 + 512]  # both entries with their data, no end marker
    tail = {"no-marker": b"", "one-zero-block": bytes(512)}.get(end, bytes(1024) + b"junk")
    assert apply_tar(tmp_path, io.BytesIO(body + tail)) == 101
    assert (tmp_path / "a").read_bytes() == b"x" * 100 and (tmp_path / "b").read_bytes() == b"y"


def test_a_stream_of_zeros_is_an_empty_layer(tmp_path: Path) -> None:
    assert apply_tar(tmp_path, io.BytesIO(bytes(1 << 20))) == 0
    assert list(tmp_path.iterdir()) == []


def test_a_file_replaces_whatever_is_there(tmp_path: Path) -> None:
    """Dockerd's rule: an existing entry is replaced unless both are directories; a symlink in
    the way is replaced, never written through."""
    layer, outside = tmp_path / "layer", tmp_path / "outside"
    layer.mkdir()
    outside.write_text("keep")
    (layer / "was-dir" / "sub").mkdir(parents=True)
    (layer / "was-dir" / "sub" / "f").write_text("x")
    (layer / "was-link").symlink_to(outside)
    (layer / "was-file").write_text("old, and longer than the new content")
    mtime = 1_600_000_000
    pax = {"SCHILY.xattr.user.snapdriver": "v"}
    names = ("was-dir", "was-link", "was-file", "new")
    data = make_tar(
        *(entry(n, data=n.encode(), mode=0o640, mtime=mtime, pax_headers=pax) for n in names)
    )
    apply_tar(layer, io.BytesIO(data))
    assert outside.read_text() == "keep"
    for name in names:
        st = os.lstat(layer / name)
        assert stat.S_ISREG(st.st_mode), name
        assert (layer / name).read_bytes() == name.encode()
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, mtime * 10**9), name
        assert os.getxattr(layer / name, "user.snapdriver") == b"v"
