"""The warehouse as a cache, on real mounts: capacity and watermarks, LRU eviction that
survives restarts, pins, TTL, retire, gc, the tune command and the counters behind them."""

import errno
import json
import mmap
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import run_kvfs, wait_for
from kvfs import meta as M
from kvfs.errors import EXIT_NOT_MOUNTED, EXIT_PERMISSION, EXIT_USAGE
from kvfs.warehouse import Warehouse

MiB = 1 << 20


def stats(m):
    with open(m.p(".kvfs", "stats.json")) as f:
        return json.load(f)


def used(m):
    st = os.statvfs(m.path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def capacity(m):
    st = os.statvfs(m.path)
    return st.f_blocks * st.f_frsize


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def fill(m, name, total, size=4 * MiB):
    """Write `total` bytes of fresh, unique files under `name`."""
    for i in range(total // size):
        write(m.p(name, f"{i:05d}"), os.urandom(size))


# -- the acceptance scenario: 8 GiB of vLLM-pattern writes into a 1 GiB warehouse -----------

VLLM_WORKER = textwrap.dedent('''
    import json, mmap, os, random, struct, sys
    root, wid, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(wid)
    pool = random.Random(1000 + wid).randbytes(4 << 20)
    MiB = 1 << 20
    SIZES = [256 << 10, 1 << 20, 2 << 20, 2 << 20, 4 << 20]

    def content(key, size):
        # Every 1 MiB block is unique (nothing dedups) and reproducible from the key.
        buf = bytearray(size)
        for i, b in enumerate(range(0, size, MiB)):
            n = min(MiB, size - b)
            s = (key * 7919 + i * 4096) % (3 * MiB)
            buf[b:b + n] = pool[s:s + n]
            buf[b:b + 16] = struct.pack(">QQ", key, i)
        return buf

    def dest(key):
        h = f"{key:032x}"
        return os.path.join(root, f"model_{wid % 2:d}_r0", h[:3], h[3:5] + "_g0", h + ".bin")

    sizes, stats = {}, {"written": 0, "hits": 0, "misses": 0, "bytes": 0, "errors": []}
    key = wid * 1_000_000
    while stats["bytes"] < total:
        try:
            for _ in range(3):  # existence checks of names nobody wrote: the common miss
                os.path.exists(dest(rng.randrange(1 << 60)))
            if sizes and rng.random() < 0.15:  # look a written key up again: a hit, or evicted
                k = rng.choice(list(sizes))
                try:
                    fd = os.open(dest(k), os.O_RDONLY | os.O_DIRECT)
                except FileNotFoundError:
                    stats["misses"] += 1
                    continue
                size = os.fstat(fd).st_size
                buf = mmap.mmap(-1, (size + 4095) // 4096 * 4096)
                n = os.readv(fd, [buf])
                os.close(fd)
                if n != size or buf[:n] != content(k, sizes[k]):
                    stats["errors"].append(f"wrong bytes in {dest(k)}")
                stats["hits"] += 1
                continue
            key += 1
            path = dest(key)
            if os.path.exists(path):
                stats["errors"].append(f"{path} exists before it was written")
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            size = rng.choice(SIZES)
            tmp = f"{path}_{rng.getrandbits(32):08x}.tmp"
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC | os.O_DIRECT, 0o644)
            buf = mmap.mmap(-1, size)
            buf[:] = content(key, size)
            if os.write(fd, buf) != size:
                stats["errors"].append(f"short write to {tmp}")
            os.close(fd)
            os.replace(tmp, path)
            sizes[key] = size
            stats["written"] += 1
            stats["bytes"] += size
        except OSError as exc:
            stats["errors"].append(repr(exc))
    print(json.dumps(stats))
''')


def test_8gib_of_vllm_pattern_writes_into_a_1gib_warehouse(make_mount, tmp_path):
    m = make_mount(devices=(("a.img", "512M"), ("b.img", "512M")))
    cap = capacity(m)
    # Pinned data: a pinned directory (inherited by what is written in it) and one file.
    os.mkdir(m.p("pinned"))
    run_kvfs("pin", m.p("pinned"))
    pinned = {m.p("pinned", f"p{i}"): os.urandom(2 * MiB) for i in range(16)}
    pinned[m.p("solo.bin")] = os.urandom(3 * MiB)
    for path, data in pinned.items():
        write(path, data)
    run_kvfs("pin", m.p("solo.bin"))
    # Files read again and again while the writers run: the most recently used.
    hot = {m.p("hot", f"h{i}"): os.urandom(2 * MiB) for i in range(8)}
    for path, data in hot.items():
        write(path, data)
    # A file opened before it is evicted.
    held_data = os.urandom(8 * MiB)
    write(m.p("held.bin"), held_data)
    held = open(m.p("held.bin"), "rb")
    assert held.read(MiB) == held_data[:MiB]

    stop = threading.Event()
    peak = [0]
    problems = []

    def sample():
        while not stop.is_set():
            u = used(m)
            peak[0] = max(peak[0], u)
            if u > cap:
                problems.append(f"used {u} > capacity {cap}")
            time.sleep(0.01)

    def reread():
        while not stop.is_set():
            for path, data in hot.items():
                try:
                    if read(path) != data:
                        problems.append(f"wrong bytes in {path}")
                except OSError as exc:
                    problems.append(f"{path}: {exc}")
            time.sleep(0.2)

    threads = [threading.Thread(target=f) for f in (sample, reread)]
    for t in threads:
        t.start()
    script = tmp_path / "worker.py"
    script.write_text(VLLM_WORKER)
    os.mkdir(m.p("vllm"))
    try:
        procs = [subprocess.Popen([sys.executable, str(script), m.p("vllm"), str(w), str(2 << 30)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for w in range(4)]
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        stop.set()
        for t in threads:
            t.join()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    assert [r["errors"] for r in results] == [[]] * 4  # zero write (or read) errors
    assert sum(r["bytes"] for r in results) >= 8 << 30
    assert sum(r["hits"] for r in results) > 0 and sum(r["misses"] for r in results) > 0
    assert problems == []
    assert peak[0] <= cap
    # The evictor brings use back under the high watermark once the writers stop.
    assert wait_for(lambda: used(m) <= 0.9 * cap)
    for path, data in {**pinned, **hot}.items():
        assert read(path) == data, path
    # The held file lost its name to eviction, and its reader still gets every byte.
    assert not os.path.exists(m.p("held.bin"))
    assert held.read() == held_data[MiB:]
    held.close()
    s = stats(m)["counters"]
    assert s["evicted_files"] > 2000 and s["evicted_bytes"] >= 6 << 30
    m.umount()
    res = run_kvfs("fsck", m.warehouse, "--verify-data", "--json")
    assert json.loads(res.stdout)["clean"]


# -- the rules one by one -------------------------------------------------------------------

def test_access_order_survives_a_remount(make_mount):
    m = make_mount(devices=(("a.img", "64M"),))
    files = {f"a{i}": os.urandom(4 * MiB) for i in range(10)}
    for i, (name, data) in enumerate(files.items()):
        write(m.p(name), data)
        os.utime(m.p(name), (1_000_000 + i, 1_000_000 + i))  # a0 least recently used
    assert read(m.p("a0")) == files["a0"]  # a0 and a1 are used again: no longer the oldest
    assert read(m.p("a1")) == files["a1"]
    m.remount()  # access times live in memory until a checkpoint or the unmount
    assert os.stat(m.p("a0")).st_atime > 1_000_000_000
    fill(m, "new", 20 * MiB)  # past the high watermark: about 10 MiB must go
    assert wait_for(lambda: stats(m)["counters"].get("evicted_files", 0) >= 2)
    assert wait_for(lambda: used(m) <= 0.9 * capacity(m))
    gone = [n for n in files if not os.path.exists(m.p(n))]
    assert gone and gone == [f"a{i}" for i in range(2, 2 + len(gone))], gone
    assert read(m.p("a0")) == files["a0"] and read(m.p("a1")) == files["a1"]
    assert os.path.exists(m.p("a9"))


def test_pins_inheritance_and_enospc_only_when_all_is_pinned_or_open(make_mount, tmp_path):
    m = make_mount(devices=(("a.img", "32M"),))
    os.mkdir(m.p("keep"))
    res = run_kvfs("pin", m.p("keep"))
    assert "pinned" in res.stdout
    assert os.getxattr(m.p("keep"), "user.kvfs.pin") == b"1"
    keep = {f"k{i}": os.urandom(4 * MiB) for i in range(3)}
    for name, data in keep.items():
        write(m.p("keep", name), data)
        assert os.getxattr(m.p("keep", name), "user.kvfs.pin") == b"1"  # inherited
        assert "user.kvfs.pin" in os.listxattr(m.p("keep", name))
    run_kvfs("unpin", m.p("keep", "k2"))
    with pytest.raises(OSError) as info:
        os.getxattr(m.p("keep", "k2"), "user.kvfs.pin")
    assert info.value.errno == errno.ENODATA
    fill(m, "loose", 60 * MiB)  # twice the capacity: eviction, never an error
    assert not os.path.exists(m.p("keep", "k2"))  # the oldest unpinned file went first
    for name in ("k0", "k1"):
        assert read(m.p("keep", name)) == keep[name]
    # Pin everything (the root pins its whole tree): a full warehouse now says ENOSPC.
    run_kvfs("pin", m.path)
    assert os.getxattr(m.p("loose", os.listdir(m.p("loose"))[0]), "user.kvfs.pin") == b"1"
    survivors = {n: read(m.p("loose", n)) for n in os.listdir(m.p("loose"))}
    with pytest.raises(OSError) as info:
        fill(m, "more", 40 * MiB)
    assert info.value.errno == errno.ENOSPC
    for n, data in survivors.items():
        assert read(m.p("loose", n)) == data
    run_kvfs("unpin", m.path)
    fill(m, "after", 40 * MiB)  # evictable again
    # Bad input: clear errors, documented exit codes.
    with pytest.raises(OSError) as info:
        os.setxattr(m.p("keep"), "user.kvfs.pin", b"maybe")
    assert info.value.errno == errno.EINVAL
    assert run_kvfs("pin", m.p("nothing-here"), check=False).returncode == EXIT_USAGE
    outside = tmp_path / "plain"
    outside.write_text("x")
    res = run_kvfs("pin", outside, check=False)
    assert res.returncode == EXIT_NOT_MOUNTED and "is not inside a kvfs mount" in res.stderr


def test_files_being_written_stay_and_open_readers_read_to_the_end(make_mount):
    m = make_mount(devices=(("a.img", "32M"),))
    first, second = os.urandom(4 * MiB), os.urandom(4 * MiB)
    w = open(m.p("writing.bin"), "wb")
    w.write(first)
    w.flush()
    os.fsync(w.fileno())  # committed, still open for writing
    os.utime(m.p("writing.bin"), (1, 1))  # and the least recently used file there is
    reader_data = os.urandom(6 * MiB)
    write(m.p("reading.bin"), reader_data)
    os.utime(m.p("reading.bin"), (2, 2))
    r = open(m.p("reading.bin"), "rb")
    assert r.read(4096) == reader_data[:4096]
    fill(m, "fill", 48 * MiB)
    assert not os.path.exists(m.p("reading.bin"))  # evicted: the name is gone ...
    assert r.read() == reader_data[4096:]  # ... the open reader reads to the end
    r.close()
    assert os.path.exists(m.p("writing.bin"))  # never evicted while written
    w.write(second)
    w.close()
    assert read(m.p("writing.bin")) == first + second
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]  # space came back


def test_ttl_expires_idle_files(make_mount):
    m = make_mount()
    write(m.p("t", "old"), b"before the ttl was set")
    os.setxattr(m.p("t"), "user.kvfs.ttl", b"3")
    write(m.p("t", "a"), b"a")
    write(m.p("t", "busy"), b"read all the time")
    write(m.p("t", "sub", "c"), b"c")  # a new directory inherits the ttl
    write(m.p("t", "pinned"), b"p")
    run_kvfs("pin", m.p("t", "pinned"))
    write(m.p("u", "keep"), b"no ttl here")
    assert os.getxattr(m.p("t", "old"), "user.kvfs.ttl") == b"3"
    assert os.getxattr(m.p("t", "sub", "c"), "user.kvfs.ttl") == b"3"
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        assert read(m.p("t", "busy")) == b"read all the time"
        time.sleep(0.3)
    for name in ("old", "a", "sub/c"):
        assert not os.path.exists(m.p("t", name)), name
    assert os.path.exists(m.p("t", "pinned")) and os.path.exists(m.p("u", "keep"))
    assert stats(m)["counters"]["expired_files"] == 3
    with pytest.raises(OSError) as info:
        os.setxattr(m.p("t"), "user.kvfs.ttl", b"-5")
    assert info.value.errno == errno.EINVAL
    os.removexattr(m.p("t"), "user.kvfs.ttl")
    assert "user.kvfs.ttl" not in os.listxattr(m.p("t", "busy"))


def test_retire_100000_files_while_another_directory_is_served(make_warehouse, tmp_path):
    from conftest import Mount

    wh = make_warehouse(devices=(("a.img", "256M"),))
    w = Warehouse(str(wh))  # populate through the engine: 100,000 FUSE creates take minutes
    try:
        model = w.mkdir(M.ROOT_INO, b"model-a", 0o755, 0, 0)
        for i in range(100):
            d = w.mkdir(model.ino, b"%03d" % i, 0o755, 0, 0)
            for j in range(1000):
                if j % 10 == 0:  # a tenth hold data: 100 distinct blocks, 100 references each
                    fh, _ = w.create(d.ino, b"%04d.bin" % j, 0o644, 0, 0)
                    w.write(fh, 0, b"kv %d " % (j % 1000) * 1000)
                    w.release(fh)
                else:
                    w.mknod(d.ino, b"%04d.bin" % j, stat.S_IFREG | 0o644, 0, 0)
        other = w.mkdir(M.ROOT_INO, b"other", 0o755, 0, 0)
        payload = {}
        for i in range(8):
            fh, _ = w.create(other.ino, b"o%d" % i, 0o644, 0, 0)
            payload[f"o{i}"] = os.urandom(MiB)
            w.write(fh, 0, payload[f"o{i}"])
            w.release(fh)
    finally:
        w.close()
    mp = tmp_path / "mnt"
    mp.mkdir()
    m = Mount(wh, mp)
    try:
        m.mount()
        free_before = os.statvfs(m.path).f_bfree
        stop = threading.Event()
        served, wrong = [], []

        def reader():  # O_DIRECT: every read is answered by the daemon, not the page cache
            buf = mmap.mmap(-1, MiB)
            while not stop.is_set():
                for name, data in payload.items():
                    fd = os.open(m.p("other", name), os.O_RDONLY | os.O_DIRECT)
                    n = os.readv(fd, [buf])
                    os.close(fd)
                    if n != MiB or buf[:] != data:
                        wrong.append(name)  # (an assert in a thread would only warn)
                    served.append(time.monotonic())

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        res = run_kvfs("retire", m.p("model-a"), "--json", timeout=300)
        t1 = time.monotonic()
        stop.set()
        t.join()
        assert wrong == [], f"the reader got wrong bytes of {wrong}"
        out = json.loads(res.stdout)[0]
        assert out["files"] == 100_000
        assert not os.path.exists(m.p("model-a"))
        during = [s for s in served if t0 <= s <= t1]
        gaps = [b - a for a, b in zip([t0] + during, during + [t1])]
        assert len(during) >= 10 and max(gaps) < 5.0, (len(during), max(gaps), t1 - t0)
        assert stats(m)["counters"]["retired_files"] == 100_000
        assert os.statvfs(m.path).f_bfree > free_before  # the 100 shared blocks are free
        assert sorted(os.listdir(m.path)) == ["other"]
        m.umount()
        report = json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)
        assert report["clean"] and report["stats"]["inodes"] == 10, report
    finally:
        m.cleanup()


def _plant_leaks(warehouse):
    """A leaked extent (1 MiB neither free nor used) and an over-counted block."""
    w = Warehouse(warehouse)
    try:
        with w.meta.begin(write=True) as txn:
            cur = txn.cursor(db=w.meta.db["free"])
            assert cur.last()
            dev, off = M.parse_free_key(cur.key())
            length = M.parse_u64(cur.value())
            w.meta.free_remove(txn, dev, off + length - MiB, MiB)
            h, raw = next(iter(txn.cursor(db=w.meta.db["blocks"])))
            rec = M.BlockRecord.unpack(raw)
            rec.refcount += 1
            w.meta.put_block(txn, h, rec)
    finally:
        w.close()


def test_gc_finds_planted_leaks_and_reclaims_only_with_delete(make_mount):
    m = make_mount()
    data = os.urandom(3 * MiB)
    write(m.p("f"), data)
    m.umount()
    # Unmounted: report, then reclaim.
    _plant_leaks(m.warehouse)
    report = json.loads(run_kvfs("gc", m.warehouse, "--json").stdout)
    assert len(report["problems"]) == 2 and report["leaked_bytes"] == MiB and not report["deleted"]
    assert not json.loads(run_kvfs("fsck", m.warehouse, "--json", check=False).stdout)["clean"]
    res = run_kvfs("gc", m.warehouse, "--delete")
    assert "reclaimed" in res.stdout
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]
    # Mounted: the same through the control file.
    _plant_leaks(m.warehouse)
    m.mount()
    free = os.statvfs(m.path).f_bfree
    report = json.loads(run_kvfs("gc", m.path, "--json").stdout)
    assert len(report["problems"]) == 2 and not report["deleted"]
    assert os.statvfs(m.path).f_bfree == free
    report = json.loads(run_kvfs("gc", m.warehouse, "--delete", "--json").stdout)  # by warehouse path
    assert report["deleted"] and report["reclaimed_bytes"] == MiB
    assert os.statvfs(m.path).f_bfree == free + MiB // 4096
    assert read(m.p("f")) == data
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]
    # An unlinked inode that nobody has open: left alone while younger than the grace.
    w = Warehouse(m.warehouse)
    try:
        ino = w.lookup(M.ROOT_INO, b"f").ino
        with w.meta.begin(write=True) as txn:
            w.namespace.remove_entry(txn, M.ROOT_INO, b"f")
            inode = w.meta.get_inode(txn, ino)
            inode.nlink = 0
            inode.ctime_ns = time.time_ns()
            w.meta.put_inode(txn, inode)
            txn.put(M.ino_key(ino), b"", db=w.meta.db["orphans"])
    finally:
        _crash_free_close(w)
    m.mount()
    report = json.loads(run_kvfs("gc", m.path, "--delete", "--json").stdout)
    assert report["problems"] == [] and report["young"] == 1
    report = json.loads(run_kvfs("gc", m.path, "--delete", "--grace", "0", "--json").stdout)
    assert len(report["problems"]) == 1 and report["reclaimed_bytes"] == 3 * MiB
    m.umount()
    assert json.loads(run_kvfs("fsck", m.warehouse, "--json").stdout)["clean"]


