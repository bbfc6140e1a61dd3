"""snapdriver's btrfs backend: layers as subvolumes, Changes from the btrfs send stream."""

from snapdriver_btrfs.backend import BtrfsBackend

#: The plugin object the ``snapdriver.backends`` entry point ``btrfs`` names.
backend = BtrfsBackend()

__all__ = ["BtrfsBackend", "backend"]
