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
