"""The LMDB schema of a warehouse: every key layout, with its builders and parsers.

Integers in keys are big-endian so that LMDB's byte order is numeric order.

    sub-database  key                                   value
    ------------  ------------------------------------  -----------------------------------------
    super         b"superblock"                         JSON: format, uuid, block_size, devices,
                                                        compression, created, high_watermark,
                                                        low_watermark (fractions of capacity)
                  b"state"                              JSON: clean, pid, mountpoint, since
    counters      name (b"next_ino", b"next_entry")     u64: next value to hand out (never reused)
    stats         name (b"lookup_hit", b"evicted_files" u64: cumulative count over the
                  ...)                                  warehouse's life (see Warehouse.stats)
    totals        b"totals"                             TOTALS struct (derived sums: files and
                                                        their bytes, blocks' raw, stored and
                                                        referenced bytes; see Totals)
    inodes        ino u64                               INODE struct (see Inode)
    dentries      parent u64 + name                     child ino u64 + entry id u64
    dirents       parent u64 + entry id u64             name   (readdir order; ids are stable
                                                        offsets, never reused)
    links         ino u64 + parent u64 + name           b""  (every name of every inode: the
                                                        reverse of dentries, for eviction)
    lru           atime_ns u64 + ino u64                b""  (derived: the files eviction may take,
                                                        least recently used first; see
                                                        evict_keys)
    expiry        (atime_ns + ttl) u64 + ino u64        b""  (derived: those of them with a ttl,
                                                        soonest deadline first)
    retiring      ino u64                               parent u64 + name (a directory detached by
                                                        kvfs retire whose subtree is being
                                                        deleted in batches)
    lineage       ino u64                               LINEAGE struct + process name: who
                                                        created the file, when; opens since
    quotas        directory ino u64                     limit u64 + usage u64 (usage: the sizes
                                                        of the regular-file names below it)
    symlinks      ino u64                               target bytes
    xattrs        ino u64 + name                        value
    bmap          ino u64 + block index u64             block hash (16 bytes); absent = hole
    blocks        block hash (16 bytes)                 BLOCK struct: device u16, offset u64,
                                                        stored length u32, raw length u32,
                                                        codec u8, refcount u32
    free          device u16 + offset u64               length u64 (free extent; coalesced)
    orphans       ino u64                               b""  (nlink is 0 but the file was open;
                                                        purged at its last close or recovery)
    incomplete    ino u64                               parent u64 + name (a regular file created
                                                        and never flushed: recovery removes it)
    quarantine    block hash (16 bytes)                 QUARANTINE struct: device u16, offset u64,
                                                        stored length u32, time_ns u64, ino u64
                                                        (the file it was found in) + reason:
                                                        a stored copy that failed verification.
                                                        It is never served nor deduplicated
                                                        against; a new write of the same content
                                                        replaces it (heals), and the record goes
                                                        when the block does
    remote        ino u64                               block size u32 + one 16-byte block hash per
                                                        block (16 zero bytes: a hole): a regular
                                                        file read through from the shared tier
                                                        whose data is still only there (its bmap is
                                                        empty until its first open fetches it; see
                                                        kvfs.shared_files)
    shared_queue  sequence u64 (upload order)           ino u64 + published_ns u64: a file published
                                                        here, to upload to the shared tier

Invariants: lru and expiry hold exactly evict_keys() of every inode, totals the sums
of inode_totals() and block_totals(), and quotas' usage the sizes below each quota
directory (put_inode, put_block, delete_block, add_link, remove_link and
delete_inode_records keep them so; nothing else writes them); links holds exactly the
dentries, reversed. A block's refcount is the number of bmap values naming it (0 only while an open
file that is being written holds it in memory, never after recovery); no two blocks' extents
overlap, no block overlaps a free extent, and block extents + free extents cover each
device's data area exactly. An inode with a remote record has no bmap records (or, after
a crash in the middle of its first open, exactly the ones the record names).

Revisions: mkfs writes FORMAT_REVISION. A warehouse that has held remote files is marked
FORMAT_REMOTE (an older kvfs, which knows nothing of remote records, would read their
empty block maps as zeros: it must refuse the warehouse). FORMAT_READABLE lists what this
code opens; sub-databases it lacks are created at the first read-write open.
"""

