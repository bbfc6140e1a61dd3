#!/bin/bash
# guest-test.sh - run snapdriver's ZFS test tier. Runs INSIDE the lab guest
# (vagrant/lab test) or the Vagrant VM (its last provisioning step), as root.
#
# Creates a file-backed zpool (2 GiB sparse file, pool "sdtest"), exports
# SNAPDRIVER_ZPOOL for the tests and adds zfs to SNAPDRIVER_REQUIRE_TIERS (a
# missing pool/module then fails instead of skipping), runs `pytest -m zfs` with the project venv if
# there is one (made on the host with /usr/bin/python3 -m venv
# --system-site-packages .venv), else Debian's python3, writes a JUnit report
# and destroys the pool again.
#
# Environment:
#   REPORT            JUnit XML path (default: .lab-report.xml in the checkout)
#   GUEST_TEST_PATHS  what pytest collects (default: tests)
#   GUEST_TEST_IMG    pool file (default: /tmp/snapdriver-pool.img)
#   SNAPDRIVER_CRASH_KILLS  SIGKILLs in the crash tier (default here: 50)
# Extra arguments are passed to pytest.
#
# Exit code: pytest's (0 ok, 1 failures, 2 interrupted/collection errors,
# 4 usage error such as a missing tests/ dir or a broken conftest, 5 NO TESTS RAN), 6 if the ZFS
# setup itself failed. Never 0 unless tests ran and passed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 6
POOL=sdtest
IMG=${GUEST_TEST_IMG:-/tmp/snapdriver-pool.img}
REPORT=${REPORT:-$PWD/.lab-report.xml}
read -r -a TEST_PATHS <<<"${GUEST_TEST_PATHS:-tests}"
LOG=$(mktemp /tmp/guest-test.XXXXXX.log)

banner() {   # banner HEADLINE [DETAIL]
    echo
    echo "############################################################"
    echo "$1"
    [ -z "${2:-}" ] || echo "$2"
    echo "############################################################"
}
setup_failed() { banner "ZFS TIER: SETUP FAILED" "$*"; exit 6; }

[ "$(id -u)" = 0 ] || setup_failed "must run as root (inside the lab guest or the Vagrant VM)"
command -v zpool >/dev/null || setup_failed "zpool not installed (run vagrant/provision.sh)"
[ -e /dev/zfs ] || modprobe zfs 2>/dev/null
[ -e /dev/zfs ] || setup_failed "no /dev/zfs: the zfs module does not load on kernel $(uname -r) (reboot into the kernel provision.sh built zfs for?)"

# A leftover pool from an earlier run in the same VM: remove it only if it is ours.
if zpool list -H -o name "$POOL" >/dev/null 2>&1; then
    zpool status -P "$POOL" | grep -qF "$IMG" \
        || setup_failed "a pool named $POOL exists and is not backed by $IMG; not touching it"
    zpool destroy -f "$POOL" || setup_failed "cannot destroy the leftover pool $POOL"
fi

# shellcheck disable=SC2317 # reached through the EXIT trap
cleanup() {
    if zpool list -H -o name "$POOL" >/dev/null 2>&1; then
        zpool destroy -f "$POOL" || echo "guest-test: WARNING: could not destroy pool $POOL"
    fi
    rm -f "$IMG" "$LOG"
}
trap cleanup EXIT

rm -f "$IMG"
truncate -s 2G "$IMG" || setup_failed "cannot create $IMG"
zpool create -f -O mountpoint="/$POOL" -O atime=off "$POOL" "$IMG" \
    || setup_failed "zpool create $POOL $IMG failed"
export SNAPDRIVER_ZPOOL=$POOL
# The project's conftest turns "ZFS TIER NOT RUN" skips into failures for required tiers.
case ",${SNAPDRIVER_REQUIRE_TIERS:-}," in
    *,zfs,*) ;;
    *) export SNAPDRIVER_REQUIRE_TIERS=${SNAPDRIVER_REQUIRE_TIERS:+$SNAPDRIVER_REQUIRE_TIERS,}zfs ;;
esac
# Each kill of the crash tier costs a restart, ~20 s under TCG: 50 is the least its figure needs.
export SNAPDRIVER_CRASH_KILLS=${SNAPDRIVER_CRASH_KILLS:-50}
echo "guest-test: pool $POOL on $IMG ($(zfs version | head -n1), kernel $(uname -r))"

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=/usr/bin/python3; fi
if ! "$PY" -c 'import pytest' 2>/dev/null; then
    echo "guest-test: WARNING: $PY cannot import pytest here; falling back to /usr/bin/python3"
    PY=/usr/bin/python3
fi
echo "guest-test: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')), pytest -m zfs ${TEST_PATHS[*]} $*"

rm -f "$REPORT"
"$PY" -m pytest -m zfs -p no:cacheprovider --junitxml="$REPORT" -ra \
    "${TEST_PATHS[@]}" "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}

# pytest's last "==== ... ====" line, e.g. "3 passed, 2 deselected in 4.1s".
summary=$(grep -E '^=+ .+ =+$' "$LOG" | tail -n1 | sed -E 's/^=+ //; s/ =+$//')
[ -n "$summary" ] || summary=$(grep -v '^[[:space:]]*$' "$LOG" | tail -n1)

case "$rc" in
    0) ;;
    5) banner "ZFS TIER: NO TESTS RAN" "(pytest exit 5: nothing collected, or -m zfs deselected everything)" ;;
    4) banner "ZFS TIER: NO TESTS RAN" "(pytest exit 4: usage error, a missing '${TEST_PATHS[*]}', or a conftest that failed to import; see above)" ;;
    2) banner "ZFS TIER: COLLECTION ERRORS OR INTERRUPTED" "(pytest exit 2)" ;;
    1) banner "ZFS TIER: TESTS FAILED" "(pytest exit 1)" ;;
    *) banner "ZFS TIER: PYTEST ERROR" "(pytest exit $rc)" ;;
esac
echo "ZFS TIER: $summary (exit $rc)"
exit "$rc"
