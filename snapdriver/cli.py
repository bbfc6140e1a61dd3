"""``snapdriver``: run a snapdriver daemon for one backend.

``snapdriver --backend NAME`` serves Docker's GraphDriver plugin protocol; ``snapdriver sweep``
asks a running plugin to reclaim orphan layers; ``snapdriver config ...`` prints the settings the
same command line would run with, and where each came from; ``snapdriver doctor`` checks the host.
Every flag may also come from the environment or the config file (:mod:`snapdriver.config`).

Start-up problems end the process with one line on stderr and exit status 2 (bad usage or
configuration) so a person or systemd sees what to fix; a running daemon never dies of a request.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapdriver import __version__, config, logs
from snapdriver.daemon import raise_open_file_limit, run
from snapdriver.errors import ConfigError, SnapdriverError
from snapdriver.graphdriver.client import PluginClient
from snapdriver.graphdriver.driver import DEFAULT_ORPHAN_AGE, GraphDriver
from snapdriver.graphdriver.front import GraphDriverFront
from snapdriver.graphdriver.serve import PLUGIN_DIR, SPEC_DIR, Listen, TLSFiles
from snapdriver.metrics_listen import MetricsAddress, metrics_serving
from snapdriver.plugins import Backend, installed_backends

if TYPE_CHECKING:  # loaded by `snapdriver containerd` only: its gRPC modules cost start-up time
    from snapdriver.containerd.server import ContainerdFront

log = logging.getLogger("snapdriver")

#: dockerd picks its own driver of these names and never asks a plugin.
BUILTIN_DRIVERS = frozenset(
    {
        "aufs",
        "btrfs",
        "devicemapper",
        "fuse-overlayfs",
        "overlay",
        "overlay2",
        "vfs",
        "zfs",
        "windowsfilter",
    }
)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


CONTAINERD_ROOT = Path("/var/lib/snapdriver-containerd")
CONTAINERD_LISTEN = "unix:///run/snapdriver/containerd.sock"


def base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapdriver",
        description="Serve Docker's GraphDriver plugin protocol from a snapshot backend. "
        "`snapdriver sweep --help`: reclaim orphan layers of a running plugin.",
    )
    parser.add_argument("--backend", help="storage backend to use (see --list-backends)")
    parser.add_argument("--list-backends", action="store_true", help="list backends and exit")
    parser.add_argument("--version", action="version", version=f"snapdriver {__version__}")
    parser.add_argument(
        "--name",
        default="snapdriver",
        help="plugin name: dockerd --storage-driver NAME (default: snapdriver)",
    )
    parser.add_argument(
        "--listen",
        help="unix:///path.sock, tcp://host:port or systemd: "
        "(default: unix:///run/docker/plugins/NAME.sock)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the last Init is kept (default: /var/lib/snapdriver/NAME)",
    )
    parser.add_argument("--socket-group", help="group allowed to use the socket (mode 0660)")
    parser.add_argument("--spec-dir", type=Path, default=SPEC_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--tls-cert", type=Path, help="server certificate (TCP only)")
    parser.add_argument("--tls-key", type=Path, help="server key")
    parser.add_argument("--tls-ca", type=Path, help="CA that signs client certificates")
    parser.add_argument("--tls-client-cert", type=Path, help="client cert dockerd presents")
    parser.add_argument("--tls-client-key", type=Path, help="client key dockerd presents")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
    )
    add_observability_flags(parser)
    config.add_config_flag(parser)
    return parser


def add_observability_flags(parser: argparse.ArgumentParser) -> None:
    """What both fronts share: the log format and the metrics listener."""
    parser.add_argument("--log-format", default="text", choices=logs.FORMATS)
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDRESS",
        help="serve Prometheus metrics at HOST:PORT or unix:///path.sock (default: off)",
    )
    parser.add_argument(
        "--metrics-group",
        metavar="GROUP",
        help="group allowed to read a unix --metrics-listen socket (mode 0660; default: root only)",
    )


def containerd_parser() -> argparse.ArgumentParser:
    """The containerd front's settings (``[containerd]`` in the config file)."""
    # "resolve": a backend's own --dataset (zfs) replaces this one; the value is the same setting
    parser = argparse.ArgumentParser(
        prog="snapdriver containerd",
        conflict_handler="resolve",
        description="Serve containerd's snapshots API (a proxy snapshotter) from a backend. "
        "Prints the [proxy_plugins] entry for containerd's config at start.",
    )
    parser.add_argument("--backend", help="storage backend to use (see snapdriver --list-backends)")
    parser.add_argument(
        "--root",
        type=Path,
        default=CONTAINERD_ROOT,
        help="the front's own directory: its key store, and its layers for btrfs "
        "(never a graphdriver Home; default: %(default)s)",
    )
    parser.add_argument("--dataset", metavar="POOL/DATASET", help="ZFS dataset of the snapshots")
    parser.add_argument(
        "--listen",
        default=CONTAINERD_LISTEN,
        help="unix:///path.sock that containerd's proxy_plugins entry names (default: %(default)s)",
    )
    parser.add_argument(
        "--name", default="snapdriver", help="the snapshotter's name in containerd's config"
    )
    add_observability_flags(parser)
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    config.add_config_flag(parser)
    return parser


config.FRONTS.update(graphdriver=base_parser, containerd=containerd_parser)


def _fail(message: str) -> int:
    print(f"snapdriver: error: {message}", file=sys.stderr)
    return 2


def _list_backends() -> int:
    backends = installed_backends()
    if not backends:
        print("no backends installed")
    for name, dist in sorted(backends.items()):
        print(f"{name}\t({dist})")
    return 0


