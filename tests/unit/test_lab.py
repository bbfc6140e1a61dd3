"""The ZFS lab's host side (snapdriver.testing.lab): its pure parts, without booting a guest.

The guest itself is proven by running vagrant/lab (see vagrant/README.md); these tests pin the
cache key, the command line, the control files and the kernel-log triage.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapdriver.hostfs import mounts_below, parse_mountinfo
from snapdriver.testing.lab import cli, keys, klog
from snapdriver.testing.lab.build import guest_sources, version_key
from snapdriver.testing.lab.errors import LabError
from snapdriver.testing.lab.hostfs import cache_dirs, inside, replace_file
from snapdriver.testing.lab.initrd import insmod_lines, unpacked_name
from snapdriver.testing.lab.paths import check_paths, lab_paths
from snapdriver.testing.lab.qemu import Guest, qemu_argv

CHECKOUT = Path(__file__).resolve().parents[2]
RECIPE = (CHECKOUT / "vagrant/build-recipe.txt").read_text()
PROVISION = (CHECKOUT / "vagrant/provision.sh").read_bytes()


def test_section_is_what_sed_prints() -> None:
    """The key hashes the same bytes the bash lab's ``sed -n '/b/,/e/p'`` gave."""
    done = subprocess.run(
        ["sed", "-n", "/^#@@ build begin$/,/^#@@ build end$/p", "vagrant/build-recipe.txt"],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert keys.section(RECIPE, "build") == done.stdout
    assert done.stdout.startswith("#@@ build begin\n")
    assert done.stdout.endswith("#@@ build end\n")


def test_cache_key_is_sha256_of_provision_and_recipe() -> None:
    """Same construction as ``{ cat provision.sh; section build; } | sha256sum | cut -c1-16``."""
    shell = subprocess.run(
        "{ cat vagrant/provision.sh; sed -n '/^#@@ build begin$/,/^#@@ build end$/p'"
        " vagrant/build-recipe.txt; } | sha256sum | cut -c1-16",
        shell=True,
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert keys.cache_key(PROVISION, RECIPE) == shell.stdout.strip()


def test_cache_key_follows_provision_and_recipe_version() -> None:
    """An edit to provision.sh or a BUILD_RECIPE bump makes a new cache; the header does not."""
    key = keys.cache_key(PROVISION, RECIPE)
    assert keys.cache_key(PROVISION + b"\n", RECIPE) != key
    bumped = RECIPE.replace("BUILD_RECIPE=1\n", "BUILD_RECIPE=2\n")
    assert bumped != RECIPE
    assert keys.cache_key(PROVISION, bumped) != key
    assert keys.cache_key(PROVISION, "another header\n" + RECIPE) == key
    assert keys.recipe_value(RECIPE, "SUITE") == "bookworm"
    with pytest.raises(ValueError, match="NOPE"):
        keys.recipe_value(RECIPE, "NOPE")


def test_initrd_key_follows_each_stage() -> None:
    """Either stage script or the module list makes a new initramfs."""
    base = keys.initrd_key(b"one", b"two", "m")
    assert len(base) == 12
    assert (
        len(
            {
                base,
                keys.initrd_key(b"one!", b"two", "m"),
                keys.initrd_key(b"one", b"two!", "m"),
                keys.initrd_key(b"one", b"two", "m n"),
                keys.initrd_key(b"onet", b"wo", "m"),
            }
        )
        == 5
    )


def test_host_mirror_formats(tmp_path: Path) -> None:
    """deb822 stanzas (Suites must list the suite) first, then one-line lists with options."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://m.example/debian http://x/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\n"
    )
    (tmp_path / "sources.list").write_text(
        "# deb http://commented bullseye main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://one.example/debian bullseye main\n"
    )
    assert keys.host_mirror("bookworm", tmp_path) == "http://m.example/debian"
    assert keys.host_mirror("bookworm-security", tmp_path) == "http://sec.example/debian-security"
    assert keys.host_mirror("bullseye", tmp_path) == "http://one.example/debian"
    assert keys.host_mirror("trixie", tmp_path) is None


def parse(*argv: str) -> cli.RunRequest:
    """``vagrant/lab run|test ...`` as the request it makes."""
    return cli.run_request(cli.parser().parse_args(list(argv)))


def test_run_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """``-t``/``-tN``, repeated ``-e``, an optional ``--``, the command's words joined."""
    monkeypatch.delenv("LAB_TIMEOUT", raising=False)
    request = parse("run", "-t", "20", "-e", "A=1", "-e", "B=x y", "--", "sleep", "100")
    assert (request.command, request.timeout, request.env) == ("sleep 100", 20, ["A=1", "B=x y"])
    assert parse("run", "-t20", "zfs version").timeout == 20
    assert parse("run", "--", "exit 3", "-t", "5").command == "exit 3 -t 5"
    assert parse("run", "true").timeout == 1800
    monkeypatch.setenv("LAB_TIMEOUT", "77")
    assert parse("run", "true").timeout == 77
    assert parse("run", "-t", "9", "true").timeout == 9


def test_test_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """``test`` runs guest-test.sh on one vCPU for an hour unless told otherwise."""
    for name in ("LAB_TIMEOUT", "LAB_SMP", "LAB_ACCEL", "LAB_MEM"):
        monkeypatch.delenv(name, raising=False)
    request = parse("test", "-e", "GUEST_TEST_PATHS=tests/zfs/x.py")
    assert (request.command, request.timeout, request.smp) == ("vagrant/guest-test.sh", 3600, 1)
    assert request.report_hint
    assert parse("test", "--", "-k", "quota or diff").command == (
        "vagrant/guest-test.sh -k 'quota or diff'"
    )
    monkeypatch.setenv("LAB_TIMEOUT", "3300")
    monkeypatch.setenv("LAB_SMP", "2")
    assert parse("test").timeout == 3300
    assert cli.machine(parse("test")) == ("tcg", 3072, 2)
    monkeypatch.setenv("LAB_SMP", "two")
    with pytest.raises(LabError, match="whole numbers"):
        cli.machine(parse("test"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "no command given"),
        (["run", "--"], "no command given"),
        (["run", "-t", "1.5", "true"], "whole seconds"),
        (["run", "-t", "", "true"], "whole seconds"),
    ],
)
def test_run_refusals(argv: list[str], message: str) -> None:
    """What the lab refuses with exit code 2 (LabError)."""
    with pytest.raises(LabError, match=message):
        parse(*argv)


@pytest.mark.parametrize(
    "argv", [[], ["bogus"], ["build", "x"], ["run", "-x", "true"], ["status", "x"]]
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    """Unknown commands and options are usage errors: exit code 2."""
    with pytest.raises(SystemExit) as stopped:
        cli.parser().parse_args(argv)
    assert stopped.value.code == 2


def test_env_lines_survive_bash(tmp_path: Path) -> None:
    """``-e`` values reach the guest's bash unchanged, quotes and all; bad names are refused."""
    value = 'it\'s $HOME `x` "q" \\ ;'
    env = tmp_path / "env"
    env.write_text(cli.env_lines([f"V={value}", "EMPTY="]))
    shown = subprocess.run(
        ["bash", "-c", f'. {env}; printf \'%s|%s\' "$V" "$EMPTY"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == f"{value}|"
    for bad in ("1X=y", "noequals", "A-B=c", "=v"):
        with pytest.raises(LabError, match="NAME=VALUE"):
            cli.env_lines([bad])


def test_check_paths() -> None:
    """Whitespace, a relative or in-checkout cache, and / as checkout are refused."""
    good = Path("/srv/snapdriver")
    check_paths(lab_paths(good, good, None))
    check_paths(lab_paths(good, good, "/var/cache/lab/"))
    assert lab_paths(good, good, "/var/cache/lab/").cache_base == Path("/var/cache/lab")
    refused = [
        (Path("/srv/snap driver"), None, "whitespace"),
        (good, "/var/cache/l ab", "whitespace"),
        (good, "cache", "absolute"),
        (good, "/srv/snapdriver/.cache", "outside the checkout"),
        (Path("/"), "/var/cache/x", "cannot be /"),
    ]
    for checkout, cache, message in refused:
        with pytest.raises(LabError, match=message):
            check_paths(lab_paths(checkout, checkout, cache))


def test_exit_codes(tmp_path: Path) -> None:
    """124 on timeout, the guest's code when it wrote one, 255 when none came back."""
    assert cli.exit_code(tmp_path, ended=False, timeout=20, took=20.0) == 124
    assert cli.exit_code(tmp_path, ended=True, timeout=20, took=3.0) == 255
    (tmp_path / "exit-code").write_text("3\n")
    assert cli.exit_code(tmp_path, ended=True, timeout=20, took=3.0) == 3
    assert cli.exit_code(tmp_path, ended=False, timeout=20, took=20.0) == 124


def test_write_ctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control share: the command, the 9p cache mode, both checkout paths once each."""
    monkeypatch.delenv("LAB_SHARE_CACHE", raising=False)
    paths = lab_paths(Path("/srv/real"), Path("/home/u/link"), None)
    cli.write_ctl(tmp_path / "ctl", paths, cli.RunRequest("exit 3", 5, ["A=b"]))
    ctl = tmp_path / "ctl"
    assert (ctl / "cmd").read_text() == "exit 3\n"
    assert (ctl / "sharecache").read_text() == "loose"
    assert (ctl / "hostpaths").read_text() == "/home/u/link\n/srv/real\n"
    assert (ctl / "env").read_text() == "export A=b\n"
    same = lab_paths(Path("/srv/real"), Path("/srv/real"), None)
    cli.write_ctl(tmp_path / "ctl2", same, cli.RunRequest("true", 5))
    assert (tmp_path / "ctl2/hostpaths").read_text() == "/srv/real\n"
    monkeypatch.setenv("LAB_SHARE_CACHE", "bogus")
    with pytest.raises(LabError, match="LAB_SHARE_CACHE"):
        cli.share_cache()


def test_qemu_argv_escapes_commas() -> None:
    """qemu option values double a literal comma; TCG unless kvm is asked for."""
    guest = Guest(
        Path("/k"),
        Path("/i"),
        Path("/c/root,fs"),
        Path("/ctl"),
        Path("/src"),
        Path("/log"),
        "tcg",
        3072,
        1,
    )
    argv = qemu_argv(guest)
    assert "local,path=/c/root,,fs,mount_tag=rootfs,security_model=passthrough,readonly=on" in argv
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"
    assert argv[argv.index("-smp") + 1] == "1"
    assert "file:/log" in argv


SOFT_LOCKUP = """\
[    0.000000] Linux version 6.1.0-56-amd64
[    1.2] zfs: module loaded\r
[ 1420.1] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [runc:4711]
[ 1420.1] CPU: 1 PID: 4711 Comm: runc
[ 1420.1] Call Trace:
[ 1420.1]  <TASK>
[ 1500.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[ 1600.0] INFO: task txg_sync:800 blocked for more than 120 seconds.
[ 1600.0] "echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
[ 1700.0] ------------[ cut here ]------------
[ 1700.0] WARNING: CPU: 0 PID: 1 at fs/x.c:1 f+0x1/0x2
[ 1800.0] Kernel panic - not syncing: softlockup: hung tasks
"""


def test_triage_counts_by_kind() -> None:
    """Each trouble line counts once, under its kind; CRs from the serial line are dropped."""
    found = klog.triage(SOFT_LOCKUP)
    assert len(found.lines) == 12
    assert found.first == 3
    assert found.kinds == {
        "BUG": 1,
        "WARNING": 1,
        "oops/panic": 1,
        "call trace": 1,
        "RCU stall": 1,
        "hung task": 2,
    }
    assert found.trouble == 7
    assert found.lines[1].endswith("module loaded")


def test_report_passing_and_failing() -> None:
    """A pass counts; a failure prints from the first trouble line, else the last 40 lines."""
    (passing,) = klog.report(SOFT_LOCKUP, 0, "/x/.lab-kernel.log")
    assert "12 lines, 7 of them kernel trouble (BUG 1," in passing
    failing = klog.report(SOFT_LOCKUP, 255, "/x/.lab-kernel.log")
    assert "first sign of trouble (line 3 of 12" in failing[0]
    assert failing[1].endswith("CPU#1 stuck for 26s! [runc:4711]")
    assert len(failing) == 1 + 10
    quiet = "".join(f"[ {n}.0] line {n}\n" for n in range(100))
    (clean,) = klog.report(quiet, 0, "k")
    assert clean == "lab: kernel log: 100 lines, 0 of them kernel trouble (k)"
    tail = klog.report(quiet, 1, "k")
    assert "last 40 lines (no kernel trouble" in tail[0]
    assert tail[1:] == [f"[ {n}.0] line {n}" for n in range(60, 100)]
    long_trouble = "BUG: x\n" + quiet + quiet
    assert len(klog.report(long_trouble, 1, "k")) == 1 + klog.SHOWN_FROM_FIRST


def test_mounts_below_a_cache_dir_decodes_and_orders() -> None:
    """The one mountinfo reader (snapdriver.hostfs) on what a chroot build leaves: mounts at or
    below a path (not its name-prefixed siblings), every one before the mounts it is inside."""
    info = (
        "30 1 0:1 / /var/cache/lab/k/rootfs rw - 9p x rw\n"
        "31 30 0:2 / /var/cache/lab/k/rootfs/dev rw - tmpfs x rw\n"
        "32 31 0:3 / /var/cache/lab/k/rootfs/dev/pts rw - devpts x rw\n"
        "33 1 0:4 / /var/cache/lab/k/rootfs2 rw - tmpfs x rw\n"
        "34 1 0:5 / /var/cache/lab/k/rootfs/a\\040b rw - tmpfs x rw\n"
    )
    root = Path("/var/cache/lab/k/rootfs")
    found = [m.target for m in mounts_below(root, table=parse_mountinfo(info))]
    assert sorted(found) == [f"{root}", f"{root}/a b", f"{root}/dev", f"{root}/dev/pts"]
    assert found.index(f"{root}/dev/pts") < found.index(f"{root}/dev") < found.index(str(root))
    assert inside(Path("/var/cache/lab/k"), Path("/var/cache/lab"))
    assert not inside(Path("/var/cache/lab"), Path("/var/cache/lab"))
    assert not inside(Path("/var/cache/lab2/k"), Path("/var/cache/lab"))


def test_initrd_parts() -> None:
    """modprobe's insmod lines (builtins skipped) and the plain names compressed modules get."""
    shown = (
        "builtin virtio_pci_modern_dev\n"
        "insmod /r/lib/modules/6.1/kernel/net/9p/9pnet.ko \n"
        "insmod /r/lib/modules/6.1/kernel/fs/9p/9p.ko.xz opt=1 x=2\n"
    )
    assert insmod_lines(shown) == [
        ("/r/lib/modules/6.1/kernel/net/9p/9pnet.ko", ""),
        ("/r/lib/modules/6.1/kernel/fs/9p/9p.ko.xz", "opt=1 x=2"),
    ]
    assert [unpacked_name(p) for p in ("/a/x.ko", "/a/y.ko.zst", "/a/z.ko.gz")] == [
        "x.ko",
        "y.ko",
        "z.ko",
    ]
    with pytest.raises(LabError, match="unexpected module"):
        unpacked_name("/a/x.o")


def test_build_pure_parts() -> None:
    """Kernel versions sort like ``sort -V``; the guest gets main + contrib and security."""
    names = ["6.1.0-9-amd64", "6.1.0-56-amd64", "6.1.0-10-amd64", "5.10.0-1-amd64"]
    assert sorted(names, key=version_key) == [
        "5.10.0-1-amd64",
        "6.1.0-9-amd64",
        "6.1.0-10-amd64",
        "6.1.0-56-amd64",
    ]
    text = guest_sources("http://m/debian", "http://s/debian-security", "bookworm")
    assert "Suites: bookworm bookworm-updates\nComponents: main contrib\n" in text
    assert "URIs: http://s/debian-security\nSuites: bookworm-security\n" in text
    assert "security" not in guest_sources("http://m/debian", None, "bookworm")


def test_replace_file_never_follows_a_link(tmp_path: Path) -> None:
    """A symlink where the lab writes (rootfs, checkout) is replaced, its target left alone."""
    target = tmp_path / "host-file"
    target.write_text("host")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    replace_file(link, b"guest", 0o755)
    assert (target.read_text(), link.read_text(), link.is_symlink()) == ("host", "guest", False)
    assert link.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-file", "resolv.conf"]


def test_cache_dirs(tmp_path: Path) -> None:
    """Cache directories are the visible directories of the base (no files, no dot-dirs)."""
    for name in ("637a9f10dd4b6891", ".hidden", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "file").write_text("")
    assert [p.name for p in cache_dirs(tmp_path)] == ["637a9f10dd4b6891", "b"]
    assert cache_dirs(tmp_path / "missing") == []


def launcher(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``vagrant/lab`` itself, as a user on a fresh machine runs it (Debian's python, no venv)."""
    return subprocess.run(
        [str(CHECKOUT / "vagrant/lab"), *argv], capture_output=True, text=True, env=env, check=False
    )


def test_launcher_needs_only_the_standard_library() -> None:
    """Every module of the package imports under ``python3 -I`` with nothing but the stdlib.

    What the interpreter's site set-up loaded before (Debian's sitecustomize) does not count.
    """
    code = (
        "import sys; from pathlib import Path; sys.path.append(sys.argv[1]);"
        "before = set(sys.modules);"
        "import lab.standalone; lab.standalone.load(Path(sys.argv[2]));"
        "import lab.cli, lab.build, lab.initrd, lab.qemu, lab.klog;"
        "new = set(sys.modules) - before;"
        "print(sorted({m.split('.')[0] for m in new} - set(sys.stdlib_module_names)),"
        " sorted(m for m in new if m.startswith('snapdriver')))"
    )
    done = subprocess.run(
        [
            "/usr/bin/python3",
            "-I",
            "-B",
            "-c",
            code,
            str(CHECKOUT / "snapdriver/testing"),
            str(CHECKOUT),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "['lab', 'snapdriver'] ['snapdriver', 'snapdriver.hostfs']"


def test_launcher_exit_codes(tmp_path: Path) -> None:
    """Help exits 0, usage errors and refusals 2; status reads a cache without building."""
    assert launcher("--help").returncode == 0
    assert "LAB_SHARE_CACHE" in launcher("help").stdout
    assert launcher("bogus").returncode == 2
    refused = launcher("run", "-t", "x", "true")
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        "lab: ERROR: -t wants whole seconds, got 'x'",
    )
    status = launcher("status", env={"LAB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert status.returncode == 0
    assert "state:    not built" in status.stdout
    assert list(tmp_path.iterdir()) == []
