"""The LMDB schema of a warehouse: every key layout, with its builders and parsers.

Integers in keys are big-endian so that LMDB's byte order is numeric order.

    sub-database  key                                   value
    ------------  ------------------------------------  -----------------------------------------
    super         b"superblock"                         JSON: format, uuid, block_size, devices,
                                                        compression, created
                  b"state"                              JSON: clean, pid, mountpoint, since
    counters      name (b"next_ino", b"next_entry")     u64: next value to hand out (never reused)
    inodes        ino u64                               INODE struct (see Inode)
    dentries      parent u64 + name                     child ino u64 + entry id u64
    dirents       parent u64 + entry id u64             name   (readdir order; ids are stable
                                                        offsets, never reused)
    symlinks      ino u64                               target bytes
    xattrs        ino u64 + name                        value
    bmap          ino u64 + block index u64             block hash (16 bytes); absent = hole
    blocks        block hash (16 bytes)                 BLOCK struct: device u16, offset u64,
                                                        stored length u32, raw length u32,
                                                        codec u8, refcount u32
    free          device u16 + offset u64               length u64 (free extent; coalesced)
    orphans       ino u64                               b""  (nlink is 0 but the inode was still
                                                        referenced; purged at forget/recovery)
    incomplete    ino u64                               parent u64 + name (a regular file created
                                                        and never flushed: recovery removes it)

Invariants: a block's refcount is the number of bmap values naming it (0 only while an open
file that is being written holds it in memory, never after recovery); no two blocks' extents
overlap, no block overlaps a free extent, and block extents + free extents cover each
device's data area exactly.
"""

import json
import struct
from dataclasses import dataclass

import lmdb

FORMAT_REVISION = 1
DB_NAMES = (
    b"super",
    b"counters",
    b"inodes",
    b"dentries",
    b"dirents",
    b"symlinks",
    b"xattrs",
    b"bmap",
    b"blocks",
    b"free",
    b"orphans",
    b"incomplete",
)
ROOT_INO = 1
MAP_SIZE = 1 << 40  # address space only; the file grows with use

_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")
_DEV_OFF = struct.Struct(">HQ")
_INODE = struct.Struct(">IIIIQqqqII")
_BLOCK = struct.Struct(">HQIIBI")

# Inode flags
F_INCOMPLETE = 1  # created, never flushed: removed by recovery after a crash
F_COMPRESS = 2  # new blocks of this file are zstd-compressed


def u64(n: int) -> bytes:
    return _U64.pack(n)


def parse_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dentry_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def dentry_val(ino: int, entry_id: int) -> bytes:
    return _U64x2.pack(ino, entry_id)


def parse_dentry_val(b: bytes) -> tuple[int, int]:
    return _U64x2.unpack(b)


def dirent_key(parent: int, entry_id: int) -> bytes:
    return _U64x2.pack(parent, entry_id)


def parse_dirent_key(b: bytes) -> tuple[int, int]:
    return _U64x2.unpack(b)


def xattr_key(ino: int, name: bytes) -> bytes:
    return _U64.pack(ino) + name


def bmap_key(ino: int, index: int) -> bytes:
    return _U64x2.pack(ino, index)


def parse_bmap_key(b: bytes) -> tuple[int, int]:
    return _U64x2.unpack(b)


def free_key(dev: int, offset: int) -> bytes:
    return _DEV_OFF.pack(dev, offset)


def parse_free_key(b: bytes) -> tuple[int, int]:
    return _DEV_OFF.unpack(b)


@dataclass
class Inode:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    flags: int = 0

    def pack(self) -> bytes:
        return _INODE.pack(
            self.mode, self.nlink, self.uid, self.gid, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev, self.flags,
        )

    @classmethod
    def unpack(cls, ino: int, b: bytes) -> "Inode":
        return cls(ino, *_INODE.unpack(b))


@dataclass
class BlockRecord:
    dev: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    refcount: int

    def pack(self) -> bytes:
        return _BLOCK.pack(
            self.dev, self.offset, self.stored_len, self.raw_len, self.codec, self.refcount
        )

    @classmethod
    def unpack(cls, b: bytes) -> "BlockRecord":
        return cls(*_BLOCK.unpack(b))


