"""Start-up errors are one line; bad backends fail at load; other plugins can wrap hooks."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

from snapdriver import hookimpl
from snapdriver.errors import BackendLoadError, ConfigError
from snapdriver.graphdriver.serve import Listen, prepare_unix_socket
from snapdriver.plugins import Backend, load_plugin_manager


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapdriver", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unknown_backend_is_one_line() -> None:
    done = cli("--backend", "nosuch")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "unknown backend 'nosuch'" in done.stderr and "btrfs" in done.stderr


def test_builtin_driver_name_is_refused() -> None:
    done = cli("--backend", "btrfs", "--name", "overlay2")
    assert done.returncode == 2 and "dockerd would pick its own driver" in done.stderr


def test_list_backends_shows_builtins() -> None:
    out = cli("--list-backends").stdout
    assert "btrfs" in out and "zfs" in out


def test_socket_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    try:
        done = cli(
            "--backend",
            "btrfs",
            "--listen",
            f"unix://{path}",
            "--state-dir",
            str(tmp_path / "state"),
        )
        assert done.returncode == 2 and "is in use" in done.stderr
    finally:
        server.close()


def test_stale_socket_is_replaced_but_files_are_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    prepare_unix_socket(stale)
    assert not stale.exists()
    regular = tmp_path / "file.sock"
    regular.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        prepare_unix_socket(regular)


def test_plain_tcp_off_loopback_is_refused(tmp_path: Path) -> None:
    done = cli(
        "--backend",
        "btrfs",
        "--listen",
        "tcp://0.0.0.0:18765",
        "--state-dir",
        str(tmp_path / "state"),
        "--spec-dir",
        str(tmp_path / "spec"),
    )
    assert done.returncode == 2 and "refusing plain TCP" in done.stderr
    assert Listen.parse("tcp://127.0.0.1:9").host == "127.0.0.1"


class NoSuchHook:
    @hookimpl
    def snapdriver_frobnicate(self) -> None: ...


class Incomplete:
    @hookimpl
    def snapdriver_setup(self) -> None: ...


def test_bad_backends_fail_at_load() -> None:
    with pytest.raises(BackendLoadError, match="snapdriver_frobnicate"):
        load_plugin_manager(NoSuchHook())
    with pytest.raises(BackendLoadError, match="does not implement snapdriver_create"):
        load_plugin_manager(Incomplete())


def test_other_plugins_can_wrap_backend_hooks() -> None:
    from snapdriver_copydir import CopyDirBackend

    calls: list[str] = []

    class Audit:
        @hookimpl(wrapper=True)
        def snapdriver_mount(self, layer: str, mount_label: str) -> Generator[None, Path, Path]:
            calls.append(layer)
            return (yield)

    backend = Backend.load(CopyDirBackend())
    backend.pm.register(Audit())
    backend.pm.hook.snapdriver_setup(config=_config(Path("/tmp/sd-wrap-test")))
    assert backend.mount("layer-x") == Path("/tmp/sd-wrap-test/dirs/layer-x")
    assert calls == ["layer-x"]


def _config(home: Path):  # type: ignore[no-untyped-def]
    from snapdriver.hookspec import BackendConfig

    return BackendConfig(home)


def test_home_not_on_btrfs_is_a_clear_init_error(tmp_path: Path) -> None:
    import asyncio

    from snapdriver.graphdriver.driver import GraphDriver

    driver = GraphDriver(Backend.load("btrfs"), tmp_path / "state")
    with pytest.raises(ConfigError, match="is not on btrfs"):
        asyncio.run(driver.init(str(tmp_path / "home"), []))
    assert not (tmp_path / "state" / "init.json").exists(), "a failed Init must not be recorded"


def test_required_hooks_are_named_once_by_the_contract() -> None:
    from snapdriver import hookspec

    marked = [name for name in dir(hookspec) if name in hookspec.REQUIRED_HOOKS]
    assert sorted(marked) == sorted(hookspec.REQUIRED_HOOKS)
    assert "snapdriver_commit" not in hookspec.REQUIRED_HOOKS, "third-party backends lack it"
    with pytest.raises(BackendLoadError, match="snapdriver_mount"):
        load_plugin_manager(Incomplete())


def test_a_recorded_init_that_cannot_resume_still_serves(tmp_path: Path) -> None:
    """A Home recorded earlier that is not on btrfs now: log, serve, say why, take a new Init."""
    import asyncio

    from snapdriver.errors import NotInitialisedError
    from snapdriver.graphdriver.driver import GraphDriver, InitRecord

    state = tmp_path / "state"
    InitRecord(tmp_path / "gone" / "home").save(state)
    driver = GraphDriver(Backend.load("btrfs"), state)

    async def scenario() -> None:
        assert await driver.resume() is False
        with pytest.raises(NotInitialisedError, match="recorded Init could not be resumed"):
            await driver.exists("a" * 64)
        assert ("Backend", "btrfs") in await driver.status(), "Status answers without a Home"

    asyncio.run(scenario())
    assert (state / "init.json").exists(), "the record stays until dockerd sends a new Init"
