"""Settings from flags, the environment and ``/etc/snapdriver/snapdriver.toml``, in that order.

Every setting is an argparse flag; the file and the environment only supply that flag's default,
so a front (or a backend, through ``snapdriver_addoption``) declares a setting once, as a flag, and
it can be set in all three places. A flag ``--state-dir`` is read from ``SNAPDRIVER_STATE_DIR`` and
from the key ``state_dir`` (its argparse ``dest``) of a table in the file:

- top level: :data:`SHARED_KEYS`, for every front;
- ``[graphdriver]``, ``[containerd]``: each front's flags (a front's table may also set a shared
  key for that front alone);
- ``[backends.NAME]``: the flags backend NAME added in ``snapdriver_addoption`` (``backends``, not
  ``backend``: TOML cannot have ``backend = "zfs"`` and a table ``[backend.zfs]`` in one file).

A front plugs in by registering the function that builds its parser in :data:`FRONTS` and calling
:func:`resolve` on its command line. The file is checked whole, against every front and every
backend it names: an unknown key or a value of the wrong type is an error naming the key and its
line, even in a table the running front does not read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapdriver.errors import ConfigError

if TYPE_CHECKING:
    from snapdriver.plugins import Backend

DEFAULT_PATH = Path("/etc/snapdriver/snapdriver.toml")
ENV_PREFIX = "SNAPDRIVER_"
#: Keys the top level of the file may hold: defaults for every front.
SHARED_KEYS = frozenset({"backend", "log_level"})
#: The table whose sub-tables hold each backend's own settings.
BACKENDS_TABLE = "backends"
#: Flags that are commands or are about the file itself, never settings.
NOT_SETTINGS = frozenset({"help", "version", "list_backends", "config"})
#: Front name -> a function building that front's parser (without backend flags).
FRONTS: dict[str, Callable[[], argparse.ArgumentParser]] = {}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def fronts() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """:data:`FRONTS`, after the command-line module has registered the built-in fronts."""
    import snapdriver.cli  # noqa: F401 - registers on import

    return FRONTS


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config PATH``, for every command that reads the file."""
    parser.add_argument(
        "--config",
        type=Path,
        help=f"settings file (default: {DEFAULT_PATH}, if it exists; env SNAPDRIVER_CONFIG)",
    )


