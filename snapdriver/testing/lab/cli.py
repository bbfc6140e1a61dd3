"""``vagrant/lab``'s commands: build, run, test, status, clean.

Exit codes: the guest command's own; 124 timeout (the guest is killed); 255 no exit code came
back (panic, crash, stage failure); 2 the lab refused (bad path, not root, build failure);
130 / 143 interrupted (Ctrl-C / SIGTERM; the guest is stopped).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from . import klog
from .build import build_rootfs
from .errors import LabError, Terminated, log
from .hostfs import CacheLock, cache_dirs, ensure_host, need_root, replace_file, safe_rm
from .initrd import build_initrd
from .paths import LabPaths, check_paths, lab_paths
from .qemu import Guest, qemu_argv, supervise

SHARE_CACHES = ("none", "mmap", "loose", "fscache")
ENVIRONMENT = """\
environment: LAB_CACHE (cache base dir, default /var/cache/snapdriver-lab),
  LAB_MIRROR (Debian mirror for the build, default: the host's apt mirror),
  LAB_ACCEL=tcg|kvm (default tcg), LAB_MEM (MiB, default 3072),
  LAB_SMP (default nproc; 1 for test), LAB_TIMEOUT (seconds, default 1800; 3600 for test),
  LAB_SHARE_CACHE (9p cache mode of the checkout share: loose (default, fast; the guest may
  not see host edits made while it runs), mmap or none). See vagrant/README.md.
exit codes: the command's; 124 timeout; 255 no exit code came back; 2 refused;
  130 / 143 interrupted."""


@dataclass(frozen=True)
class RunRequest:
    """What ``run`` and ``test`` boot: a shell command, its timeout, extra environment."""

    command: str
    timeout: int
    env: list[str] = field(default_factory=list)
    smp: int = 0  # 0: LAB_SMP or the host's CPU count
    report_hint: bool = False


def parser() -> argparse.ArgumentParser:
    """The command line (same commands and options as the bash lab had)."""
    top = argparse.ArgumentParser(
        prog="vagrant/lab",
        description="The offline ZFS test lab of snapdriver: a Debian bookworm guest booted with\n"
        "qemu; the checkout is shared read-write at the same absolute path.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("build", help="build or reuse the cached guest")
    run = sub.add_parser(
        "run", help="boot, run a shell command in the checkout, exit with its code"
    )
    test = sub.add_parser("test", help="build if needed, run vagrant/guest-test.sh")
    for each in (run, test):
        each.add_argument("-t", dest="timeout", metavar="SECONDS", help="kill the guest after this")
        each.add_argument(
            "-e",
            dest="env",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="export this in the guest (repeatable)",
        )
    run.add_argument("words", nargs=argparse.REMAINDER, metavar="-- 'shell command'")
    test.add_argument("words", nargs=argparse.REMAINDER, metavar="-- PYTEST-OPTION")
    sub.add_parser("status", help="cache dir, state, stale builds")
    sub.add_parser("clean", help="delete all cached builds (safely)")
    sub.add_parser("help", help="this text")
    return top


def after_dashes(words: list[str]) -> list[str]:
    """The words after an optional leading ``--``."""
    return words[1:] if words[:1] == ["--"] else words


def seconds(value: str | None, default: int) -> int:
    """A whole number of seconds (``-t`` or ``LAB_TIMEOUT``)."""
    text = str(default) if value is None else value
    if not re.fullmatch(r"[0-9]+", text):
        raise LabError(f"-t wants whole seconds, got '{text}'")
    return int(text)


def env_lines(assignments: list[str]) -> str:
    """``-e NAME=VALUE`` as lines the guest's bash sources."""
    out = []
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LabError(f"-e wants NAME=VALUE, got '{item}'")
        out.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(out)


def timeout_option(args: argparse.Namespace) -> str | None:
    """``-t`` as given, else ``LAB_TIMEOUT`` unless unset or empty."""
    given: str | None = args.timeout
    return given if given is not None else os.environ.get("LAB_TIMEOUT") or None


def run_request(args: argparse.Namespace) -> RunRequest:
    """``run``/``test`` options as a request (``test`` adds guest-test.sh and its defaults)."""
    words = after_dashes(args.words)
    if args.command == "test":
        command = shlex.join(["vagrant/guest-test.sh", *words])
        timeout = seconds(timeout_option(args), 3600)
        # The gating tier runs on one vCPU: CI once saw both vCPUs stuck at once (in runc and its
        # child) for 30 min under TCG, a cross-CPU wait that one CPU cannot have. ~7% slower.
        smp = 0 if os.environ.get("LAB_SMP") else 1
        return RunRequest(command, timeout, args.env, smp, report_hint=True)
    if not words:
        raise LabError("no command given: vagrant/lab run [-t SECONDS] -- 'shell command'")
    timeout = seconds(timeout_option(args), 1800)
    return RunRequest(" ".join(words), timeout, args.env)


def ensure_built(paths: LabPaths) -> tuple[CacheLock, Path]:
    """The built cache (built now if needed, under the exclusive lock), held shared; its initrd."""
    lock = CacheLock(paths.cache)
    if not (paths.cache / "stamp.ready").exists():
        need_root()
        lock.take(exclusive=True)
        if not (paths.cache / "stamp.ready").exists():
            build_rootfs(paths)
    # Runs share the cache; the initramfs is written atomically (temporary file + rename).
    lock.take(exclusive=False)
    return lock, build_initrd(paths)


def machine(request: RunRequest) -> tuple[str, int, int]:
    """The accelerator, memory (MiB) and vCPUs from the environment, checked."""
    accel = os.environ.get("LAB_ACCEL") or "tcg"
    if accel not in ("tcg", "kvm"):
        raise LabError("LAB_ACCEL must be tcg or kvm")
    if accel == "kvm" and not os.access("/dev/kvm", os.W_OK):
        raise LabError("LAB_ACCEL=kvm but /dev/kvm is not usable")
    mem = os.environ.get("LAB_MEM") or "3072"
    smp = str(request.smp or os.environ.get("LAB_SMP") or os.cpu_count() or 1)
    if not (mem.isdigit() and smp.isdigit()):
        raise LabError("LAB_MEM and LAB_SMP must be whole numbers")
    return accel, int(mem), int(smp)


def share_cache() -> str:
    """The checkout share's 9p cache mode (``LAB_SHARE_CACHE``, loose by default)."""
    mode = os.environ.get("LAB_SHARE_CACHE") or "loose"
    if mode not in SHARE_CACHES:
        raise LabError("LAB_SHARE_CACHE must be none, mmap, loose or fscache")
    return mode


def write_ctl(ctl: Path, paths: LabPaths, request: RunRequest) -> None:
    """The control share stage 2 reads: command, share cache mode, checkout paths, env."""
    ctl.mkdir()
    (ctl / "cmd").write_text(request.command + "\n")
    (ctl / "sharecache").write_text(share_cache())
    hostpaths = dict.fromkeys([str(paths.logical), str(paths.checkout)])
    (ctl / "hostpaths").write_text("".join(f"{p}\n" for p in hostpaths))
    (ctl / "env").write_text(env_lines(request.env))


def exit_code(ctl: Path, ended: bool, timeout: int, took: float) -> int:
    """The run's exit code from how qemu ended and what the guest wrote back."""
    if not ended:
        log(f"TIMEOUT after {timeout}s (guest killed); exit code 124")
        return 124
    written = (ctl / "exit-code").read_text().strip() if (ctl / "exit-code").exists() else ""
    if written.isdigit():
        log(f"guest command exit code {written} ({took:.1f} s end to end)")
        return int(written)
    log(f"no exit code came back from the guest (crash or panic?); exit code 255 ({took:.1f} s)")
    return 255


def keep_kernel_log(raw: Path, checkout: Path, rc: int) -> None:
    """Keep the kernel's log as .lab-kernel.log and triage it (see klog)."""
    kept = checkout / ".lab-kernel.log"
    try:
        text = raw.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        log("no kernel log came back")
        return
    replace_file(kept, text.encode())
    print("\n".join(klog.report(text, rc, str(kept))), file=sys.stderr, flush=True)


def guest_for(paths: LabPaths, request: RunRequest, rundir: Path, initrd: Path) -> Guest:
    """The machine for this run, its control share written into ``rundir``."""
    kver = (paths.cache / "kver").read_text().strip()
    accel, mem, smp = machine(request)
    write_ctl(rundir / "ctl", paths, request)
    log(
        f"booting (accel={accel}, {mem} MiB, {smp} cpus, kernel {kver}, timeout {request.timeout}s)"
    )
    kernel = paths.rootfs / f"boot/vmlinuz-{kver}"
    ctl, klog_file = rundir / "ctl", rundir / "kernel.log"
    return Guest(kernel, initrd, paths.rootfs, ctl, paths.checkout, klog_file, accel, mem, smp)


def boot(paths: LabPaths, request: RunRequest, rundir: Path) -> int:
    """Boot the guest for one command in ``rundir``; its exit code (see the module's doc)."""
    lock, initrd = ensure_built(paths)
    try:
        ensure_host("qemu-system-x86_64:qemu-system-x86")
        guest = guest_for(paths, request, rundir, initrd)
        started = time.monotonic()
        ended = supervise(qemu_argv(guest), request.timeout)
        rc = exit_code(guest.ctl, ended, request.timeout, time.monotonic() - started)
    finally:
        lock.close()
    keep_kernel_log(guest.kernel_log, paths.checkout, rc)
    report = paths.checkout / ".lab-report.xml"
    if request.report_hint and report.exists():
        log(f"junit report: {report}")
    return rc


def cmd_run(paths: LabPaths, request: RunRequest) -> int:
    """``run`` and ``test``: boot with a temporary run directory, removed whatever happens."""
    check_paths(paths)
    machine(request)
    share_cache()
    env_lines(request.env)
    need_root()
    rundir = Path(tempfile.mkdtemp(prefix="snapdriver-lab-run.", dir="/tmp"))
    try:
        return boot(paths, request, rundir)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(rundir)], check=False)


