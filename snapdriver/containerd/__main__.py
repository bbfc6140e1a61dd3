"""``python -m snapdriver.containerd --backend NAME --root DIR --listen unix:///path.sock``.

Serves containerd's snapshots API until SIGTERM or SIGINT. At start it prints the
``[proxy_plugins]`` snippet for containerd's config to stdout; the socket appears once the front
is ready. Bad usage or configuration ends it with one line on stderr and exit status 2.
(Temporary entry point: ``snapdriver containerd ...`` will take it over.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from snapdriver import daemon
from snapdriver.containerd.server import ContainerdFront, parse_listen, proxy_plugin_toml
from snapdriver.errors import SnapdriverError
from snapdriver.plugins import Backend

PROG = "snapdriver-containerd"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    made = _Parser(prog=PROG, description="Serve containerd's snapshots API (proxy plugin).")
    made.add_argument("--backend", required=True, help="storage backend (btrfs, zfs, ...)")
    made.add_argument("--root", required=True, type=Path, help="where the layers and keys live")
    made.add_argument("--listen", required=True, help="unix:///path/to/socket.sock")
    made.add_argument("--name", default="snapdriver", help="snapshotter name in containerd")
    made.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return made


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    arguments = parser()
    early, _ = arguments.parse_known_args(args_list)
    try:
        backend = Backend.load(early.backend)
        backend.add_options(arguments)
        args = arguments.parse_args(args_list)
        path = parse_listen(args.listen)
        logging.basicConfig(
            level=args.log_level.upper(), format=f"{PROG} %(levelname)s %(name)s: %(message)s"
        )
        print(proxy_plugin_toml(args.name, path), flush=True)
        front = ContainerdFront(backend, args.root.absolute(), path, args)
        daemon.raise_open_file_limit()
        return asyncio.run(daemon.run(front, f"containerd snapshotter ({backend.name})"))
    except SnapdriverError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