import contextlib
import json
import os
import stat
import struct
from dataclasses import dataclass

import lmdb

from .errors import Invalid

FORMAT_REVISION = 2
FORMAT_REMOTE = 3
FORMAT_READABLE = (FORMAT_REVISION, FORMAT_REMOTE)
DB_NAMES = (
    b"super",
    b"counters",
    b"stats",
    b"inodes",
    b"dentries",
    b"dirents",
    b"links",
    b"lru",
    b"expiry",
    b"retiring",
    b"totals",
    b"lineage",
    b"quotas",
    b"symlinks",
    b"xattrs",
    b"bmap",
    b"blocks",
    b"free",
    b"orphans",
    b"incomplete",
    b"quarantine",
    b"remote",
    b"shared_queue",
)
ROOT_INO = 1
MAP_SIZE = 1 << 40  # address space only; the file grows with use

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U64x2 = struct.Struct(">QQ")
_DEV_OFF = struct.Struct(">HQ")
_INODE = struct.Struct(">IIIIQqqqIII")
_BLOCK = struct.Struct(">HQIIBI")
_TOTALS = struct.Struct(">qqqqq")
_LINEAGE = struct.Struct(">qIIIQ")
_QUOTA = struct.Struct(">QQ")
_QUARANTINE = struct.Struct(">HQIQQ")
TOTALS_KEY = b"totals"

# Inode flags
F_INCOMPLETE = 1  # created, never flushed: removed by recovery after a crash
F_COMPRESS = 2  # new blocks of this file are zstd-compressed
F_PINNED = 4  # never evicted or expired; on a directory, inherited by what is created in it


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


