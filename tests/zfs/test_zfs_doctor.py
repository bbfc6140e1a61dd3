"""``snapdriver doctor`` on the zfs backend, against a real pool: the root dataset it would use,
who has claimed it, whether it is writable, and the pool's health."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from snapdriver_zfs.testing import scratch_root, skip_without_zfs, zfs

from snapdriver import doctor
from snapdriver.doctor import Host
from snapdriver.hookspec import Finding

pytestmark = pytest.mark.zfs


def findings(home: Path, dataset: str) -> dict[str, Finding]:
    host = Host(
        backend="zfs",
        front="containerd",
        data_root=home,
        backend_args=argparse.Namespace(dataset=dataset),
    )
    return {found.check: found for found in doctor.check_backend(host)}


def test_doctor_judges_the_root_dataset_and_its_pool(tmp_path: Path) -> None:
    skip_without_zfs()
    pool = os.environ["SNAPDRIVER_ZPOOL"]
    with scratch_root("doc") as root:
        fresh = findings(tmp_path, root)
        assert fresh["zfs root dataset"].level == "OK", fresh
        assert "not claimed yet" in fresh["zfs root dataset"].detail
        assert fresh["zfs pool"].level == "OK" and f"{pool} is ONLINE" in fresh["zfs pool"].detail
        assert zfs("get", "-H", "-o", "value", "snapdriver:home", root).strip() == "-", (
            "doctor must not claim the dataset"
        )

        zfs("set", "snapdriver:home=/elsewhere", root)
        taken = findings(tmp_path, root)["zfs root dataset"]
        assert taken.level == "FAIL" and "keeps the layers of /elsewhere" in taken.detail
        assert f"zfs inherit snapdriver:home {root}" in taken.fix

        zfs("set", f"snapdriver:home={tmp_path}", root)
        zfs("set", "readonly=on", root)
        frozen = findings(tmp_path, root)["zfs root dataset"]
        assert frozen.level == "FAIL" and frozen.fix == f"zfs set readonly=off {root}"
        zfs("inherit", "readonly", root)
        assert "claimed by this Home" in findings(tmp_path, root)["zfs root dataset"].detail

    missing = findings(tmp_path, root)["zfs root dataset"]
    assert missing.level == "FAIL" and missing.fix == f"zfs create -o mountpoint=none {root}"
