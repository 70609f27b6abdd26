#!/usr/bin/env bash
# Make (once) and mount a default file-backed warehouse, ready to use.
#   KVFS_WAREHOUSE (default /var/lib/kvfs/default), KVFS_MOUNT (default /mnt/kvfs),
#   KVFS_SIZE (default: 4G, at most half the free space), KVFS_LINK (default
#   /usr/local/bin/kvfs: the link to this checkout's kvfs, see below).
set -euo pipefail
cd "$(dirname "$0")/.."
KVFS_SKIP_CLIENTS=1 bash scripts/setup.sh
WAREHOUSE=${KVFS_WAREHOUSE:-/var/lib/kvfs/default}
MNT=${KVFS_MOUNT:-/mnt/kvfs}
KVFS=$PWD/.venv/bin/kvfs
# A bare "kvfs", and mount.fuse3 (fstab type fuse.kvfs), find the command on root's PATH:
# LINK, a link to this checkout's. A link to some checkout's .venv/bin/kvfs (an older clone,
# say) is pointed here; anything else is left alone, and said.
LINK=${KVFS_LINK:-/usr/local/bin/kvfs}
old=$(readlink "$LINK") || old=
if [ "$old" = "$KVFS" ]; then
    echo "kvfs: $LINK -> $KVFS"
elif [ ! -w "$(dirname "$LINK")" ]; then
    echo "kvfs: $LINK left alone (no right to write in $(dirname "$LINK")); call this checkout's kvfs as $KVFS"
elif [ ! -e "$LINK" ] && [ ! -L "$LINK" ]; then
    ln -s "$KVFS" "$LINK"
    echo "kvfs: $LINK -> $KVFS (new)"
elif [ -L "$LINK" ] && [[ $old = */.venv/bin/kvfs ]]; then
    ln -sfn "$KVFS" "$LINK"
    echo "kvfs: $LINK -> $KVFS (was -> $old)"
else
    what=$(if [ -L "$LINK" ]; then echo "a link to $old"; else stat -c "a %F" "$LINK"; fi)
    echo "kvfs: $LINK is $what, not a kvfs checkout's: left alone; call this checkout's kvfs as $KVFS"
fi
# How to call it from here: bare if "kvfs" on PATH is this checkout's.
CALL=$KVFS
if [ "$(readlink -f "$(command -v kvfs)")" = "$(readlink -f "$KVFS")" ]; then
    CALL=kvfs
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
echo "Unmount with:  $CALL umount $MNT"
