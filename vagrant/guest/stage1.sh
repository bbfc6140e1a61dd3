#!/bin/busybox sh
# shellcheck shell=dash
# Stage 1 of the lab guest: /init in the initramfs (busybox only), made by
# snapdriver/testing/lab/initrd.py. Loads the virtio/9p/overlay modules listed in
# /modules.list, mounts the cached rootfs read-only over 9p under a tmpfs overlay and
# switch_roots into stage 2 (/lab-init, stage2.sh). On failure it powers the guest off:
# the host then sees no exit code (255).
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "lab stage 1: $*"; echo o > /proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/ttyS0 2>&1
t_init=$(cut -d" " -f1 /proc/uptime)
while read -r mod args; do
    # shellcheck disable=SC2086 # the module arguments are words, split on purpose
    insmod "/lib/modules/$mod" $args || fail "insmod $mod"
done < /modules.list
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose rootfs /ro || fail "mount 9p rootfs"
mount -t tmpfs -o mode=755 lab-rw /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "mount overlay"
cp /lab-init /newroot/lab-init || fail "copy stage 2"
chmod 755 /newroot/lab-init || fail "chmod stage 2"
echo "init $t_init, stage-2 $(cut -d" " -f1 /proc/uptime)" > /newroot/lab-boot-times
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /lab-init
