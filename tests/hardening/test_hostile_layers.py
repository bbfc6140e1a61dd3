"""Hostile layer tars through ApplyDiff, over the real socket, into real btrfs subvolumes or ZFS
datasets.

Every input of :mod:`tests.hardening.corpus` is applied to a fresh layer created on a base layer.
Before the first one, everything the plugin must never touch is recorded: the whole btrfs
filesystem outside the plugin's Home (including a canary directory the corpus aims at), the base
layer and a sibling layer inside Home (every path, size, mode, owner, times, xattrs and sha256),
and a canary directory on the host's own filesystem. After each input:

* nothing recorded has changed (the figure reported is the bytes that differ: 0);
* the reply is 200 with a size, or a non-200 ``{"Err": "..."}`` on one line without a traceback,
  and hostile input is a client error (4xx), never an internal error (500);
* the outcome is the one the case expects (see the corpus), and an applied layer holds what it
  should;
* the plugin still answers ``Plugin.Activate`` on a new connection;
* after a failed ApplyDiff the layer does not exist, and ``Remove`` succeeds and leaves no
  subvolume; after a successful one ``Remove`` does the same;
* for the 2,000-deep tree, Changes and Diff answer within ``SNAPDRIVER_DEEP_BUDGET`` seconds
  (by default 180 on btrfs, 600 on ZFS: see :data:`DEEP_BUDGET`) without running into Python's
  recursion limit, and a Diff they give applies again.

The figures go to the run's summary (the ``figure`` fixture):
``HOSTILE LAYERS (btrfs): N inputs, E clear errors, A applied inside the layer, 0 bytes outside,
...``.

On ZFS (the lab) a layer is mounted at ``<Home>/mnt/<id>`` only while it is in use, so the base and
the sibling are held (Get) for the whole module to be recorded, and "outside Home" is the host
directory around Home plus the list of datasets below the root. The whole corpus runs there too;
``SNAPDRIVER_ZFS_HOSTILE=subset`` runs only :data:`ZFS_CASES`, for a quick look: the inputs that
aim at where layers live (``..``, absolute paths, symlinks, hard links, whiteouts and devices
towards the canaries, the sibling, the host), plus a few malformed archives (26 inputs, 111 s in
the lab); the rest exercise the tar reader, which is the same code on both backends.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapdriver.testing.conformance import Plugin
from snapdriver.testing.process import PluginProcess
from snapdriver.testing.trees import read_at_depth
from tests.hardening.corpus import (
    BASE_FILES,
    CANARY_FILES,
    CASES,
    DEEP,
    OWNED,
    SIBLING_FILES,
    Case,
    Target,
    tree_tar,
)
from tests.storage import Space, Storage

ZFS_CASES = (
    "dotdot-file",
    "dotdot-to-canary",
    "absolute-etc-passwd",
    "absolute-canary-path",
    "symlink-abs-host-dir-write",
    "symlink-abs-canary-dir-write",
    "symlink-dotdot-write",
    "symlink-rel-canary-write",
    "symlink-rel-sibling-write",
    "symlink-chain-to-canary-write",
    "symlink-proc-self-root-write",
    "symlink-proc-self-cwd-write",
    "hardlink-dotdot-to-canary",
    "hardlink-abs-canary",
    "hardlink-to-layer-root",
    "hardlink-through-abs-symlink",
    "whiteout-dotdot-to-canary",
    "whiteout-through-rel-symlink-to-canary",
    "opaque-at-root",
    "opaque-in-rel-symlinked-canary",
    "char-device",
    "device-through-host-dev-symlink",
    "garbage-random",
    "truncated-inside-data",
    "one-mib-of-zeros",
    "root-entry-as-file",
)
ZFS_SUBSET = os.environ.get("SNAPDRIVER_ZFS_HOSTILE", "") == "subset"

MANIFEST = b'{"Implements":["GraphDriver"]}\n'
#: Files in Home the plugin keeps for its own bookkeeping (the layer records; the btrfs backend's
#: qgroups still to destroy, when quotas are on): the only files outside a layer that may change.
PLUGIN_METADATA = ("snapdriver.db", "qgroups.pending")
#: Paths the corpus aims at on the host (through /proc/self/root, /proc/self/cwd, /dev).
HOST_SENTINELS = (
    Path("/etc/pwned-by-layer"),
    Path("/dev/snapdriver-hostile-null"),
    Path.cwd() / "pwned-by-layer",
    Path("/pwned-by-layer"),
)
HOST_FILES = (Path("/etc/passwd"), Path("/etc/shadow"))
#: How long Changes or Diff of the 2,000-deep layer may take before it counts as hung. More on
#: ZFS: ``zfs diff`` prints every changed object's whole path, found by walking up its parents,
#: so the 2,000-deep tree gives 4 MB of paths; that took ~200 s of the lab's emulated CPU alone.
DEEP_BUDGET = {
    backend: float(os.environ.get("SNAPDRIVER_DEEP_BUDGET", default))
    for backend, default in (("btrfs", 180), ("zfs", 600))
}


# -- the wire ------------------------------------------------------------------------------------


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def post(
    sock: Path, path: str, body: bytes | Iterable[bytes] = b"", timeout: float = 900.0
) -> tuple[int, bytes]:
    """One request on a new connection, as dockerd sends it (an iterable body goes chunked)."""
    conn = _UnixHTTP(sock, timeout)
    try:
        headers = {"Host": "", "Accept": "application/vnd.docker.plugins.v1.2+json"}
        chunked = not isinstance(body, bytes)
        conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def call(sock: Path, method: str, timeout: float = 900.0, **payload: Any) -> tuple[int, bytes]:
    body = json.dumps(payload).encode() + b"\n"
    return post(sock, f"/GraphDriver.{method}", body, timeout=timeout)


def error_message(status: int, body: bytes) -> str:
    """The ``Err`` of a non-200 reply, after checking its form; fails the test otherwise."""
    assert status != 200
    try:
        reply = json.loads(body)
    except ValueError:
        pytest.fail(f"non-200 reply ({status}) is not JSON: {body[:200]!r}")
    assert isinstance(reply, dict) and list(reply) == ["Err"], f"not {{'Err': ...}}: {reply!r}"
    message = reply["Err"]
    assert isinstance(message, str) and message.strip(), f"empty error message: {reply!r}"
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    assert "Traceback" not in message, f"error carries a traceback: {message!r}"
    assert body.endswith(b"\n") and body.count(b"\n") == 1, "reply is one JSON line"
    return message


# -- what must not change --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: int
    size: int  # of a regular file; 0 for anything else
    details: tuple[object, ...] = ()


State = dict[str, Entry]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    found = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return tuple(found)


def _entry(path: str, st: os.stat_result, volatile: bool) -> Entry:
    kind = stat.S_IFMT(st.st_mode)
    if volatile:
        return Entry(kind, 0)
    common = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, _xattrs(path))
    if stat.S_ISREG(kind):
        extra = (st.st_ctime_ns, st.st_nlink, _sha256(path))
        return Entry(kind, st.st_size, (*common, *extra))
    if stat.S_ISLNK(kind):
        return Entry(kind, 0, (*common, os.readlink(path)))
    if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        return Entry(kind, 0, (*common, st.st_rdev))
    return Entry(kind, 0, common)


def capture(
    root: Path,
    skip: Callable[[str], bool] = lambda path: False,
    volatile: Callable[[str], bool] = lambda path: False,
) -> State:
    """Every path below ``root`` (itself included) with its metadata and content hash.

    Iterative, never follows a symlink; ``skip`` prunes a path and what is below it,
    ``volatile`` keeps only its presence and type (directories whose times move with layers).
    """
    state: State = {}
    stack = [str(root)]
    while stack:
        path = stack.pop()
        if skip(path):
            continue
        st = os.lstat(path)
        state[path] = _entry(path, st, volatile(path))
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                stack.extend(entry.path for entry in entries)
    return state


def differences(before: State, after: State) -> tuple[list[str], int]:
    """The paths that differ, and the bytes involved: the sizes of the files added, removed or
    rewritten (0 for a change of metadata only)."""
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    empty = Entry(0, 0)
    return changed, sum(max(before.get(p, empty).size, after.get(p, empty).size) for p in changed)


# -- the plugin and what it guards --------------------------------------------------------------


@dataclass
class Outcome:
    case: str
    status: int = 0
    message: str = ""
    applied_inside: bool = False
    clear_error: bool = False
    bytes_outside: int = 0
    alive: bool = False
    notes: list[str] = field(default_factory=list)


#: Per backend, the outcome of each input.
RESULTS: dict[str, list[Outcome]] = {"btrfs": [], "zfs": []}


@dataclass
class Env:
    plugin: Plugin
    storage: Storage
    #: What the plugin must leave alone around Home: the btrfs filesystem, or (zfs) the host
    #: directory that holds Home and the canary.
    outside: Path
    canary: Path
    host_canary: Path
    base: str
    sibling: str
    baseline: dict[str, State] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)  # the layers under test: not snapshotted

    @property
    def sock(self) -> Path:
        return self.plugin.process.socket

    @property
    def home(self) -> Path:
        return self.storage.home

    @property
    def backend(self) -> str:
        return self.storage.backend

    @property
    def layers(self) -> Path:
        """Where layers are: every subvolume (btrfs), or the mounted ones (zfs)."""
        return self.home / ("subvolumes" if self.backend == "btrfs" else "mnt")

    def layer_dir(self, layer: str) -> Path:
        return self.layers / layer

    @contextlib.contextmanager
    def opened(self, layer: str) -> Iterator[Path]:
        """The layer's files: a btrfs subvolume is always there, a ZFS dataset is mounted."""
        if self.backend == "btrfs":
            yield self.layer_dir(layer)
            return
        try:
            yield self.plugin.get(layer)
        finally:
            self.plugin.put(layer)

    def snapshot(self) -> dict[str, State]:
        """Everything outside the layers under test."""
        home = str(self.home)
        subvolumes = str(self.layers)

        def skip_outside(path: str) -> bool:
            return path == home

        def skip_home(path: str) -> bool:
            parent, name = os.path.split(path)
            if parent == home and name.startswith(PLUGIN_METADATA):
                return True
            return parent == subvolumes and name in self.active

        def volatile_home(path: str) -> bool:
            return path in (home, subvolumes, str(self.home / "scratch"))

        host: State = capture(self.host_canary)
        for path in HOST_FILES:
            if path.exists():
                host[str(path)] = _entry(str(path), os.lstat(path), False)
        for path in HOST_SENTINELS:
            host[f"exists:{path}"] = Entry(int(os.path.lexists(path)), 0)
        return {
            f"{self.backend} outside Home": capture(self.outside, skip_outside),
            "Home outside the layer": capture(self.home, skip_home, volatile_home),
            "host": host,
            "stored layers": {
                f"stored:{name}": Entry(0, 0)
                for name in self.storage.stored()
                if name not in self.active
            },
        }

    def outside_changes(self) -> tuple[list[str], int]:
        now = self.snapshot()
        changed: list[str] = []
        total = 0
        for key, before in self.baseline.items():
            paths, size = differences(before, now[key])
            changed += [f"{key}: {p}" for p in paths]
            total += size
        return changed, total

    def still_stored(self, layer: str) -> bool:
        """A subvolume anywhere on the filesystem (btrfs), or a dataset or snapshot (zfs)."""
        if self.backend == "zfs":
            return layer in self.storage.stored()
        listing = subprocess.run(
            ["btrfs", "subvolume", "list", str(self.outside)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return any(line.endswith("/" + layer) for line in listing.splitlines())

    def restart_plugin(self) -> None:
        """SIGKILL and start again (no new Init: it resumes, as under dockerd)."""
        self.plugin.client.close()
        self.plugin.process.kill()
        self.plugin.process.start()
        self.plugin.client = self.plugin.process.client()

    def alive(self) -> bool:
        try:
            return post(self.sock, "/Plugin.Activate", timeout=60) == (200, MANIFEST)
        except OSError:
            return False


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture(scope="module")
def env(space: Space, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if space.backend == "btrfs":
        outside, root = Path(space.place), Path(space.place) / f"hostile-{uuid.uuid4().hex[:8]}"
    else:
        outside = root = tmp_path_factory.mktemp("hostile")
    canary = root / "canary"
    canary.mkdir(parents=True)
    _write_tree(canary, CANARY_FILES)
    host_canary = tmp_path_factory.mktemp("host-canary")
    _write_tree(host_canary, CANARY_FILES)
    process = PluginProcess(space.backend, tmp_path_factory.mktemp("hostile-plugin"))
    process.start()
    storage = space.at(root / "home")
    plugin = Plugin(process, storage.home)
    env = Env(plugin, storage, outside, canary, host_canary, "hostile-base", "hostile-sibling")
    try:
        opts = storage.init_options or None
        init = {"Home": str(storage.home), "Opts": opts, "UIDMaps": None, "GIDMaps": None}
        plugin.client.call("GraphDriver.Init", init)
        for layer, files in ((env.base, BASE_FILES), (env.sibling, SIBLING_FILES)):
            plugin.create(layer)
            plugin.client.apply_diff(layer, "", tree_tar(files))
        with contextlib.ExitStack() as held:
            for layer in (env.base, env.sibling):  # mounted throughout (zfs), to be recorded
                held.enter_context(env.opened(layer))
            env.baseline = env.snapshot()
            yield env
        # Children first: whatever an interrupted case left, then the base and the sibling.
        leftovers = sorted(set(storage.stored()) - {env.base, env.sibling})
        for layer in [*leftovers, env.base, env.sibling]:
            plugin.remove(layer)
        assert storage.stored() == []
        assert not leftovers, f"cases left layers behind: {leftovers}"
    finally:
        plugin.client.close()
        process.stop()


# -- the corpus ----------------------------------------------------------------------------------


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reply_problem(status: int, body: bytes) -> tuple[str, str | None]:
    """(the error message, or "" for a 200; a problem with the reply's form, or None)."""
    if status == 200:
        try:
            reply = json.loads(body)
        except ValueError:
            return "", f"200 reply is not JSON: {body[:200]!r}"
        if not (isinstance(reply, dict) and list(reply) == ["Size"]):
            return "", f"200 reply is not {{'Size': N}}: {reply!r}"
        if not isinstance(reply["Size"], int):
            return "", f"200 reply's Size is not a number: {reply!r}"
        return "", None
    try:
        return error_message(status, body), None
    except (AssertionError, pytest.fail.Exception) as err:
        return "", _short(str(err))


def _followup_problem(method: str, status: int, body: bytes) -> tuple[str, str | None]:
    """Like :func:`_reply_problem`, for Changes (a JSON list) and Diff (a tar stream)."""
    if status != 200:
        return _reply_problem(status, body)
    if method == "Diff":
        return "", None if len(body) >= 1024 else f"the Diff is {len(body)} bytes"
    try:
        changes = json.loads(body)["Changes"]
    except (ValueError, KeyError, TypeError):
        return "", f"200 reply is not {{'Changes': [...]}}: {_short(repr(body))}"
    return "", None if isinstance(changes, list) else "Changes is not a list"


def _deep_followups(env: Env, layer: str, outcome: Outcome) -> list[str]:
    """Changes and Diff of a 2,000-deep layer, and the Diff applied to a new layer.

    Each must answer within the backend's ``DEEP_BUDGET`` seconds, with 200 or a well-formed
    error, and none may run into Python's recursion limit. (A path 2,000 directories deep is over
    PATH_MAX as an absolute path, so a walker that uses absolute paths fails with ENAMETOOLONG, as
    Docker's own walkers do; that is reported in the summary, not failed.)
    """
    problems: list[str] = []
    replies: dict[str, tuple[int, bytes]] = {}
    budget = DEEP_BUDGET[env.backend]
    for method in ("Changes", "Diff"):
        began = time.monotonic()
        try:
            status, body = call(env.sock, method, timeout=budget, ID=layer, Parent=env.base)
        except TimeoutError:
            alive = env.alive()  # the event loop answers while a worker thread grinds on
            problems.append(
                f"{method} of a {DEEP}-deep layer gave no answer in {budget:.0f} s "
                f"(plugin answering Activate meanwhile: {alive}); the test killed and restarted "
                "the plugin to go on"
            )
            outcome.notes.append(f"{method}: no answer in {budget:.0f} s")
            env.restart_plugin()
            return problems  # Diff goes through the same Changes
        took = time.monotonic() - began
        replies[method] = (status, body)
        message, problem = _followup_problem(method, status, body)
        if problem:
            problems.append(f"{method} of the deep layer: {problem}")
        if "recursion" in message.lower():
            problems.append(f"{method} of the deep layer hit the recursion limit: {message}")
        outcome.notes.append(
            f"{method}={status} in {took:.0f} s" + (f" ({_short(message, 70)})" if message else "")
        )
    status, body = replies["Changes"]
    if status == 200:
        paths = {c["Path"] for c in json.loads(body)["Changes"]}
        if not ("/d" in paths and "/" + "d/" * DEEP + "bottom" in paths):
            problems.append(f"Changes of the deep layer lacks the tree ({len(paths)} entries)")
    status, diff = replies["Diff"]
    if status != 200:
        return problems
    again = f"{layer}-again"
    env.plugin.create(again, env.base)
    try:
        path = f"/GraphDriver.ApplyDiff?id={again}&parent={env.base}"
        status, body = post(env.sock, path, chunks(diff))
        outcome.notes.append(f"re-ApplyDiff={status}")
        if status != 200:
            problems.append(f"re-applying the deep Diff: {_short(body.decode(errors='replace'))}")
        else:
            try:
                with env.opened(again) as root:  # a ZFS layer is mounted only while held
                    _deep_file_in(root)
            except (AssertionError, OSError) as err:
                problems.append(f"the re-applied deep Diff lacks the deep file: {err}")
    finally:
        problems += _removed(env, again)
    return problems


def _deep_file_in(layer: Path) -> None:
    assert read_at_depth(layer, "d", DEEP, "bottom") == OWNED


def _removed(env: Env, layer: str) -> list[str]:
    """Remove ``layer``; the problems if it fails or leaves its directory or subvolume."""
    status, body = call(env.sock, "Remove", ID=layer)
    if status != 200:
        return [f"Remove of {layer} failed ({status}): {_short(body.decode(errors='replace'))}"]
    problems = []
    if os.path.lexists(env.layer_dir(layer)):
        problems.append(f"Remove left the directory of {layer}")
    if env.still_stored(layer):
        problems.append(f"Remove left the subvolume or dataset of {layer}")
    return problems


def _judge_reply(case: Case, status: int, body: bytes, outcome: Outcome) -> list[str]:
    """The reply's form, its status class, and whether it is the outcome the case expects."""
    problems = []
    outcome.message, problem = _reply_problem(status, body)
    if problem:
        problems.append(problem)
    elif status >= 500:
        problems.append(f"hostile input caused an internal error: {_short(outcome.message)}")
    elif status != 200:
        outcome.clear_error = True
    if status == 200 and case.expect == "error":
        size = json.loads(body).get("Size")
        why = case.why or "malformed or hostile input"
        problems.append(f"accepted (Size {size}) but must be refused: {why}")
    if status != 200 and case.expect == "applied":
        problems.append(f"refused but must apply: {_short(outcome.message)}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_layer(env: Env, case: Case) -> None:
    if env.backend == "zfs" and ZFS_SUBSET and case.id not in ZFS_CASES:
        pytest.skip("not in the ZFS subset (SNAPDRIVER_ZFS_HOSTILE=subset)")
    layer = f"hostile-{case.id}-{uuid.uuid4().hex[:8]}"
    env.active = {layer, f"{layer}-again"}
    outcome = Outcome(case.id)
    problems: list[str] = []
    try:
        env.plugin.create(layer, env.base)
        target = Target(env.canary, env.host_canary, env.layer_dir(layer), env.sibling)
        data = case.build(target)
        path = f"/GraphDriver.ApplyDiff?id={layer}&parent={env.base}"
        began = time.monotonic()
        status, body = post(env.sock, path, chunks(data))
        if case.deep:
            outcome.notes.append(f"ApplyDiff={status} in {time.monotonic() - began:.0f} s")
        outcome.status = status
        # Whatever the reply: the plugin answers, and nothing outside the layer moved.
        outcome.alive = env.alive()
        changed, outcome.bytes_outside = env.outside_changes()
        assert outcome.alive, f"the plugin died:\n{env.plugin.process.log_tail()}"
        assert not changed, f"{outcome.bytes_outside} bytes outside the layer changed: {changed}"
        problems += _judge_reply(case, status, body, outcome)
        # The layer afterwards: complete and as expected, or not there at all.
        _, exists = call(env.sock, "Exists", ID=layer)
        if json.loads(exists) != {"Exists": status == 200}:
            problems.append(f"Exists is {exists!r} after an ApplyDiff that answered {status}")
        if status == 200:
            try:
                if case.check is not None:
                    with env.opened(layer) as found:
                        case.check(found, target)
                outcome.applied_inside = not problems
            except (AssertionError, OSError) as err:
                problems.append(f"applied, but the layer is not as expected: {_short(str(err))}")
            if case.deep:
                problems += _deep_followups(env, layer, outcome)
        problems += _removed(env, layer)
        changed, late_bytes = env.outside_changes()
        outcome.bytes_outside += late_bytes
        assert not changed, f"after Remove, {changed} changed outside the layer"
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
    finally:
        RESULTS[env.backend].append(outcome)
        if os.path.lexists(env.layer_dir(layer)) or env.still_stored(layer):
            call(env.sock, "Remove", ID=layer)


def test_summary(env: Env, figure: Callable[[str], None]) -> None:
    """The tier's figure, in the run's summary (run last: pytest keeps the file's order)."""
    results = RESULTS[env.backend]
    if not results:
        pytest.skip("no hostile input ran")
    total = len(results)
    errors = sum(r.clear_error for r in results)
    applied = sum(r.applied_inside for r in results)
    outside = sum(r.bytes_outside for r in results)
    alive = sum(r.alive for r in results)
    line = (
        f"HOSTILE LAYERS ({env.backend}): {total} inputs, {errors} clear errors, {applied} "
        f"applied inside the layer, {outside} bytes outside, "
        + ("plugin alive after each" if alive == total else f"plugin alive after {alive}/{total}")
    )
    other = [r.case for r in results if not (r.clear_error or r.applied_inside)]
    if other:
        line += f"; {len(other)} wrong or internal-error replies: {', '.join(other)}"
    figure(line)
    for r in results:
        if r.notes:
            figure(f"HOSTILE LAYERS deep follow-ups: {r.case}: {', '.join(r.notes)}")
    assert outside == 0 and alive == total
