"""The random walks' shared half: the model of a layer's content, Docker's tar and whiteout rules
as the model reads them, random layer contents drawn against the model, and the runner.

Each front drives it with its own state machine (tests/hardening/test_random_walk.py over the
GraphDriver socket, tests/hardening/test_random_walk_containerd.py over snapshots.v1 gRPC); both
keep what each layer must hold as a :data:`Content` and change it only with
:func:`apply_entries`, so there is one model, whatever wrote the layer (a tar through ApplyDiff,
or files written into a mounted directory by :func:`write_entries`).

Budgets come from the environment (``SNAPDRIVER_WALK_EXAMPLES``, ``SNAPDRIVER_WALK_STEPS``, each
front with its own defaults, smaller on ZFS); ``SNAPDRIVER_WALK_SEED`` picks a seed, otherwise
the walk is derandomized. A failure prints hypothesis's ``@reproduce_failure`` blob, the seed
and the front's log.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from snapdriver_zfs.testing import skip_without_zfs

from snapdriver.testing.loopfs import can_make_loop_filesystems
from tests.conftest import skip_tier
from tests.storage import Space, open_space

MiB = 1 << 20
SEED = os.environ.get("SNAPDRIVER_WALK_SEED")
SPACING = 5  # steps between kills, and between disk fills
NAMES = ("a", "b", "c")
NO_SPACE = "no space left on device"
#: The size of the filesystem (btrfs) or pool (ZFS) a walk may fill.
SIZE_MB = 256

#: A layer's content: relative path -> ("dir", b""), ("file", bytes) or ("link", target).
Node = tuple[str, bytes]
Content = dict[str, Node]
#: One change: (kind, path, payload), kind one of file, dir, link, whiteout, opaque.
Entry = tuple[str, str, bytes]


def budget(examples: int, steps: int) -> tuple[int, int]:
    """Sequences and steps per sequence: the environment's, else the given defaults."""
    return (
        int(os.environ.get("SNAPDRIVER_WALK_EXAMPLES", examples)),
        int(os.environ.get("SNAPDRIVER_WALK_STEPS", steps)),
    )


# -- the model's tar rules -----------------------------------------------------------------------


def remove_tree(content: Content, path: str) -> None:
    for key in [k for k in content if k == path or k.startswith(path + "/")]:
        del content[key]


def apply_entries(content: Content, entries: list[Entry]) -> Content:
    """Docker's UnpackLayer as the model reads it; parents always exist in generated tars."""
    result = dict(content)
    for kind, path, payload in entries:
        if kind == "whiteout":
            remove_tree(result, path)
        elif kind == "opaque":
            remove_tree(result, path)
            result[path] = ("dir", b"")
        elif kind == "dir" and result.get(path, ("", b""))[0] == "dir":
            continue  # an existing directory is kept, with its contents
        else:
            remove_tree(result, path)
            result[path] = (kind, payload)
    return result


