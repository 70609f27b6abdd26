#!/usr/bin/env python3
"""Retrieval throughput of LMCache through the kvfs storage plugin (kvfs.lmcache_plugin)
against LMCache's own local_disk backend (LocalDiskBackend) on the same disk, in one run.

A kvfs warehouse (one file-backed device) and LMCache's local_disk directory are made side
by side under --dir. CHUNKS KV chunks (KV_2LTD, bfloat16, 256 tokens, --chunk-mib MiB each,
random) are stored through each backend's batched_submit_put_task, then read back with
batched_get_blocking in batches of --batch chunks (as StorageManager.batched_get does), the
backends alternating, each timed --reps times: warm (the page cache holds the files) and
cold (page cache dropped; kvfs remounted, which also empties its own block cache, and a new
plugin instance made). Only the batched_get_blocking calls are timed; every chunk they
return is compared with what was stored, outside the timing. The plugin is timed on the
direct path and with file I/O; "lookup" is batched_contains of one batch.
Prints the command line and a table (medians; MB/s of KV bytes retrieved).

    .venv/bin/python scripts/lmcache_bench.py [--chunks 128] [--chunk-mib 2] [--batch 16]
                                              [--reps 3] [--dir /var/tmp] [--json]
"""

import argparse
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

KVFS = [sys.executable, "-m", "kvfs.tools"]
MiB = 1 << 20


