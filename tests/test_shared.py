"""The shared tier (issue 8) against a real S3 server: SeaweedFS on 127.0.0.1, two
warehouses mounted on this machine playing two nodes on one bucket.

Done when: a file written on node A is read byte-identical on node B by the same path;
two nodes writing one path concurrently stay consistent and one version wins everywhere;
with the server stopped, both mounts serve local files and no call blocks past the
configured timeout, and queued uploads complete once it is back; a block corrupted in the
bucket is refused. Also: pinned files are never dropped from a full queue (which survives
a remount), retire --shared, stat, and a remote file is never read as zeros without its
tier."""

import errno
import json
import os
import threading
import time
import uuid

import pytest

from conftest import run_kvfs, wait_for
from kvfs import meta as M
from kvfs.shared import Keys, Manifest, Store, StoreRefused, Unreachable, parse_url
from seaweed import BUCKET, Seaweed, free_ports

MiB = 1 << 20
SMALL = (("a.img", "96M"),)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    sw = Seaweed(tmp_path_factory.mktemp("seaweed"))
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def store_env(monkeypatch, tmp_path):
    """Credentials for the daemons (they inherit the environment), and no AWS files of
    this machine's user in the way."""
    def apply(sw):
        for k, v in sw.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return apply


@pytest.fixture
def nodes(seaweed, store_env, make_mount):
    """make(name, **kw): a mount sharing this test's prefix of the bucket."""
    store_env(seaweed)
    prefix = f"t-{uuid.uuid4().hex[:10]}"

    def make(name, timeout=2, queue=None, endpoint=None, **kw):
        opts = [f"shared=s3://{BUCKET}/{prefix}", f"shared_endpoint={endpoint or seaweed.endpoint}",
                f"shared_timeout={timeout}"] + ([f"shared_queue={queue}"] if queue else [])
        kw.setdefault("devices", SMALL)
        return make_mount(name, options=opts, **kw)

    make.prefix = prefix
    make.keys = Keys(prefix)
    return make


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def shared(m):
    with open(m.p(".kvfs", "stats.json")) as f:
        return json.load(f)["shared"]


def drained(m, timeout=30):
    assert wait_for(lambda: shared(m)["queue"] == 0, timeout), shared(m)
    return shared(m)


def uuid_of(m):
    with open(m.p(".kvfs", "stats.json")) as f:
        return json.load(f)["uuid"]


def fsck_clean(m):
    m.umount()
    report = json.loads(run_kvfs("fsck", m.warehouse, "--verify-data", "--json").stdout)
    assert report["clean"], report["problems"]
    st = json.loads(run_kvfs("stat", m.warehouse, "--json").stdout)["shared"]  # unmounted: counters
    assert st is not None and st["state"] == "not configured" and "uploaded_files" in st, st
    assert "Traceback" not in run_kvfs("stat", m.warehouse).stderr


def test_manifests_keys_and_urls():
    assert parse_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_url("s3://bucket") == ("bucket", "")
    for bad in ("http://x/y", "s3://ab", "bucket/x"):
        with pytest.raises(ValueError):
            parse_url(bad)
    k = Keys("p/q")
    assert k.block(bytes(range(16))) == "p/q/blocks/000102030405060708090a0b0c0d0e0f"
    assert k.manifest("models/ü.kv".encode()) == "p/q/files/models/ü.kv"
    assert k.manifest(b"\xff") is None and Keys("").manifest(b"a") == "files/a"
    m = Manifest("file", "a/b", 0o644, 1, 2, 3, 5000, 4096, [b"\1" * 16, None],
                 {b"user.kvfs.model": b"llama", b"user.bin": b"\xff"}, "node", 7)
    back = Manifest.decode(m.encode())
    assert back == m and back.order == (7, "node")
    for broken in (b"{}", b"[1]", m.encode().replace(b'"size":5000', b'"size":9000'),
                   m.encode().replace(b'"block_size":4096', b'"block_size":4097'),
                   m.encode().replace(b'"mode":420', b'"mode":-1'), b"not json"):
        with pytest.raises(ValueError):
            Manifest.decode(broken)