def path_parts(path: str | bytes) -> list[bytes]:
    """The names of a path relative to the root ('a//b/./c' -> [a, b, c]). Invalid for a
    string no bytes can spell (a lone surrogate that is not an escaped byte)."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        raise Invalid(f"{path!r} is not a path (it cannot be encoded)") from None
    return [p for p in raw.split(b"/") if p not in (b"", b".")]


def link_key(ino: int, parent: int, name: bytes) -> bytes:
    return _U64x2.pack(ino, parent) + name


def parse_link_key(b: bytes) -> tuple[int, int, bytes]:
    ino, parent = _U64x2.unpack(b[:16])
    return ino, parent, b[16:]


def time_key(t_ns: int, ino: int) -> bytes:
    """Key of the lru and expiry indexes: a time (clamped to the epoch), then the inode."""
    return _U64x2.pack(min(max(t_ns, 0), (1 << 64) - 1), ino)


def parse_time_key(b: bytes) -> tuple[int, int]:
    return _U64x2.unpack(b)


def free_key(dev: int, offset: int) -> bytes:
    return _DEV_OFF.pack(dev, offset)


def parse_free_key(b: bytes) -> tuple[int, int]:
    return _DEV_OFF.unpack(b)


HOLE = bytes(16)  # in a remote record: a block of zeros (no hash is 16 zero bytes in practice)


def remote_val(block_size: int, hashes: list[bytes | None]) -> bytes:
    return _U32.pack(block_size) + b"".join(HOLE if h is None else h for h in hashes)


def parse_remote_val(b: bytes) -> tuple[int, list[bytes | None]]:
    body = b[4:]
    hashes = [body[i:i + 16] for i in range(0, len(body), 16)]
    return _U32.unpack(b[:4])[0], [None if h == HOLE else h for h in hashes]


def queue_val(ino: int, published_ns: int) -> bytes:
    return _U64x2.pack(ino, published_ns)


def parse_queue_val(b: bytes) -> tuple[int, int]:
    return _U64x2.unpack(b)


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
    ttl: int = 0  # seconds after the last access that the file expires; 0: never

    def pack(self) -> bytes:
        return _INODE.pack(
            self.mode, self.nlink, self.uid, self.gid, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev, self.flags, self.ttl,
        )

    @classmethod
    def unpack(cls, ino: int, b: bytes) -> "Inode":
        return cls(ino, *_INODE.unpack(b))


def evict_keys(inode: Inode | None) -> tuple[bytes | None, bytes | None]:
    """The (lru, expiry) index keys of an inode. Only complete, linked, unpinned regular
    files may be evicted; of those, the ones with a ttl also expire. The access time is
    the eviction clock (utime(2) moves a file in the order, as it should)."""
    if (inode is None or not stat.S_ISREG(inode.mode) or inode.nlink == 0
            or inode.flags & (F_INCOMPLETE | F_PINNED)):
        return None, None
    lru = time_key(inode.atime_ns, inode.ino)
    expiry = time_key(inode.atime_ns + inode.ttl * 1_000_000_000, inode.ino) if inode.ttl else None
    return lru, expiry


def inode_totals(inode: Inode | None) -> tuple[int, int]:
    """(files, file bytes) an inode adds to the totals: linked regular files count."""
    if inode is None or not stat.S_ISREG(inode.mode) or inode.nlink == 0:
        return 0, 0
    return 1, inode.size


@dataclass
class Totals:
    """Sums kept in step with every inode and block record (so statistics never scan).

    files, file_bytes: linked regular files and their sizes (holes included);
    block_bytes: raw bytes of the stored blocks (each once); stored_bytes: what they take
    on the devices; referenced_bytes: raw bytes times references (what files would take
    without deduplication). Deduplication ratio referenced/block, compression block/stored.
    """
    files: int = 0
    file_bytes: int = 0
    block_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0

    def pack(self) -> bytes:
        return _TOTALS.pack(self.files, self.file_bytes, self.block_bytes, self.stored_bytes,
                            self.referenced_bytes)

    @classmethod
    def unpack(cls, b: bytes | None) -> "Totals":
        return cls() if b is None else cls(*_TOTALS.unpack(b))


@dataclass
class Lineage:
    """Who made a file and how much it is used (kvfs ls/find)."""
    created_ns: int
    uid: int
    gid: int
    pid: int
    opens: int = 0
    comm: bytes = b""  # the creating process's name (/proc/PID/comm), at most 16 bytes

    def pack(self) -> bytes:
        return _LINEAGE.pack(self.created_ns, self.uid, self.gid, self.pid, self.opens) + self.comm[:16]

    @classmethod
    def unpack(cls, b: bytes) -> "Lineage":
        return cls(*_LINEAGE.unpack(b[:_LINEAGE.size]), b[_LINEAGE.size:])


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


@dataclass
class Quarantined:
    """A block's stored copy that failed verification (see the quarantine sub-database)."""

    dev: int
    offset: int
    stored_len: int
    time_ns: int
    ino: int
    reason: str

    def pack(self) -> bytes:
        return _QUARANTINE.pack(self.dev, self.offset, self.stored_len, self.time_ns, self.ino) + self.reason.encode()[:512]

    @classmethod
    def unpack(cls, b: bytes) -> "Quarantined":
        b = bytes(b)
        return cls(*_QUARANTINE.unpack(b[:_QUARANTINE.size]), b[_QUARANTINE.size:].decode(errors="replace"))


# Shapes of every sub-database's records: (key length, value length); an int is exact, a
# (min,) tuple a least length, None anything. verify_records checks every record against it.
RECORD_SHAPES = {
    "super": (None, (2,)), "counters": (None, 8), "stats": (None, 8), "totals": (None, _TOTALS.size),
    "inodes": (8, _INODE.size), "dentries": ((9,), 16), "dirents": (16, (1,)), "links": ((17,), 0),
    "lru": (16, 0), "expiry": (16, 0), "retiring": (8, (9,)), "lineage": (8, (_LINEAGE.size,)),
    "quotas": (8, _QUOTA.size), "symlinks": (8, None), "xattrs": ((9,), None), "bmap": (16, 16),
    "blocks": (16, _BLOCK.size), "free": (_DEV_OFF.size, 8), "orphans": (8, 0),
    "incomplete": (8, (9,)), "quarantine": (16, (_QUARANTINE.size,)), "remote": (8, (4,)),
    "shared_queue": (8, 16),
}


def _fits(shape, n: int) -> bool:
    return shape is None or (n == shape if isinstance(shape, int) else n >= shape[0])


