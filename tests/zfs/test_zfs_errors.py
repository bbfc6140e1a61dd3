"""A full pool or quota, as ZFS reports it, is NoSpaceError; other failures stay BackendError.

Pure logic (no pool): the messages are the ones libzfs, the kernel and pyzfs give. The lab proves
the behaviour end to end (tests/hardening/test_full_disk.py on zfs).
"""

from __future__ import annotations

import errno

import pytest
from snapdriver_zfs.backend import _error
from snapdriver_zfs.zfs import ZfsError

from snapdriver.core import _reason
from snapdriver.errors import BackendError, NoSpaceError, storage_error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        # The CLI: libzfs says "out of space" for ENOSPC and EDQUOT alike (EZFS_NOSPC).
        (ZfsError("cannot create 'sdtest/t1/abc': out of space"), errno.ENOSPC),
        # An errno libzfs passes through is strerror's text.
        (ZfsError("cannot snapshot 'p/a@b': No space left on device"), errno.ENOSPC),
        (ZfsError("cannot create 'p/a': Disk quota exceeded"), errno.EDQUOT),
        # pyzfs: the errno rides on the exception; compound ones list "No space left" per item.
        (ZfsError("lzc_clone p/b: Failed to create clone", errno.EDQUOT), errno.EDQUOT),
        (ZfsError("lzc_create p/a: Failed to create filesystem", errno.ENOSPC), errno.ENOSPC),
        (ZfsError("lzc_snapshot p/a@b: No space left"), errno.ENOSPC),
        (ZfsError("lzc_snapshot p/a@b: Quota exceeded"), errno.EDQUOT),
    ],
)
def test_a_full_pool_or_quota_is_no_space(error: ZfsError, code: int) -> None:
    assert error.no_space == code
    mapped = _error(error, "cannot create layer dataset p/a")
    assert isinstance(mapped, NoSpaceError)
    assert str(mapped) == f"{_words(code)}: cannot create layer dataset p/a"
    assert _reason(mapped) == _words(code)  # what the core puts before "while creating layer"


@pytest.mark.parametrize(
    "error",
    [
        ZfsError("cannot destroy 'p/a': dataset is busy"),
        ZfsError("cannot open 'p/a': dataset does not exist"),
        ZfsError("lzc_destroy p/a: Dataset busy", errno.EBUSY),
        # A dataset merely named after space is not a full pool.
        ZfsError("cannot open 'p/space': permission denied"),
    ],
)
def test_other_failures_stay_backend_errors(error: ZfsError) -> None:
    assert error.no_space == 0
    mapped = _error(error, "cannot remove layer dataset p/a")
    assert type(mapped) is BackendError
    assert str(mapped) == f"cannot remove layer dataset p/a: {error}"


def test_btrfs_and_zfs_share_the_mapping() -> None:
    """One helper for both backends: the same errno gives the same message."""
    assert str(storage_error(errno.EDQUOT, "x", "ignored")) == "disk quota exceeded: x"
    assert str(storage_error(errno.ENOSPC, "x", "ignored")) == "no space left on device: x"
    assert str(storage_error(errno.EIO, "x", "Input/output error")) == "x: Input/output error"


def _words(code: int) -> str:
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}[code]
