"""The conformance suite: what every snapdriver backend must do, driven over the real socket.

A backend author runs it with one class::

    from snapdriver.testing import Conformance

    class TestMyBackend(Conformance):
        backend = "mybackend"          # the entry-point name

and, when layers must live on a particular filesystem, overrides the ``snapdriver_home``
fixture to return a directory there. The suite starts ``snapdriver --backend NAME`` as its own
process, sends Init as dockerd does, and checks moby's graphtest behaviours (CreateEmpty,
CreateBase, CreateSnap, DeepLayerRead with 128 layers, DiffApply, Changes with its 21 entries,
SetQuota) plus the wire details dockerd 20.10 depends on.
"""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from snapdriver.graphdriver.client import PluginCallError, PluginClient
from snapdriver.testing.process import PluginProcess

MiB = 1 << 20


def random_content(size: int, seed: int) -> bytes:
    """Deterministic bytes for (size, seed), like graphtest's ``randomContent``."""
    return random.Random(seed).randbytes(size)


def new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def add_many_files(root: Path, count: int, seed: int) -> None:
    """graphtest's ``addManyFiles``: ``directory-N/file-M``, 64 bytes each, 100 per directory."""
    for i in range(count):
        directory = root / f"directory-{i - i % 100}"
        directory.mkdir(exist_ok=True)
        (directory / f"file-{i}").write_bytes(random_content(64, seed + i))


