"""The config file: precedence, origins, backend tables, and errors that name the key and line."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from snapdriver import cli, config
from snapdriver.errors import ConfigError

FILE = """\
# a settings file
backend = "btrfs"
log_level = "warning"

[graphdriver]
name = "sdconf"
listen = "unix:///tmp/from-file.sock"
state_dir = "/tmp/state-from-file"
socket_group = "root"

[backends.zfs]
dataset = "tank/docker"

[containerd]
root = "/var/lib/snapdriver/ctd"
listen = "unix:///run/snapdriver/containerd.sock"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "snapdriver.toml"
    path.write_text(text)
    return path


def show(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def line_of(out: str, key: str) -> str:
    return next(line for line in out.splitlines() if line.startswith((f"{key} ", f"# {key} ")))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SNAPDRIVER_* setting of the test runner's, and no host file, leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith(config.ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent" / "snapdriver.toml")


def test_flag_beats_env_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, FILE)
    monkeypatch.setenv("SNAPDRIVER_LISTEN", "unix:///tmp/from-env.sock")
    monkeypatch.setenv("SNAPDRIVER_STATE_DIR", "/tmp/state-from-env")
    code, out, _ = show(["--config", str(path), "--state-dir", "/tmp/state-from-flag"], capsys)
    assert code == 0
    assert line_of(out, "state_dir") == 'state_dir = "/tmp/state-from-flag"  # flag --state-dir'
    assert line_of(out, "listen") == 'listen = "unix:///tmp/from-env.sock"  # env SNAPDRIVER_LISTEN'
    assert line_of(out, "name") == f'name = "sdconf"  # file {path}:6'
    assert line_of(out, "log_level") == f'log_level = "warning"  # file {path}:3'
    assert line_of(out, "tls_cert") == "# tls_cert is unset  # default"
    assert line_of(out, "spec_dir") == 'spec_dir = "/etc/docker/plugins"  # default'


def test_backend_table_feeds_the_backend_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """zfs's --dataset (added in snapdriver_addoption) comes from [backends.zfs]."""
    path = write(tmp_path, FILE)
    code, out, _ = show(["--config", str(path), "--backend", "zfs"], capsys)
    assert code == 0
    assert "[backends.zfs]" in out
    assert line_of(out, "dataset") == f'dataset = "tank/docker"  # file {path}:12'
    assert line_of(out, "backend") == 'backend = "zfs"  # flag --backend'


def test_backend_flag_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SNAPDRIVER_BACKEND", "zfs")
    monkeypatch.setenv("SNAPDRIVER_DATASET", "pool/env")
    code, out, _ = show([], capsys)
    assert code == 0
    assert line_of(out, "dataset") == 'dataset = "pool/env"  # env SNAPDRIVER_DATASET'
    assert "# config file: none" in out


def test_missing_default_file_is_fine_missing_named_file_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert config.read_file(None).path is None
    code, _, err = show(["--config", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "nope.toml does not exist" in err
    monkeypatch.setenv("SNAPDRIVER_CONFIG", str(tmp_path / "nope2.toml"))
    code, _, err = show([], capsys)
    assert code == 2 and "nope2.toml does not exist" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('backend = "btrfs"\n\nlistne = "x"\n', "unknown key 'listne' at {path}:3"),
        (
            "[graphdriver]\nname = 'a'\nstate_dri = '/x'\n",
            "'state_dri' in [graphdriver] at {path}:3",
        ),
        ("[backends.zfs]\n# c\ndatset = 'x'\n", "'datset' in [backends.zfs] at {path}:3"),
        ("[backends.btrfs]\ndataset = 'x'\n", "in [backends.btrfs] at {path}:2 (nothing is"),
        ("[backends.nosuch]\nx = 1\n", "[backends.nosuch] at {path}:1: unknown backend 'nosuch'"),
        ("[containerd]\nroot = '/x'\nlisten = 3\n", "listen (file {path}:3): expected a string"),
        ("[graphdriver]\n\nname = 7\n", "name (file {path}:3): expected a string, got 7"),
        ("log_level = 'loud'\n", "log_level (file {path}:1): 'loud' is not one of"),
        ("[graphdriver]\nstate_dir = ['/a']\n", "state_dir (file {path}:2): a list is not"),
        ("[graphdriver]\ntls_cert = true\n", "tls_cert (file {path}:2): expected a path"),
        ("graphdriver = 1\n", "graphdriver at {path}:1: expected a table"),
        ("backends = 'zfs'\n", "backends at {path}:1: expected tables"),
        ("backends.zfs.dataset = 5\n", "dataset (file {path}:1): expected a string"),
        ("[graphdriver\n", "config file {path}: "),
    ],
)
def test_bad_file_names_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    code, _, err = show(["--config", str(path)], capsys)
    assert code == 2, err
    assert message.format(path=path) in err
    assert err.count("\n") == 1