def _crash_free_close(w):
    """Close the warehouse as it is, without the close-time purge of unlinked inodes."""
    with w.meta.begin(write=True) as txn:
        w.meta.put_json(txn, b"state", {"clean": True})
    w.meta.sync()
    w.devices.close()
    w.meta.close()
    os.close(w._lock_fd)
    w._lock_fd = -1


def test_tune_changes_watermarks_on_a_running_mount(make_mount):
    m = make_mount(devices=(("a.img", "64M"),))
    fill(m, "d", 40 * MiB)
    assert stats(m)["counters"].get("evicted_files", 0) == 0
    res = run_kvfs("tune", m.path, "--high-watermark", "50%", "--low-watermark", "0.3")
    assert "high watermark 50.0%, low watermark 30.0%" in res.stdout
    assert wait_for(lambda: used(m) <= 0.3 * capacity(m))
    assert stats(m)["counters"]["evicted_files"] >= 3
    for bad in (["--high-watermark", "120%"], ["--high-watermark", "40%", "--low-watermark", "60%"]):
        res = run_kvfs("tune", m.path, *bad, check=False)
        assert res.returncode == EXIT_USAGE and "Traceback" not in res.stderr, res.stderr
    m.umount()
    res = run_kvfs("tune", m.warehouse, "--json")  # unmounted: from the superblock
    assert json.loads(res.stdout) == {"high_watermark": 0.5, "low_watermark": 0.3}