def verify_records(path: str) -> dict:
    """Read every record of the environment at `path` and check its shape (and the
    superblock's JSON). Returns {"records": N, "problems": [...]}; opening or reading errors
    are problems too. LMDB does not checksum its pages, so damage that keeps every shape
    is not found here; what it is found by is fsck's cross-checks and block hashes.
    Run it in a child process (fsck does): LMDB's C code may crash on a damaged page."""
    problems: list[str] = []
    records = 0
    try:
        meta = Meta(path, readonly=True)
    except (lmdb.Error, ValueError, OSError) as exc:
        return {"records": 0, "problems": [f"cannot open: {exc}"]}
    try:
        meta.quick_check(path)
        with meta.begin() as txn:
            for name, db in meta.db.items():
                kshape, vshape = RECORD_SHAPES.get(name, (None, None))
                try:
                    for key, val in txn.cursor(db=db):
                        records += 1
                        if not _fits(kshape, len(key)) or not _fits(vshape, len(val)):
                            problems.append(f"{name}: record {bytes(key[:24]).hex()} has the wrong shape "
                                            f"({len(key)}-byte key, {len(val)}-byte value)")
                            if len(problems) > 100:
                                return {"records": records, "problems": problems}
                except lmdb.Error as exc:
                    problems.append(f"{name}: cannot be read to the end: {exc}")
            for key in (b"superblock", b"state"):
                try:
                    if meta.get_json(txn, key) is None and key == b"superblock":
                        problems.append("the superblock is missing")
                except ValueError as exc:
                    problems.append(f"super: {key.decode()} is not JSON ({exc})")
    except (lmdb.Error, ValueError) as exc:
        problems.append(str(exc))
    finally:
        meta.close()
    return {"records": records, "problems": problems}


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: str, path: str, keep: str | None = None) -> None:
    """Give directory `new` the name `path`. The directory there before is renamed to
    `keep` (replacing it), or removed. A crash between the two renames leaves `new` whole
    under its own name."""
    import shutil

    old = keep or path + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(new, path)
    if keep is None:
        shutil.rmtree(old, ignore_errors=True)


def verify_in_child(path: str) -> dict:
    """verify_records of the environment at `path`, run in a child process: a damaged
    page can crash LMDB's C code, and that must not take the caller with it. A child killed
    by a signal means damage; a child that fails otherwise (it could not start, say) is an
    OSError: nothing is known about the metadata then."""
    import subprocess
    import sys

    code = "import json, sys; from kvfs.meta import verify_records; print(json.dumps(verify_records(sys.argv[1])))"
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    if res.returncode < 0:
        return {"records": 0, "problems": [f"reading it crashed (signal {-res.returncode})"]}
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise OSError(f"the metadata check could not run: {last}")
    return json.loads(res.stdout)


def block_totals(rec: BlockRecord | None) -> tuple[int, int, int]:
    """(block bytes, stored bytes, referenced bytes) a block record adds to the totals."""
    if rec is None:
        return 0, 0, 0
    return rec.raw_len, rec.stored_len, rec.raw_len * rec.refcount