def cmd_build(paths: LabPaths) -> int:
    """``build``: build or reuse the guest."""
    check_paths(paths)
    need_root()
    started = time.monotonic()
    if (paths.cache / "stamp.ready").exists():
        log(f"reusing {paths.cache}")
    lock, _ = ensure_built(paths)
    lock.close()
    log(f"build ready in {time.monotonic() - started:.1f} s: {paths.cache}")
    return 0


def cmd_status(paths: LabPaths) -> int:
    """``status``: this checkout's cache, its state, and stale caches."""
    check_paths(paths)
    cache = paths.cache
    print(f"checkout: {paths.checkout}\ncache:    {cache}")
    if (cache / "stamp.ready").exists():
        print(f"state:    ready (kernel {(cache / 'kver').read_text().strip()})")
    elif cache.is_dir():
        stamps = " ".join(sorted(p.name for p in cache.glob("stamp.*")))
        print(f"state:    incomplete ({stamps})")
    else:
        print("state:    not built")
    for other in cache_dirs(paths.cache_base):
        if other != cache:
            print(f"stale:    {other} (vagrant/lab clean removes it)")
    return 0


def cmd_clean(paths: LabPaths) -> int:
    """``clean``: delete every cached build that no lab process is using."""
    check_paths(paths)
    need_root()
    for cache in cache_dirs(paths.cache_base):
        fd = os.open(cache / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LabError(f"{cache} is in use by another lab process") from None
        log(f"removing {cache}")
        try:
            safe_rm(cache, paths.cache_base)
        finally:
            os.close(fd)
    return 0


def dispatch(paths: LabPaths, args: argparse.Namespace) -> int:
    """Run the chosen command."""
    if args.command == "build":
        return cmd_build(paths)
    if args.command in ("run", "test"):
        return cmd_run(paths, run_request(args))
    if args.command == "status":
        return cmd_status(paths)
    if args.command == "clean":
        return cmd_clean(paths)
    parser().print_help()
    return 0


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C does, so every cleanup runs."""
    raise Terminated


def launch(checkout: Path, logical: Path, argv: list[str]) -> int:
    """The lab for the checkout at ``checkout`` (reached by the user as ``logical``)."""
    args = parser().parse_args(argv)
    paths = lab_paths(checkout, logical, os.environ.get("LAB_CACHE"))
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return dispatch(paths, args)
    except LabError as error:
        log(f"ERROR: {error}")
        return 2
    except (subprocess.CalledProcessError, OSError) as error:
        log(f"ERROR: {error}")
        return 2
    except KeyboardInterrupt:
        log("interrupted (SIGINT); exit code 130")
        return 130
    except Terminated:
        log("terminated (SIGTERM); exit code 143")
        return 143


def main(argv: list[str]) -> int:
    """``python -m snapdriver.testing.lab``: the lab for the checkout this package is in."""
    checkout = Path(__file__).resolve().parents[3]
    return launch(checkout, checkout, argv)
