"""The direct path (kvfs.direct_client) raced, on real mounts: readers reading batches
straight into their memory while files are evicted, retired, unlinked, renamed over and
rewritten (through the mount and through direct stores), and two clients storing the same
paths at once.

Every file's content identifies itself: each block starts with (key, version, block index)
and the rest is derived from key and version (`content`), so a reader can tell that what a
read reports as read is exactly one complete version of that file: never a mix of two,
never a block of another file, never garbage. The only other outcome a reader of a file that
may vanish accepts is -ENOENT; -EIO (healthy devices) fails the test, and so does any
quarantined block or device error in the mount's counters, or an unclean fsck after.
"""

import errno
import functools
import itertools
import json
import os
import random
import struct
import threading
import time

from conftest import run_kvfs
from kvfs import direct_client

BS = 256 << 10  # the warehouses' block size here
HDR = struct.Struct("<24sQI")  # key, version, block index: at the start of every block
SIZES = (HDR.size, 4000, 70000, BS, BS + 1, 2 * BS + 5000, 4 * BS - 3)
MAX_SIZE = max(SIZES)
SLOT = MAX_SIZE + 4096  # a reader's room per item: more than any file, so reads stop at EOF
RACE_S = 3.0  # seconds each race runs
VERSION = itertools.count(1)  # versions are unique across all keys and tests


