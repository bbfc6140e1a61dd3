"""What ``snapdriver doctor`` asks of the zfs backend: the root dataset it would use, and its pool.

The same choices as set-up (:func:`~snapdriver_zfs.backend._choose_root` and the checks after
it), made read-only: nothing is created, claimed or mounted here.
"""

from __future__ import annotations

from snapdriver.errors import ConfigError
from snapdriver.hookspec import BackendConfig, Finding, Level
from snapdriver_zfs.backend import HOME, _check_root, _choose_root, _parse_options, _require_zfs
from snapdriver_zfs.zfs import Zfs, ZfsError

ROOT_CHECK = "zfs root dataset"
POOL_CHECK = "zfs pool"
#: zpool health states in which writes may still work (a vdev lost, redundancy left).
DEGRADED = frozenset({"DEGRADED"})


def findings(config: BackendConfig) -> list[Finding]:
    """The root dataset's state, then its pool's, or why they cannot be checked."""
    try:
        command = _require_zfs()
    except ConfigError as err:
        return [Finding(ROOT_CHECK, "SKIP", f"not checked: {err}")]
    try:
        root = _choose_root(config, _parse_options(config.options))
    except ConfigError as err:
        fix = "snapdriver --dataset POOL/DATASET, or dockerd --storage-opt zfs.fsname=POOL/DATASET"
        return [Finding(ROOT_CHECK, "FAIL", str(err), fix)]
    zfs = Zfs(command)
    try:
        _check_root(zfs, root)
    except ConfigError as err:
        return [Finding(ROOT_CHECK, "FAIL", str(err), f"zfs create -o mountpoint=none {root}")]
    return [_judge_root(zfs, root, config), _judge_pool(zfs, root.split("/")[0])]


def _judge_root(zfs: Zfs, root: str, config: BackendConfig) -> Finding:
    try:
        props = zfs.get(root, HOME, "readonly", "available")
    except ZfsError as err:
        return Finding(ROOT_CHECK, "FAIL", f"cannot read {root}'s properties: {err}")
    owner, home = props.get(HOME, "-"), str(config.home)
    if owner not in ("", "-", home):
        return Finding(
            ROOT_CHECK,
            "FAIL",
            f"{root} keeps the layers of {owner}, not of {home}: snapdriver would refuse to start",
            f"give each front or plugin its own dataset; if {owner} is gone for good: "
            f"zfs inherit {HOME} {root}",
        )
    if props.get("readonly") == "on":
        return Finding(ROOT_CHECK, "FAIL", f"{root} is readonly", f"zfs set readonly=off {root}")
    claimed = "claimed by this Home" if owner == home else "not claimed yet"
    free = _gib(props.get("available", ""))
    return Finding(ROOT_CHECK, "OK", f"{root} ({claimed}), {free} available")


def _judge_pool(zfs: Zfs, pool: str) -> Finding:
    try:
        health = zfs.pool_health(pool)
    except ZfsError as err:
        return Finding(POOL_CHECK, "FAIL", f"cannot read pool {pool}'s health: {err}")
    if health == "ONLINE":
        return Finding(POOL_CHECK, "OK", f"{pool} is ONLINE")
    level: Level = "WARN" if health in DEGRADED else "FAIL"
    return Finding(POOL_CHECK, level, f"{pool} is {health}", f"zpool status -x {pool}")


def _gib(value: str) -> str:
    return f"{int(value) / (1 << 30):.1f} GiB" if value.isdigit() else value or "?"