def _tls(args: argparse.Namespace) -> TLSFiles | None:
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise SnapdriverError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    return TLSFiles(
        args.tls_cert, args.tls_key, args.tls_ca, args.tls_client_cert, args.tls_client_key
    )


def _group(name: str | None, flag: str = "--socket-group") -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SnapdriverError(f"{flag} {name!r}: no such group") from None


def sweep_main(argv: Sequence[str]) -> int:
    """``snapdriver sweep``: ask the running plugin to reclaim orphan layers now."""
    parser = argparse.ArgumentParser(
        prog="snapdriver sweep",
        description="Remove layers nobody references: half made by a crash, unknown to "
        "snapdriver's record, or forgotten by dockerd (such as leaked -init layers).",
    )
    parser.add_argument("--name", default="snapdriver", help="the plugin's name")
    parser.add_argument("--listen", help="the plugin's address (default: its unix socket)")
    parser.add_argument(
        "--min-age",
        type=float,
        default=DEFAULT_ORPHAN_AGE,
        help="only layers older than this many seconds (default: %(default)s)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list, do not remove")
    args = parser.parse_args(argv)
    address = args.listen or f"unix://{PLUGIN_DIR / args.name}.sock"
    try:
        with PluginClient(address) as client:
            reply = client.call(
                "Snapdriver.Sweep", {"MinAge": args.min_age, "DryRun": args.dry_run}
            )
    except (OSError, SnapdriverError) as err:
        return _fail(f"cannot sweep through {address}: {err}")
    removed = reply.get("Removed", [])
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} orphan layer(s)")
    for layer in removed:
        print(layer)
    return 0


def config_main(argv: Sequence[str]) -> int:
    """``snapdriver config [FRONT] [FLAGS]``: the settings FLAGS would run with, and whence."""
    front, argv = (
        (argv[0], argv[1:]) if argv[:1] and argv[0] in config.FRONTS else ("graphdriver", argv)
    )
    parser = config.FRONTS[front]()
    try:
        file, early = config.early(parser, argv, front)
        if early.backend:
            resolved = config.with_backend(parser, argv, file, front, Backend.load(early.backend))
        else:
            resolved = config.resolve(parser, argv, file, front)
    except ConfigError as err:
        return _fail(str(err))
    print(config.render(resolved), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from snapdriver.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["config"]:
        return config_main(argv[1:])
    if argv[:1] == ["containerd"]:
        return containerd_main(argv[1:])
    parser = base_parser()
    try:
        file, early = config.early(parser, argv, "graphdriver")
    except ConfigError as err:
        return _fail(str(err))
    if early.list_backends:
        return _list_backends()
    if not early.backend:
        return _fail(
            "--backend is required (installed: "
            f"{', '.join(sorted(installed_backends())) or 'none'})"
        )
    if early.name in BUILTIN_DRIVERS or not _NAME.fullmatch(early.name):
        return _fail(
            f"--name {early.name!r} is not usable: dockerd would pick its own driver "
            "of that name, or it is not a lowercase name"
        )
    try:
        backend = Backend.load(early.backend)
        args = config.with_backend(parser, argv, file, "graphdriver", backend).args
        if args.metrics_listen:  # a bad address fails here, before anything starts
            args.metrics_listen = MetricsAddress.parse(args.metrics_listen)
        logs.configure(args.log_level, args.log_format, args.name)
        raise_open_file_limit()
        return asyncio.run(_serve(backend, args))
    except SnapdriverError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


def containerd_main(argv: Sequence[str]) -> int:
    """``snapdriver containerd``: serve containerd's snapshots API from one backend."""
    from snapdriver.containerd.server import ContainerdFront, parse_listen, proxy_plugin_toml

    parser = containerd_parser()
    try:
        file, early = config.early(parser, argv, "containerd")
        if not early.backend:
            raise ConfigError(
                "--backend is required (installed: "
                f"{', '.join(sorted(installed_backends())) or 'none'})"
            )
        backend = Backend.load(early.backend)
        args = config.with_backend(parser, argv, file, "containerd", backend).args
        if args.dataset and early.backend != "zfs":
            raise ConfigError(f"--dataset is a zfs setting; the {early.backend} backend has none")
        path = parse_listen(args.listen)
        if args.metrics_listen:  # a bad address fails here, before anything starts
            args.metrics_listen = MetricsAddress.parse(args.metrics_listen)
        logs.configure(args.log_level, args.log_format, f"containerd-{args.name}")
        print(proxy_plugin_toml(args.name, path), flush=True)
        front = ContainerdFront(backend, args.root.absolute(), path, args)
        raise_open_file_limit()
        return asyncio.run(_serve_containerd(front, args))
    except SnapdriverError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return 130


async def _serve_containerd(front: ContainerdFront, args: argparse.Namespace) -> int:
    group = _group(args.metrics_group, "--metrics-group")
    async with metrics_serving(args.metrics_listen, front.core, front.backend.name, group) as where:
        if where:
            log.info("serving metrics on %s", where)
        return await run(front, f"backend {front.backend.name} to containerd")


async def _serve(backend: Backend, args: argparse.Namespace) -> int:
    state_dir = args.state_dir or Path("/var/lib/snapdriver") / args.name
    front = GraphDriverFront(
        GraphDriver(backend, state_dir, args),
        args.name,
        Listen.parse(args.listen) if args.listen else Listen.default(args.name),
        group=_group(args.socket_group),
        tls=_tls(args),
        spec_dir=args.spec_dir,
    )
    group = _group(args.metrics_group, "--metrics-group")
    async with metrics_serving(
        args.metrics_listen, front.driver.core, backend.name, group
    ) as where:
        if where:
            log.info("serving metrics on %s", where)
        return await run(front, f"backend {backend.name} to dockerd")


if __name__ == "__main__":
    raise SystemExit(main())