def _write_until_full(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(os.urandom(MiB))
            handle.flush()
            os.fsync(handle.fileno())


class Plugin:
    """A running plugin process with one Init done, and a client to it."""

    def __init__(self, process: PluginProcess, home: Path) -> None:
        self.process = process
        self.home = home
        self.client = process.client()

    def call(self, method: str, **payload: Any) -> dict[str, Any]:
        return self.client.call(f"GraphDriver.{method}", payload)

    def get(self, layer: str) -> Path:
        return Path(self.call("Get", ID=layer)["Dir"])

    def put(self, layer: str) -> None:
        self.call("Put", ID=layer)

    def create(self, layer: str, parent: str = "", rw: bool = False, **opts: str) -> None:
        payload: dict[str, Any] = {"ID": layer}
        if parent:
            payload["Parent"] = parent
        if opts:
            payload["StorageOpt"] = opts
        self.call("CreateReadWrite" if rw else "Create", **payload)

    def remove(self, layer: str) -> None:
        self.call("Remove", ID=layer)

    def restart(self) -> None:
        self.client.close()
        self.process.restart()
        self.client = self.process.client()


class Conformance:
    """Subclass with ``backend = "NAME"``; override the ``snapdriver_home`` fixture if needed."""

    backend: ClassVar[str] = ""
    #: moby's zfs graphtest requires SetQuota; elsewhere an unsupported quota skips.
    quota_required: ClassVar[bool] = False
    #: Init's Opts, as dockerd would send them from --storage-opt.
    init_options: ClassVar[Sequence[str] | None] = None
    #: Extra command-line flags for the daemon.
    cli_args: ClassVar[Sequence[str]] = ()

    @pytest.fixture(scope="class")
    @classmethod
    def plugin(
        cls,
        snapdriver_home: Path,
        snapdriver_init_options: list[str] | None,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[Plugin]:
        if not cls.backend:
            pytest.fail("set `backend = NAME` on the Conformance subclass")
        workdir = tmp_path_factory.mktemp("plugin")
        process = PluginProcess(cls.backend, workdir, cls.cli_args)
        process.start()
        home = snapdriver_home / process.name
        plugin = Plugin(process, home)
        try:
            init = {
                "Home": str(home),
                "Opts": snapdriver_init_options or cls.init_options,
                "UIDMaps": None,
                "GIDMaps": None,
            }
            plugin.client.call("GraphDriver.Init", init)
            yield plugin
            leftovers = plugin.call("Status")
            assert leftovers["Status"], "Status reply must not be empty"
        finally:
            plugin.client.close()
            process.stop()

    # -- the wire ---------------------------------------------------------------------------------

    def test_activate_manifest(self, plugin: Plugin) -> None:
        status, body = plugin.client.raw("Plugin.Activate")
        assert status == 200
        assert body == b'{"Implements":["GraphDriver"]}\n'

    def test_capabilities_are_nested_and_false(self, plugin: Plugin) -> None:
        reply = plugin.client.call("GraphDriver.Capabilities", {})
        assert reply == {"Capabilities": {"ReproducesExactDiffs": False}}

    def test_errors_are_json_with_non_200_status(self, plugin: Plugin) -> None:
        status, body = plugin.client.raw("GraphDriver.Get", b'{"ID":"' + b"0" * 64 + b'"}\n')
        assert status != 200
        assert body.startswith(b'{"Err":"') and b"does not exist" in body
        status, body = plugin.client.raw("GraphDriver.Get", b'{"ID":"../etc"}\n')
        assert status == 400 and b"invalid layer ID" in body
        status, body = plugin.client.raw("GraphDriver.Nope", b"{}\n")
        assert status == 404 and body.startswith(b'{"Err":')

    def test_remove_of_unknown_id_succeeds(self, plugin: Plugin) -> None:
        plugin.remove(new_id())

    # -- graphtest --------------------------------------------------------------------------------

    def test_create_empty(self, plugin: Plugin) -> None:
        plugin.create("empty")
        try:
            assert plugin.call("Exists", ID="empty") == {"Exists": True}
            root = plugin.get("empty")
            st = root.stat()
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o755
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert [p for p in os.listdir(root) if p != "lost+found"] == []
            plugin.put("empty")
        finally:
            plugin.remove("empty")
        assert plugin.call("Exists", ID="empty") == {"Exists": False}

    @staticmethod
    def _create_base(plugin: Plugin, layer: str) -> None:
        plugin.create(layer, rw=True)
        root = plugin.get(layer)
        old = os.umask(0)
        try:
            subdir = root / "a subdir"
            subdir.mkdir(mode=0o705 | stat.S_ISVTX)
            os.lchown(subdir, 1, 2)
            data = root / "a file"
            data.write_bytes(b"Some data")
            os.chmod(data, 0o222 | stat.S_ISUID)
        finally:
            os.umask(old)
            plugin.put(layer)

    @staticmethod
    def _verify_base(plugin: Plugin, layer: str) -> None:
        root = plugin.get(layer)
        try:
            sub = (root / "a subdir").lstat()
            assert stat.S_ISDIR(sub.st_mode) and stat.S_IMODE(sub.st_mode) == 0o705 | stat.S_ISVTX
            assert (sub.st_uid, sub.st_gid) == (1, 2)
            data = (root / "a file").lstat()
            assert stat.S_ISREG(data.st_mode)
            assert stat.S_IMODE(data.st_mode) == 0o222 | stat.S_ISUID
            assert (data.st_uid, data.st_gid) == (0, 0)
            assert sorted(p for p in os.listdir(root) if p != "lost+found") == [
                "a file",
                "a subdir",
            ]
        finally:
            plugin.put(layer)

    def test_create_base(self, plugin: Plugin) -> None:
        self._create_base(plugin, "Base")
        try:
            self._verify_base(plugin, "Base")
        finally:
            plugin.remove("Base")

    def test_create_snap_preserves_modes_and_is_writable(self, plugin: Plugin) -> None:
        self._create_base(plugin, "Base")
        plugin.create("Snap", "Base")
        try:
            self._verify_base(plugin, "Snap")
            root = plugin.get("Snap")
            (root / "written").write_text("Create layers are writable")
            plugin.put("Snap")
            base = plugin.get("Base")
            assert not (base / "written").exists(), "a write to a child reached its parent"
            plugin.put("Base")
        finally:
            plugin.remove("Snap")
            plugin.remove("Base")

    def test_deep_layer_read_128(self, plugin: Plugin) -> None:
        layers = [new_id()]
        plugin.create(layers[0])
        (plugin.get(layers[0]) / "testfile.txt").write_text("test content")
        plugin.put(layers[0])
        try:
            for i in range(1, 129):
                layer = new_id()
                plugin.create(layer, layers[-1])
                root = plugin.get(layer)
                (root / "top-id").write_text(layer)
                (root / f"layer-{i}").mkdir()
                (root / f"layer-{i}" / "layer-id").write_text(layer)
                (root / f"layer-{i}" / "parent-id").write_text(layers[-1])
                plugin.put(layer)
                layers.append(layer)
            root = plugin.get(layers[-1])
            assert (root / "top-id").read_text() == layers[-1]
            expected = layers[-1]
            for i in range(128, 0, -1):
                assert (root / f"layer-{i}" / "layer-id").read_text() == expected
                expected = (root / f"layer-{i}" / "parent-id").read_text()
            assert expected == layers[0]
            assert (root / "testfile.txt").read_text() == "test content"
            plugin.put(layers[-1])
        finally:
            for layer in reversed(layers):
                plugin.remove(layer)

    @pytest.mark.parametrize("file_count", [10, 1000])
    def test_diff_apply(self, plugin: Plugin, file_count: int) -> None:
        base, upper, diff = new_id(), new_id(), new_id()
        plugin.create(base)
        root = plugin.get(base)
        add_many_files(root, file_count, 3)
        (root / "file-remove.txt").write_bytes(random_content(100, 7))
        (root / "var" / "lib").mkdir(parents=True)
        plugin.put(base)
        try:
            plugin.create(upper, base)
            root = plugin.get(upper)
            add_many_files(root, file_count, 6)
            (root / "file-remove.txt").unlink()
            (root / "var" / "lib").rmdir()
            plugin.put(upper)
            diff_size = plugin.call("DiffSize", ID=upper)["Size"]
            plugin.create(diff, base)
            tar = plugin.client.diff(upper, base)
            size = plugin.client.apply_diff(diff, base, tar)
            # Whiteouts and directories have size 0, so both are the bytes of the new files.
            assert size == diff_size == file_count * 64
            applied = plugin.get(diff)
            for i in range(file_count):
                path = applied / f"directory-{i - i % 100}" / f"file-{i}"
                assert path.read_bytes() == random_content(64, 6 + i)
            assert not (applied / "file-remove.txt").exists()
            assert not (applied / "var" / "lib").exists()
            plugin.put(diff)
        finally:
            for layer in (diff, upper, base):
                plugin.remove(layer)

    def test_changes_21_entries(self, plugin: Plugin) -> None:
        base, upper = new_id(), new_id()
        plugin.create(base)
        add_many_files(plugin.get(base), 20, 3)
        plugin.put(base)
        plugin.create(upper, base)
        try:
            root = plugin.get(upper) / "directory-0"
            expected = [("/directory-0", 0)]
            for j in range(20):
                if j % 3 == 0:
                    (root / f"file-{j}").write_bytes(random_content(64, 100 + j))
                    expected.append((f"/directory-0/file-{j}", 0))
                elif j % 3 == 1:
                    (root / f"file-6-{j}").write_bytes(random_content(64, 200 + j))
                    expected.append((f"/directory-0/file-6-{j}", 1))
                else:
                    (root / f"file-{j}").unlink()
                    expected.append((f"/directory-0/file-{j}", 2))
            plugin.put(upper)
            changes = plugin.call("Changes", ID=upper, Parent=base)["Changes"]
            got = sorted((c["Path"], c["Kind"]) for c in changes)
            assert got == sorted(expected)
            assert len(got) == 21
        finally:
            plugin.remove(upper)
            plugin.remove(base)

    def test_set_quota(self, plugin: Plugin) -> None:
        self._create_base(plugin, "QuotaBase")
        layer = f"{self.backend}Test"
        try:
            try:
                plugin.create(layer, "QuotaBase", rw=True, size="50M")
            except PluginCallError as err:
                if "quota" in err.message.lower() and not self.quota_required:
                    pytest.skip(f"quota not supported here: {err.message}")
                raise
            root = plugin.get(layer)
            try:
                (root / "smallfile").write_bytes(b"\0" * 25 * MiB)
                with pytest.raises(OSError, match=r"quota|space") as caught:
                    _write_until_full(root / "bigfile", 50 * MiB)
                assert caught.value.errno in (122, 28)  # EDQUOT, ENOSPC
            finally:
                plugin.put(layer)
        finally:
            plugin.remove(layer)
            plugin.remove("QuotaBase")

    # -- Docker's expectations beyond graphtest ---------------------------------------------------

    def test_empty_diff_is_go_end_of_archive(self, plugin: Plugin) -> None:
        base, child = new_id(), new_id()
        plugin.create(base)
        plugin.create(child, base)
        try:
            assert plugin.client.diff(child, base) == bytes(1024)
        finally:
            plugin.remove(child)
            plugin.remove(base)

    def test_diff_is_stable_and_round_trips(self, plugin: Plugin) -> None:
        base, child = new_id(), new_id()
        plugin.create(base)
        root = plugin.get(base)
        (root / "etc").mkdir()
        (root / "etc" / "gone").write_text("x")
        plugin.put(base)
        plugin.create(child, base)
        root = plugin.get(child)
        (root / "etc" / "gone").unlink()
        (root / "etc" / "new").write_text("hello")
        os.link(root / "etc" / "new", root / "etc" / "new-link")
        os.symlink("new", root / "etc" / "symlink")
        plugin.put(child)
        try:
            first = plugin.client.diff(child, base)
            assert first == plugin.client.diff(child, base), "Diff output changed between runs"
            with tarfile.open(fileobj=io.BytesIO(first)) as tar:
                names = {m.name: m for m in tar.getmembers()}
            assert set(names) == {"etc", "etc/.wh.gone", "etc/new", "etc/new-link", "etc/symlink"}
            assert names["etc/new-link"].islnk() and names["etc/new-link"].linkname == "etc/new"
            assert names["etc"].mode & 0o170000 == 0o040000, "mode must carry the type bits"
            assert first.endswith(bytes(1024)) and len(first) % 512 == 0
        finally:
            plugin.remove(child)
            plugin.remove(base)

    def test_get_is_stable_and_refcounted(self, plugin: Plugin) -> None:
        layer = new_id()
        plugin.create(layer)
        try:
            first, second = plugin.get(layer), plugin.get(layer)
            assert first == second
            plugin.put(layer)
            assert (first / ".").is_dir(), "one Put released a layer still held twice"
            plugin.put(layer)
            plugin.put(layer)  # an unmatched Put is not an error
        finally:
            plugin.remove(layer)

    def test_create_accepts_missing_optional_fields(self, plugin: Plugin) -> None:
        layer = new_id()
        status, body = plugin.client.raw("GraphDriver.Create", b'{"ID":"%s"}\n' % layer.encode())
        assert (status, body) == (200, b"{}\n")
        plugin.remove(layer)

    def test_unknown_storage_option_is_refused(self, plugin: Plugin) -> None:
        with pytest.raises(PluginCallError, match="Unknown option"):
            plugin.create(new_id(), rw=True, colour="blue")

    def test_concurrent_diff_streams_into_apply(self, plugin: Plugin) -> None:
        """dockerd's commit: Diff streams on one connection while ApplyDiff reads it on another."""
        base, upper, target = new_id(), new_id(), new_id()
        plugin.create(base)
        plugin.create(upper, base)
        root = plugin.get(upper)
        for i in range(16):
            (root / f"blob-{i}").write_bytes(random_content(MiB, i))
        plugin.put(upper)
        plugin.create(target, base)
        result: dict[str, int] = {}
        try:
            with PluginClient(plugin.process.address) as reader:
                stream = reader.diff_stream(upper, base)
                worker = threading.Thread(
                    target=lambda: result.update(
                        size=plugin.client.apply_diff(target, base, stream)
                    )
                )
                worker.start()
                worker.join(120)
            assert result.get("size") == 16 * MiB
            applied = plugin.get(target)
            assert (applied / "blob-7").read_bytes() == random_content(MiB, 7)
            plugin.put(target)
        finally:
            for layer in (target, upper, base):
                plugin.remove(layer)

    def test_bad_tar_fails_cleanly_and_plugin_keeps_serving(self, plugin: Plugin) -> None:
        layer = new_id()
        plugin.create(layer)
        try:
            with pytest.raises(PluginCallError, match="invalid layer tar"):
                plugin.client.apply_diff(layer, "", b"this is not a tar archive" * 40)
            assert plugin.call("Exists", ID=layer) == {"Exists": False}
            assert plugin.client.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
        finally:
            plugin.remove(layer)

    def test_restart_without_init_carries_on(self, plugin: Plugin) -> None:
        layer = new_id()
        plugin.create(layer)
        (plugin.get(layer) / "kept").write_text("survives a plugin restart")
        try:
            plugin.restart()  # dockerd sends no Activate or Init to a restarted plugin
            assert (plugin.get(layer) / "kept").read_text() == "survives a plugin restart"
            plugin.put(layer)
            plugin.put(layer)
        finally:
            plugin.remove(layer)
