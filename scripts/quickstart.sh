#!/usr/bin/env bash
# Make (once) and mount a default file-backed warehouse, ready to use.
#   KVFS_WAREHOUSE (default /var/lib/kvfs/default), KVFS_MOUNT (default /mnt/kvfs),
#   KVFS_SIZE (default: 4G, at most half the free space).
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
WAREHOUSE=${KVFS_WAREHOUSE:-/var/lib/kvfs/default}
MNT=${KVFS_MOUNT:-/mnt/kvfs}
KVFS=$PWD/.venv/bin/kvfs
# mount.fuse3 (fstab type fuse.kvfs) looks for "kvfs" on root's PATH.
if [ "$(id -u)" = 0 ] && [ ! -e /usr/local/bin/kvfs ]; then
    ln -s "$KVFS" /usr/local/bin/kvfs
fi
if [ ! -d "$WAREHOUSE/meta" ]; then
    "$KVFS" mkfs "$WAREHOUSE" ${KVFS_SIZE:+--size "$KVFS_SIZE"}
fi
mkdir -p "$MNT"
if grep -q " $MNT fuse.kvfs " /proc/self/mounts; then
    echo "kvfs: $WAREHOUSE is already mounted on $MNT"
else
    "$KVFS" mount "$WAREHOUSE" "$MNT"
fi
df -h "$MNT"
echo
echo "kvfs is ready at $MNT (warehouse $WAREHOUSE, log $WAREHOUSE/kvfs.log)."
echo "Unmount with:  $KVFS umount $MNT"
