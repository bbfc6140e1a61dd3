"""snapdriver's ZFS backend: layers as datasets and clones, Changes from ``zfs diff``."""

from snapdriver_zfs.backend import ZfsBackend

#: The plugin object the ``snapdriver.backends`` entry point ``zfs`` names.
backend = ZfsBackend()

__all__ = ["ZfsBackend", "backend"]
