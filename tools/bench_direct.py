"""kvfs bench --only direct-path: the direct path against the raw device file it reads, in
one run. Every row's baseline is the warehouse's own device file read (or a scratch file
on the same disk written) with plain preadv/pwrite at the same parallelism; the other
paths (the mount, a plain directory) are rows of their own against that same baseline.
Drives kvfs only as a client does: kvfs.direct_client, kvfs.kv, file I/O on the mount.
"""

import concurrent.futures
import json
import mmap
import os
import statistics
import time

import numpy as np

from kvfs.direct_client import connect
from kvfs.kv import KVStore

MiB = 1 << 20
THREADS = 16  # the same parallelism as the daemon's direct path (its hello says; see run)
DATA_START = 1 << 20  # where a device's data area starts (kvfs.store.DATA_START)


def _pread_all(path: str, offset: int, length: int, threads: int | None = None, odirect: bool = False) -> float:
    """Read [offset, offset+length) of a file with `threads` threads in 1 MiB preadv calls
    into one buffer (through the page cache, or past it with O_DIRECT): seconds."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if odirect else 0))
    # Memory mapped in before the clock starts, as the direct path's reused array is.
    buf = memoryview(mmap.mmap(-1, length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE))
    try:
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads or THREADS) as pool:
            list(pool.map(lambda off: os.preadv(fd, [buf[off:off + MiB]], offset + off), range(0, length, MiB)))
        return time.perf_counter() - t
    finally:
        os.close(fd)


def _pwrite_all(path: str, data, threads: int | None = None) -> float:
    """Write `data` to a new file with `threads` threads in 1 MiB pwrite calls, then
    fdatasync: seconds."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    view = memoryview(data)
    try:
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads or THREADS) as pool:
            list(pool.map(lambda off: os.pwrite(fd, view[off:off + MiB], off), range(0, len(view), MiB)))
        os.fdatasync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)
        os.unlink(path)


def _read_paths(paths: list[str], threads: int | None = None) -> float:
    def one(p):
        buf = bytearray(MiB)
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads or THREADS) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - t


def device_file(mount: str) -> str:
    with open(os.path.join(mount, ".kvfs", "stats.json")) as f:
        stats = json.load(f)
    dev = stats["devices"][0]["path"]
    return dev if os.path.isabs(dev) else os.path.join(stats["path"], dev)


