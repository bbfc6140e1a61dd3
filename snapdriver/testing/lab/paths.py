"""Where the lab's pieces are: the checkout, its vagrant/ scripts, the cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .keys import cache_key

DEFAULT_CACHE = "/var/cache/snapdriver-lab"


@dataclass(frozen=True)
class LabPaths:
    """The checkout (physical and as the user reached it) and the cache for its build recipe."""

    checkout: Path
    logical: Path
    cache_base: Path

    @property
    def vagrant(self) -> Path:
        """The checkout's vagrant/ directory (provision.sh, build-recipe.txt, guest/)."""
        return self.checkout / "vagrant"

    @property
    def recipe(self) -> str:
        """The build recipe's text."""
        return (self.vagrant / "build-recipe.txt").read_text()

    @property
    def cache(self) -> Path:
        """This recipe's cache directory."""
        provision = (self.vagrant / "provision.sh").read_bytes()
        return self.cache_base / cache_key(provision, self.recipe)

    @property
    def rootfs(self) -> Path:
        """The guest's root filesystem inside the cache."""
        return self.cache / "rootfs"


def lab_paths(checkout: Path, logical: Path, cache_env: str | None) -> LabPaths:
    """The paths from the launcher's location and ``LAB_CACHE`` (trailing slash dropped)."""
    base = (cache_env or DEFAULT_CACHE).rstrip("/") or "/"
    return LabPaths(checkout, logical, Path(base))


def check_paths(paths: LabPaths) -> None:
    """Refuse paths the guest cannot share (whitespace) and a cache inside the checkout."""
    for path in (paths.checkout, paths.logical):
        if re.search(r"\s", str(path)):
            raise LabError(
                f"the checkout path '{path}' contains whitespace. The lab shares the checkout into"
                " the guest at the same absolute path and cannot do that with spaces. Move or"
                " clone the project to a path without spaces."
            )
    base = str(paths.cache_base)
    if re.search(r"\s", base):
        raise LabError(f"LAB_CACHE '{base}' must not contain whitespace")
    if not base.startswith("/"):
        raise LabError("LAB_CACHE must be an absolute path")
    for path in (paths.checkout, paths.logical):
        if (base + "/").startswith(f"{path}/"):
            raise LabError(f"LAB_CACHE must be outside the checkout ({paths.checkout})")
    if str(paths.checkout) == "/":
        raise LabError("the checkout cannot be /")