def build_tar(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, path, payload in entries:
            parent, base = posixpath.split(path)
            if kind == "whiteout":
                info = tarfile.TarInfo(posixpath.join(parent, ".wh." + base))
            elif kind == "opaque":
                info = tarfile.TarInfo(path + "/.wh..wh..opq")
            else:
                info = tarfile.TarInfo(path)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, payload.decode()
            if kind == "file":
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def parse_tar(data: bytes) -> list[Entry]:
    """A Diff's tar as model entries (whiteouts and opaque markers recognised)."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            path = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
            parent, base = posixpath.split(path)
            if path in (".", ""):
                continue
            if base == ".wh..wh..opq":
                entries.append(("opaque", parent, b""))
            elif base.startswith(".wh."):
                entries.append(("whiteout", posixpath.join(parent, base[4:]), b""))
            elif member.isdir():
                entries.append(("dir", path, b""))
            elif member.issym():
                entries.append(("link", path, member.linkname.encode()))
            elif member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                entries.append(("file", path, source.read()))
            else:
                raise AssertionError(f"unexpected entry in a Diff: {member.name} ({member.type!r})")
    return entries


def read_tree(root: Path) -> Content:
    content: Content = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                content[rel] = ("link", os.readlink(full).encode())
            elif full.is_dir():
                content[rel] = ("dir", b"")
            else:
                content[rel] = ("file", full.read_bytes())
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return content


def write_entries(root: Path, entries: list[Entry]) -> None:
    """Make the entries' changes in a mounted directory, as a container or containerd's unpack
    would (whiteouts become deletions); symlinks under ``root`` are replaced, never followed."""
    for kind, path, payload in entries:
        target = root / path
        if kind == "dir" and target.is_dir() and not target.is_symlink():
            continue
        if target.is_dir() and not target.is_symlink():
            if kind == "opaque":
                for child in list(target.iterdir()):
                    _delete(child)
                continue
            shutil.rmtree(target)
        elif target.is_symlink() or target.exists():
            target.unlink()
        if kind in ("dir", "opaque"):
            target.mkdir()
        elif kind == "link":
            target.symlink_to(payload.decode())
        elif kind == "file":
            target.write_bytes(payload)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_changes(base: Content, layer: Content, kinds: dict[str, int]) -> None:
    """Changes against the two models: Docker's kinds (0 modify, 1 add, 2 delete)."""
    for path in layer.keys() - base.keys():
        assert kinds.get(path) == 1, f"{path} added but reported as {kinds.get(path)}"
    for path in base.keys() - layer.keys():
        # Only the topmost deleted path is reported, and only below a directory: Docker does not
        # look into an old directory that became a file or link (its whole tree is "changed").
        parent = posixpath.dirname(path)
        if "/" not in path or layer.get(parent, ("", b""))[0] == "dir":
            assert kinds.get(path) == 2, f"{path} deleted but reported as {kinds.get(path)}"
    for path in base.keys() & layer.keys():
        if base[path] != layer[path] and "dir" not in (base[path][0], layer[path][0]):
            assert path in kinds, f"{path} changed but not reported"
    for path, kind in kinds.items():
        if kind == 1:
            assert path in layer, f"{path} reported added but absent"
        elif kind == 2:
            assert path in base, f"{path} reported deleted but never there"
            assert path not in layer or layer[path][0] != base[path][0], f"{path} still there"
        else:
            assert path in base and path in layer, f"{path} reported modified"


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (unbuffered: closing it writes nothing)."""
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\xa5" * MiB)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise


def big_tar(total: int) -> Iterator[bytes]:
    """``total`` bytes of file content in 8 MiB files, streamed."""
    for i in range(total // (8 * MiB)):
        info = tarfile.TarInfo(f"big/{i:03d}")
        info.size = 8 * MiB
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        for _ in range(8):
            yield b"\x5a" * MiB
    yield b"\0" * 1024


# -- the filesystem a walk fills ----------------------------------------------------------------


@contextlib.contextmanager
def walk_space(backend: str, homes: Path) -> Iterator[tuple[Space, int]]:
    """A :data:`SIZE_MB` btrfs or ZFS pool of the walk's own (:func:`tests.storage.open_space`),
    and its free bytes while empty: a Remove after a disk fill must give back most of them."""
    if backend == "btrfs":
        reason = can_make_loop_filesystems()
        if reason:
            skip_tier("btrfs", reason)
    else:
        skip_without_zfs()
    with open_space(backend, homes, SIZE_MB) as space:
        yield space, space.free()


def given_back(space: Space, room: int) -> bool:
    """Most of the ``room`` the space had empty is free again."""
    return space.free() > room // 2


# -- drawing layer contents against the model --------------------------------------------------


def draw_entries(data: st.DataObject, content: Content, counts: Counter[str]) -> list[Entry]:
    """A small layer's entries, each valid against the content at its point in the layer."""
    state = dict(content)
    entries: list[Entry] = []
    unpacked: set[str] = set()
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["file", "file", "dir", "link", "whiteout", "opaque"]))
        path, payload = draw_path(data, state, kind, unpacked), b""
        if path is None:
            continue
        if kind == "file":
            payload = data.draw(st.binary(max_size=64)) * data.draw(st.sampled_from([1, 97]))
        elif kind == "link":
            payload = data.draw(st.sampled_from([b"a", b"../b", b"/c/a", b"missing"]))
        entries.append((kind, path, payload))
        if kind == "whiteout" and path in state:
            counts["whiteouts that removed something"] += 1
        if kind == "opaque" and any(k.startswith(path + "/") for k in state):
            counts["opaques that emptied a directory"] += 1
        state = apply_entries(state, [entries[-1]])
        unpacked.add(path)
    return entries