def run(bench, drop_caches, Row) -> None:
    """Add the direct path's rows to `bench` (a tools.bench.Bench)."""
    mount, rawdir, scale = bench.mount, bench.raw, bench.scale
    client = connect(mount)
    if client is None:
        bench.rows.append(Row("direct path", "-", None, None, note="not served by this mount"))
        return
    global THREADS
    THREADS = client.threads  # raw reads and writes with as many threads as the daemon's
    dev = device_file(mount)
    cold = bench.can_drop
    total = scale.total
    size = 32 * MiB
    count = max(2, total // size)
    total = count * size
    note = "" if cold else "page cache not dropped (not root): warm"
    rnd = np.random.default_rng(15)
    data = bytearray(rnd.bytes(total))
    for off in range(0, total, MiB):  # every block unique
        data[off:off + 16] = off.to_bytes(16, "big")
    buf = client.buffer(total)
    buf.mm[:total] = data
    base = os.path.join(mount, f"direct-{os.getpid()}")

    # Stores: one request for all files, durable at the reply; against pwrite + fdatasync of
    # the same bytes, alternating (this disk's write speed wanders).
    raw_ws, direct_ws = [], []
    reps = max(1, scale.reps)
    for rep in range(reps):
        # The first repetition stores `data` (what the reads below read: the first extents
        # of the device, which the raw reads read too); later ones other bytes (no dedup).
        buf.mm[:total] = data
        if rep:
            view = np.frombuffer(buf.mm, np.uint64, total // 8)
            view ^= np.uint64(rep)
            del view
        os.sync()
        items = [(os.path.join(base if rep == 0 else f"{base}-{rep}", f"f{i:04d}"), buf, i * size, size, 0o644)
                 for i in range(count)]
        if rep == 0:
            first_items = items

        def direct_store():
            t = time.perf_counter()
            res = client.write(items, parents=True, sync=True)
            assert all(r == 0 for r in res), res
            return total / (time.perf_counter() - t) / 1e9

        def raw_store():
            return total / _pwrite_all(os.path.join(rawdir, "scratch"), buf.mm[:total]) / 1e9

        for side in ((raw_store, direct_store) if rep % 2 == 0 else (direct_store, raw_store)):
            (raw_ws if side is raw_store else direct_ws).append(side())
    items = first_items
    bench.add(f"store {count} x 32 MiB, direct path (one request, synced)", "GB/s",
              {"raw": raw_ws, "kvfs": direct_ws}, target=0.8, note=f"raw: pwrite+fdatasync, {THREADS} threads")

    # Cold reads of the same bytes four ways, each against the device file read alike: the
    # better of preadv through the page cache and past it (O_DIRECT), each repetition.
    raw_kinds: dict[bool, list] = {False: [], True: []}

    def raw_read():
        for odirect in (False, True):
            drop_caches()
            raw_kinds[odirect].append(total / _pread_all(dev, DATA_START, total, odirect=odirect) / 1e9)
        return max(raw_kinds[False][-1], raw_kinds[True][-1])

    def direct_read():
        drop_caches()
        t = time.perf_counter()
        got = client.read([(p, 0, size, buf, off) for p, _, off, _, _ in items])
        took = time.perf_counter() - t
        assert got == [size] * count, got
        return total / took / 1e9

    raws, directs = [], []
    for _ in range(max(1, scale.reps)):
        raws.append(raw_read())
        directs.append(direct_read())
    assert bytes(buf.mm[:total]) == bytes(data), "the direct path read other bytes"
    kinds = f"buffered {statistics.median(raw_kinds[False]):.2f}, O_DIRECT {statistics.median(raw_kinds[True]):.2f} GB/s"
    bench.add(f"cold read {count} x 32 MiB, direct path", "GB/s", {"raw": raws, "kvfs": directs},
              target=0.9, note=f"raw: device file, {THREADS} threads, the better of {kinds}; {note}".rstrip("; "))
    mounts = []
    for _ in range(max(1, scale.reps)):
        drop_caches()
        mounts.append(total / _read_paths([p for p, *_ in items]) / 1e9)
    bench.add(f"cold read {count} x 32 MiB, through the mount ({THREADS} readers)", "GB/s",
              {"raw": raws, "kvfs": mounts}, note="raw: device file; direct/mount "
              f"{statistics_ratio(directs, mounts)}")
    plain = []
    os.makedirs(os.path.join(rawdir, "direct-plain"), exist_ok=True)
    plain_paths = []
    for i in range(count):
        p = os.path.join(rawdir, "direct-plain", f"f{i:04d}")
        with open(p, "wb") as f:
            f.write(data[i * size:(i + 1) * size])
        plain_paths.append(p)
    os.sync()
    for _ in range(max(1, scale.reps)):
        drop_caches()
        plain.append(total / _read_paths(plain_paths) / 1e9)
    bench.add(f"cold read {count} x 32 MiB, plain ext4 directory ({THREADS} readers)", "GB/s",
              {"raw": raws, "kvfs": plain}, note="raw: device file (the row is ext4/raw)")
    buf.close()
    del data

    # Publish and lookups: many small files per request.
    n = min(20_000, max(2_000, scale.entries // 5))
    small = client.buffer(n * 4096)
    small.mm[:n * 4096] = rnd.bytes(n * 4096)
    names = [os.path.join(base, "small", f"{i % 256:02x}", f"c{i:06d}.kv") for i in range(n)]
    # Warm metadata, as the raw side's is (the cold reads above dropped the page cache, the
    # metadata's pages with it): a batch of other files first, and their directories.
    warm = client.write([(os.path.join(base, "small", f"{i % 256:02x}", f"warm{i:06d}.kv"), small, i * 4096, 4096, 0o644)
                         for i in range(min(n, 1000))])
    assert not any(warm), warm
    t = time.perf_counter()
    for lo in range(0, n, 1000):
        res = client.write([(names[i], small, i * 4096, 4096, 0o644) for i in range(lo, min(n, lo + 1000))])
        assert not any(res), res
    direct_pub = n / (time.perf_counter() - t)
    rawsmall = os.path.join(rawdir, "direct-small")
    t = time.perf_counter()
    for i in range(n):
        p = os.path.join(rawsmall, f"{i % 256:02x}", f"c{i:06d}.kv")
        if i < 256:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(small.mm[i * 4096:(i + 1) * 4096])
    raw_pub = n / (time.perf_counter() - t)
    bench.add(f"publish {n} files of 4 KiB, 1,000 per request", "files/s",
              {"raw": [raw_pub], "kvfs": [direct_pub]}, note="raw: create+write on ext4; target 20,000/s")
    probe = names + [p + ".missing" for p in names]
    client.lookup(probe[:10_000])  # (warm, as the raw side's dentries are)
    t = time.perf_counter()
    for lo in range(0, len(probe), 10_000):
        client.lookup(probe[lo:lo + 10_000])
    direct_look = len(probe) / (time.perf_counter() - t)
    rprobe = [p.replace(base, rawsmall) for p in probe]
    t = time.perf_counter()
    for p in rprobe:
        os.path.exists(p)
    raw_look = len(rprobe) / (time.perf_counter() - t)
    bench.add(f"batched lookups, {len(probe)} names (half present), 10,000 per request", "names/s",
              {"raw": [raw_look], "kvfs": [direct_look]}, note="raw: stat on ext4; target 200,000/s")
    small.close()

    # A Llama-3-8B context (32 layers, 8 KV heads, head dim 128, 16-bit): 128 KiB a token.
    tokens = 32768 if scale.total >= 512 * MiB else 2048
    ctx = bytes_of_context = tokens * 128 * 1024
    kvs = KVStore(os.path.join(base, "kv"), "llama-3-8b", chunk_tokens=256, dtype="bf16")
    ids = np.arange(tokens, dtype=np.int64) + 1000
    kv = np.empty((32, 2, tokens, 8, 128), dtype=np.float16)
    kv.reshape(-1).view(np.uint8)[:] = np.frombuffer(rnd.bytes(kv.nbytes), np.uint8)
    kvs.store(ids, kv)
    del kv
    os.sync()
    plain_kvs = KVStore(kvs.root, kvs.model, chunk_tokens=256, dtype="bf16", direct=False)
    raws, directs, fresh, mounts = [], [], [], []
    drop_caches()
    t = time.perf_counter()
    got, arr = kvs.load(ids)  # into fresh memory
    fresh.append(ctx / (time.perf_counter() - t) / 1e9)
    assert got == tokens
    raw_kinds = {False: [], True: []}
    for _ in range(max(1, min(3, scale.reps))):
        for odirect in (False, True):
            drop_caches()
            raw_kinds[odirect].append(ctx / _pread_all(dev, DATA_START, ctx, odirect=odirect) / 1e9)
        raws.append(max(raw_kinds[False][-1], raw_kinds[True][-1]))
        drop_caches()
        t = time.perf_counter()
        got, out = kvs.load(ids, out=arr)  # into the caller's array, as the raw read
        directs.append(ctx / (time.perf_counter() - t) / 1e9)
        assert got == tokens
        del out
    del arr
    drop_caches()
    t = time.perf_counter()
    got, out = plain_kvs.load(ids)
    mounts.append(ctx / (time.perf_counter() - t) / 1e9)
    del out
    gib = bytes_of_context / (1 << 30)
    bench.add(f"load a cold {tokens // 1024}K-token Llama-3-8B context ({gib:g} GiB), kvfs.kv direct path, "
              "into a reused array",
              "GB/s", {"raw": raws, "kvfs": directs}, target=0.9,
              note=f"raw: device file, {THREADS} threads, the better of buffered "
                   f"{statistics.median(raw_kinds[False]):.2f} and O_DIRECT {statistics.median(raw_kinds[True]):.2f}; "
                   f"{ctx / 1e9 / statistics.median(directs):.2f} s")
    bench.add("load the same context, kvfs.kv direct path, into fresh memory", "GB/s",
              {"raw": raws[:1], "kvfs": fresh}, note=f"{ctx / 1e9 / fresh[0]:.2f} s: the kernel zeroes "
              "and maps every new page")
    bench.add("load the same context, kvfs.kv through the mount (file I/O)", "GB/s",
              {"raw": raws[:1], "kvfs": mounts},
              note=f"{ctx / 1e9 / mounts[0]:.2f} s; direct/mount {statistics_ratio(directs, mounts)}")
    kvs.close()
    client.close()


def statistics_ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.1f}x"
