#!/usr/bin/env python3
"""The shared tier's throughput and latency: two warehouses on this machine as two nodes
on one bucket. Node A writes FILES files of SIZE MiB; the upload is timed from the first
write until A's queue is empty. Node B then reads them by path (lookup, fetch of every
block, verification, local store), and again from its own devices with a cold page
cache. Lookups of names nobody has, and of names only the store has, are timed one by one.

Without --endpoint it runs SeaweedFS (tests/seaweed.py) on 127.0.0.1 for the run; with
it, credentials come from the usual AWS variables and BUCKET must exist.

    .venv/bin/python scripts/sharedbench.py [--files 32] [--size-mib 8] [--dir /var/tmp] [--json]
    .venv/bin/python scripts/sharedbench.py --endpoint http://minio:9000 --bucket kv [...]
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
import uuid

from kvfs.tools.bench import drop_caches

HERE = os.path.dirname(os.path.abspath(__file__))
KVFS = [sys.executable, "-m", "kvfs.tools"]


def kvfs(*args):
    subprocess.run([*KVFS, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def shared_stats(mnt):
    with open(os.path.join(mnt, ".kvfs", "stats.json")) as f:
        return json.load(f)["shared"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--size-mib", type=int, default=8)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--dir", default="/var/tmp", help="where the warehouses go")
    ap.add_argument("--endpoint", help="an S3 endpoint to use instead of a local SeaweedFS")
    ap.add_argument("--bucket", default="kvfs-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = tempfile.mkdtemp(prefix="kvfs-sharedbench-", dir=args.dir)
    sw = None
    mounts = []
    try:
        endpoint = args.endpoint
        if endpoint is None:
            sys.path.insert(0, os.path.join(HERE, "..", "tests"))
            import seaweed

            sw = seaweed.Seaweed(os.path.join(base, "seaweed"))
            sw.start()
            os.environ.update(sw.env())
            endpoint, args.bucket = sw.endpoint, seaweed.BUCKET
        url = f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:8]}"
        size = args.size_mib << 20
        need = args.files * size
        for name in ("a", "b"):
            wh, mnt = os.path.join(base, name), os.path.join(base, f"mnt-{name}")
            os.mkdir(mnt)
            kvfs("mkfs", wh, "--size", f"{max(need * 2, 256 << 20) >> 20}M")
            kvfs("mount", wh, mnt, "--shared", url, "--shared-endpoint", endpoint)
            mounts.append(mnt)
        a, b = mounts
        data = [os.urandom(size) for _ in range(args.files)]

        t0 = time.perf_counter()
        for i, d in enumerate(data):
            with open(os.path.join(a, f"f{i}"), "wb") as f:
                f.write(d)
        written = time.perf_counter() - t0
        while shared_stats(a)["queue"]:
            time.sleep(0.02)
        uploaded = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, d in enumerate(data):
            with open(os.path.join(b, f"f{i}"), "rb") as f:
                assert f.read() == d, f"f{i} differs"
        fetched = time.perf_counter() - t0
        if not drop_caches():
            sys.exit("sharedbench: dropping the page cache needs root")
        t0 = time.perf_counter()
        for i in range(args.files):
            with open(os.path.join(b, f"f{i}"), "rb") as f:
                f.read()
        local = time.perf_counter() - t0

        miss, hit = [], []
        for i in range(args.lookups):
            t = time.perf_counter()
            os.path.exists(os.path.join(b, f"nobody-{i}"))
            miss.append(time.perf_counter() - t)
        for i in range(min(args.lookups, 50)):
            with open(os.path.join(a, f"small{i}"), "wb") as f:
                f.write(b"x")
        while shared_stats(a)["queue"]:
            time.sleep(0.02)
        for i in range(min(args.lookups, 50)):
            t = time.perf_counter()
            os.stat(os.path.join(b, f"small{i}"))
            hit.append(time.perf_counter() - t)

        mb = need / 1e6
        result = {
            "files": args.files, "size_mib": args.size_mib, "endpoint": endpoint,
            "write_a_MBps": round(mb / written, 1),
            "upload_until_queue_empty_MBps": round(mb / uploaded, 1),
            "read_b_first_MBps": round(mb / fetched, 1),
            "read_b_again_cold_MBps": round(mb / local, 1),
            "lookup_miss_ms_median": round(statistics.median(miss) * 1e3, 2),
            "lookup_found_in_store_ms_median": round(statistics.median(hit) * 1e3, 2),
            "a": shared_stats(a), "b": shared_stats(b),
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{args.files} files of {args.size_mib} MiB through {endpoint}:")
            for k, v in result.items():
                if k.endswith(("MBps", "_ms_median")):
                    print(f"  {k:36} {v}")
        return 0
    finally:
        for mnt in mounts:
            subprocess.run([*KVFS, "umount", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if sw is not None:
            sw.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