def draw_path(data: st.DataObject, state: Content, kind: str, unpacked: set[str]) -> str | None:
    """A new name in an existing directory; for whiteouts, mostly an existing path."""
    if kind == "opaque":  # only where nothing below was unpacked by this tar yet
        dirs = [p for p, n in state.items() if n[0] == "dir"]
        dirs = [d for d in dirs if not any(u.startswith(d + "/") for u in unpacked)]
        return data.draw(st.sampled_from(sorted(dirs))) if dirs else None
    if kind == "whiteout" and state and data.draw(st.booleans()):
        return data.draw(st.sampled_from(sorted(state)))
    dirs = ["", *sorted(p for p, n in state.items() if n[0] == "dir")]
    parent = data.draw(st.sampled_from(dirs))
    return posixpath.join(parent, data.draw(st.sampled_from(NAMES)))


# -- the state machines' common part and the runner -------------------------------------------


class ModelWalk(RuleBasedStateMachine):
    """Step counting and spacing for kills and disk fills; figures in ``counts``.

    Subclasses set ``counts`` on the class (shared by every sequence of one test).
    """

    counts: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        #: Steps so far, and the step of the last kill and disk fill: each is one step in several,
        #: not one in three when swarm testing leaves few rules enabled.
        self.step = 0
        self.last: Counter[str] = Counter()
        self.counts["sequences"] += 1

    def spaced(self, what: str) -> bool:
        return self.step - self.last[what] >= SPACING if self.last[what] else True

    def disk_filled(self) -> None:
        """Count a disk fill (by a container or by an ApplyDiff) and space the next one."""
        self.counts["disk fills"] += 1
        self.last["full"] = self.step

    def stepped(self, layers: int) -> None:
        """Count one step and its check of ``layers`` layers (from the invariant)."""
        self.counts["checks"] += 1
        self.step += 1
        self.counts["layer checks"] += layers

    def draw_entries(self, data: st.DataObject, content: Content) -> list[Entry]:
        return draw_entries(data, content, self.counts)


def run_walk(
    machine: type[ModelWalk],
    budget: tuple[int, int],
    figure: Callable[[str], None],
    title: str,
    *,
    log_tail: Callable[[], str],
) -> None:
    """Run the walk within ``budget`` (sequences, steps); report its figures under ``title``."""
    counts: Counter[str] = Counter()
    machine.counts = counts
    factory = seed(int(SEED))(machine) if SEED is not None else machine
    examples, steps = budget
    config = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    started = time.monotonic()
    try:
        run_state_machine_as_test(factory, settings=config)
    except BaseException:
        print(f"{title} failed; seed: {SEED or 'derandomized (no SNAPDRIVER_WALK_SEED)'}")
        print(log_tail())
        raise
    walked = counts["checks"] - counts["sequences"]  # one check before the first step
    figure(
        f"{title}: {counts['sequences']} sequences, {walked} steps, {counts['calls']} calls "
        f"({counts['writes']} layer writes, {counts['whiteouts that removed something']} "
        f"whiteouts and {counts['opaques that emptied a directory']} opaque directories that "
        f"removed something), {counts['kills']} kills, {counts['disk fills']} disk fills, "
        f"{counts['disk-full errors']} disk-full errors, 0 layers lost or changed in "
        f"{counts['layer checks']} layer checks "
        f"({time.monotonic() - started:.0f} s, seed {SEED or 'derandomized'})"
    )
