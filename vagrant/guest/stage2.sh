#!/bin/bash
# Stage 2 of the lab guest: /lab-init in the guest rootfs, PID 1, no systemd (stage1.sh
# starts it). Basic mounts, loop and zfs modules, the shares (ctl: what the host asks for;
# host: the checkout, bound at its host paths), the command (ctl/cmd) with ctl/env sourced,
# the exit code back to the host (ctl/exit-code), power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb
# Power off, then wait for it without touching the rootfs: the power-off shuts the 9p transport
# down, a `sleep` looked up there can fail ("command not found"), and PID 1 returning panics the
# kernel ("Attempted to kill init!", a call trace in the kernel log) before the power is off.
# Hence a static busybox on tmpfs (/run) once /run is there.
off() { sync; echo o > /proc/sysrq-trigger; /run/lab-busybox sleep 30 2>/dev/null || sleep 30; }
fail() { echo "lab stage 2: $*"; off; }
trap off EXIT
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev
# The kernel logs to ttyS1 (a file on the host); the command talks on ttyS0.
exec </dev/null >/dev/ttyS0 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
ln -sfn /proc/self/fd /dev/fd; ln -sfn fd/0 /dev/stdin; ln -sfn fd/1 /dev/stdout; ln -sfn fd/2 /dev/stderr
mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mount -t tmpfs -o mode=755,nosuid,nodev run /run
mkdir -p /run/lock
cp /bin/busybox /run/lab-busybox || echo "lab stage 2: WARNING: no busybox for the power-off"
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
hostname snapdriver-lab
busybox ip link set lo up 2>/dev/null
modprobe loop
modprobe virtio_rng 2>/dev/null
t_zfs=$(cut -d" " -f1 /proc/uptime)
echo "options zfs zfs_arc_max=268435456" > /etc/modprobe.d/lab-zfs.conf
modprobe zfs || echo "lab stage 2: WARNING: modprobe zfs failed"
t_zfs="$t_zfs-$(cut -d" " -f1 /proc/uptime)"
mkdir -p /mnt/ctl /mnt/host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none ctl /mnt/ctl || fail "mount ctl share"
hc=$(cat /mnt/ctl/sharecache 2>/dev/null)
mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=${hc:-mmap}" host /mnt/host || fail "mount host share"
first=""
while IFS= read -r p; do
    [ -n "$p" ] || continue
    mkdir -p "$p" || fail "mkdir $p"
    mount --bind /mnt/host "$p" || fail "bind the checkout at $p"
    [ -n "$first" ] || first=$p
done < /mnt/ctl/hostpaths
# shellcheck source=/dev/null # written by the host for this run
[ -f /mnt/ctl/env ] && . /mnt/ctl/env
cd "${first:-/mnt/host}" || fail "cd checkout"
echo "lab: guest ready after $(cut -d" " -f1 /proc/uptime) s uptime ($(cat /lab-boot-times), zfs $t_zfs); running the command in $PWD"
bash /mnt/ctl/cmd < /dev/null
rc=$?
echo "$rc" > /mnt/ctl/exit-code
sync
echo "LAB-EXIT-CODE: $rc"
