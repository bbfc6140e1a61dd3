"""Loading backends and plugins, and the typed facade the core calls them through."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path

import pluggy

from snapdriver import hookspec
from snapdriver.errors import BackendError, BackendLoadError
from snapdriver.hookspec import REQUIRED_HOOKS, BackendConfig, CreateRequest, Finding, hookimpl
from snapdriver.layers.changes import Change, walk_changes

BACKEND_GROUP = "snapdriver.backends"
PLUGIN_GROUP = "snapdriver.plugins"
BACKEND_PLUGIN_NAME = "backend"
#: Set when the tree walk answers a ``snapdriver_changes`` call, for a wrapper that wants to tell
#: native answers from the walk's (pluggy does not say which implementation answered).
WALKED: ContextVar[bool] = ContextVar("snapdriver_walked", default=False)


class TreeWalkChanges:
    """The fallback differ: Docker's two-tree walk, consulted after every native one."""

    @hookimpl(trylast=True)
    def snapdriver_changes(
        self, layer: str, layer_dir: Path, parent: str, parent_dir: Path
    ) -> Sequence[Change]:
        WALKED.set(True)
        return walk_changes(layer_dir, parent_dir)


def installed_backends() -> dict[str, str]:
    """Installed backends: name -> the distribution that provides it."""
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=BACKEND_GROUP):
        found[ep.name] = ep.dist.name if ep.dist else "?"
    return found


def load_plugin_manager(backend: str | object) -> pluggy.PluginManager:
    """Load the backend named ``backend`` (or register the given object) plus every plugin.

    Fails fast with :class:`BackendLoadError`: an unknown name, an import error, a hook that no
    spec declares, or a required hook the backend lacks.
    """
    pm = pluggy.PluginManager(hookspec.PROJECT)
    pm.add_hookspecs(hookspec)
    pm.register(TreeWalkChanges(), name="snapdriver.tree-walk")
    label = backend if isinstance(backend, str) else type(backend).__name__
    try:
        if isinstance(backend, str):
            _load_backend_entry_point(pm, backend)
        else:
            pm.register(backend, name=BACKEND_PLUGIN_NAME)
        pm.load_setuptools_entrypoints(PLUGIN_GROUP)
        pm.check_pending()
    except BackendLoadError:
        raise
    except Exception as err:
        raise BackendLoadError(f"backend {label!r} failed to load: {err}") from err
    missing = [h for h in REQUIRED_HOOKS if not getattr(pm.hook, h).get_hookimpls()]
    if missing:
        raise BackendLoadError(f"backend {label!r} does not implement {', '.join(missing)}")
    return pm


def _load_backend_entry_point(pm: pluggy.PluginManager, name: str) -> None:
    eps = [ep for ep in metadata.entry_points(group=BACKEND_GROUP) if ep.name == name]
    if not eps:
        known = ", ".join(sorted(installed_backends())) or "none"
        raise BackendLoadError(f"unknown backend {name!r} (installed backends: {known})")
    plugin = eps[0].load()
    pm.register(plugin, name=BACKEND_PLUGIN_NAME)


class Backend:
    """A typed facade over ``pm.hook``: one method per hook, results checked."""

    def __init__(self, pm: pluggy.PluginManager, name: str) -> None:
        self.pm = pm
        self.name = name
        self._hook = pm.hook

    @classmethod
    def load(cls, backend: str | object) -> Backend:
        name = backend if isinstance(backend, str) else type(backend).__name__
        return cls(load_plugin_manager(backend), name)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        self._hook.snapdriver_addoption(parser=parser)

    def setup(self, config: BackendConfig) -> None:
        self._hook.snapdriver_setup(config=config)

    def create(self, request: CreateRequest) -> None:
        self._hook.snapdriver_create(request=request)

    def remove(self, layer: str) -> None:
        self._hook.snapdriver_remove(layer=layer)

    def mount(self, layer: str, mount_label: str = "") -> Path:
        path = self._hook.snapdriver_mount(layer=layer, mount_label=mount_label)
        if path is None:
            raise BackendError(f"backend {self.name!r} returned no directory for layer {layer}")
        return path if isinstance(path, Path) else Path(path)  # on every Get: no needless copy

    def unmount(self, layer: str) -> None:
        self._hook.snapdriver_unmount(layer=layer)

    def commit(self, layer: str) -> None:
        self._hook.snapdriver_commit(layer=layer)

    def reclaim(self, timeout: float) -> None:
        self._hook.snapdriver_reclaim(timeout=timeout)

    def free_space(self) -> tuple[int, int] | None:
        found = self._hook.snapdriver_free_space()
        return None if found is None else (int(found[0]), int(found[1]))

    def doctor(self, config: BackendConfig) -> list[Finding]:
        return [found for each in self._hook.snapdriver_doctor(config=config) for found in each]

    def instant_mounts(self) -> bool:
        return bool(self._hook.snapdriver_instant_mounts())

    def layers(self) -> list[str]:
        return list(self._hook.snapdriver_layers() or ())

    def changes(self, layer: str, layer_dir: Path, parent: str, parent_dir: Path) -> list[Change]:
        found = self._hook.snapdriver_changes(
            layer=layer, layer_dir=layer_dir, parent=parent, parent_dir=parent_dir
        )
        return list(found)

    def status(self) -> list[tuple[str, str]]:
        return [(str(k), str(v)) for pairs in self._hook.snapdriver_status() for k, v in pairs]

    def metadata(self, layer: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        # pluggy returns the last-registered plugin first; apply in registration order.
        for pairs in reversed(self._hook.snapdriver_metadata(layer=layer)):
            merged.update({str(k): str(v) for k, v in pairs.items()})
        return merged

    def cleanup(self) -> None:
        self._hook.snapdriver_cleanup()