def path_from_argv(argv: Sequence[str]) -> Path | None:
    """The ``--config`` of a command line, before the rest of it can be parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    add_config_flag(parser)
    found: Path | None = parser.parse_known_args(argv)[0].config
    return found


# -- the file, with the line of every key ----------------------------------------------------------


@dataclass(frozen=True)
class ConfigFile:
    """A parsed settings file: its tables and the line each key was written on."""

    path: Path | None
    data: Mapping[str, Any] = field(default_factory=dict)
    lines: Mapping[tuple[str, ...], int] = field(default_factory=dict)

    def where(self, *key: str) -> str:
        """``PATH:LINE`` of ``key`` (or of the nearest table that holds it)."""
        for end in range(len(key), 0, -1):
            line = self.lines.get(key[:end])
            if line is not None:
                return f"{self.path}:{line}"
        return str(self.path)

    def table(self, *names: str) -> Mapping[str, Any]:
        found: Any = self.data
        for name in names:
            found = found.get(name, {}) if isinstance(found, Mapping) else {}
        return found if isinstance(found, Mapping) else {}


def read_file(explicit: Path | None, environ: Mapping[str, str] = os.environ) -> ConfigFile:
    """The file named by ``--config``, else by ``SNAPDRIVER_CONFIG``, else the default one.

    A missing default file is no file; a missing file someone named is an error.
    """
    named = explicit or (
        Path(environ["SNAPDRIVER_CONFIG"]) if environ.get("SNAPDRIVER_CONFIG") else None
    )
    path = named or DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named is None:
            return ConfigFile(None)
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: {err.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    return ConfigFile(path, data, key_lines(text))


_TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)
_PART = re.compile(r"[A-Za-z0-9_-]+|\"([^\"]*)\"|'([^']*)'")


def _dotted(text: str) -> tuple[str, ...]:
    return tuple(m.group(1) or m.group(2) or m.group(0) for m in _PART.finditer(text))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers (from 1) of table headers and keys, by their full dotted path.

    tomllib keeps no positions. This reads only what a settings file holds: ``[table]`` headers and
    ``key = value`` lines (dotted keys too); lines inside a multi-line string or array are skipped
    by tracking open triple quotes and brackets, which is all the precision an error message needs.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_brackets, in_string = 0, False
    for number, line in enumerate(text.splitlines(), start=1):
        if not in_string and open_brackets == 0:
            header = _TABLE.match(line)
            key = _KEY.match(line)
            if header:
                table = _dotted(header.group(1))
                lines.setdefault(table, number)
            elif key:
                lines.setdefault((*table, *_dotted(key.group(1))), number)
        in_string ^= line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1
        if not in_string:
            code = re.sub(r"\"[^\"]*\"|'[^']*'", "", line).split("#", 1)[0]
            open_brackets = max(0, open_brackets + code.count("[") - code.count("]"))
            if _TABLE.match(line):
                open_brackets = 0
    return lines


# -- where each flag is read from ------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One flag as a setting: its table in the file, its key there and its environment variable.

    ``table`` is where the setting belongs; ``front`` is the running front's table, which may
    override a shared key or a backend's key for that front alone (``[containerd] dataset`` over
    ``[backends.zfs] dataset``), if the front declares that flag itself.
    """

    action: argparse.Action
    table: tuple[str, ...]
    front: str = ""

    @property
    def tables(self) -> list[tuple[str, ...]]:
        """The tables to read, first match wins."""
        found: list[tuple[str, ...]] = []
        if self.front and (self.front,) != self.table:
            found.append((self.front,))
        found.append(self.table)
        if self.key in SHARED_KEYS:
            found.append(())
        return found

    @property
    def key(self) -> str:
        return self.action.dest

    @property
    def env(self) -> str:
        flag = max(self.action.option_strings, key=len)
        return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()

    @property
    def flag(self) -> str:
        return max(self.action.option_strings, key=len)


def settings_of(
    parser: argparse.ArgumentParser,
    front: str,
    backend: str | None = None,
    backend_dests: Iterable[str] = (),
) -> list[Setting]:
    """The parser's flags that are settings, each with the table it is read from."""
    from_backend = set(backend_dests)
    found = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_SETTINGS:
            continue
        if action.dest in from_backend and backend:
            table: tuple[str, ...] = (BACKENDS_TABLE, backend)
        else:
            table = (front,)
        found.append(Setting(action, table, front))
    return found


def dests_added(
    parser: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], None]
) -> list[str]:
    """The ``dest`` of every flag ``add`` put on ``parser`` (a backend's ``add_options``)."""
    before = {id(action) for action in parser._actions}
    add(parser)
    return [a.dest for a in parser._actions if id(a) not in before and a.option_strings]


