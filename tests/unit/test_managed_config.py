"""The managed plugin's pure parts: plugin/config.json against snapdriver's own command line, the
host mirror the build reads, and the cache key. The build and the plugin run in the dockerd tier
(tests/dockerd/test_managed_plugin.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snapdriver import cli, config
from snapdriver.testing import managed

PLUGIN_CONFIG: dict[str, Any] = json.loads(managed.CONFIG.read_text())


def resolved(environ: dict[str, str]) -> config.Resolved:
    """What the plugin's entrypoint runs with under ``environ`` (its Env), as the daemon parses."""
    argv = PLUGIN_CONFIG["Entrypoint"][1:]
    return config.resolve(
        cli.base_parser(), argv, config.ConfigFile(None), "graphdriver", environ=environ
    )


def default_env() -> dict[str, str]:
    return {env["Name"]: env["Value"] for env in PLUGIN_CONFIG["Env"]}


def test_entrypoint_serves_the_declared_socket() -> None:
    assert PLUGIN_CONFIG["Interface"]["Types"] == ["docker.graphdriver/1.0"]
    args = resolved(default_env()).args
    # dockerd mounts the plugin's runtime directory at /run/docker/plugins and dials Socket there
    assert args.listen == f"unix:///run/docker/plugins/{PLUGIN_CONFIG['Interface']['Socket']}"
    assert args.backend == "btrfs"
    assert PLUGIN_CONFIG["Entrypoint"][0] == f"{managed.VENV}/bin/snapdriver"


def test_every_setting_is_a_flag_the_daemon_reads() -> None:
    environ = default_env() | {"SNAPDRIVER_LOG_LEVEL": "debug", "SNAPDRIVER_LOG_FORMAT": "json"}
    done = resolved(environ)
    for env in PLUGIN_CONFIG["Env"]:
        assert env["Settable"] == ["value"]
        dest = env["Name"].removeprefix(config.ENV_PREFIX).lower()
        assert done.origins.get(dest) == f"env {env['Name']}", env["Name"]
    assert (done.args.log_level, done.args.log_format) == ("debug", "json")
    assert not done.args.metrics_listen  # the empty default: metrics off


def test_propagated_mount_and_capabilities() -> None:
    assert Path(PLUGIN_CONFIG["PropagatedMount"]).is_absolute()
    assert PLUGIN_CONFIG["Linux"]["Capabilities"] == ["CAP_SYS_ADMIN"]
    assert not PLUGIN_CONFIG["Linux"]["AllowAllDevices"]


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian http://other.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
"""


@pytest.mark.parametrize(
    ("files", "mirror"),
    [
        ({"sources.list.d/debian.sources": DEB822}, "http://mirror.example/debian"),
        (
            {"sources.list": "deb [arch=amd64] http://one.example/debian bookworm main\n"},
            "http://one.example/debian",
        ),
        (
            {"sources.list": "deb http://one.example/debian bullseye main\n"},
            managed.FALLBACK_MIRROR,
        ),
        ({}, managed.FALLBACK_MIRROR),
    ],
    ids=["deb822", "one-line", "other-suite", "none"],
)
def test_host_mirror(tmp_path: Path, files: dict[str, str], mirror: str) -> None:
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert managed.host_mirror("bookworm", tmp_path) == mirror


def test_cache_key_follows_what_goes_in() -> None:
    key = managed.base_key("http://a/debian")
    assert key == managed.base_key("http://a/debian", packages=tuple(reversed(managed.PACKAGES)))
    assert key != managed.base_key("http://b/debian")
    assert key != managed.base_key("http://a/debian", packages=(*managed.PACKAGES, "vim"))
