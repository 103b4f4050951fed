#!/usr/bin/env bash
# Make (once) the Debian 12 root filesystem the system tests boot, and print its path.
#
#   bash tests/system/make_rootfs.sh [CACHE_DIR]     (default /var/cache/runtime-cluster-tests)
#
# The tree is cached outside the repository, under a name that hashes what goes into
# it, so a change to the package list builds a new one and never reuses a stale tree.
# It holds what node-agent's .deb depends on, so installing the .deb in a test
# fetches nothing, and openssh-server for `agentctl up`. The containers share the
# machine's network, so nothing in them may open ports or reach out by itself:
# ssh.service is disabled (each test host starts its own sshd on its own loopback
# address) and the timers are masked (apt-daily would fetch package lists).
set -euo pipefail
CACHE=${1:-${RUNTIME_TEST_CACHE:-/var/cache/runtime-cluster-tests}}
SUITE=bookworm
PACKAGES=systemd,systemd-sysv,dbus,python3,adduser,openssh-server,ca-certificates,procps
KEY=$(printf '%s %s v2' "$SUITE" "$PACKAGES" | sha256sum | cut -c1-12)
ROOT="$CACHE/rootfs-$SUITE-$KEY"
if [ -f "$ROOT/.complete" ]; then
    echo "$ROOT"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9                                     # two test runs never build it at once
if [ -f "$ROOT/.complete" ]; then
    echo "$ROOT"
    exit 0
fi
MIRROR=${DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$MIRROR" ] && [ -r /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TMP="$ROOT.tmp.$$"
rm -rf "$TMP"
trap 'rm -rf "$TMP"' EXIT
echo "make_rootfs: debootstrap $SUITE into $TMP from $MIRROR (about 100 s)" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TMP" "$MIRROR" >"$TMP.log" 2>&1 || {
    tail -20 "$TMP.log" >&2; echo "make_rootfs: debootstrap failed (log $TMP.log)" >&2; exit 1; }
rm -f "$TMP.log"
# Nothing may open ports or reach the network from the shared namespace by itself.
chroot "$TMP" systemctl disable ssh.service >/dev/null 2>&1 || true
chroot "$TMP" systemctl mask ssh.socket apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
chroot "$TMP" apt-get clean
: > "$TMP/etc/machine-id"
echo bookworm > "$TMP/etc/hostname"
touch "$TMP/.complete"
mv "$TMP" "$ROOT"
trap - EXIT
# Trees made from an older package list are never used again.
for old in "$CACHE"/rootfs-"$SUITE"-*; do
    [ "$old" = "$ROOT" ] || [ ! -d "$old" ] || rm -rf "$old"
done
echo "$ROOT"
