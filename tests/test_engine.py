"""Engine pieces on real LMDB and real device files, without FUSE."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from kvfs import codec, meta as M
from kvfs.errors import Corrupt
from kvfs.store import ALLOC_UNIT, FreeMap
from kvfs.warehouse import Warehouse


def test_codec_verifies_and_pads():
    data = b"kv" * 3000 + bytes(5000)
    h = codec.block_hash(data)
    stored, used = codec.encode(data, codec.CODEC_NONE)
    assert used == codec.CODEC_NONE and len(stored) == 6000  # trailing zeros not stored
    assert codec.decode(stored, used, len(data), h) == data
    packed, used = codec.encode(bytes(1 << 16) + b"x" * 100, codec.CODEC_ZSTD)
    assert used == codec.CODEC_ZSTD
    bad = bytearray(stored)
    bad[10] ^= 1
    with pytest.raises(Corrupt):
        codec.decode(bytes(bad), codec.CODEC_NONE, len(data), h)
    with pytest.raises(Corrupt):
        codec.decode(b"not zstd", codec.CODEC_ZSTD, 100, h)


def test_freemap_coalesces_and_refuses_double_free():
    f = FreeMap()
    f.add(0, 10 * ALLOC_UNIT)
    a = f.take(2 * ALLOC_UNIT)
    b = f.take(3 * ALLOC_UNIT)
    assert (a, b) == (0, 2 * ALLOC_UNIT)
    f.add(a, 2 * ALLOC_UNIT)
    with pytest.raises(Corrupt):
        f.add(a, ALLOC_UNIT)
    f.add(b, 3 * ALLOC_UNIT)
    assert list(f.by_off.items()) == [(0, 10 * ALLOC_UNIT)]
    assert f.take(11 * ALLOC_UNIT) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 8)), min_size=1, max_size=60))
def test_persistent_free_map_matches_allocator(tmp_path_factory, steps):
    """free_remove/free_add on LMDB track the in-memory allocator exactly."""
    path = tmp_path_factory.mktemp("meta")
    meta = M.Meta(str(path))
    try:
        size = 64 * ALLOC_UNIT
        mem = FreeMap()
        mem.add(0, size)
        with meta.begin(write=True) as txn:
            txn.put(M.free_key(0, 0), M.u64(size), db=meta.db["free"])
        held = []
        for take, units in steps:
            with meta.begin(write=True) as txn:
                if take or not held:
                    off = mem.take(units * ALLOC_UNIT)
                    if off is None:
                        continue
                    meta.free_remove(txn, 0, off, units * ALLOC_UNIT)
                    held.append((off, units * ALLOC_UNIT))
                else:
                    off, length = held.pop(len(held) // 2)
                    mem.add(off, length)
                    meta.free_add(txn, 0, off, length)
            with meta.begin() as txn:
                persisted = [(M.parse_free_key(k)[1], M.parse_u64(v)) for k, v in txn.cursor(db=meta.db["free"])]
            assert persisted == list(mem.by_off.items())
    finally:
        meta.close()


def test_unlink_of_a_block_pinned_by_an_open_writer(tmp_path):
    """A block whose last committed reference goes away while an uncommitted file dedups
    onto it survives until that file commits (refcounts stay exact)."""
    Warehouse.mkfs(str(tmp_path / "w"), devices=[("a.img", 64 << 20)], block_size=1 << 16)
    w = Warehouse(str(tmp_path / "w"))
    try:
        data = os.urandom(1 << 16)
        fh, a = w.create(M.ROOT_INO, b"a", 0o644, 0, 0)
        w.write(fh, 0, data)
        w.release(fh)
        fh, b = w.create(M.ROOT_INO, b"b", 0o644, 0, 0)
        w.write(fh, 0, data)  # dedup onto a's block, not committed yet
        w.unlink(M.ROOT_INO, b"a")  # drops the only committed reference
        w.release(fh)  # commit b
        fh = w.open(b.ino)
        assert w.read(fh, 0, 1 << 16) == data
        w.release(fh)
        with w.meta.begin() as txn:
            recs = [M.BlockRecord.unpack(v) for _, v in txn.cursor(db=w.meta.db["blocks"])]
        assert [r.refcount for r in recs] == [1]
    finally:
        w.close()


# -- regressions found in review: each reproducer drives the engine directly -----------

BS = 1 << 16


def _blk(c):
    return bytes([c]) * BS


def _fresh(tmp_path, size=64 << 20):
    path = str(tmp_path / "w")
    Warehouse.mkfs(path, devices=[("a.img", size)], block_size=BS)
    return path


def _crash(w):
    """What kill -9 leaves: no close(), state still 'not clean'."""
    w.devices.close()
    w.meta.close()
    os.close(w._lock_fd)
    w._lock_fd = -1


def _fsck_clean(path):
    from kvfs.fsck import Fsck

    w = Warehouse(path, check_only=True)
    try:
        with w.meta.begin() as txn:
            f = Fsck(w, txn)
            f.run(verify_data=True)
        return f.problems
    finally:
        w.close()


def _fill(w):
    fh, _ = w.create(M.ROOT_INO, b"fill", 0o644, 0, 0)
    from kvfs.errors import NoSpace

    i = 0
    with pytest.raises(NoSpace):
        while True:
            w.write(fh, i * BS, os.urandom(BS))
            i += 1
    return fh


def test_block_moving_within_a_file_in_one_commit(tmp_path):
    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(1) + _blk(2))
    w.release(fh)
    fh = w.open(ino.ino, write=True)
    w.write(fh, 0, _blk(3))
    w.write(fh, BS, _blk(1))  # the old block 0 moves to index 1
    w.release(fh)
    w.setattr(ino.ino, size=BS)  # and a truncate that drops what the first block replaced
    fh = w.open(ino.ino)
    assert w.read(fh, 0, 2 * BS) == _blk(3)
    w.release(fh)
    w.close()
    assert _fsck_clean(path) == []


def test_empty_file_created_and_closed_survives_a_crash(tmp_path):
    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, _ = w.create(M.ROOT_INO, b"empty", 0o644, 0, 0)
    w.release(fh)
    w.mknod(M.ROOT_INO, b"node", 0o100644, 0, 0)
    w.close()
    w = Warehouse(path)
    _crash(w)
    w = Warehouse(path)
    try:
        assert w.recovery["incomplete_files"] == 0
        assert w.lookup(M.ROOT_INO, b"empty").size == 0
        w.lookup(M.ROOT_INO, b"node")
    finally:
        w.close()


def test_no_space_keeps_written_bytes_and_reports_at_flush(tmp_path):
    from kvfs.errors import NoSpace

    path = _fresh(tmp_path, size=(1 << 20) + 4 * BS)
    w = Warehouse(path)
    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(ord("x")))
    w.release(fh)
    w.set_pin(ino.ino, True)  # else the full warehouse would evict it rather than fail
    filler = _fill(w)
    fh = w.open(ino.ino, write=True)
    w.write(fh, 0, b"NEW")
    with pytest.raises(NoSpace):
        w.flush(fh)
    assert w.read(fh, 0, 3) == b"NEW"  # not silently dropped
    with pytest.raises(NoSpace):
        w.flush(fh)  # and a retry does not pretend to succeed
    with pytest.raises(NoSpace):
        w.setattr(ino.ino, size=100)
    w.release(filler)
    w.unlink(M.ROOT_INO, b"fill")  # space comes back
    w.flush(fh)
    w.release(fh)
    w.setattr(ino.ino, size=BS)  # the tail past 100 must read as zeros
    fh = w.open(ino.ino)
    assert w.read(fh, 0, BS) == b"NEW" + b"x" * 97 + bytes(BS - 100)
    w.release(fh)
    w.close()
    assert _fsck_clean(path) == []


def test_failed_truncate_changes_nothing(tmp_path):
    from kvfs.errors import Corrupt as CorruptError

    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(1) + _blk(2) + _blk(3))
    w.release(fh)
    with w.meta.begin() as txn:
        h = txn.get(M.bmap_key(ino.ino, 1), db=w.meta.db["bmap"])
        rec = w.meta.get_block(txn, h)
    os.pwrite(w.devices.devices[rec.dev].fd, b"\xff", rec.offset + 10)  # rot block 1
    w.cache._cache.clear()
    held = w.open(ino.ino, write=True)  # the file is open while the truncate fails
    with pytest.raises(CorruptError):
        w.setattr(ino.ino, size=BS + 100)
    assert w.getattr(ino.ino).size == 3 * BS
    assert w.read(held, 2 * BS, BS) == _blk(3)
    w.write(held, 0, b"z")
    w.release(held)  # commits: block 2 must still be there
    fh = w.open(ino.ino)
    assert w.read(fh, 2 * BS, BS) == _blk(3)
    w.release(fh)
    w.close()


def _corrupt_first_block(w, ino):
    with w.meta.begin() as txn:
        h = txn.get(M.bmap_key(ino, 0), db=w.meta.db["bmap"])
        rec = w.meta.get_block(txn, h)
    os.pwrite(w.devices.devices[rec.dev].fd, b"\x00", rec.offset + 5)
    w.cache._cache.clear()
    return bytes(h)


def _two_files_sharing_a_block(w):
    inos = []
    for name in (b"f", b"f2"):
        fh, inode = w.create(M.ROOT_INO, name, 0o644, 0, 0)
        w.write(fh, 0, _blk(1))
        w.release(fh)
        inos.append(inode.ino)
    return inos


def test_a_corrupt_block_is_eio_quarantined_and_its_file_dropped_then_healed(tmp_path):
    from kvfs.errors import Corrupt as CorruptError, NotFound

    path = _fresh(tmp_path)
    w = Warehouse(path)
    f, f2 = _two_files_sharing_a_block(w)
    h = _corrupt_first_block(w, f)
    fh = w.open(f)
    with pytest.raises(CorruptError):
        w.read(fh, 0, BS)
    with pytest.raises(CorruptError):  # again: from the quarantine, not the device
        w.read(fh, 0, BS)
    w.release(fh)
    with pytest.raises(NotFound):
        w.lookup(M.ROOT_INO, b"f")  # dropped: never served again
    st = w.stats()
    assert st["quarantined_blocks"] == 1
    assert st["counters"]["corrupt_blocks"] == 1 and st["counters"]["quarantined_files"] == 1
    with w.meta.begin() as txn:
        assert w.meta.get_quarantine(txn, h).ino == f
    fh, _ = w.create(M.ROOT_INO, b"g", 0o644, 0, 0)
    w.write(fh, 0, _blk(1))  # same content: must not dedup onto the bad copy; it heals it
    w.release(fh)
    for name in (b"f2", b"g"):  # f2 shared the block: it is served from the healed copy
        fh = w.open(w.lookup(M.ROOT_INO, name).ino)
        assert w.read(fh, 0, BS) == _blk(1)
        w.release(fh)
    assert w.stats()["quarantined_blocks"] == 0 and w.stats()["counters"]["healed_blocks"] == 1
    w.close()
    assert _fsck_clean(path) == []


def test_quarantine_survives_a_restart_and_drops_the_other_holders(tmp_path):
    from kvfs.errors import Corrupt as CorruptError, NotFound

    path = _fresh(tmp_path)
    w = Warehouse(path)
    f, f2 = _two_files_sharing_a_block(w)
    _corrupt_first_block(w, f)
    fh = w.open(f)
    with pytest.raises(CorruptError):
        w.read(fh, 0, BS)
    w.release(fh)
    w.close()
    problems = _fsck_clean(path)  # f2 still holds it: fsck says so
    assert any("is damaged" in p and "/f2" in p for p in problems), problems
    w = Warehouse(path)
    dev_reads_before = sum(d.reads for d in w.devices.devices)
    fh = w.open(f2)
    with pytest.raises(CorruptError):
        w.read(fh, 0, BS)
    assert sum(d.reads for d in w.devices.devices) == dev_reads_before  # known bad: not read
    w.release(fh)
    with pytest.raises(NotFound):
        w.lookup(M.ROOT_INO, b"f2")
    w.close()
    assert _fsck_clean(path) == []  # the last holder went, so did the block and its record


def test_fsck_flags_an_unreferenced_block_record(tmp_path):
    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(7))
    w.release(fh)
    with w.meta.begin(write=True) as txn:  # plant: the file forgets its block
        txn.delete(M.bmap_key(ino.ino, 0), db=w.meta.db["bmap"])
    w.close()
    problems = _fsck_clean(path)
    assert any("referenced by no file" in p for p in problems)


def test_threaded_readers_never_see_mixed_or_corrupt_blocks(tmp_path):
    """Readers in threads (as the FUSE layer runs them) race rewrites, truncates and commits
    of the same file: every block they get is wholly one written version, never an error."""
    import threading

    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(1) * 4)
    w.release(fh)
    versions = {bytes([v]) * BS for v in range(1, 40)} | {bytes(BS)}
    stop = threading.Event()
    errors = []

    def reader():
        rfh = w.open(ino.ino)
        try:
            while not stop.is_set():
                data = bytes(w.read(rfh, 0, 4 * BS))  # (a bytes-like object)
                for i in range(0, len(data), BS):
                    chunk = data[i:i + BS]
                    if len(chunk) == BS and chunk not in versions:
                        errors.append(f"block {i // BS}: mixed bytes")
        except Exception as exc:  # noqa: BLE001 - any error is a failure here
            errors.append(repr(exc))
        finally:
            w.release(rfh)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 40):
        wfh = w.open(ino.ino, write=True)
        for i in range(4):
            w.write(wfh, i * BS, _blk(v))
        if v % 5 == 0:
            w.setattr(ino.ino, size=BS)  # truncate, then grow again
            w.write(wfh, 3 * BS, _blk(v))
        w.release(wfh)
        if v % 7 == 0:
            w.checkpoint()
    stop.set()
    for t in threads:
        t.join()
    w.close()
    assert errors == []
    assert _fsck_clean(path) == []


# -- regressions found in the review of the cache behaviour ----------------------------------

def test_gc_between_the_halves_of_create_cannot_drop_the_new_file(tmp_path):
    """create() makes and opens a file under one lock: gc (grace 0, another thread) cannot
    see it as an unfinished file nobody has open."""
    import threading

    from kvfs.fsck import gc

    path = _fresh(tmp_path)
    w = Warehouse(path)
    make = w.namespace.make
    reports = []

    def make_then_gc(*args, **kw):
        inode = make(*args, **kw)
        t = threading.Thread(target=lambda: reports.append(gc(w, delete=True, grace=0)))
        t.start()
        t.join(timeout=0.5)  # gc waits for the lock that create still holds
        return inode

    w.namespace.make = make_then_gc
    fh, inode = w.create(M.ROOT_INO, b"new", 0o644, 0, 0)
    w.release(fh)
    w.namespace.make = make
    deadline = __import__("time").monotonic() + 10
    while not reports and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.01)
    assert reports and reports[0]["problems"] == []
    assert w.lookup(M.ROOT_INO, b"new").ino == inode.ino
    w.close()


def test_enospc_from_fragmentation_says_so(tmp_path):
    """Pinned 64K+4K files between unpinned 60K ones: once those are evicted the free space
    is in holes smaller than a block. The error says fragmented, not 'all pinned'."""
    from kvfs.errors import NoSpace

    path = str(tmp_path / "w")
    Warehouse.mkfs(path, devices=[("a.img", 8 << 20)], block_size=BS, high_watermark=1.0, low_watermark=1.0)
    w = Warehouse(path)
    pinned = w.mkdir(M.ROOT_INO, b"pinned", 0o755, 0, 0).ino
    w.set_pin(pinned, True)

    def make(d, name, n):
        fh, _ = w.create(d, name, 0o644, 0, 0)
        w.write(fh, 0, os.urandom(n))
        w.release(fh)

    i = 0
    with pytest.raises(NoSpace):
        while True:
            make(pinned, b"p%d" % i, BS + 4096)
            make(M.ROOT_INO, b"u%d" % i, BS - 4096)
            i += 1
    with pytest.raises(NoSpace, match="fragmented"):
        make(M.ROOT_INO, b"new", BS)
    w.close()
    assert _fsck_clean(path) == []


def test_gc_leaves_a_block_that_changed_since_its_snapshot(tmp_path):
    """gc repairs under the lock only what is still as its snapshot saw it."""
    from kvfs.fsck import Fsck, _reclaim

    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, a = w.create(M.ROOT_INO, b"a", 0o644, 0, 0)
    w.write(fh, 0, _blk(5))
    w.release(fh)
    with w.meta.begin(write=True) as txn:  # plant: one reference too many
        h = txn.get(M.bmap_key(a.ino, 0), db=w.meta.db["bmap"])
        rec = w.meta.get_block(txn, h)
        rec.refcount += 1
        w.meta.put_block(txn, h, rec)
    with w.snapshot() as (txn, held, _):
        f = Fsck(w, txn, held=held)
        f.check_refcounts()
    assert [c[0] for c in f.candidates] == ["block"]
    fh, _ = w.create(M.ROOT_INO, b"b", 0o644, 0, 0)  # meanwhile: another reference
    w.write(fh, 0, _blk(5))
    w.release(fh)
    freed, skipped = w.maintain(lambda txn, effects, removed: _reclaim(w, txn, f.candidates, effects, removed))
    assert (freed, skipped) == (0, 1)
    with w.meta.begin() as txn:
        assert w.meta.get_block(txn, h).refcount == 3  # untouched: 2 references + the planted one
    w.close()


def test_close_frees_blocks_an_unfinished_upload_still_held(tmp_path):
    """The shared tier's uploader holds a file's blocks while it uploads; if the warehouse
    closes without it (the store hung at unmount), a block only that hold kept (its file
    deleted meanwhile) must not stay behind as an unreferenced record of a clean warehouse."""
    path = _fresh(tmp_path)
    w = Warehouse(path)
    fh, inode = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    w.write(fh, 0, _blk(3))
    w.release(fh)
    snap = w.sharing.share_snapshot(inode.ino)
    assert snap is not None and snap.held
    w.unlink(M.ROOT_INO, b"f")
    with w.meta.begin() as txn:  # kept by the hold alone
        assert w.meta.get_block(txn, snap.held[0]).refcount == 0
    w.close()
    assert _fsck_clean(path) == []


def _distinct_blocks_file(w, name, n):
    fh, inode = w.create(M.ROOT_INO, name, 0o644, 0, 0)
    for i in range(n):
        w.write(fh, i * BS, bytes([i + 1]) * BS)
    w.release(fh)
    w.drop_cache()
    return inode.ino


def test_a_sequential_reader_is_read_ahead_each_block_once_then_served_from_the_cache(tmp_path):
    path = _fresh(tmp_path)
    w = Warehouse(path)
    n = 40
    ino = _distinct_blocks_file(w, b"seq", n)
    fh = w.open(ino)
    for i in range(n):
        assert w.read(fh, i * BS, BS) == bytes([i + 1]) * BS
    c = w.stats()["counters"]
    assert c["device_reads"] == n  # each block read from its device once
    # Every block was read ahead (the first ones from the open): by a read-ahead thread, or
    # by the reader itself when it needed one that had not started yet.
    assert c.get("read_ahead_blocks", 0) + c.get("read_ahead_late", 0) == n and c.get("read_ahead_blocks", 0) > 0
    # All of it is in the daemon's cache now: answered with no device read (the FUSE
    # layer does it without a thread hop); after a cache drop, read_cached declines.
    assert w.read_cached(fh, 3 * BS + 10, BS) == bytes([4]) * (BS - 10) + bytes([5]) * 10
    assert w.stats()["counters"]["device_reads"] == n
    w.drop_cache()
    assert w.read_cached(fh, 7 * BS, BS) is None
    assert w.read(fh, 7 * BS, BS) == bytes([8]) * BS
    w.release(fh)
    # Read to its end a moment ago, the file is in the kernel's page cache: opening it again
    # reads nothing ahead (no read request will come to use it).
    w.drop_cache()
    before = dict(w.stats()["counters"])
    fh = w.open(ino)
    assert w.cache._fetching == {}
    w.release(fh)
    w.cache._ahead_pool.submit(lambda: None).result()
    assert w.stats()["counters"]["device_reads"] == before["device_reads"]
    w.close()


def test_a_damaged_block_met_by_read_ahead_still_fails_its_reader(tmp_path):
    import time
    from kvfs.errors import Corrupt as CorruptError, NotFound

    path = _fresh(tmp_path)
    w = Warehouse(path)
    ino = _distinct_blocks_file(w, b"f", 12)
    with w.meta.begin() as txn:
        rec = w.meta.get_block(txn, txn.get(M.bmap_key(ino, 3), db=w.meta.db["bmap"]))
    os.pwrite(w.devices.devices[rec.dev].fd, b"\xff", rec.offset + 7)
    fh = w.open(ino)
    assert w.read(fh, 0, BS) == bytes([1]) * BS  # (the open started reading ahead: blocks 0-11)
    deadline = time.monotonic() + 10
    while w.counters["read_ahead_errors"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.counters["read_ahead_errors"] == 1  # read ahead, failed, not cached, not reported yet
    assert w.counters["corrupt_blocks"] == 0
    for i in (1, 2):
        assert w.read(fh, i * BS, BS) == bytes([i + 1]) * BS
    with pytest.raises(CorruptError):
        w.read(fh, 3 * BS, BS)  # the reader reads it itself and gets EIO
    assert w.counters["corrupt_blocks"] == 1 and w.stats()["quarantined_blocks"] == 1
    with pytest.raises(NotFound):
        w.lookup(M.ROOT_INO, b"f")  # the file holding it is dropped
    w.release(fh)
    w.close()
    assert _fsck_clean(path) == []


def test_read_ahead_racing_rewrites_that_free_and_reuse_extents_serves_no_wrong_block(tmp_path):
    """Read-ahead fetches blocks no reader has asked for yet. Rewrites free the old blocks
    and checkpoints let their extents be reused at once: a read-ahead must never pick up
    another block's bytes (wrong data, or a false 'damaged' that quarantines a sound
    block and drops the file)."""
    import threading

    path = _fresh(tmp_path)
    w = Warehouse(path)
    n = 24

    def block(v, idx):
        return bytes([v, idx]) * (BS // 2)

    fh, ino = w.create(M.ROOT_INO, b"f", 0o644, 0, 0)
    for idx in range(n):
        w.write(fh, idx * BS, block(1, idx))
    w.release(fh)
    stop = threading.Event()
    errors = []
    reads = [0]

    def reader():
        try:
            while not stop.is_set():
                rfh = w.open(ino.ino)  # (starts reading ahead)
                try:
                    for idx in range(n):
                        chunk = bytes(w.read(rfh, idx * BS, BS))
                        if chunk[1:2] != bytes([idx]) or chunk != block(chunk[0], idx):
                            errors.append(f"block {idx}: wrong bytes {chunk[:4]!r}")
                        reads[0] += 1
                finally:
                    w.release(rfh)
        except Exception as exc:  # noqa: BLE001 - any error is a failure here
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 60):
        wfh = w.open(ino.ino, write=True)
        for idx in range(n):
            w.write(wfh, idx * BS, block(v, idx))
        w.release(wfh)
        w.checkpoint()  # the old extents are reusable by the next rewrite
        w.drop_cache()  # and reads go to the devices
    stop.set()
    for t in threads:
        t.join()
    c = w.stats()["counters"]
    w.close()
    assert errors == []
    assert c.get("corrupt_blocks", 0) == 0 and c.get("read_ahead_errors", 0) == 0
    assert c.get("read_ahead_blocks", 0) > 0 and reads[0] > 3 * n
    assert _fsck_clean(path) == []


@pytest.mark.parametrize("halves", [(0, 128 << 10), (128 << 10, 0)], ids=["in-order", "second-half-first"])
def test_many_sequential_readers_read_each_block_from_the_devices_once(tmp_path, halves):
    """Eight readers of eight files at once want more read-ahead than the block cache
    holds: read-ahead is capped, and blocks a reader is done with (answered whole, in any
    order of requests) go first, so what was read ahead is not pushed out before its
    reader gets there (each block read once)."""
    import threading

    bs, readers, per_file = 256 << 10, 8, 64
    path = str(tmp_path / "w")
    Warehouse.mkfs(path, devices=[("a.img", 256 << 20)], block_size=bs)
    w = Warehouse(path)
    inos = []
    for f in range(readers):
        fh, ino = w.create(M.ROOT_INO, b"f%d" % f, 0o644, 0, 0)
        for i in range(per_file):
            w.write(fh, i * bs, bytes([f + 1, i]) * (bs // 2))
        w.release(fh)
        inos.append(ino.ino)
    w.drop_cache()
    wrong = []

    def reader(f):
        fh = w.open(inos[f])
        for i in range(per_file):
            for off in halves:  # as FUSE asks: 128 KiB at a time, not always in order
                got = w.read_cached(fh, i * bs + off, 128 << 10)
                if got is None:
                    got = w.read(fh, i * bs + off, 128 << 10)
                if bytes(got) != bytes([f + 1, i]) * (64 << 10):
                    wrong.append((f, i, off))
        w.release(fh)

    threads = [threading.Thread(target=reader, args=(f,)) for f in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = w.stats()["counters"]
    w.close()
    assert wrong == []
    blocks = readers * per_file
    # (before the cap and the demotion: 737 device reads of these 512 blocks; demoting on
    # "read to its end" alone: 643-772 when the second halves came first)
    assert blocks <= c["device_reads"] <= blocks + blocks // 20, c
    assert c.get("read_ahead_blocks", 0) > blocks // 2


def test_read_ahead_that_cannot_start_leaves_no_read_registered(tmp_path):
    """Read-ahead is advice: if its thread cannot start, the open still succeeds and no
    read stays registered (that would keep every extent freed later from being reused)."""
    path = _fresh(tmp_path)
    w = Warehouse(path)
    ino = _distinct_blocks_file(w, b"f", 4)
    w.release(w.open(ino))  # (the pool exists now)
    w.cache._ahead_pool.submit(lambda: None).result()
    w.cache._ahead_pool.shutdown(wait=True)  # (its read-ahead is over; submit refuses from now on)
    assert w.devices._readers == {}
    w.drop_cache()

    fh = w.open(ino)
    assert w.read(fh, 0, BS) == bytes([1]) * BS
    w.release(fh)
    assert w.devices._readers == {} and w.cache._fetching == {}
    fh, _ = w.create(M.ROOT_INO, b"g", 0o644, 0, 0)
    w.write(fh, 0, b"x" * BS)
    w.release(fh)
    w.checkpoint()
    w.unlink(M.ROOT_INO, b"g")
    w.checkpoint()
    assert w.devices.deferred_bytes == 0  # the freed extent is reusable
    w.close()


def test_read_ahead_queued_but_without_a_thread_ends_only_its_own_registration(tmp_path):
    """ThreadPoolExecutor.submit queues the task before it starts a thread; if the start
    fails it raises, and a thread it already has runs the task later. The task's read
    registration must end exactly once: ending it twice would end another read's, and
    that read's extents could be reused under it."""
    import concurrent.futures

    class ThreadStartFails:
        def __init__(self):
            self.pool = concurrent.futures.ThreadPoolExecutor(1)

        def submit(self, fn, *args):
            self.pool.submit(fn, *args)  # queued: the one thread runs it
            raise RuntimeError("can't start new thread")

    path = _fresh(tmp_path)
    w = Warehouse(path)
    ino = _distinct_blocks_file(w, b"f", 4)
    w.cache._ahead_pool = ThreadStartFails()
    other = w.devices.read_begin()  # a long read in progress elsewhere
    fh = w.open(ino)
    w.cache._ahead_pool.pool.shutdown(wait=True)  # (the queued task has run)
    assert dict(w.devices._readers) == {other: 1} and w.cache._fetching == {}
    assert w.read(fh, 0, BS) == bytes([1]) * BS
    w.release(fh)
    w.devices.read_end(other)
    assert w.devices._readers == {}
    w.cache._ahead_pool = None  # (its stand-in has no shutdown)
    w.close()


def test_many_threads_compress_blocks_at_once(tmp_path):
    """Blocks are compressed outside the lock by every writer thread at once: zstd contexts
    are not thread-safe (a shared one crashed the daemon), so each thread has its own."""
    import threading

    w = Warehouse.mkfs(str(tmp_path / "w"), size=256 << 20)
    w = Warehouse(str(tmp_path / "w"), compression="zstd")
    try:
        datas = [(bytes([i]) * 1000 + os.urandom(200)) * 2000 for i in range(8)]
        errors = []

        def work(i):
            try:
                for r in range(3):
                    fh, _ = w.create(M.ROOT_INO, f"f{i}.{r}".encode(), 0o644, 0, 0)
                    w.write(fh, 0, datas[i])
                    w.release(fh)
            except Exception as exc:  # (an assert in a thread would only warn)
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for i in range(8):
            ino = w.lookup(M.ROOT_INO, f"f{i}.2".encode()).ino
            fh = w.open(ino)
            assert bytes(w.read(fh, 0, len(datas[i]))) == datas[i]
            w.release(fh)
        assert w.stats()["counters"].get("stored_blocks", 0) > 0
    finally:
        w.close()