def test_control_directory_permissions_and_bad_requests(public_mount):
    _control_checks(public_mount)


def _control_checks(m):
    write(m.p("f"), b"x")
    os.mkdir(m.p("d"))
    assert sorted(os.listdir(m.path)) == ["d", "f"]
    assert sorted(os.listdir(m.p(".kvfs"))) == ["control", "direct", "lookup", "metrics", "stats.json"]
    assert os.stat(m.p(".kvfs", "control")).st_mode & 0o777 == 0o600
    fd = os.open(m.p(".kvfs", "control"), os.O_RDWR)
    os.write(fd, b"this is not json")
    with pytest.raises(OSError) as info:
        os.pread(fd, 4096, 0)
    assert info.value.errno == errno.EINVAL
    os.write(fd, json.dumps({"op": "retire", "path": "no/such/dir"}).encode())
    reply = json.loads(os.pread(fd, 4096, 0))
    assert reply["ok"] is False and reply["errno"] == errno.ENOENT
    os.close(fd)
    res = run_kvfs("retire", m.p("no-such-dir"), check=False)
    assert res.returncode == EXIT_USAGE and "no such file" in res.stderr
    os.write(fd := os.open(m.p(".kvfs", "control"), os.O_RDWR),
             json.dumps({"op": "retire", "path": "x" * 600}).encode())
    assert json.loads(os.pread(fd, 4096, 0))["errno"] == errno.ENAMETOOLONG
    os.close(fd)
    for fn, args, err in ((os.mkdir, (m.p(".kvfs"),), errno.EEXIST),
                          (os.unlink, (m.p(".kvfs", "control"),), errno.EPERM),
                          (os.rename, (m.p("f"), m.p(".kvfs", "f")), errno.EPERM),
                          (os.rename, (m.p("f"), m.p(".kvfs")), errno.EISDIR),  # the kernel's
                          (os.rename, (m.p("d"), m.p(".kvfs")), errno.EPERM),
                          (os.rename, (m.p(".kvfs"), m.p("e")), errno.EPERM),
                          (os.setxattr, (m.p(".kvfs", "control"), "user.x", b"1"), errno.EPERM)):
        with pytest.raises(OSError) as info:
            fn(*args)
        assert info.value.errno == err, (fn, args)
    # Another user may read the statistics and may not drive the control interface. The
    # probe imports what it needs as root: the interpreter may live where nobody can read.
    probe = textwrap.dedent(f'''
        import os, sys
        import kvfs.tools.main, kvfs.tools.client, kvfs.control, kvfs.mount, kvfs.mounttab, kvfs.warehouse, kvfs.fsck
        kvfs.tools.main.build_parser()  # and what the parser imports
        os.setgid(65534); os.setuid(65534)
        try:
            os.open({m.p(".kvfs", "control")!r}, os.O_RDWR)
            sys.exit("opened the control file")
        except PermissionError:
            pass
        open({m.p(".kvfs", "stats.json")!r}).read()
        sys.exit(kvfs.tools.main.main(["gc", {m.path!r}]))
    ''')
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == EXIT_PERMISSION, res.stderr
    assert "root and the warehouse owner" in res.stderr
    assert read(m.p("f")) == b"x"  # and the daemon is fine


def test_fsck_rebuilds_broken_eviction_indexes(make_warehouse):
    from kvfs.fsck import Fsck

    wh = str(make_warehouse(devices=(("a.img", "64M"),)))
    w = Warehouse(wh)
    fh, a = w.create(M.ROOT_INO, b"a", 0o644, 0, 0)
    w.write(fh, 0, b"a")
    w.release(fh)
    with w.meta.begin(write=True) as txn:  # plant: a lost lru key, a stray one, a stray link
        cur = txn.cursor(db=w.meta.db["lru"])
        assert cur.first()
        cur.delete()
        txn.put(M.time_key(5, 999), b"", db=w.meta.db["lru"])
        txn.put(M.link_key(a.ino, M.ROOT_INO, b"ghost"), b"", db=w.meta.db["links"])
    w.close()
    for repair in (True, False):
        w = Warehouse(wh, check_only=not repair)
        try:
            with w.meta.begin(write=repair) as txn:
                f = Fsck(w, txn, repair=repair)
                f.run()
        finally:
            w.close()
        if repair:
            assert len(f.problems) == 3 and f.repaired == 3, f.problems
        else:
            assert f.problems == []
