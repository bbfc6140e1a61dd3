"""How ``vagrant/lab`` loads this package with nothing but the standard library.

Debian's ``/usr/bin/python3 -I`` runs the lab before any venv exists, so the snapdriver package
(whose ``__init__`` needs pluggy) cannot be imported. The lab needs one module of it, the
mountinfo reader :mod:`snapdriver.hostfs`, which is standard library only: it is loaded here
from its file, alone, under its own name, so every caller shares the one implementation.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

HOSTFS = "snapdriver.hostfs"


def load(checkout: Path) -> None:
    """Make ``snapdriver.hostfs`` importable without its package (idempotent)."""
    if HOSTFS in sys.modules:
        return
    package = types.ModuleType("snapdriver")
    package.__path__ = []  # a package of which only hostfs is loaded
    sys.modules.setdefault("snapdriver", package)
    spec = importlib.util.spec_from_file_location(HOSTFS, checkout / "snapdriver" / "hostfs.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {checkout}/snapdriver/hostfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[HOSTFS] = module  # before it runs: its dataclasses look their module up
    spec.loader.exec_module(module)
