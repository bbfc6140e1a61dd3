#!/bin/sh
# zfs-front.sh DATASET COMMAND...: create DATASET, then exec COMMAND (a front on it).
# containerd's suite starts one front per subtest and each ZFS front needs a root dataset of its
# own (a root keeps one front's layers); the suite names it with its front number, {n}.
set -e
zfs create -o mountpoint=legacy "$1"
shift
exec "$@"