# -- converting a value from the file or the environment -------------------------------------------


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` (a TOML value, or an environment string) as the flag's parsed value would be."""
    name = f"{action.dest} ({where})"
    if isinstance(action, argparse._CountAction):
        return _one(_Typed(action, int), value, name)
    if action.nargs == 0:  # store_true, store_false, store_const: the file says on or off
        on = _boolean(value, name)
        if isinstance(action, argparse._StoreFalseAction):
            return on
        return action.const if on else action.default
    if isinstance(value, list):
        if action.nargs not in ("*", "+") and not isinstance(action, argparse._AppendAction):
            raise ConfigError(f"{name}: a list is not allowed here, give one value")
        return [_one(action, item, name) for item in value]
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return [
            _one(action, item, name)
            for item in (value.split(",") if isinstance(value, str) else [value])
        ]
    return _one(action, value, name)


class _Typed(argparse.Action):
    """An action's view with another value type (a counter's value is an integer)."""

    def __init__(self, action: argparse.Action, kind: Callable[[str], Any]) -> None:
        super().__init__(action.option_strings, action.dest, type=kind, choices=action.choices)


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _one(action: argparse.Action, value: Any, name: str) -> Any:
    kind = action.type
    if isinstance(value, (bool, dict, list)):
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    if isinstance(value, (int, float)) and kind not in (int, float):
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    if isinstance(value, float) and kind is int:
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    try:
        result = kind(value) if callable(kind) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{name}: {value!r} is not {_kind_name(kind)} ({err})") from None
    if action.choices is not None and result not in action.choices:
        allowed = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{name}: {value!r} is not one of {allowed}")
    return result


def _kind_name(kind: object) -> str:
    names: dict[object, str] = {int: "an integer", float: "a number", Path: "a path (a string)"}
    return names.get(kind, "a string")


# -- resolving: flags over environment over file over defaults -------------------------------------


@dataclass
class Resolved:
    """The parsed arguments and, for every setting, where its value came from."""

    args: argparse.Namespace
    origins: dict[str, str]
    settings: list[Setting]
    file: ConfigFile


def resolve(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    file: ConfigFile,
    front: str,
    *,
    backend: str | None = None,
    backend_dests: Iterable[str] = (),
    environ: Mapping[str, str] = os.environ,
    known_only: bool = False,
) -> Resolved:
    """Parse ``argv`` with defaults taken from ``environ``, then ``file``, then the parser.

    ``known_only`` parses what it knows and leaves the rest (the early pass, before the backend has
    added its flags); otherwise an unknown flag ends the process, as argparse does.
    """
    settings = settings_of(parser, front, backend, backend_dests)
    origins: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    for setting in settings:
        found = _from_env(setting, environ) or _from_file(setting, file)
        if found:
            defaults[setting.key], origins[setting.key] = found
    with _defaults(parser, lambda action: defaults.get(action.dest, action.default)):
        args = parser.parse_known_args(argv)[0] if known_only else parser.parse_args(argv)
    given = given_on_command_line(parser, argv)  # after: --help and --version act only once
    for setting in settings:
        if setting.key in given:
            origins[setting.key] = f"flag {setting.flag}"
        origins.setdefault(setting.key, "default")
    return Resolved(args, origins, settings, file)


def _from_env(setting: Setting, environ: Mapping[str, str]) -> tuple[Any, str] | None:
    if setting.env not in environ:
        return None
    where = f"env {setting.env}"
    return convert(setting.action, environ[setting.env], where), where


def _from_file(setting: Setting, file: ConfigFile) -> tuple[Any, str] | None:
    for table in setting.tables:
        values = file.table(*table)
        if setting.key in values:
            where = f"file {file.where(*table, setting.key)}"
            return convert(setting.action, values[setting.key], where), where
    return None


def given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every flag that ``argv`` sets (parsed with every default suppressed)."""
    try:
        with _defaults(parser, lambda action: argparse.SUPPRESS):
            found, _ = parser.parse_known_args(argv)
    except SystemExit:
        return set()  # a bad command line: the real parse says so
    return set(vars(found))


@contextlib.contextmanager
def _defaults(
    parser: argparse.ArgumentParser, default: Callable[[argparse.Action], Any]
) -> Iterator[None]:
    """Give every action of ``parser`` the default ``default(action)`` for a while."""
    saved = [(action, action.default) for action in parser._actions]
    for action in parser._actions:
        action.default = default(action)
    try:
        yield
    finally:
        for action, value in saved:
            action.default = value


def early(
    parser: argparse.ArgumentParser, argv: Sequence[str], front: str
) -> tuple[ConfigFile, argparse.Namespace]:
    """Read and check the file, and parse what the front's parser knows before a backend is loaded
    (``--backend`` itself may come from the file)."""
    file = read_file(path_from_argv(argv))
    check_file(file, backend_actions)
    return file, resolve(parser, argv, file, front, known_only=True).args


def with_backend(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    file: ConfigFile,
    front: str,
    backend: Backend,
) -> Resolved:
    """Add the backend's flags to ``parser`` and parse ``argv`` whole (an error ends the process).

    What a front does to start::

        file, args = config.early(parser, argv, "containerd")
        backend = Backend.load(args.backend)
        args = config.with_backend(parser, argv, file, "containerd", backend).args
    """
    added = dests_added(parser, backend.add_options)
    return resolve(parser, argv, file, front, backend=backend.name, backend_dests=added)


def backend_actions(name: str) -> list[argparse.Action]:
    """The flags backend ``name`` adds (loading it), for checking its ``[backends.NAME]`` table."""
    from snapdriver.errors import BackendLoadError
    from snapdriver.plugins import Backend

    parser = argparse.ArgumentParser(add_help=False)
    try:
        Backend.load(name).add_options(parser)
    except BackendLoadError as err:
        raise ConfigError(str(err)) from None
    return list(parser._actions)


# -- checking the whole file -----------------------------------------------------------------------


def check_file(file: ConfigFile, backend_dests: Callable[[str], list[argparse.Action]]) -> None:
    """Every key of ``file`` is a setting of some front or backend, with a value of its type.

    ``backend_dests(name)`` gives the flags backend ``name`` adds (loading it); it raises
    :class:`ConfigError` for a backend that is not installed.
    """
    for key, value in file.data.items():
        where = file.where(key)
        if key == BACKENDS_TABLE and not isinstance(value, Mapping):
            raise ConfigError(f"{key} at {where}: expected tables [{key}.NAME]")
        if key in fronts():
            _check_table(file, (key,), value, _front_actions(key))
        elif key == BACKENDS_TABLE:
            _check_backends(file, value, backend_dests)
        elif key in SHARED_KEYS:
            actions = _front_actions(next(iter(fronts())))
            convert(actions[key], value, f"file {where}")
        else:
            raise ConfigError(f"unknown key {key!r} at {where}{_known(fronts(), SHARED_KEYS)}")


def _check_backends(
    file: ConfigFile,
    tables: Mapping[str, Any],
    backend_dests: Callable[[str], list[argparse.Action]],
) -> None:
    for name, table in tables.items():
        where = file.where(BACKENDS_TABLE, name)
        try:
            actions = {a.dest: a for a in backend_dests(name)}
        except ConfigError as err:
            raise ConfigError(f"[{BACKENDS_TABLE}.{name}] at {where}: {err}") from None
        _check_table(file, (BACKENDS_TABLE, name), table, actions)


def _check_table(
    file: ConfigFile,
    table: tuple[str, ...],
    values: Any,
    actions: Mapping[str, argparse.Action],
) -> None:
    dotted = ".".join(table)
    if not isinstance(values, Mapping):
        raise ConfigError(f"{dotted} at {file.where(*table)}: expected a table [{dotted}]")
    for key, value in values.items():
        where = file.where(*table, key)
        if key not in actions:
            raise ConfigError(f"unknown key {key!r} in [{dotted}] at {where}{_known(actions)}")
        convert(actions[key], value, f"file {where}")


def _front_actions(front: str) -> dict[str, argparse.Action]:
    parser = fronts()[front]()
    return {s.key: s.action for s in settings_of(parser, front)}


def _known(*names: Iterable[str]) -> str:
    known = sorted({str(n) for group in names for n in group})
    return f" (known: {', '.join(known)})" if known else " (nothing is settable here)"


# -- showing the result ----------------------------------------------------------------------------


def render(resolved: Resolved) -> str:
    """The effective settings as a TOML file, each value commented with where it came from."""
    out = [f"# config file: {resolved.file.path or f'none ({DEFAULT_PATH} does not exist)'}"]
    by_table: dict[tuple[str, ...], list[Setting]] = {}
    for setting in resolved.settings:
        table = () if setting.key in SHARED_KEYS else setting.table
        by_table.setdefault(table, []).append(setting)
    for table in sorted(by_table, key=len):
        if table:
            out.append(f"\n[{'.'.join(table)}]")
        for setting in by_table[table]:
            value = getattr(resolved.args, setting.key, None)
            origin = resolved.origins[setting.key]
            out.append(_line(setting.key, value, origin))
    return "\n".join(out) + "\n"


def _line(key: str, value: Any, origin: str) -> str:
    if value is None:
        return f"# {key} is unset  # {origin}"
    return f"{key} = {_toml(value)}  # {origin}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