def test_store_requests_conditions_and_breaker(seaweed, store_env, monkeypatch):
    """The store client alone: conditional creates, compare-and-swap, refusals that are
    not outages, and an outage that costs one timeout, not one per request."""
    store_env(seaweed)
    s = Store(BUCKET, seaweed.endpoint, timeout=1)
    key = f"unit-{uuid.uuid4().hex[:8]}/x"
    assert s.get(key) is None
    assert s.put(key, b"one", if_none_match=True)
    assert not s.put(key, b"two", if_none_match=True)  # exists: not replaced
    body, etag = s.get(key)
    assert body == b"one"
    assert not s.put(key, b"three", if_match='"not-the-etag"')
    assert s.put(key, b"three", if_match=etag) and s.get(key)[0] == b"three"
    assert s.delete_tree(key.rsplit("/", 1)[0]) == 1 and s.get(key) is None
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreRefused):
        Store(BUCKET, seaweed.endpoint, timeout=1).get(key)
    dead = Store(BUCKET, f"http://127.0.0.1:{free_ports(1)[0]}", timeout=1)
    with pytest.raises(Unreachable):
        dead.get(key)
    assert dead.down() > 0
    t0 = time.monotonic()
    with pytest.raises(Unreachable):
        dead.put(key, b"x")
    assert time.monotonic() - t0 < 0.3  # not tried (the timeout is 1 s): the breaker is open


def test_written_on_a_read_on_b(nodes, seaweed, make_mount):
    a = nodes("a")
    b = nodes("b")
    files = {
        "models/llama/chunk0.kv": os.urandom(3 * MiB + 12345),  # several blocks, a partial last one
        "models/llama/small.kv": b"tiny",
        "top.bin": bytes(2 * MiB) + os.urandom(100),  # a hole, then data
        "dup.bin": os.urandom(MiB) * 3,  # one block three times
    }
    os.makedirs(a.p("models", "llama"))
    os.setxattr(a.p("models", "llama"), "user.kvfs.model", b"llama-3-8b")
    for path, data in files.items():
        write(a.p(path), data)
    os.setxattr(a.p("models/llama/chunk0.kv"), "user.kvfs.tenant", b"acme")
    st = drained(a)
    assert st["uploaded_files"] >= 4 and st["state"] == "ok", st
    t0 = time.monotonic()
    for path, data in files.items():
        assert read(b.p(path)) == data, path
    fetch_s = time.monotonic() - t0
    assert os.getxattr(b.p("models/llama/chunk0.kv"), "user.kvfs.tenant") == b"acme"
    assert os.stat(b.p("models/llama/chunk0.kv")).st_size == len(files["models/llama/chunk0.kv"])
    sb = shared(b)
    assert sb["lookup_hits"] >= 4 and sb["fetched_files"] == 4 and sb["remote_files"] == 0, sb
    assert sb["fetched_blocks"] == 4 + 1 + 1 + 1, sb  # a hole and a repeated block are not fetched
    # The store holds every block once, and the manifest says what the issue asks for.
    s3 = seaweed.client()
    man = json.loads(s3.get_object(Bucket=BUCKET, Key=nodes.keys.manifest(b"models/llama/chunk0.kv"))["Body"].read())
    assert man["size"] == len(files["models/llama/chunk0.kv"]) and man["block_size"] == MiB
    assert man["node"] == uuid_of(a) and man["xattrs"]["user.kvfs.tenant"] == "acme"
    assert len(man["blocks"]) == 4 and all(man["blocks"])
    human = run_kvfs("stat", b.path).stdout
    assert "shared     s3://" in human and "fetched 4 files" in human, human
    with open(a.p(".kvfs", "metrics")) as f:
        metrics = f.read()
    assert "kvfs_shared_queue_files 0.0" in metrics and "kvfs_shared_uploaded_blocks_total 7.0" in metrics, metrics
    print(f"\nread 4 files ({sum(map(len, files.values())) / MiB:.1f} MiB) through from the store in {fetch_s:.2f} s")

    # Node C with 256 KiB blocks reads the same bytes (cut again into its own blocks),
    # and what B fetched is local: B serves it with no tier at all.
    c = nodes("c", block_size="256K")
    assert read(c.p("models/llama/chunk0.kv")) == files["models/llama/chunk0.kv"]
    b.umount()
    b.options = []
    b.mount()
    for path, data in files.items():
        assert read(b.p(path)) == data, path
    assert os.getxattr(b.p("models", "llama"), "user.kvfs.model") == b"llama-3-8b"
    for m in (a, b, c):
        fsck_clean(m)


