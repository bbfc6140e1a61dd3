"""Booting the guest: qemu's command line and its supervision (timeout, signals, clean kill)."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# A guest kernel that locks up (CI saw both vCPUs stuck in runc for the rest of the timeout under
# TCG) panics after 60 s instead: the panic ends qemu (-no-reboot) with every CPU's trace logged.
KERNEL_WATCHDOG = "watchdog_thresh=30 softlockup_panic=1 softlockup_all_cpu_backtrace=1"
KILL_GRACE = 10  # seconds between SIGTERM and SIGKILL for qemu


@dataclass(frozen=True)
class Guest:
    """One boot: the kernel, initramfs and shares, and the machine's size."""

    kernel: Path
    initrd: Path
    rootfs: Path
    ctl: Path
    checkout: Path
    kernel_log: Path
    accel: str
    mem: int
    smp: int


def qemu_value(path: Path) -> str:
    """A path as a qemu option value (a literal comma is written as two)."""
    return str(path).replace(",", ",,")


def qemu_argv(guest: Guest) -> list[str]:
    """qemu's command line: the console on stdio, the kernel's log on a second serial port."""
    accel, cpu = ("kvm", "host") if guest.accel == "kvm" else ("tcg,thread=multi", "max")
    append = f"console=ttyS1 loglevel=7 {KERNEL_WATCHDOG} panic=-1 mitigations=off"
    shares = [
        f"local,path={qemu_value(guest.rootfs)},mount_tag=rootfs,security_model=passthrough,"
        "readonly=on",
        f"local,path={qemu_value(guest.ctl)},mount_tag=ctl,security_model=none",
        f"local,path={qemu_value(guest.checkout)},mount_tag=host,security_model=passthrough,"
        "multidevs=remap",
    ]
    argv = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        str(guest.mem),
        "-smp",
        str(guest.smp),
        "-display",
        "none",
        "-vga",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        "stdio",
        "-serial",
        f"file:{guest.kernel_log}",
        "-device",
        "virtio-rng-pci",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        append,
    ]
    for share in shares:
        argv += ["-virtfs", share]
    return argv


def copy_console(source: IO[bytes], sink: IO[bytes]) -> None:
    """The guest's console to ours, line by line, without the serial line's CRs."""
    for line in source:
        sink.write(line.replace(b"\r\n", b"\n").removesuffix(b"\r"))
        sink.flush()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after a grace period: the guest is gone when this returns."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def supervise(argv: list[str], timeout: float) -> bool:
    """Run qemu to its end or ``timeout``; True when it ended by itself.

    However this returns (timeout, Ctrl-C, SIGTERM turned into an exception), qemu is stopped.
    qemu gets a session of its own: the lab, not the terminal, decides when it dies.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    copier = threading.Thread(
        target=copy_console, args=(proc.stdout, sys.stdout.buffer), daemon=True
    )
    copier.start()
    try:
        proc.wait(timeout)
        ended = True
    except subprocess.TimeoutExpired:
        ended = False
    finally:
        stop(proc)
    copier.join(5)
    return ended
