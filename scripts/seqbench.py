#!/usr/bin/env python3
"""Sequential write/read MB/s through a kvfs mount next to a plain directory on the same disk.

Both are measured in the same run, alternating, REPS times; the median is reported with the
ratio kvfs/raw. "write" ends at close (raw: page cache only, so it swings with dirty-page
state); "write_fsync" ends after fsync (durable on both sides). Cold reads drop the page
cache first (needs root).

    .venv/bin/python scripts/seqbench.py [--dir /var/tmp] [--size-mib 512] [--reps 3] [--json]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CHUNK = 1 << 20
KVFS = [sys.executable, "-m", "kvfs.tools"]


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def write_file(path, size, direct=False, fsync=False):
    buf = os.urandom(CHUNK)
    flags = os.O_CREAT | os.O_TRUNC | os.O_WRONLY | (os.O_DIRECT if direct else 0)
    if direct:
        import mmap

        m = mmap.mmap(-1, CHUNK)
        m.write(buf)
        buf = m
    t = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    for _ in range(size // CHUNK):
        os.write(fd, buf)
    if fsync:
        os.fsync(fd)
    os.close(fd)
    return size / (time.perf_counter() - t) / 1e6


def read_file(path):
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while True:
            got = f.readinto(buf)
            if not got:
                break
            n += got
    return n / (time.perf_counter() - t) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp", help="where the raw directory and the warehouse live")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = args.size_mib << 20
    base = tempfile.mkdtemp(prefix="kvfs-bench-", dir=args.dir)
    raw = os.path.join(base, "raw")
    wh = os.path.join(base, "wh")
    mnt = os.path.join(base, "mnt")
    os.makedirs(raw)
    os.makedirs(mnt)
    subprocess.run([*KVFS, "mkfs", wh, "--size", f"{max(4 * args.size_mib, 1024)}M"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([*KVFS, "mount", wh, mnt], check=True, stdout=subprocess.DEVNULL)
    workloads = ("write", "write_fsync", "read_cold", "read_warm")
    results = {k: {"raw": [], "kvfs": []} for k in workloads}
    try:
        for rep in range(args.reps):
            for side, d in (("raw", raw), ("kvfs", mnt)):
                path = os.path.join(d, f"f{rep}")
                results["write_fsync"][side].append(write_file(path + "s", size, fsync=True))
                os.unlink(path + "s")
                results["write"][side].append(write_file(path, size))
                drop_caches()
                results["read_cold"][side].append(read_file(path))
                results["read_warm"][side].append(read_file(path))
                os.unlink(path)
    finally:
        subprocess.run([*KVFS, "umount", mnt], stdout=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)
    table = {}
    for k, v in results.items():
        r, kv = statistics.median(v["raw"]), statistics.median(v["kvfs"])
        table[k] = {"raw_MBps": round(r), "kvfs_MBps": round(kv), "ratio": round(kv / r, 2)}
    if args.json:
        print(json.dumps({"size_mib": args.size_mib, "reps": args.reps, "results": table}, indent=2))
    else:
        print(f"sequential, {args.size_mib} MiB file, 1 MiB I/O, median of {args.reps}")
        print(f"{'workload':<12}{'raw MB/s':>10}{'kvfs MB/s':>11}{'kvfs/raw':>10}")
        for k, row in table.items():
            print(f"{k:<12}{row['raw_MBps']:>10}{row['kvfs_MBps']:>11}{row['ratio']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