def test_a_file_grown_past_a_short_block_reads_the_same_on_b(nodes):
    """A block written short stays short when the file grows past it (local reads see
    zeros after it): B must accept it as it is (its hash is of what it holds) and read
    the same bytes, with its own block size as well."""
    a, b = nodes("a"), nodes("b")
    with open(a.p("grown.kv"), "wb") as f:
        f.write(b"x" * 100)
    with open(a.p("grown.kv"), "r+b") as f:
        f.seek(MiB + 5000)
        f.write(b"tail")
    want = b"x" * 100 + bytes(MiB + 4900) + b"tail"
    assert read(a.p("grown.kv")) == want
    drained(a)
    assert read(b.p("grown.kv")) == want
    assert shared(b)["corrupt_blocks"] == 0
    c = nodes("c", block_size="256K")
    assert read(c.p("grown.kv")) == want


def test_remote_file_is_never_read_as_zeros_without_its_tier(nodes):
    a = nodes("a")
    b = nodes("b")
    data = os.urandom(2 * MiB)
    write(a.p("f"), data)
    drained(a)
    assert os.stat(b.p("f")).st_size == len(data)  # looked up: there, not fetched yet
    assert shared(b)["remote_files"] == 1
    b.umount()
    # Marked for kvfs versions that know remote files: an older one refuses the warehouse.
    meta = M.Meta(os.path.join(b.warehouse, "meta"), readonly=True)
    with meta.begin() as txn:
        assert meta.get_json(txn, b"superblock")["format"] == M.FORMAT_REMOTE != M.FORMAT_REVISION
    meta.close()
    b.options = []
    b.mount()
    with pytest.raises(OSError) as exc:
        read(b.p("f"))
    assert exc.value.errno == errno.EIO
    with open(b.p("f"), "wb") as f:  # an O_TRUNC open needs no data: allowed
        f.write(b"new")
    assert read(b.p("f")) == b"new"
    fsck_clean(b)


