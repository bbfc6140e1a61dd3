"""Cache keys and the host's Debian mirror: pure functions of file contents.

The rootfs cache is ``$LAB_CACHE/<key>``: sha256 of ``provision.sh`` followed by the build
recipe, the ``#@@ build`` section of ``vagrant/build-recipe.txt``. That section is the text the
bash lab hashed (its own build code, kept byte for byte), so a cache built by it stays valid.
"""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path

INITRAMFS_RECIPE = b"initramfs 2: vagrant/guest/stage1.sh as /init, stage2.sh as /lab-init\n"


def section(text: str, name: str) -> str:
    """Lines from ``#@@ NAME begin`` through ``#@@ NAME end``, as ``sed -n '/b/,/e/p'`` prints."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if not inside and line == f"#@@ {name} begin":
            inside = True
        if inside:
            out.append(line + "\n")
            if line == f"#@@ {name} end" and len(out) > 1:
                inside = False
    return "".join(out)


def recipe_value(recipe: str, name: str) -> str:
    """``NAME=value`` from the build section (the recipe names its suite, e.g. ``SUITE``)."""
    match = re.search(rf"^{name}=(\S+)$", section(recipe, "build"), re.MULTILINE)
    if match is None:
        raise ValueError(f"the build recipe sets no {name}")
    return match.group(1)


def cache_key(provision: bytes, recipe: str) -> str:
    """The rootfs cache directory's name (16 hex digits)."""
    digest = hashlib.sha256(provision + section(recipe, "build").encode())
    return digest.hexdigest()[:16]


def initrd_key(stage1: bytes, stage2: bytes, modules: str) -> str:
    """The initramfs file's key (12 hex digits): the guest scripts and the module list."""
    digest = hashlib.sha256(INITRAMFS_RECIPE)
    for part in (stage1, b"\0", stage2, b"\0", modules.encode()):
        digest.update(part)
    return digest.hexdigest()[:12]


def deb822_mirror(text: str, suite: str) -> str | None:
    """The first URI of the first deb822 stanza whose ``Suites:`` lists ``suite``."""
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and key in ("URIs", "Suites"):
                fields[key] = value.strip()
        if fields.get("URIs") and suite in fields.get("Suites", "").split():
            return fields["URIs"].split()[0]
    return None


def one_line_mirror(text: str, suite: str) -> str | None:
    """The URI of the first ``deb URI SUITE ...`` line (options in brackets ignored)."""
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line, count=1).split()
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return None


def host_mirror(suite: str, etc_apt: Path = Path("/etc/apt")) -> str | None:
    """The host's mirror for ``suite``: deb822 files first, then one-line lists."""
    for name in sorted(glob.glob(str(etc_apt / "sources.list.d" / "*.sources"))):
        found = deb822_mirror(Path(name).read_text(errors="replace"), suite)
        if found:
            return found
    lists = [
        str(etc_apt / "sources.list"),
        *sorted(glob.glob(str(etc_apt / "sources.list.d/*.list"))),
    ]
    for name in lists:
        if Path(name).is_file():
            found = one_line_mirror(Path(name).read_text(errors="replace"), suite)
            if found:
                return found
    return None