class Meta:
    """The LMDB environment of a warehouse and its named sub-databases."""

    def __init__(self, path: str, readonly: bool = False):
        self._batches: dict[int, dict] = {}  # id(write txn) -> what it keeps in memory (batch)
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
            try:
                self.db[name.decode()] = self.env.open_db(name, create=not readonly)
            except lmdb.NotFoundError:
                # Read-only open of another format revision: the superblock check of the
                # caller says what is wrong (it needs only b"super").
                if name == b"super":
                    raise

    def quick_check(self, path: str) -> None:
        """Cheap checks that a mount makes before trusting the environment (ValueError if
        it is damaged): the data file holds every page the meta page names (a short file
        would be a SIGBUS at the first read past its end), and every sub-database's first
        record can be reached. The whole check is verify_records (fsck)."""
        data = os.path.join(path, "data.mdb")
        need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        have = os.path.getsize(data)
        if have < need:
            raise ValueError(f"{data} is {have} bytes; its pages need {need} (truncated)")
        with self.begin() as txn:
            for name, db in self.db.items():
                with txn.cursor(db=db) as cur:
                    cur.first()

    def begin(self, write: bool = False) -> lmdb.Transaction:
        return self.env.begin(write=write)

    def sync(self) -> None:
        self.env.sync(True)

    def copy_to(self, path: str) -> None:
        """A consistent, compacted copy of the environment in a new directory `path`,
        synced (replace_dir then gives it its name)."""
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o700)
        self.env.copy(path, compact=True)
        fsync_file(os.path.join(path, "data.mdb"))

    def close(self) -> None:
        self.env.close()

    # -- small helpers used by several layers -------------------------------------------

    def get_json(self, txn, key: bytes):
        raw = txn.get(key, db=self.db["super"])
        return None if raw is None else json.loads(raw)

    def put_json(self, txn, key: bytes, value) -> None:
        txn.put(key, json.dumps(value, sort_keys=True).encode(), db=self.db["super"])

    def next_counter(self, txn, name: bytes, start: int) -> int:
        batch = self._batches.get(id(txn)) if self._batches else None
        if batch is not None:
            counters = batch["counters"]
            if name not in counters:
                raw = txn.get(name, db=self.db["counters"])
                counters[name] = start if raw is None else parse_u64(raw)
            value = counters[name]
            counters[name] = value + 1
            return value
        raw = txn.get(name, db=self.db["counters"])
        value = start if raw is None else parse_u64(raw)
        txn.put(name, u64(value + 1), db=self.db["counters"])
        return value

    def get_stats(self, txn) -> dict[str, int]:
        return {k.decode(): parse_u64(v) for k, v in txn.cursor(db=self.db["stats"])}

    def put_stats(self, txn, stats: dict[str, int]) -> None:
        for name, value in stats.items():
            txn.put(name.encode(), u64(value), db=self.db["stats"])

    def get_inode(self, txn, ino: int) -> Inode | None:
        raw = txn.get(ino_key(ino), db=self.db["inodes"])
        return None if raw is None else Inode.unpack(ino, raw)

    def put_inode(self, txn, inode: Inode) -> None:
        """Store an inode and keep what is derived from it in step: the eviction indexes,
        the totals and the usage of the quota directories above its names."""
        key = ino_key(inode.ino)
        raw = txn.get(key, db=self.db["inodes"])
        old = Inode.unpack(inode.ino, raw) if raw is not None else None
        self._reindex(txn, old, inode)
        txn.put(key, inode.pack(), db=self.db["inodes"])
        (f0, b0), (f1, b1) = inode_totals(old), inode_totals(inode)
        self._add_totals(txn, files=f1 - f0, file_bytes=b1 - b0)
        if old is not None and stat.S_ISREG(inode.mode) and inode.size != old.size and self.has_quotas(txn):
            for parent, _ in self.names_of(txn, inode.ino):
                self._quota_add(txn, self.quota_roots(txn, parent), inode.size - old.size)

    @contextlib.contextmanager
    def batch(self, txn):
        """Within it, write transaction `txn` keeps what thousands of small changes would
        each read and write again in memory, and writes it once at the end: the totals,
        the counters (next inode, next entry) and the extents taken out of the free map
        (adjacent ones taken out as one). Nothing in it may read the totals or the free map."""
        batch = self._batches[id(txn)] = {"totals": {}, "counters": {}, "taken": []}
        try:
            yield
        finally:
            del self._batches[id(txn)]
        self._add_totals(txn, **batch["totals"])
        for name, value in batch["counters"].items():
            txn.put(name, u64(value), db=self.db["counters"])
        runs: list = []
        for dev, off, length in sorted(batch["taken"]):
            if runs and runs[-1][0] == dev and runs[-1][1] + runs[-1][2] == off:
                runs[-1][2] += length
                runs[-1][3].append((dev, off, length))
            else:
                runs.append([dev, off, length, [(dev, off, length)]])
        from .errors import Corrupt

        for dev, off, length, parts in runs:
            try:
                self.free_remove(txn, dev, off, length)
            except Corrupt:  # not inside one free extent as a whole: piece by piece
                for part in parts:
                    self.free_remove(txn, *part)

    def _add_totals(self, txn, **delta) -> None:
        if not any(delta.values()):
            return
        batch = self._batches.get(id(txn)) if self._batches else None
        if batch is not None:
            totals = batch["totals"]
            for name, d in delta.items():
                totals[name] = totals.get(name, 0) + d
            return
        t = Totals.unpack(txn.get(TOTALS_KEY, db=self.db["totals"]))
        for name, d in delta.items():
            setattr(t, name, getattr(t, name) + d)
        txn.put(TOTALS_KEY, t.pack(), db=self.db["totals"])

    def get_totals(self, txn) -> Totals:
        return Totals.unpack(txn.get(TOTALS_KEY, db=self.db["totals"]))

    def get_lineage(self, txn, ino: int) -> Lineage | None:
        raw = txn.get(ino_key(ino), db=self.db["lineage"])
        return None if raw is None else Lineage.unpack(raw)

    def put_lineage(self, txn, ino: int, lineage: Lineage) -> None:
        txn.put(ino_key(ino), lineage.pack(), db=self.db["lineage"])

    # -- quotas: a directory's usage is the sum of the sizes of the regular-file names
    #    below it (a file with two names there counts twice); add_link, remove_link and
    #    put_inode keep it.

    def has_quotas(self, txn) -> bool:
        return txn.stat(self.db["quotas"])["entries"] > 0

    def get_quota(self, txn, ino: int) -> tuple[int, int] | None:
        raw = txn.get(ino_key(ino), db=self.db["quotas"])
        return None if raw is None else _QUOTA.unpack(raw)

    def set_quota(self, txn, ino: int, limit: int | None) -> None:
        """Give directory `ino` a quota of `limit` bytes (None: none); its usage is
        counted now."""
        if limit is None:
            txn.delete(ino_key(ino), db=self.db["quotas"])
        else:
            txn.put(ino_key(ino), _QUOTA.pack(limit, self.tree_usage(txn, ino)), db=self.db["quotas"])

    def quota_roots(self, txn, directory: int) -> list[int]:
        """The directories with a quota at or above `directory`."""
        out, seen = [], set()
        d = directory
        while d not in seen:
            seen.add(d)
            if txn.get(ino_key(d), db=self.db["quotas"]) is not None:
                out.append(d)
            names = self.names_of(txn, d) if d != ROOT_INO else []
            if not names:  # the root, or a directory being retired
                break
            d = names[0][0]
        return out

    def tree_usage(self, txn, ino: int) -> int:
        """What inode `ino` counts in a quota: its size, or all below a directory."""
        inode = self.get_inode(txn, ino)
        if inode is None:
            return 0
        if stat.S_ISREG(inode.mode):
            return inode.size
        if not stat.S_ISDIR(inode.mode):
            return 0
        total, stack = 0, [ino]
        while stack:
            d = stack.pop()
            for key, name in self.iter_prefix(txn, "dirents", ino_key(d)):
                raw = txn.get(dentry_key(d, name), db=self.db["dentries"])
                child = raw and self.get_inode(txn, parse_dentry_val(raw)[0])
                if child and stat.S_ISREG(child.mode):
                    total += child.size
                elif child and stat.S_ISDIR(child.mode):
                    stack.append(child.ino)
        return total

    def _quota_add(self, txn, roots: list[int], delta: int) -> None:
        for r in roots:
            limit, usage = self.get_quota(txn, r)
            txn.put(ino_key(r), _QUOTA.pack(limit, max(0, usage + delta)), db=self.db["quotas"])

    def _reindex(self, txn, old: Inode | None, new: Inode | None) -> None:
        for dbname, o, n in zip(("lru", "expiry"), evict_keys(old), evict_keys(new)):
            if o != n:
                if o is not None:
                    txn.delete(o, db=self.db[dbname])
                if n is not None:
                    txn.put(n, b"", db=self.db[dbname])

    def add_link(self, txn, ino: int, parent: int, name: bytes) -> None:
        txn.put(link_key(ino, parent, name), b"", db=self.db["links"])
        if self.has_quotas(txn):
            self._quota_add(txn, self.quota_roots(txn, parent), self.tree_usage(txn, ino))

    def remove_link(self, txn, ino: int, parent: int, name: bytes) -> None:
        txn.delete(link_key(ino, parent, name), db=self.db["links"])
        if self.has_quotas(txn):
            self._quota_add(txn, self.quota_roots(txn, parent), -self.tree_usage(txn, ino))

    def names_of(self, txn, ino: int) -> list[tuple[int, bytes]]:
        """Every (parent, name) under which inode `ino` is linked."""
        return [parse_link_key(k)[1:] for k, _ in self.iter_prefix(txn, "links", ino_key(ino))]

    def path_of(self, txn, ino: int) -> str:
        """One path of inode `ino` from the root (for messages); "<unlinked inode N>" if
        it has no name."""
        parts: list[bytes] = []
        while ino != ROOT_INO and len(parts) < 4096:
            names = self.names_of(txn, ino)
            if not names:
                return f"<unlinked inode {ino}>" + ("/" + os.fsdecode(b"/".join(reversed(parts))) if parts else "")
            ino, name = names[0]
            parts.append(name)
        return "/" + os.fsdecode(b"/".join(reversed(parts)))

    def get_block(self, txn, h: bytes) -> BlockRecord | None:
        raw = txn.get(h, db=self.db["blocks"])
        return None if raw is None else BlockRecord.unpack(raw)

    def put_block(self, txn, h: bytes, rec: BlockRecord) -> None:
        old = self.get_block(txn, h)
        txn.put(h, rec.pack(), db=self.db["blocks"])
        self._add_block_totals(txn, old, rec)

    def delete_block(self, txn, h: bytes) -> None:
        old = self.get_block(txn, h)
        txn.delete(h, db=self.db["blocks"])
        self._add_block_totals(txn, old, None)
        self.delete_quarantine(txn, h)

    # Quarantine: stored copies of blocks that failed verification.
    def put_quarantine(self, txn, h: bytes, q: "Quarantined") -> None:
        txn.put(h, q.pack(), db=self.db["quarantine"])

    def get_quarantine(self, txn, h: bytes) -> "Quarantined | None":
        db = self.db.get("quarantine")  # absent in a read-only open of an older warehouse
        raw = None if db is None else txn.get(h, db=db)
        return None if raw is None else Quarantined.unpack(raw)

    def delete_quarantine(self, txn, h: bytes) -> None:
        txn.delete(h, db=self.db["quarantine"])

    def iter_quarantine(self, txn):
        """(hash, Quarantined) of every quarantined block."""
        db = self.db.get("quarantine")
        if db is None:
            return
        for h, raw in txn.cursor(db=db):
            yield bytes(h), Quarantined.unpack(raw)

    def _add_block_totals(self, txn, old: BlockRecord | None, new: BlockRecord | None) -> None:
        (r0, s0, f0), (r1, s1, f1) = block_totals(old), block_totals(new)
        self._add_totals(txn, block_bytes=r1 - r0, stored_bytes=s1 - s0, referenced_bytes=f1 - f0)

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
        old = self.get_inode(txn, ino)
        self._reindex(txn, old, None)
        files, nbytes = inode_totals(old)
        self._add_totals(txn, files=-files, file_bytes=-nbytes)
        hashes = []
        for key, val in list(self.iter_prefix(txn, "bmap", prefix)):
            txn.delete(key, db=self.db["bmap"])
            hashes.append(val)
        for dbname in ("xattrs", "links"):
            for key, _ in list(self.iter_prefix(txn, dbname, prefix)):
                txn.delete(key, db=self.db[dbname])
        for name in ("symlinks", "orphans", "incomplete", "retiring", "lineage", "quotas", "remote", "inodes"):
            txn.delete(prefix, db=self.db[name])
        return hashes

    # -- free-extent map (the persistent half; kvfs.store keeps the in-memory half) -----

    def free_remove(self, txn, dev: int, offset: int, length: int) -> None:
        """Take [offset, offset+length) out of a free extent (it must lie inside one)."""
        from .errors import Corrupt

        batch = self._batches.get(id(txn)) if self._batches else None
        if batch is not None:
            batch["taken"].append((dev, offset, length))
            return
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
