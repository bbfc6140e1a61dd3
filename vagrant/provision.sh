#!/bin/bash
# provision.sh - the one provisioning script of the snapdriver ZFS lab.
#
# Used in two places:
#   * the Vagrant VM (Vagrantfile, booted Debian 12): `sudo vagrant/provision.sh`
#   * the offline lab (vagrant/lab build): run inside a debootstrap chroot of
#     Debian bookworm, with /proc, /sys and /dev prepared by the lab script.
#
# It enables Debian's `contrib` component, installs the kernel + headers, DKMS,
# ZFS (zfs-dkms, zfsutils-linux, python3-pyzfs), btrfs (btrfs-progs,
# python3-btrfsutil), docker.io and the Python test stack, and checks that a
# zfs.ko was really built for the kernel(s) that will run.
#
# Environment knobs (all optional):
#   PROVISION_CHROOT=1|0     force chroot / booted-system mode (default: auto)
#   PROVISION_LAB_ROOTFS=1   set by vagrant/lab: also divert update-initramfs
#                            (the lab never uses Debian's initrd) and let dpkg
#                            skip fsync. Never set this on a real machine.
#
# Idempotent: running it again only installs what is missing.
set -euo pipefail

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -d /proc/self ] || die "/proc is not mounted (in a chroot, mount proc first)"

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C.UTF-8 LANG=C.UTF-8
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# ---------------------------------------------------------------- mode
detect_chroot() {
    case "${PROVISION_CHROOT:-auto}" in
        1|yes|true) return 0 ;;
        0|no|false) return 1 ;;
    esac
    # In a chroot, our / differs from the root of PID 1.
    local mine init
    mine=$(stat -c '%d:%i' / 2>/dev/null) || return 0
    init=$(stat -Lc '%d:%i' /proc/1/root/. 2>/dev/null) || return 0
    [ "$mine" != "$init" ]
}

if detect_chroot; then MODE=chroot; else MODE=booted; fi
log "mode: $MODE"

# ---------------------------------------------------------------- chroot tweaks
POLICY_CREATED=0
cleanup() {
    if [ "$POLICY_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

if [ "$MODE" = chroot ]; then
    # Never start daemons (dockerd, zed, containerd) inside the chroot.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_CREATED=1
    fi
    if [ "${PROVISION_LAB_ROOTFS:-0}" = 1 ]; then
        echo force-unsafe-io > /etc/dpkg/dpkg.cfg.d/lab-unsafe-io
        if [ "$(dpkg-divert --truename /usr/sbin/update-initramfs)" = /usr/sbin/update-initramfs ]; then
            dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.lab-real \
                --add /usr/sbin/update-initramfs
        fi
        ln -sf /bin/true /usr/sbin/update-initramfs
    fi
fi

# ---------------------------------------------------------------- apt sources
enable_contrib() {
    local f
    # deb822 style (*.sources): "Components: main" -> "Components: main contrib"
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        sed -Ei '/^Components:.*[[:space:]]main([[:space:]]|$)/{/[[:space:]]contrib([[:space:]]|$)/!s/[[:space:]]*$/ contrib/}' "$f"
    done
    # one-line style (sources.list, *.list)
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -Ei '/^[[:space:]]*deb(-src)?[[:space:]]/{/[[:space:]]contrib([[:space:]]|$)/!s/[[:space:]]main([[:space:]]|$)/ main contrib\1/}' "$f"
    done
}
enable_contrib

APT_OPTS=(-y -q -o Acquire::Retries=3 -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold --no-install-recommends)

# An interrupted earlier run may have left dpkg half-configured.
dpkg --configure -a || true
apt-get -q -o Acquire::Retries=3 update

has_candidate() {   # has_candidate PKG: true if apt can install PKG
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

# ---------------------------------------------------------------- packages
BASE_PKGS=(
    ca-certificates kmod procps util-linux e2fsprogs xz-utils file
    busybox-static
    dkms gcc make libc6-dev
    python3 python3-venv python3-pip python3-pytest python3-hypothesis python3-aiohttp
    btrfs-progs python3-btrfsutil
)
KERNEL_PKGS=(linux-image-amd64 linux-headers-amd64)
if [ "$MODE" = booted ]; then
    # Headers for the kernel running now, if the mirror still carries them, so
    # zfs loads without a reboot. Otherwise the reboot into the newest kernel
    # (installed above) is required; we flag it below.
    if has_candidate "linux-headers-$(uname -r)"; then
        KERNEL_PKGS+=("linux-headers-$(uname -r)")
    else
        log "linux-headers-$(uname -r) is not on the mirror; zfs will be built for the newest kernel only"
    fi
fi
ZFS_PKGS=(zfs-dkms zfsutils-linux python3-pyzfs)
DOCKER_PKGS=(docker.io iptables)

log "installing kernel, headers, toolchain, python, btrfs"
apt-get install "${APT_OPTS[@]}" "${BASE_PKGS[@]}" "${KERNEL_PKGS[@]}"

# zfs-dkms comes after the headers so that its postinst finds them.
log "installing ZFS (DKMS build: several minutes)"
apt-get install "${APT_OPTS[@]}" "${ZFS_PKGS[@]}"

log "installing docker.io"
apt-get install "${APT_OPTS[@]}" "${DOCKER_PKGS[@]}"

# ---------------------------------------------------------------- zfs.ko check
zfs_src=$(ls -d /usr/src/zfs-* 2>/dev/null | sort -V | tail -n1)
[ -n "$zfs_src" ] || die "zfs-dkms sources missing in /usr/src"
zfs_ver=${zfs_src#/usr/src/zfs-}

has_zfs_ko() { find "/lib/modules/$1" -name 'zfs.ko*' -print -quit 2>/dev/null | grep -q .; }

built_for=()
for kver in $(ls /lib/modules | sort -V); do
    moddir=/lib/modules/$kver
    [ -e "$moddir/build" ] || continue          # no headers: DKMS cannot build
    [ -e "/boot/vmlinuz-$kver" ] || continue     # headers without an image
    if ! has_zfs_ko "$kver"; then
        log "zfs.ko missing for $kver: dkms install zfs/$zfs_ver -k $kver"
        dkms install "zfs/$zfs_ver" -k "$kver"
    fi
    has_zfs_ko "$kver" || die "DKMS did not produce zfs.ko for $kver"
    depmod -a "$kver"
    built_for+=("$kver")
done
[ "${#built_for[@]}" -gt 0 ] || die "no kernel with headers found; zfs.ko was not built"
log "zfs $zfs_ver built for: ${built_for[*]}"

if [ "$MODE" = chroot ]; then
    apt-get clean
else
    running=$(uname -r)
    if has_zfs_ko "$running"; then
        modprobe zfs && log "zfs module loaded: $(cat /sys/module/zfs/version)"
    else
        log "zfs is not built for the running kernel $running: REBOOT into ${built_for[-1]}"
        touch /var/run/reboot-required
    fi
fi
log "done"
