"""``python -m snapdriver.containerd ARGS`` is ``snapdriver containerd ARGS``."""

from __future__ import annotations

import sys

from snapdriver.cli import main

raise SystemExit(main(["containerd", *sys.argv[1:]]))