@functools.lru_cache(maxsize=1024)
def content(key: str, version: int) -> bytes:
    rng = random.Random(f"{key}/{version}")
    data = bytearray(rng.randbytes(rng.choice(SIZES)))
    for i in range(0, len(data), BS):
        head = HDR.pack(key.encode(), version, i // BS)
        n = min(len(head), len(data) - i)
        data[i:i + n] = head[:n]
    return bytes(data)


def identify(chunk) -> tuple[str, int, int] | None:
    """(key, version, block index) a block starts with, if it is long enough to say."""
    if len(chunk) < HDR.size:
        return None
    key, version, idx = HDR.unpack_from(chunk)
    return key.rstrip(b"\0").decode(errors="replace"), version, idx


def check_whole(key: str, data, versions: set | None = None) -> str | None:
    """None if `data` is exactly one complete version of `key` (one of `versions`, if
    given); else what is wrong."""
    got = identify(data)
    if got is None or got[0] != key or got[2] != 0:
        return f"{key}: {len(data)} bytes that start with {got}"
    want = content(key, got[1])
    if bytes(data) != want:
        return f"{key}: {len(data)} bytes, not version {got[1]} whole ({len(want)} bytes)"
    if versions is not None and got[1] not in versions:
        return f"{key}: version {got[1]} was never written"
    return None


def check_blocks(key: str, data) -> str | None:
    """A file being rewritten in place (O_TRUNC, then writes) may be read half written, on
    kvfs as anywhere: then each block read must still be the start of that block of one
    version of `key` (nothing of another file, no garbage)."""
    for i in range(0, len(data), BS):
        chunk = bytes(data[i:i + BS])
        got = identify(chunk)
        if got is None:  # a tail too short to carry a header: the start of the last block
            if len(data) - i >= HDR.size:
                return f"{key}: block {i // BS} unidentifiable"
            continue
        if got[0] != key or got[2] != i // BS or content(key, got[1])[i:i + len(chunk)] != chunk:
            return f"{key}: block {i // BS} of {len(data)} bytes is not the start of version {got[1]}'s"
    return None


def stats(m) -> dict:
    with open(m.p(".kvfs", "stats.json")) as f:
        return json.load(f)


def mount_write(path: str, key: str, version: int) -> None:
    """Publish a version through the mount as caches do: a temp file renamed over."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{version}.tmp")
    with open(tmp, "wb") as f:
        f.write(content(key, version))
    os.replace(tmp, path)


def direct_store(client, buf, items, sync=False) -> list[int]:
    """Store [(path, key, version)] as one direct batch from `buf`."""
    work, off = [], 0
    for path, key, version in items:
        data = content(key, version)
        buf.mm[off:off + len(data)] = data
        work.append((path, buf, off, len(data), 0o644))
        off += len(data)
    return client.write(work, parents=True, sync=sync)


class Race:
    """Threads that run until `stop`, recording problems (any exception too)."""

    def __init__(self, m):
        self.m = m
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.counts: dict[str, int] = {}
        self.written: dict[str, set] = {}  # key -> versions written (or begun)
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def note(self, key: str, version: int) -> int:
        with self._lock:
            self.written.setdefault(key, set()).add(version)
        return version

    def problem(self, msg: str) -> None:
        with self._lock:
            if len(self.problems) < 30:
                self.problems.append(msg)

    def spawn(self, fn, *args) -> None:
        def body():
            try:
                fn(*args)
            except Exception as exc:  # a failure of the test's own thread is a problem too
                self.problem(f"{fn.__name__}: {type(exc).__name__}: {exc}")
        t = threading.Thread(target=body, daemon=True)
        self.threads.append(t)

    def run(self, seconds: float = RACE_S) -> None:
        for t in self.threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and all(t.is_alive() for t in self.threads):
            time.sleep(0.05)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a racing thread hangs"

    def connect(self):
        client = direct_client.connect(self.m.path)
        assert client is not None, "the mount does not serve the direct path"
        return client

    def reader(self, pick, batch: int = 6, in_place=(), seed: int = 0) -> None:
        """Batch-read what pick(rng, batch) -> [(path, key)] names, whole, into one buffer;
        check each item read. Keys in `in_place` are checked block by block (see
        check_blocks); an empty read is allowed for them only."""
        rng = random.Random(seed)
        client = self.connect()
        buf = client.buffer(batch * SLOT)
        try:
            while not self.stop.is_set():
                chosen = pick(rng, batch)
                if not chosen:
                    time.sleep(0.01)
                    continue
                results = client.read([(path, 0, SLOT, buf, i * SLOT) for i, (path, _) in enumerate(chosen)])
                for i, ((path, key), r) in enumerate(zip(chosen, results)):
                    if r == -errno.ENOENT:
                        self.count("enoent")
                        continue
                    if r < 0:
                        self.problem(f"direct read of {path}: {os.strerror(-r)}")
                        continue
                    data = buf.mm[i * SLOT:i * SLOT + r]
                    if key in in_place:
                        bad = None if r == 0 else check_blocks(key, data)
                    else:
                        bad = check_whole(key, data, self.written.get(key))
                    if bad:
                        self.problem(f"direct read of {path}: {bad}")
                    else:
                        self.count("read_ok")
        finally:
            buf.close()
            client.close()

    def finish(self) -> dict:
        """The mount's counters say nothing went wrong; unmount and fsck. Returns the counters."""
        counters = stats(self.m)["counters"]
        print(self.counts, {k: v for k, v in counters.items() if k.startswith(("direct", "evicted", "retired"))})
        for name in ("corrupt_blocks", "quarantined_files", "device_errors"):
            assert not counters.get(name), (name, counters.get(name))
        assert self.problems == [], self.problems
        self.m.umount()
        res = run_kvfs("fsck", self.m.warehouse, "--verify-data", "--json", check=False)
        report = json.loads(res.stdout)
        assert res.returncode == 0 and report["clean"], report
        return counters


def test_direct_reads_race_eviction(make_mount):
    """A small warehouse filled past its high watermark by direct stores and mount writes:
    readers of what was written get whole versions or ENOENT (evicted); a read that started
    before an eviction keeps its extents."""
    m = make_mount(devices=(("a.img", "24M"),), block_size="256K")
    run_kvfs("tune", m.path, "--high-watermark", "0.5", "--low-watermark", "0.3")
    race = Race(m)
    keys: list[str] = []

    def direct_writer():
        client = race.connect()
        buf = client.buffer(4 * MAX_SIZE)
        for n in itertools.count():
            if race.stop.is_set():
                break
            batch = [(f"e/d{n}_{j}", f"d{n}_{j}", race.note(f"d{n}_{j}", next(VERSION))) for j in range(4)]
            for (path, key, _), r in zip(batch, direct_store(client, buf, batch, sync=n % 8 == 0)):
                if r:
                    race.problem(f"direct store of {path}: {os.strerror(-r)}")
                else:
                    keys.append(key)
            race.count("stored", len(batch))

    def mount_writer():
        os.makedirs(m.p("e"), exist_ok=True)
        for n in itertools.count():
            if race.stop.is_set():
                break
            key = f"m{n}"
            mount_write(m.p("e", key), key, race.note(key, next(VERSION)))
            keys.append(key)

    def pick(rng, k):
        recent = keys[-60:]
        return [(f"e/{key}", key) for key in rng.sample(recent, min(k, len(recent)))]

    race.spawn(direct_writer)
    race.spawn(mount_writer)
    for s in range(2):
        race.spawn(race.reader, pick, 6, (), s)
    race.run()
    counters = race.finish()
    assert counters.get("evicted_files", 0) > 0, counters
    assert race.counts.get("read_ok", 0) > 50, race.counts


def test_direct_reads_race_retire(make_mount):
    """Directories stored by direct batches and retired with `kvfs retire` while readers
    read them: whole versions, or ENOENT once the directory is retired."""
    m = make_mount(block_size="256K")
    race = Race(m)
    live: list[int] = []  # model directories stored, newest last
    retired: list[int] = []

    def keeper():
        client = race.connect()
        buf = client.buffer(6 * MAX_SIZE)
        for n in itertools.count():
            if race.stop.is_set():
                break
            batch = [(f"model{n}/f{j}", f"m{n}f{j}", race.note(f"m{n}f{j}", next(VERSION))) for j in range(6)]
            results = direct_store(client, buf, batch)
            assert results == [0] * 6, results
            live.append(n)
            time.sleep(0.05)
            if len(live) > 2:
                old = live.pop(0)
                run_kvfs("retire", m.p(f"model{old}"))
                retired.append(old)

    def pick(rng, k):
        ns = live[-3:] + retired[-2:]
        return [(f"model{n}/f{j}", f"m{n}f{j}") for n, j in
                ((rng.choice(ns), rng.randrange(6)) for _ in range(k))] if ns else []

    race.spawn(keeper)
    for s in range(2):
        race.spawn(race.reader, pick, 6, (), s)
    race.run()
    counters = race.finish()
    assert len(retired) >= 3 and counters.get("retired_files", 0) >= 18, (retired, counters)
    assert race.counts.get("read_ok", 0) > 50 and race.counts.get("enoent", 0) > 0, race.counts


def test_direct_reads_race_unlink_and_rename_over(make_mount):
    """Names unlinked, renamed over (a temp file of the mount, another name) and replaced by
    direct stores while readers read them: a whole version of that name, or ENOENT."""
    m = make_mount(block_size="256K")
    race = Race(m)
    names = [f"u{i}" for i in range(12)]
    os.mkdir(m.p("u"))
    for key in names:
        mount_write(m.p("u", key), key, race.note(key, next(VERSION)))

    def mutator(seed):
        rng = random.Random(seed)
        client = race.connect()
        buf = client.buffer(MAX_SIZE)
        while not race.stop.is_set():
            key = rng.choice(names)
            path = m.p("u", key)
            op = rng.randrange(4)
            try:
                if op == 0:
                    os.unlink(path)
                    race.count("unlinked")
                elif op == 1:
                    mount_write(path, key, race.note(key, next(VERSION)))
                elif op == 2:  # another name (with this name's content) renamed over it
                    alt = m.p("u", f"{key}.alt{seed}")
                    with open(alt, "wb") as f:
                        f.write(content(key, race.note(key, next(VERSION))))
                    os.rename(alt, path)
                else:
                    r = direct_store(client, buf, [(f"u/{key}", key, race.note(key, next(VERSION)))])
                    if r != [0]:
                        race.problem(f"direct store of u/{key}: {r}")
            except FileNotFoundError:
                pass  # unlinked by the other mutator meanwhile
            race.count("mutations")

    def pick(rng, k):
        return [(f"u/{key}", key) for key in rng.sample(names, k)]

    for s in range(2):
        race.spawn(mutator, s)
    for s in range(2):
        race.spawn(race.reader, pick, 6, (), s)
    race.run()
    race.finish()
    assert race.counts.get("unlinked", 0) > 5 and race.counts.get("enoent", 0) > 0, race.counts
    assert race.counts.get("read_ok", 0) > 50, race.counts


def test_direct_reads_race_rewrites(make_mount):
    """The same files rewritten over and over: by a direct client, through the mount (temp
    file renamed over), and in place through the mount (O_TRUNC and two writes, which
    readers may see half done, block by block). Nothing is ever removed here: every read
    of a replaced file succeeds."""
    m = make_mount(block_size="256K")
    race = Race(m)
    names = [f"w{i}" for i in range(8)]
    in_place = [f"i{i}" for i in range(3)]
    os.mkdir(m.p("w"))
    for key in names + in_place:
        mount_write(m.p("w", key), key, race.note(key, next(VERSION)))

    def direct_writer():
        rng = random.Random(1)
        client = race.connect()
        buf = client.buffer(4 * MAX_SIZE)
        while not race.stop.is_set():
            batch = [(f"w/{key}", key, race.note(key, next(VERSION))) for key in rng.sample(names, 4)]
            r = direct_store(client, buf, batch, sync=rng.random() < 0.2)
            if r != [0] * 4:
                race.problem(f"direct store: {r}")
            race.count("direct_stores")

    def mount_writer():
        rng = random.Random(2)
        while not race.stop.is_set():
            key = rng.choice(names)
            mount_write(m.p("w", key), key, race.note(key, next(VERSION)))
            race.count("mount_writes")

    def in_place_writer():
        rng = random.Random(3)
        while not race.stop.is_set():
            key = rng.choice(in_place)
            data = content(key, race.note(key, next(VERSION)))
            with open(m.p("w", key), "wb") as f:
                f.write(data[:len(data) // 2])
                f.write(data[len(data) // 2:])
            race.count("in_place_writes")

    def pick(rng, k):
        return [(f"w/{key}", key) for key in rng.sample(names + in_place, k)]

    race.spawn(direct_writer)
    race.spawn(mount_writer)
    race.spawn(in_place_writer)
    for s in range(2):
        race.spawn(race.reader, pick, 6, set(in_place), s)
    race.run()
    assert race.counts.get("enoent", 0) == 0, race.counts
    for key in names:  # after the race, the mount and the direct path agree
        with open(m.p("w", key), "rb") as f:
            assert check_whole(key, f.read(), race.written[key]) is None, key
    race.finish()
    assert race.counts.get("read_ok", 0) > 50, race.counts
    assert min(race.counts.get(k, 0) for k in ("direct_stores", "mount_writes", "in_place_writes")) > 3, race.counts


def test_two_direct_clients_store_the_same_paths(make_mount):
    """Two clients store batches of the same 8 paths at once. A batch is published in one
    transaction and a batch read resolves in one: every batch read sees all 8 files from
    one batch, and at the end every file is the last batch's, whole, through the direct
    path and through the mount alike."""
    m = make_mount(block_size="256K")
    race = Race(m)
    paths = [f"s/p{j}" for j in range(8)]
    batches: dict[int, int] = {}  # version -> writer

    def writer(w):
        client = race.connect()
        buf = client.buffer(8 * MAX_SIZE)
        rng = random.Random(w)
        while not race.stop.is_set():
            v = next(VERSION)
            batches[v] = w
            batch = [(p, p, race.note(p, v)) for p in paths]
            r = direct_store(client, buf, batch, sync=rng.random() < 0.1)
            if r != [0] * 8:
                race.problem(f"writer {w}: {r}")
            race.count(f"batches{w}")

    def snapshot_reader(seed):
        client = race.connect()
        buf = client.buffer(8 * SLOT)
        while not race.stop.is_set():
            results = client.read([(p, 0, SLOT, buf, i * SLOT) for i, p in enumerate(paths)])
            if all(r == -errno.ENOENT for r in results):
                continue  # not stored yet
            seen = set()
            for i, (p, r) in enumerate(zip(paths, results)):
                if r < 0:
                    race.problem(f"{p}: {os.strerror(-r)}")
                    continue
                data = buf.mm[i * SLOT:i * SLOT + r]
                bad = check_whole(p, data, race.written.get(p))
                if bad:
                    race.problem(bad)
                else:
                    seen.add(identify(data)[1])
            if len(seen) > 1:
                race.problem(f"one batch read saw versions {sorted(seen)} of one batch store each")
            race.count("read_ok")

    for w in range(2):
        race.spawn(writer, w)
    race.spawn(snapshot_reader, 0)
    race.run()
    assert race.problems == [], race.problems
    client = race.connect()
    buf = client.buffer(8 * SLOT)
    results = client.read([(p, 0, SLOT, buf, i * SLOT) for i, p in enumerate(paths)])
    final = set()
    for i, (p, r) in enumerate(zip(paths, results)):
        data = buf.mm[i * SLOT:i * SLOT + r]
        assert r > 0 and check_whole(p, data, race.written[p]) is None, (p, r)
        final.add(identify(data)[1])
        with open(m.p(p), "rb") as f:
            assert f.read() == data, p  # the mount serves what the direct path stored last
    buf.close()
    client.close()
    assert len(final) == 1, final  # every file from the same (the last) batch
    assert race.counts.get("batches0", 0) > 3 and race.counts.get("batches1", 0) > 3, race.counts
    assert race.counts.get("read_ok", 0) > 10, race.counts
    race.finish()


def test_a_read_into_changing_memory_never_quarantines_a_healthy_block(make_mount):
    """Raw blocks read whole land in the caller's memory and are verified there. Memory the
    caller changes meanwhile (items of one batch aimed at the same range, or its own
    threads writing its buffer) must not make a healthy block look damaged: that would
    drop the files that hold it (quarantine), for every user of the mount."""
    m = make_mount(block_size="256K")
    client = direct_client.connect(m.path)
    files = {f"f{i}": os.urandom(4 * BS) for i in range(4)}
    src = client.buffer(16 * BS)
    for i, data in enumerate(files.values()):
        src.mm[i * 4 * BS:(i + 1) * 4 * BS] = data
    assert client.write([(name, src, i * 4 * BS, 4 * BS, 0o644) for i, name in enumerate(files)]) == [0] * 4
    dest = client.buffer(BS)
    stop = threading.Event()

    def scribble():  # the client's own thread writing its buffer while reads land in it
        while not stop.is_set():
            dest.mm[:4096] = os.urandom(4096)

    t = threading.Thread(target=scribble, daemon=True)
    t.start()
    try:
        for _ in range(20):  # 16 blocks at once, all into the same range
            results = client.read([(name, b * BS, BS, dest, 0) for name in files for b in range(4)])
            assert results == [BS] * 16, results
    finally:
        stop.set()
        t.join()
    counters = stats(m)["counters"]
    assert not counters.get("corrupt_blocks") and not counters.get("quarantined_files"), counters
    for name, data in files.items():  # every file is still there, whole
        with open(m.p(name), "rb") as f:
            assert f.read() == data, name
    client.close()