class Meta:
    """The LMDB environment of a warehouse and its named sub-databases."""

    def __init__(self, path: str, readonly: bool = False):
        self.env = lmdb.open(
            path,
            map_size=MAP_SIZE,
            max_dbs=len(DB_NAMES) + 2,
            subdir=True,
            readonly=readonly,
            # Durability is ordered by the warehouse: device data is synced before
            # env.sync() at checkpoints, fsync() and unmount. A killed daemon loses
            # nothing (the OS has the pages); a power cut loses at most the last
            # checkpoint interval.
            sync=False,
            metasync=False,
            readahead=False,
            meminit=False,
            lock=True,
        )
        self.db = {}
        for name in DB_NAMES:
            self.db[name.decode()] = self.env.open_db(name, create=not readonly)

    def begin(self, write: bool = False) -> lmdb.Transaction:
        return self.env.begin(write=write)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()

    # -- small helpers used by several layers -------------------------------------------

    def get_json(self, txn, key: bytes):
        raw = txn.get(key, db=self.db["super"])
        return None if raw is None else json.loads(raw)

    def put_json(self, txn, key: bytes, value) -> None:
        txn.put(key, json.dumps(value, sort_keys=True).encode(), db=self.db["super"])

    def next_counter(self, txn, name: bytes, start: int) -> int:
        raw = txn.get(name, db=self.db["counters"])
        value = start if raw is None else parse_u64(raw)
        txn.put(name, u64(value + 1), db=self.db["counters"])
        return value

    def get_inode(self, txn, ino: int) -> Inode | None:
        raw = txn.get(ino_key(ino), db=self.db["inodes"])
        return None if raw is None else Inode.unpack(ino, raw)

    def put_inode(self, txn, inode: Inode) -> None:
        txn.put(ino_key(inode.ino), inode.pack(), db=self.db["inodes"])

    def get_block(self, txn, h: bytes) -> BlockRecord | None:
        raw = txn.get(h, db=self.db["blocks"])
        return None if raw is None else BlockRecord.unpack(raw)

    def put_block(self, txn, h: bytes, rec: BlockRecord) -> None:
        txn.put(h, rec.pack(), db=self.db["blocks"])

    def iter_prefix(self, txn, dbname: str, prefix: bytes, start: bytes | None = None):
        """Yield (key, value) of `dbname` whose key starts with `prefix`, from `start`."""
        cur = txn.cursor(db=self.db[dbname])
        if not cur.set_range(start if start is not None else prefix):
            return
        for key, val in cur:
            if not key.startswith(prefix):
                return
            yield key, val

    def delete_inode_records(self, txn, ino: int) -> list[bytes]:
        """Delete every record of inode `ino`; return the block hashes its map named
        (the caller decides what happens to their reference counts)."""
        prefix = ino_key(ino)
        hashes = []
        for key, val in list(self.iter_prefix(txn, "bmap", prefix)):
            txn.delete(key, db=self.db["bmap"])
            hashes.append(val)
        for key, _ in list(self.iter_prefix(txn, "xattrs", prefix)):
            txn.delete(key, db=self.db["xattrs"])
        for name in ("symlinks", "orphans", "incomplete", "inodes"):
            txn.delete(prefix, db=self.db[name])
        return hashes

    # -- free-extent map (the persistent half; kvfs.store keeps the in-memory half) -----

    def free_remove(self, txn, dev: int, offset: int, length: int) -> None:
        """Take [offset, offset+length) out of a free extent (it must lie inside one)."""
        from .errors import Corrupt

        db = self.db["free"]
        cur = txn.cursor(db=db)
        if cur.set_range(free_key(dev, offset + 1)):
            found = cur.prev()
        else:
            found = cur.last()
        if not found:
            raise Corrupt(f"free map: no free extent at device {dev} offset {offset}")
        fdev, foff = parse_free_key(cur.key())
        flen = parse_u64(cur.value())
        if fdev != dev or foff > offset or foff + flen < offset + length:
            raise Corrupt(
                f"free map: [{offset}, +{length}) on device {dev} is not free "
                f"(nearest free extent {fdev}:{foff}+{flen})"
            )
        cur.delete()
        if foff < offset:
            txn.put(free_key(dev, foff), u64(offset - foff), db=db)
        end, fend = offset + length, foff + flen
        if end < fend:
            txn.put(free_key(dev, end), u64(fend - end), db=db)

    def free_add(self, txn, dev: int, offset: int, length: int) -> None:
        """Return [offset, offset+length) to the free map, merging with neighbours."""
        from .errors import Corrupt

        db = self.db["free"]
        cur = txn.cursor(db=db)
        start, end = offset, offset + length
        nxt = prv = None
        if cur.set_range(free_key(dev, offset)):
            ndev, noff = parse_free_key(cur.key())
            if ndev == dev:
                nxt = (noff, parse_u64(cur.value()))
            has_prev = cur.prev()
        else:
            has_prev = cur.last()
        if has_prev:
            pdev, poff = parse_free_key(cur.key())
            if pdev == dev:
                prv = (poff, parse_u64(cur.value()))
        if (nxt and nxt[0] < end) or (prv and prv[0] + prv[1] > offset):
            raise Corrupt(f"free map: double free at device {dev} offset {offset}")
        if nxt and nxt[0] == end:
            txn.delete(free_key(dev, nxt[0]), db=db)
            end = nxt[0] + nxt[1]
        if prv and prv[0] + prv[1] == offset:
            txn.delete(free_key(dev, prv[0]), db=db)
            start = prv[0]
        txn.put(free_key(dev, start), u64(end - start), db=db)
