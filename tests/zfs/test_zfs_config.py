"""Set-up errors that need no pool: a missing tool or module, bad storage options."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
from snapdriver_zfs import ZfsBackend, backend

from snapdriver.errors import ConfigError
from snapdriver.hookspec import BackendConfig
from snapdriver.plugins import Backend

# The package attribute ``backend`` is the plugin object, so reach the module by its full name.
backend_module = importlib.import_module("snapdriver_zfs.backend")


def test_entry_point_object_is_a_valid_backend() -> None:
    loaded = Backend.load(backend)
    parser = argparse.ArgumentParser()
    loaded.add_options(parser)
    assert parser.parse_args(["--dataset", "tank/docker"]).dataset == "tank/docker"


def test_missing_zfs_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backend_module, "find_command", lambda name="zfs": None)
    with pytest.raises(ConfigError, match="zfs command is not installed"):
        ZfsBackend().snapdriver_setup(BackendConfig(tmp_path))


def test_missing_dev_zfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(backend_module, "find_command", lambda name="zfs": "/sbin/zfs")
    monkeypatch.setattr(backend_module, "DEV_ZFS", str(tmp_path / "no-dev-zfs"))
    with pytest.raises(ConfigError, match="modprobe zfs"):
        ZfsBackend().snapdriver_setup(BackendConfig(tmp_path))


def test_options() -> None:
    assert backend_module._parse_options({"zfs.fsname": "tank/d", "size": "1G"}) == "tank/d"
    assert backend_module._parse_options({}) is None
    with pytest.raises(ConfigError, match=r"unknown storage option 'zfs\.mountopt'"):
        backend_module._parse_options({"zfs.mountopt": "x"})
    with pytest.raises(ConfigError, match="needs a dataset name"):
        backend_module._parse_options({"zfs.fsname": ""})


def test_flag_and_option_must_agree(tmp_path: Path) -> None:
    args = argparse.Namespace(dataset="tank/a")
    config = BackendConfig(tmp_path, {}, args)
    assert backend_module._choose_root(config, "tank/a") == "tank/a"
    assert backend_module._choose_root(config, None) == "tank/a"
    with pytest.raises(ConfigError, match="disagree"):
        backend_module._choose_root(config, "tank/b")


def test_home_not_on_zfs_and_no_dataset_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dataset POOL/DATASET"):
        backend_module._choose_root(BackendConfig(tmp_path / "home"), None)
