"""A private dockerd for end-to-end tests, benchmarks and the demo.

It gets its own data root, exec root, API socket and pid file, no iptables and no bridge, so a
system dockerd on the same machine is left alone. Images are built offline from Debian's
``busybox-static``: a root filesystem of ``/bin/busybox`` and its applet links, imported as a tar.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "mkdir",
    "rm",
    "touch",
    "sleep",
    "true",
    "chmod",
    "ln",
    "cp",
    "mv",
    "dd",
    "head",
    "wc",
    "find",
    "stat",
    "sync",
    "env",
    "seq",
    "xargs",
)


#: What dockerd logs when the containerd it started was not up in time (it then exits).
CONTAINERD_TIMEOUT = "timeout waiting for containerd to start"
START_ATTEMPTS = 3


class _ExitedEarly(RuntimeError):
    """dockerd exited before its API answered."""


def docker_cli() -> str:
    found = shutil.which("docker")
    if found is None:
        raise RuntimeError("the docker CLI is not installed (apt-get install docker.io)")
    return found


def busybox_rootfs_tar(extra_files: dict[str, bytes] | None = None) -> bytes:
    """A tar of a tiny root filesystem: busybox-static, its applets, /etc/passwd, /tmp."""
    if not BUSYBOX.exists():
        raise RuntimeError("/bin/busybox is missing (apt-get install busybox-static)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("bin", "etc", "tmp", "root", "proc", "sys", "dev"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        files = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:\n"}
        for name, data in (files | (extra_files or {})).items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Dockerd:
    """``dockerd --experimental`` with a private root; :meth:`docker` runs the CLI against it."""

    def __init__(
        self,
        workdir: Path,
        storage_driver: str,
        data_root: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.storage_driver = storage_driver
        self.data_root = data_root or workdir / "data"
        self.exec_root = Path("/run") / f"sd-exec-{os.getpid()}-{storage_driver[:20]}"
        self.host = f"unix://{workdir}/docker.sock"
        self.pidfile = workdir / "dockerd.pid"
        self.log_path = workdir / "dockerd.log"
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd and wait for its API.

        dockerd gives the containerd it starts a fixed few seconds and exits when that is not
        enough, as on a loaded host or in the lab's emulated guest: that exit is retried.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(timeout)
                return
            except _ExitedEarly as err:
                if attempt == START_ATTEMPTS or CONTAINERD_TIMEOUT not in str(err):
                    raise
                self.stop()  # the exec root it left

    def _start_once(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            "dockerd",
            "--experimental",
            "--storage-driver",
            self.storage_driver,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            self.host,
            "--pidfile",
            str(self.pidfile),
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _ExitedEarly(f"dockerd exited early:\n{self.log_tail()}")
            if self.docker("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dockerd did not come up in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        # dockerd leaves its exec root behind (and mounts in it only while running).
        subprocess.run(
            ["umount", "-R", "-l", str(self.exec_root)], capture_output=True, check=False
        )
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300, stdin: IO[bytes] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this dockerd; ``stdin`` feeds e.g. ``docker import -``."""
        done = subprocess.run(
            [docker_cli(), "-H", self.host, *args],
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "DOCKER_CONFIG": str(self.workdir / "cli")},
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"docker {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def import_busybox(self, tag: str) -> None:
        tar = self.workdir / "busybox-rootfs.tar"
        tar.write_bytes(busybox_rootfs_tar())
        self.docker("import", str(tar), tag)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