def kvfs(*args):
    subprocess.run([*KVFS, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=128)
    ap.add_argument("--chunk-mib", type=int, default=2, help="MiB per chunk (a multiple of 1/4)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where the warehouse and the local_disk directory go")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # LMCache's own chatter; errors still raise here

    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.check.utils import EventLoopManager
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
    from kvfs.lmcache_plugin import KvfsBackend

    layers, tokens = 8, 256
    hidden = args.chunk_mib * MiB // (2 * layers * tokens * 2)
    shape = torch.Size([2, layers, tokens, hidden])
    chunk_bytes = shape.numel() * 2
    total = args.chunks * chunk_bytes
    base = tempfile.mkdtemp(prefix="kvfs-lmcbench-", dir=args.dir)
    wh, mnt, disk = (os.path.join(base, n) for n in ("wh", "mnt", "localdisk"))
    os.mkdir(mnt)
    os.mkdir(disk)
    mounted = False
    loop = EventLoopManager()
    loop.start()
    backends = {}
    try:
        kvfs("mkfs", wh, "--size", f"{max(total * 3, 512 * MiB) // MiB}M")
        kvfs("mount", wh, mnt)
        mounted = True
        os.mkdir(os.path.join(mnt, "lmcache"))
        cpu_gb = (args.batch * 2 + 8) * chunk_bytes / 2**30
        config = LMCacheEngineConfig.from_dict({
            "chunk_size": tokens, "local_cpu": False, "max_local_cpu_size": cpu_gb,
            "local_disk": f"file://{disk}/", "max_local_disk_size": total * 2 / 2**30,
            "extra_config": {"storage_plugin.kvfs.root": os.path.join(mnt, "lmcache")},
        })
        metadata = LMCacheMetadata(model_name="bench/model", world_size=1, local_world_size=1, worker_id=0,
                                   local_worker_id=0, kv_dtype=torch.bfloat16,
                                   kv_shape=(layers, 2, tokens, 1, hidden))
        cpu = LocalCPUBackend(config=config, metadata=metadata, dst_device="cpu")

        def plugin(direct: bool):
            cfg = LMCacheEngineConfig.from_dict({**config.to_dict(), "extra_config": {
                **config.extra_config, "storage_plugin.kvfs.direct": direct}})
            return KvfsBackend(dst_device="cpu", config=cfg, metadata=metadata, local_cpu_backend=cpu,
                               loop=loop.get_loop())

        backends = {
            "kvfs plugin, direct path": plugin(True),
            "kvfs plugin, file I/O": plugin(False),
            "LMCache local_disk": LocalDiskBackend(config, loop.get_loop(), cpu, "cpu", None, metadata),
        }
        assert backends["kvfs plugin, direct path"].uses_direct_path, "the mount does not serve the direct path"
        keys = [CacheEngineKey("bench/model", 1, 0, 10_000 + i, torch.bfloat16) for i in range(args.chunks)]
        gen = torch.Generator().manual_seed(7)
        data = [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(args.chunks)]

        def store(name, backend):
            t0 = time.perf_counter()
            for lo in range(0, args.chunks, args.batch):
                objs = []
                for i in range(lo, min(lo + args.batch, args.chunks)):
                    obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
                    obj.tensor.copy_(data[i])
                    objs.append(obj)
                backend.batched_submit_put_task(keys[lo:lo + len(objs)], objs)
                for obj in objs:
                    obj.ref_count_down()
                if isinstance(backend, LocalDiskBackend):
                    while any(backend.exists_in_put_tasks(k) for k in keys[lo:lo + len(objs)]):
                        time.sleep(0.001)
            if isinstance(backend, KvfsBackend):
                backend.flush()
            return time.perf_counter() - t0

        store_s = {"kvfs plugin, direct path": store("kvfs", backends["kvfs plugin, direct path"]),
                   "LMCache local_disk": store("disk", backends["LMCache local_disk"])}
        os.sync()

        def retrieve(backend) -> float:
            spent = 0.0
            for lo in range(0, args.chunks, args.batch):
                t0 = time.perf_counter()
                got = backend.batched_get_blocking(keys[lo:lo + args.batch])
                spent += time.perf_counter() - t0
                for i, obj in enumerate(got):  # checked, but not timed
                    assert obj is not None and torch.equal(obj.tensor, data[lo + i]), f"chunk {lo + i} differs"
                    obj.ref_count_down()
            return spent

        def lookup(backend) -> float:
            t0 = time.perf_counter()
            for _ in range(20):
                assert backend.batched_contains(keys[:args.batch]) == min(args.batch, args.chunks)
            return (time.perf_counter() - t0) / 20

        results = {name: {"warm": [], "cold": [], "lookup": []} for name in backends}
        cold_ok = True
        for rep in range(args.reps):
            for name in backends:
                retrieve(backends[name])  # warm-up: the files in the page cache
                results[name]["warm"].append(retrieve(backends[name]))
                results[name]["lookup"].append(lookup(backends[name]))
            for name in backends:
                if name.startswith("kvfs"):
                    backends[name].close()
                    kvfs("umount", mnt)
                    kvfs("mount", wh, mnt)
                    backends[name] = plugin(name.endswith("direct path"))
                cold_ok = drop_caches() and cold_ok
                results[name]["cold"].append(retrieve(backends[name]))

        mb = total / 1e6
        rows = []
        for name, r in results.items():
            rows.append({"backend": name,
                         "store_MBps": round(mb / store_s[name], 1) if name in store_s else None,
                         "retrieve_warm_MBps": round(mb / statistics.median(r["warm"]), 1),
                         "retrieve_cold_MBps": round(mb / statistics.median(r["cold"]), 1) if cold_ok else None,
                         "lookup_batch_ms": round(statistics.median(r["lookup"]) * 1e3, 3)})
        cmd = shlex.join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                          *sys.argv])
        if args.json:
            print(json.dumps({"command": cmd, "chunks": args.chunks, "chunk_bytes": chunk_bytes,
                              "batch": args.batch, "reps": args.reps, "rows": rows}, indent=2))
            return 0
        print(f"$ {cmd}")
        print(f"{args.chunks} chunks of {chunk_bytes / MiB:g} MiB (KV_2LTD {list(shape)} bf16), batches of "
              f"{args.batch}, {args.reps} reps (medians), {os.cpu_count()} CPUs, under {args.dir}"
              + ("" if cold_ok else "; cold runs need root (drop_caches): not measured"))
        print()
        print("| backend | store MB/s | retrieve warm MB/s | retrieve cold MB/s | batched_contains of a batch, ms |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            cells = [r["store_MBps"], r["retrieve_warm_MBps"], r["retrieve_cold_MBps"], r["lookup_batch_ms"]]
            print(f"| {r['backend']} | " + " | ".join("-" if c is None else f"{c:,}" for c in cells) + " |")
        return 0
    finally:
        for b in backends.values():
            try:
                b.close()
            except Exception:
                pass
        loop.stop()
        if mounted:
            subprocess.run([*KVFS, "umount", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