def test_two_writers_one_version_wins(nodes, seaweed):
    a = nodes("a")
    b = nodes("b")
    paths = [f"race/f{i}" for i in range(6)]
    mine = {m.path: {p: os.urandom(MiB + 7) for p in paths} for m in (a, b)}
    start = threading.Barrier(2)

    def writer(m):
        start.wait()
        for p in paths:
            write(m.p(p), mine[m.path][p])

    threads = [threading.Thread(target=writer, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    drained(a)
    drained(b)
    s3 = seaweed.client()
    owner = {uuid_of(a): a.path, uuid_of(b): b.path}
    winner = {}
    for p in paths:
        man = json.loads(s3.get_object(Bucket=BUCKET, Key=nodes.keys.manifest(p.encode()))["Body"].read())
        winner[p] = mine[owner[man["node"]]][p]
        for m in (a, b):
            assert read(m.p(p)) in (mine[a.path][p], mine[b.path][p])  # whole, one or the other
    # Each node ends on the version in the store by itself: the loser takes it when its
    # upload finds it newer, or when it looks at its own manifest again (5 s after it).
    t0 = time.monotonic()
    assert wait_for(lambda: all(read(m.p(p)) == winner[p] for p in paths for m in (a, b)), 20)
    print(f"\nboth nodes on the winning versions {time.monotonic() - t0:.1f} s after the uploads; "
          f"superseded here: A {shared(a)['superseded_files']}, B {shared(b)['superseded_files']}")
    for p in paths:
        for m in (a, b):
            os.unlink(m.p(p))  # local only: the shared version stays
            assert read(m.p(p)) == winner[p], (p, m.path)  # a fresh lookup: the same

    # A stale writer: A publishes while it cannot reach the store, B publishes the same
    # path later and uploads it; when A's old version reaches the store, it loses, and A
    # takes B's version in place of its own.
    a.umount()
    a.options = [o if not o.startswith("shared_endpoint=") else f"shared_endpoint=http://127.0.0.1:{free_ports(1)[0]}"
                 for o in a.options]
    a.mount()
    write(a.p("late"), b"old version from A")
    time.sleep(0.05)
    write(b.p("late"), b"newer version from B")
    drained(b)
    assert shared(a)["queue"] == 1
    a.umount()
    a.options = [o if not o.startswith("shared_endpoint=") else f"shared_endpoint={seaweed.endpoint}"
                 for o in a.options]
    a.mount()
    st = drained(a)
    assert st["superseded_files"] >= 1, st
    assert read(a.p("late")) == b"newer version from B"
    man = json.loads(s3.get_object(Bucket=BUCKET, Key=nodes.keys.manifest(b"late"))["Body"].read())
    assert man["node"] == uuid_of(b)
    for m in (a, b):
        fsck_clean(m)


def test_outage_local_files_served_calls_bounded_uploads_resume(tmp_path, store_env, make_mount):
    """With the server hung (SIGSTOP) and then dead (SIGKILL), both mounts serve their
    local files, and lookups and opens that need the store fail within the timeout."""
    sw = Seaweed(tmp_path / "sw")
    sw.start()
    try:
        store_env(sw)
        opts = [f"shared=s3://{BUCKET}/outage", f"shared_endpoint={sw.endpoint}", "shared_timeout=1"]
        a = make_mount("a", options=opts, devices=SMALL)
        b = make_mount("b", options=opts, devices=SMALL)
        before = {n: os.urandom(MiB + 1) for n in ("pre", "pre2", "mine")}
        for n, data in before.items():
            write(a.p(n), data)
        drained(a)
        assert read(b.p("mine")) == before["mine"]  # now local on B too
        os.stat(b.p("pre2"))  # B knows it, has not fetched it
        limit = 1 + 1.5  # the timeout, and room for a loaded machine
        worst = {}

        def timed(what, fn):
            t0 = time.monotonic()
            try:
                return fn()
            finally:
                worst[what] = max(worst.get(what, 0), time.monotonic() - t0)

        def missing(path):
            with pytest.raises(FileNotFoundError):
                os.stat(path)

        def eio(path):
            with pytest.raises(OSError) as exc:
                read(path)
            assert exc.value.errno == errno.EIO

        after = {}
        for phase in ("paused", "killed"):
            sw.pause() if phase == "paused" else sw.kill()
            for i in range(2):
                name = f"{phase}{i}"
                after[name] = os.urandom(MiB // 2 + i)
                timed("write while down", lambda: write(a.p(name), after[name]))
                timed("lookup of a name the store has", lambda: missing(b.p("pre")))
                timed("lookup of a name nobody has", lambda: missing(a.p(f"nobody-{phase}{i}")))
                timed("open of a file not fetched yet", lambda: eio(b.p("pre2")))
                assert timed("read of a local file", lambda: read(a.p("mine"))) == before["mine"]
                assert timed("read of a fetched file", lambda: read(b.p("mine"))) == before["mine"]
            assert shared(a)["queue"] == (2 if phase == "paused" else 4)
        print("\nslowest calls with the store down (timeout 1 s): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in worst.items()))
        for what, seconds in worst.items():
            assert seconds < limit, (what, seconds)
        st = shared(a)
        assert st["queue"] == 4 and st["failures"] >= 1 and st["state"] in ("unreachable", "failing"), st
        sw.start()  # back, on the same data
        st = drained(a, timeout=60)
        assert st["uploaded_files"] == 3 + 4 and st["state"] == "ok", st
        for name, data in after.items():
            assert read(b.p(name)) == data, name
        assert read(b.p("pre")) == before["pre"] and read(b.p("pre2")) == before["pre2"]
        for m in (a, b):
            fsck_clean(m)
    finally:
        sw.stop()


def test_s3_server_keeps_its_state_in_its_own_directory(tmp_path, monkeypatch):
    """SeaweedFS, started and started again on the same data, keeps everything (volumes,
    the filer's store filerldb2, its log) under the test's directory: nothing lands in the
    repository root or in the directory the tests run in, whatever a filer.toml in the
    home directory says."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = set(os.listdir(root))
    cwd = tmp_path / "cwd"
    home = tmp_path / "home"
    os.makedirs(cwd)
    os.makedirs(home / ".seaweedfs")
    (home / ".seaweedfs" / "filer.toml").write_text('[leveldb2]\nenabled = true\ndir = "./filerldb2"\n')
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    sw = Seaweed(tmp_path / "sw")
    try:
        for _ in range(2):
            sw.start()
            sw.client().put_object(Bucket=BUCKET, Key="state", Body=b"x")
            sw.kill()
    finally:
        sw.stop()
    assert os.listdir(cwd) == [] and os.listdir(home) == [".seaweedfs"]
    assert set(os.listdir(root)) - before == set()
    assert os.path.isdir(os.path.join(sw.data, "filerldb2"))


def test_corrupt_block_in_the_bucket_is_refused(nodes, seaweed):
    a = nodes("a")
    b = nodes("b")
    data = os.urandom(2 * MiB + 5)
    write(a.p("victim"), data)
    write(a.p("expired"), os.urandom(5000))
    drained(a)
    s3 = seaweed.client()
    man = json.loads(s3.get_object(Bucket=BUCKET, Key=nodes.keys.manifest(b"victim"))["Body"].read())
    key = nodes.keys.block(bytes.fromhex(man["blocks"][1]))
    good = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[1000] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(bad))
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            read(b.p("victim"))
        assert exc.value.errno == errno.EIO
    st = shared(b)
    assert st["corrupt_blocks"] >= 1 and st["fetched_files"] == 0 and st["remote_files"] == 1, st
    with open(os.path.join(b.warehouse, "kvfs.log")) as f:
        assert "does not match its hash" in f.read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"short")  # the wrong length is refused as well
    with pytest.raises(OSError):
        read(b.p("victim"))
    s3.put_object(Bucket=BUCKET, Key=key, Body=good)  # repaired in the store: served again
    assert read(b.p("victim")) == data
    # A block that a lifecycle rule expired before the manifest that names it: the file is
    # a miss, as if evicted (a cache's client copes with that), not an error.
    man = json.loads(s3.get_object(Bucket=BUCKET, Key=nodes.keys.manifest(b"expired"))["Body"].read())
    s3.delete_object(Bucket=BUCKET, Key=nodes.keys.block(bytes.fromhex(man["blocks"][0])))
    with pytest.raises(FileNotFoundError):
        read(b.p("expired"))
    assert not os.path.exists(b.p("expired"))
    fsck_clean(b)


def test_pinned_files_never_dropped_from_a_full_queue(nodes, seaweed):
    """Queue of 3 and a store that cannot be reached: cache files are dropped, pinned ones
    stay queued however many, across a remount, and are uploaded once the store is there."""
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    a = nodes("a", queue=3, endpoint=dead, timeout=1)
    os.mkdir(a.p("keep"))
    run_kvfs("pin", a.p("keep"))
    for i in range(4):
        write(a.p("cache", f"c{i}"), os.urandom(5000))
    for i in range(5):
        write(a.p("keep", f"k{i}"), os.urandom(5000))
    write(a.p("cache", "last"), b"newest cache file")
    st = shared(a)
    assert st["queue"] == 5 and st["dropped_files"] == 5, st  # 5 pinned; 4 + 1 cache files dropped
    a.umount()
    a.mount()
    assert shared(a)["queue"] == 5
    a.umount()
    a.options = [o if not o.startswith("shared_endpoint=") else f"shared_endpoint={seaweed.endpoint}"
                 for o in a.options]
    a.mount()
    st = drained(a)
    assert st["uploaded_files"] == 5, st
    s3 = seaweed.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{nodes.prefix}/files/")["Contents"]}
    assert {f"{nodes.prefix}/files/keep/k{i}" for i in range(5)} <= keys
    assert not any("/files/cache/" in k for k in keys), keys
    fsck_clean(a)


def test_retire_shared_and_local_unlink(nodes, seaweed):
    a = nodes("a")
    b = nodes("b")
    for i in range(3):
        write(a.p("model-v1", "sub", f"c{i}"), os.urandom(3000))
    write(a.p("other"), b"stays")
    drained(a)
    os.unlink(a.p("other"))  # deleting locally never deletes shared data
    assert read(b.p("other")) == b"stays"
    assert read(b.p("model-v1", "sub", "c1"))  # B has one of them locally now
    res = run_kvfs("retire", "--shared", "--json", a.p("model-v1"))
    r = json.loads(res.stdout)[0]
    assert r["files"] == 3 and r["shared_manifests"] == 5, r  # 3 files, 2 directories
    s3 = seaweed.client()
    left = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{nodes.prefix}/files/").get("Contents", [])]
    assert left == [f"{nodes.prefix}/files/other"], left
    blocks = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{nodes.prefix}/blocks/").get("KeyCount", 0)
    assert blocks == 4  # blocks are left to the lifecycle rules
    assert not os.path.exists(b.p("model-v1", "sub", "c0"))  # B finds it nowhere now ...
    assert read(b.p("model-v1", "sub", "c1"))  # ... but keeps its local copy
    res = run_kvfs("retire", "--shared", a.p("other"))  # a path only in the store
    assert "1 manifests deleted" in res.stdout


def test_files_stored_on_the_direct_path_are_shared_and_read_back_directly(nodes):
    """A direct store queues its files for the shared tier like any other write; on node B
    a direct lookup finds what only the tier holds, and a direct read fetches it first,
    then answers its bytes."""
    from kvfs.direct_client import connect

    a, b = nodes("a"), nodes("b")
    files = {"kv/m/00/c0.kv": os.urandom(2 * MiB + 77), "kv/m/01/c1.kv": os.urandom(5000),
             "kv/n/02/c2.kv": os.urandom(MiB + 5)}
    ca = connect(a.path)
    buf = ca.buffer(6 * MiB)
    items, off = [], 0
    for path, data in files.items():
        buf.mm[off:off + len(data)] = data
        items.append((path, buf, off, len(data), 0o644))
        off += len(data)
    assert ca.write(items) == [0, 0, 0]
    st = drained(a)
    assert st["uploaded_files"] >= 3, st
    cb = connect(b.path)
    into = cb.buffer(9 * MiB)
    # Looked up (one component a round) and installed from the tier, as a lookup through
    # the mount would; a name the tier does not have either is still a miss.
    looked = list(files)[:2]
    assert cb.lookup(looked + ["kv/m/00/none.kv"]) == [len(files[p]) for p in looked] + [-errno.ENOENT]
    assert shared(b)["fetched_files"] == 0  # (looked up, not fetched yet)
    got = cb.read([(path, 0, len(data), into, i * 3 * MiB) for i, (path, data) in enumerate(files.items())])
    assert got == [len(d) for d in files.values()]
    for i, data in enumerate(files.values()):
        assert bytes(into.mm[i * 3 * MiB:i * 3 * MiB + len(data)]) == data
    assert shared(b)["fetched_files"] == 3  # (the third was looked up by the read itself)
    ca.close()
    cb.close()