def test_bad_env_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SNAPDRIVER_LOG_LEVEL", "chatty")
    code, _, err = show([], capsys)
    assert code == 2 and "log_level (env SNAPDRIVER_LOG_LEVEL): 'chatty' is not one of" in err


def test_key_lines_skip_multiline_values() -> None:
    text = (
        'a = """\nfake = 1\n"""\n'
        "b = [\n  'x',\n  'fake2 = 3',\n]\n"
        "[t . 'q.r']  # c\n"
        "c = 1\n"
        "d.e = 2\n"
        "[[arr]]\n"
        "f = 3\n"
    )
    lines = config.key_lines(text)
    assert lines[("a",)] == 1 and lines[("b",)] == 4
    assert ("fake",) not in lines and ("fake2",) not in lines
    assert lines[("t", "q.r")] == 8 and lines[("t", "q.r", "c")] == 9
    assert lines[("t", "q.r", "d", "e")] == 10
    assert lines[("arr", "f")] == 12


def test_conversion_of_flag_kinds() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--on", action="store_true")
    parser.add_argument("--no-off", dest="off", action="store_false")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--age", type=float)
    parser.add_argument("--count", type=int)
    parser.add_argument("--opt", action="append")
    actions = {a.dest: a for a in parser._actions}
    assert config.convert(actions["on"], True, "f") is True
    assert config.convert(actions["on"], "yes", "env") is True
    assert config.convert(actions["off"], False, "f") is False
    assert config.convert(actions["verbose"], 2, "f") == 2
    assert config.convert(actions["age"], 5, "f") == 5.0
    assert config.convert(actions["opt"], ["a=1", "b=2"], "f") == ["a=1", "b=2"]
    assert config.convert(actions["opt"], "a=1,b=2", "env") == ["a=1", "b=2"]
    with pytest.raises(ConfigError, match=r"count \(f\): expected an integer"):
        config.convert(actions["count"], 1.5, "f")
    with pytest.raises(ConfigError, match="expected true or false"):
        config.convert(actions["on"], "maybe", "env")
    with pytest.raises(ConfigError, match="is not a number"):
        config.convert(actions["age"], "soon", "env")


def test_a_front_plugs_in_with_its_parser(tmp_path: Path) -> None:
    """What the containerd subcommand does: resolve its own parser against its own table."""
    path = write(tmp_path, FILE)
    parser = cli.containerd_parser()
    file = config.read_file(path)
    config.check_file(file, config.backend_actions)
    resolved = config.resolve(parser, ["--backend", "zfs"], file, "containerd", environ={})
    assert resolved.args.root == Path("/var/lib/snapdriver/ctd")
    assert resolved.args.listen == "unix:///run/snapdriver/containerd.sock"
    assert resolved.args.log_level == "warning"  # the shared top-level key
    assert resolved.origins["root"] == f"file {path}:15"
    assert resolved.origins["backend"] == "flag --backend"


def test_front_table_overrides_shared_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "error"\n[containerd]\nlog_level = "debug"\n')
    file = config.read_file(path)
    args = config.resolve(cli.containerd_parser(), [], file, "containerd", environ={}).args
    assert args.log_level == "debug"
    args = config.resolve(cli.base_parser(), [], file, "graphdriver", environ={}).args
    assert args.log_level == "error"


def test_daemon_serves_with_file_settings(tmp_path: Path) -> None:
    """The file reaches the daemon itself: its listen address is refused as in use."""
    busy = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(busy))
    server.listen()
    text = f'backend = "btrfs"\n[graphdriver]\nlisten = "unix://{busy}"\nstate_dir = "{tmp_path}"\n'
    path = write(tmp_path, text)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "snapdriver", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.close()
    assert done.returncode == 2 and "is in use" in done.stderr, done.stderr


def test_config_command_for_the_containerd_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[containerd] dataset is zfs's --dataset there; the graphdriver reads [backends.zfs]."""
    text = FILE.replace('root = "/var/lib/snapdriver/ctd"', 'dataset = "tank/ctd"')
    path = write(tmp_path, text)
    code, out, err = show(["containerd", "--config", str(path), "--backend", "zfs"], capsys)
    assert code == 0, err
    assert line_of(out, "dataset") == f'dataset = "tank/ctd"  # file {path}:15'
    assert (
        line_of(out, "listen")
        == f'listen = "unix:///run/snapdriver/containerd.sock"  # file {path}:16'
    )
    code, out, _ = show(["--config", str(path), "--backend", "zfs"], capsys)
    assert line_of(out, "dataset") == f'dataset = "tank/docker"  # file {path}:12'
    code, out, _ = show(["containerd", "--config", str(path), "--dataset", "x/y"], capsys)
    assert line_of(out, "dataset") == 'dataset = "x/y"  # flag --dataset'
    assert line_of(out, "root") == "# root is unset  # default"


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_print_once(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "snapdriver", flag],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout.count("snapdriver") >= 1
    first = done.stdout.splitlines()[0]
    assert done.stdout.count(first) == 1, done.stdout
