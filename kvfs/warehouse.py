"""The warehouse: files, blocks, dedup and recovery behind a synchronous, thread-safe API.

Write path: a file's bytes are cut into fixed-size blocks. A block that is fully written is
hashed (xxh3-128), and either found already stored (dedup: nothing is written) or written to
a freshly allocated extent. Nothing becomes visible in metadata until the file is committed
(flush, fsync or close): then one LMDB transaction adds the new block records, points the
file's block map at them, adjusts reference counts and takes the new extents out of the
persistent free map. A crash before the commit leaves the previous version of the file (or,
for a file created and never closed, nothing: recovery removes it).

Blocks that an uncommitted file refers to are "held" in memory, so a concurrent unlink
that drops the last committed reference keeps the record (with refcount 0) until the commit
takes it or the hold goes away; recovery frees whatever is left at refcount 0.

Capacity: the warehouse is a cache. Above the high watermark the least recently used
unpinned files are evicted (names removed, data freed once nobody has them open) until use
is under the low watermark: in the background (evict_to_low_watermark, driven by the mount
daemon) and inline when a write finds no room. Access times are kept in memory and written
in batches at checkpoints; they are the eviction clock (the lru and expiry indexes of
kvfs.meta). Files under a directory with a ttl expire that long after their last access.
`kvfs retire` detaches a subtree at once and deletes it in short batches.

Read path: every block read from a device is verified against its hash before a byte of it
is returned; a mismatch raises Corrupt (EIO) and is remembered.

Shared tier: kvfs.shared_files (mixed in) holds the files whose data is still in the
shared object store and the queue of files published here to upload there.
"""

import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import logging
import os
import shutil
import stat
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass

from . import codec as codecs
from . import meta as M
from .errors import (
    Corrupt,
    Damaged,
    Exists,
    FileTooBig,
    Invalid,
    IsADirectory,
    KvfsError,
    NameTooLong,
    NoAttr,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    QuietError,
    QuotaExceeded,
    ReadOnly,
    EXIT_EXISTS,
    EXIT_IN_USE,
    EXIT_NEEDS_FSCK,
    EXIT_NO_WAREHOUSE,
    EXIT_USAGE,
)
from .shared_files import SharedFiles
from .store import DATA_START, Device, DeviceSet, Faults, prepare_device, round_up
from .units import parse_size

log = logging.getLogger("kvfs.warehouse")

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
MAX_FILE_SIZE = 1 << 50
DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_HIGH_WATERMARK = 0.90  # fractions of capacity: evict above high, down to low
DEFAULT_LOW_WATERMARK = 0.80
ACCESS_GRANULARITY_NS = 1_000_000_000  # an access time moves only if it moved this much
EVICT_BATCH = 128  # files removed per metadata transaction by eviction and expiry
INLINE_EVICT_BYTES = 32 << 20  # a writer that finds no room evicts at least this much
REAP_BATCH = 512  # entries deleted per transaction by retire
READ_AHEAD_BYTES = 8 << 20  # how far ahead of a sequential reader blocks are fetched into the block cache
READ_AHEAD_THREADS = 4  # threads reading ahead: the devices see this many reads at once (besides readers')
READ_AHEAD_UNUSED_S = 2.0  # blocks read ahead and not read within this long stop limiting read-ahead
READ_THROUGH_S = 30.0  # a file read to its end this recently is in the kernel's page cache: no read-ahead at open
CONTROL_NAME = b".kvfs"  # the control directory in the mount's root (kvfs.fs serves it)
PIN_XATTR = b"user.kvfs.pin"
TTL_XATTR = b"user.kvfs.ttl"
QUOTA_XATTR = b"user.kvfs.quota"
POLICY_XATTRS = (PIN_XATTR, TTL_XATTR, QUOTA_XATTR)  # kept in the inode or quotas, not as xattrs
BLOCK_CACHE_BYTES = 64 << 20
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
META_DIR = "meta"
POWER_CUT_DIR = "meta.power-cut"  # fault drills only: the metadata a power cut would leave
BACKUP_DIRS = ("meta.backup", "meta.backup.1")  # copies of the metadata, newest first
BACKUP_INTERVAL = 600.0  # seconds between metadata backups of a mounted warehouse
LOCK_FILE = "lock"
LOG_FILE = "kvfs.log"
DEFAULT_DEVICE = "data0.img"


def now_ns() -> int:
    return time.time_ns()


@functools.lru_cache(maxsize=64)
def _zero_hash(n: int) -> bytes:
    return codecs.block_hash(bytes(n))


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise Invalid(f"invalid name {name!r}")


@dataclass(frozen=True)
class Pending:
    """A block an open file refers to that is not committed yet."""

    hash: bytes
    dev: int
    offset: int
    stored_len: int
    raw_len: int
    codec: int
    own: bool  # True: this file allocated and wrote the extent; False: dedup onto a record


class OpenFile:
    """Uncommitted state of a regular file that has open handles."""

    def __init__(self, ino: int, size: int, codec: int):
        self.ino = ino
        self.size = size
        self.codec = codec
        self.handles = 0
        self.writers = 0  # handles open for writing: the file is never evicted meanwhile
        self.base_size = size  # the committed size
        self.pending = 0  # bytes of growth counted against quotas until the next commit
        self.quota_roots: list[int] | None = None  # quota directories above it, once known
        # Partially written blocks, in memory. A buffer holds the block's bytes up to the
        # last one written (or loaded); the rest of the block is zeros. A buffer of a whole
        # block per file would cost a block per open file with a few bytes written.
        self.dirty: dict[int, bytearray] = {}
        self.changes: dict[int, Pending | None] = {}  # stored blocks; None: a hole
        self.trunc_blocks: int | None = None  # committed blocks from here on are dropped
        self.changed = False
        self.mtime_ns = 0


@dataclass
class Handle:
    ino: int
    writable: bool
    append: bool
    read_end: int = 0  # where the last read on this handle ended (sequential detection)
    ahead: int = -1  # the highest block index read ahead for it


class _Fetching:
    """A block a read-ahead thread was asked to fetch. Whoever starts it first reads it
    (the read-ahead thread, or a reader that needs it now and finds it not started); later
    ones wait for `done` and take it from the block cache. Its read registration
    (read_begin) is ended exactly once (`ended`), by the read-ahead task, or where the task
    could not be started."""

    __slots__ = ("started", "ahead", "ended", "done")

    def __init__(self):
        self.started = False  # claimed, by a reader or by the read-ahead task
        self.ahead = False  # claimed by the read-ahead task
        self.ended = False
        self.done = threading.Event()


class Warehouse(SharedFiles):
    """An open warehouse. All public methods are thread-safe and raise KvfsError."""

    # -- creation --------------------------------------------------------------------

    @staticmethod
    def mkfs(path: str, devices: list[tuple[str, int | None]] | None = None,
               size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
               compression: str = "none", force: bool = False,
               high_watermark: float = DEFAULT_HIGH_WATERMARK,
               low_watermark: float = DEFAULT_LOW_WATERMARK) -> dict:
        """Make a new warehouse (kvfs mkfs). Returns its superblock."""
        path = os.path.abspath(path)
        if block_size < 4096 or block_size > (16 << 20) or block_size & (block_size - 1):
            raise QuietError(f"block size {block_size} must be a power of two from 4 KiB to 16 MiB", EXIT_USAGE)
        try:
            check_watermarks(high_watermark, low_watermark)
        except Invalid as exc:
            raise QuietError(str(exc), EXIT_USAGE) from None
        if compression not in codecs.CODEC_NAMES:
            raise QuietError(f"unknown codec {compression!r}", EXIT_USAGE)
        meta_dir = os.path.join(path, META_DIR)
        if os.path.exists(meta_dir):
            if not force:
                raise QuietError(f"{path} already holds a warehouse (use --force to replace it)", EXIT_EXISTS)
            lock_fd = _lock(path)  # refuse to wipe a mounted warehouse
            os.close(lock_fd)
            shutil.rmtree(meta_dir)
        os.makedirs(path, exist_ok=True)
        wh_uuid = str(uuidlib.uuid4())
        if not devices:
            devices = [(DEFAULT_DEVICE, size if size is not None else default_size(path))]
        devs = []
        for index, (dpath, dsize) in enumerate(devices):
            full = dpath if os.path.isabs(dpath) else os.path.join(path, dpath)
            real_size = prepare_device(full, dsize, wh_uuid, index, force or dpath == DEFAULT_DEVICE)
            devs.append({"path": dpath, "size": real_size})
        sb = {
            "format": M.FORMAT_REVISION,
            "uuid": wh_uuid,
            "block_size": block_size,
            "devices": devs,
            "compression": compression,
            "created": time.time(),
            "high_watermark": high_watermark,
            "low_watermark": low_watermark,
        }
        meta = M.Meta(meta_dir)
        os.chmod(meta_dir, 0o700)  # names, lineage and annotations are for root and the owner
        try:
            with meta.begin(write=True) as txn:
                meta.put_json(txn, b"superblock", sb)
                meta.put_json(txn, b"state", {"clean": True})
                for index, d in enumerate(devs):
                    txn.put(M.free_key(index, DATA_START), M.u64(d["size"] - DATA_START), db=meta.db["free"])
                t = now_ns()
                root = M.Inode(M.ROOT_INO, stat.S_IFDIR | 0o755, 2, os.getuid(), os.getgid(), 0, t, t, t)
                meta.put_inode(txn, root)
                txn.put(b"next_ino", M.u64(M.ROOT_INO + 1), db=meta.db["counters"])
                txn.put(b"next_entry", M.u64(1), db=meta.db["counters"])
            meta.sync()
        finally:
            meta.close()
        return sb

    # -- opening, recovery, closing ---------------------------------------------------

    def __init__(self, path: str, readonly: bool = False, mountpoint: str | None = None,
                 compression: str | None = None, durability: str = "fsync",
                 check_only: bool = False, lock_fd: int | None = None):
        """Open (and lock) a warehouse. A read-write open runs recovery if the warehouse was
        not closed cleanly; check_only opens it read-only as it is (for fsck). lock_fd: the
        warehouse lock, already taken by the caller (_lock); this open owns it from then."""
        readonly = readonly or check_only
        self.path = os.path.abspath(path)
        meta_dir = os.path.join(self.path, META_DIR)
        if not os.path.isdir(meta_dir):
            raise QuietError(f"{self.path} is not a kvfs warehouse (no {META_DIR}/; run kvfs mkfs)", EXIT_NO_WAREHOUSE)
        self._lock_fd = _lock(self.path) if lock_fd is None else lock_fd
        try:
            self._open_meta(meta_dir, readonly)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.readonly = readonly
        self.durability = durability
        self._lock = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._open: dict[int, OpenFile] = {}
        self._held: dict[bytes, int] = collections.Counter()
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._fetching: dict[bytes, _Fetching] = {}  # blocks being read ahead (_cache_lock)
        # Blocks read ahead into the cache and not read yet -> when (_cache_lock)
        self._unused: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._served: dict[bytes, int] = {}  # bytes of a cached block answered so far (_cache_lock)
        self._read_through: dict[int, float] = {}  # ino -> when a read last reached its end (_lock)
        self._ahead_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.bad_blocks: set[tuple[bytes, int, int]] = set()  # (hash, device, offset)
        # Inodes whose unpublished changes were dropped: a client (the kernel) may cache
        # bytes or attributes that are no longer true and must be told (take_discarded).
        self.discarded: set[int] = set()
        self.counters = collections.Counter()  # since this open; stats() adds the past
        self.default_codec = codecs.codec_by_name(compression or self.sb.get("compression", "none"))
        self.recovery: dict | None = None
        self.high_watermark = self.sb.get("high_watermark", DEFAULT_HIGH_WATERMARK)
        self.low_watermark = self.sb.get("low_watermark", DEFAULT_LOW_WATERMARK)
        self._accessed: dict[int, int] = {}  # ino -> ns: access times not yet written
        self._opens: dict[int, int] = collections.Counter()  # ino -> opens not yet counted
        # Quotas: bytes that open files have grown by and not committed, per quota directory.
        self._quota_pending: dict[int, int] = collections.Counter()
        # Set when use passes the high watermark: the mount daemon's evictor waits on it.
        self.pressure = threading.Event()
        # Called (outside any lock) with [(parent, name, ino)] of names that the warehouse
        # removed by itself (eviction, expiry, retire): the FUSE layer tells the kernel.
        self.on_removed = None
        try:
            if not readonly:
                with self.meta.begin(write=True) as txn:
                    state = self.meta.get_json(txn, b"state") or {}
                    if not state.get("clean", False):
                        self.recovery = self._recover(txn)
                    self.meta.put_json(txn, b"state", {
                        "clean": False, "pid": os.getpid(), "mountpoint": mountpoint,
                        "since": time.time(),
                    })
                self._sync_meta()
            elif not check_only:
                with self.meta.begin() as txn:
                    state = self.meta.get_json(txn, b"state") or {}
                if not state.get("clean", False):
                    raise QuietError(
                        f"{self.path} was not cleanly unmounted; mount it read-write once "
                        "(recovery runs) or run kvfs fsck before a read-only mount",
                        EXIT_NEEDS_FSCK,
                    )
            self._load_free_maps()  # after recovery: it frees extents in the persistent map
            with self.meta.begin() as txn:
                for h, q in self.meta.iter_quarantine(txn):
                    self.bad_blocks.add((h, q.dev, q.offset))
                self._stats_base = self.meta.get_stats(txn)
                # Writes check quotas only while some exist (set_quota keeps this true).
                self._quotas_exist = self.meta.has_quotas(txn)
        except BaseException:
            self.devices.close()
            self.meta.close()
            os.close(self._lock_fd)
            raise

    def _open_meta(self, meta_dir: str, readonly: bool) -> None:
        import lmdb

        self.meta = None
        try:
            self.meta = M.Meta(meta_dir, readonly=readonly)
            self.meta.quick_check(meta_dir)
            with self.meta.begin() as txn:
                sb = self.meta.get_json(txn, b"superblock")
        except (lmdb.Error, ValueError) as exc:
            if self.meta is not None:
                self.meta.close()
            raise QuietError(f"{self.path}: metadata is damaged ({exc}); run kvfs fsck {self.path} "
                             "(--repair restores the newest metadata backup)", EXIT_NEEDS_FSCK) from None
        if sb is None:
            self.meta.close()
            raise QuietError(f"{self.path}: no superblock; not a kvfs warehouse or damaged (run kvfs fsck)", EXIT_NEEDS_FSCK)
        if sb.get("format") not in M.FORMAT_READABLE:
            self.meta.close()
            raise QuietError(
                f"{self.path}: format revision {sb.get('format')} is not supported "
                f"(this kvfs reads revisions {', '.join(map(str, M.FORMAT_READABLE))})", EXIT_NO_WAREHOUSE)
        self.sb = sb
        self.block_size = sb["block_size"]
        devs = []
        try:
            for index, d in enumerate(sb["devices"]):
                p = d["path"] if os.path.isabs(d["path"]) else os.path.join(self.path, d["path"])
                devs.append(Device(index, p, d["size"], sb["uuid"], readonly=readonly))
        except BaseException:
            for d in devs:
                d.close()
            self.meta.close()
            raise
        self.devices = DeviceSet(devs, Faults.from_env())

    def _load_free_maps(self) -> None:
        from .store import FreeMap

        self.devices.free = [FreeMap() for _ in self.devices.devices]
        with self.meta.begin() as txn:
            for key, val in txn.cursor(db=self.meta.db["free"]):
                dev, off = M.parse_free_key(key)
                self.devices.free[dev].add(off, M.parse_u64(val))

    def _recover(self, txn) -> dict:
        """Bring metadata to a clean state after a crash (called in a write txn)."""
        report = {"incomplete_files": 0, "orphans": 0, "unreferenced_blocks": 0}
        effects: list = []
        db = self.meta.db
        for key, _ in list(txn.cursor(db=db["incomplete"])):
            self.drop_incomplete(txn, M.parse_u64(key), effects)
            report["incomplete_files"] += 1
        report["orphans"] = self._purge_orphans(txn, effects)
        for key, val in list(txn.cursor(db=db["blocks"])):
            rec = M.BlockRecord.unpack(val)
            if rec.refcount == 0:  # nothing is held at open: _settle frees it
                self._settle(txn, key, rec, effects, collections.Counter())
                report["unreferenced_blocks"] += 1
        log.warning("recovered after unclean shutdown: %s", report)
        return report

    def drop_incomplete(self, txn, ino: int, effects: list, removed: list | None = None) -> None:
        """Remove a file that was created and never flushed (recovery, gc); its name goes
        to `removed` for the kernel to be told."""
        db = self.meta.db
        val = txn.get(M.ino_key(ino), db=db["incomplete"])
        parent, name = M.parse_u64(val[:8]), val[8:]
        dv = txn.get(M.dentry_key(parent, name), db=db["dentries"])
        if dv is not None and M.parse_dentry_val(dv)[0] == ino:
            self._remove_entry(txn, parent, name)
            if removed is not None:
                removed.append((parent, name, ino))
        txn.delete(M.ino_key(ino), db=db["incomplete"])
        inode = self.meta.get_inode(txn, ino)
        if inode is not None:
            inode.nlink = max(0, inode.nlink - 1)
            if inode.nlink == 0:
                self._purge_inode(txn, ino, effects, collections.Counter())
            else:
                self.meta.put_inode(txn, inode)

    def purge_unlinked(self, txn, ino: int, effects: list) -> None:
        """Delete an unlinked inode kept for an open file that is gone (gc)."""
        self._purge_inode(txn, ino, effects, collections.Counter())

    def is_open(self, ino: int) -> bool:
        return ino in self._open

    def held_blocks(self) -> set[bytes]:
        """Blocks that files being written refer to before their commit."""
        with self._lock:
            return set(self._held)

    def maintain(self, fn):
        """Run fn(txn, effects, removed) under the lock in one write transaction, then give
        back the extents it listed in effects [(device, offset, length)] and tell the
        kernel about the names it listed in removed [(parent, name, ino)] (gc)."""
        self._check_writable()
        effects: list = []
        removed: list = []
        with self._lock:
            with self.meta.begin(write=True) as txn:
                result = fn(txn, effects, removed)
            self._apply(effects)
        self._notify_removed(removed)
        return result

    @contextlib.contextmanager
    def snapshot(self):
        """A read transaction and, taken at the same instant, the blocks that files being
        written hold and the inodes that are open (gc scans them without the lock)."""
        with self._lock:
            txn = self.meta.begin()
            held, open_inos = set(self._held), set(self._open)
        try:
            yield txn, held, open_inos
        finally:
            txn.abort()

    def close(self) -> None:
        """Commit every open file, mark the warehouse clean and release it."""
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                if not self.readonly:
                    for of in list(self._open.values()):
                        try:
                            self._commit(of)
                        except KvfsError as exc:
                            log.error("commit of inode %d at close failed, its unpublished "
                                      "changes are dropped: %s", of.ino, exc)
                        self._discard(of)
                    self._flush_access()
                    # Unlinked inodes kept for open files go now: nothing is open any more.
                    # Holds left now are an upload's that did not finish (the shared tier
                    # gave up waiting for it): nothing will release them, and a block only
                    # they kept must not stay as an unreferenced record of a clean warehouse.
                    with self.meta.begin(write=True) as txn:
                        self._purge_orphans(txn, [])
                        effects: list = []
                        for h in list(self._held):
                            del self._held[h]
                            rec = self.meta.get_block(txn, h)
                            if rec is not None and rec.refcount == 0:
                                self._settle(txn, h, rec, effects, collections.Counter())
                        self.meta.put_stats(txn, self.stats_totals())
                    # Clean only once the data is durable: a device that fails its sync
                    # leaves the warehouse unclean, and the next mount recovers.
                    self._sync_devices()
                    with self.meta.begin(write=True) as txn:
                        self.meta.put_json(txn, b"state", {"clean": True})
                    self._sync_meta()
                    try:
                        self.backup_meta()
                    except OSError as exc:
                        log.error("metadata backup at unmount failed: %s", exc)
            finally:
                if self._ahead_pool is not None:  # its reads end before the devices close
                    self._ahead_pool.shutdown(wait=True)
                self.devices.close()
                self.meta.close()
                os.close(self._lock_fd)
                self._lock_fd = -1

    def checkpoint(self) -> None:
        """Make everything committed so far durable: device data first, then metadata."""
        with self._lock:
            if self.readonly or self._lock_fd < 0:
                return
            self._flush_access()
            with self.meta.begin(write=True) as txn:
                self.meta.put_stats(txn, self.stats_totals())
            self._sync_devices()
            self._sync_meta()
            self.devices.checkpointed()

    def backup_meta(self, only_if_missing: bool = False) -> str | None:
        """Copy the metadata (a consistent, compacted snapshot; writers are not held up) to
        the newest backup directory, keeping the one before it. fsck --repair falls back to
        them when the metadata is damaged. Returns the backup's path (None if skipped)."""
        import shutil

        newest, older = (os.path.join(self.path, d) for d in BACKUP_DIRS)
        if self.readonly or (only_if_missing and os.path.isdir(newest)):
            return None
        t0 = time.monotonic()
        tmp = newest + ".new"
        self.meta.copy_to(tmp)
        check = M.verify_in_child(tmp)  # a copy of damaged metadata must not push out a good one
        if check["problems"]:
            shutil.rmtree(tmp, ignore_errors=True)
            log.error("metadata backup not kept: the copy does not read back whole (%s); the metadata "
                      "itself may be damaged: unmount and run kvfs fsck", check["problems"][0])
            return None
        M.replace_dir(tmp, newest, keep=older)
        log.info("metadata backed up to %s in %.2f s", newest, time.monotonic() - t0)
        return newest

    def _sync_devices(self) -> None:
        try:
            self.devices.sync()
        except KvfsError:
            self.counters["device_errors"] += 1
            raise

    def _sync_meta(self) -> None:
        """Make committed metadata durable. Under a volatile-write-cache fault drill, also
        keep a copy of it as it is now: what a power cut would leave (see store.Faults)."""
        self.meta.sync()
        faults = self.devices.faults
        if faults is not None and faults.volatile:
            path = os.path.join(self.path, POWER_CUT_DIR)
            self.meta.copy_to(path + ".tmp")
            M.replace_dir(path + ".tmp", path)

    # -- helpers ----------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnly("read-only mount")

    def _get_inode(self, txn, ino: int) -> M.Inode:
        inode = self.meta.get_inode(txn, ino)
        if inode is None:
            raise NotFound(f"inode {ino} does not exist")
        return inode

    def _live(self, inode: M.Inode) -> M.Inode:
        of = self._open.get(inode.ino)
        if of is not None and of.changed:
            inode.size = of.size
            inode.mtime_ns = of.mtime_ns
            inode.ctime_ns = max(inode.ctime_ns, of.mtime_ns)
        return inode

    def _get_dir(self, txn, ino: int) -> M.Inode:
        inode = self._get_inode(txn, ino)
        if not stat.S_ISDIR(inode.mode):
            raise NotADirectory(f"inode {ino} is not a directory")
        if inode.nlink == 0:
            raise NotFound("directory was removed")
        return inode

    def _find(self, txn, parent: int, name: bytes) -> tuple[int, int] | None:
        raw = txn.get(M.dentry_key(parent, name), db=self.meta.db["dentries"])
        return None if raw is None else M.parse_dentry_val(raw)

    def _add_entry(self, txn, parent: int, name: bytes, ino: int, entry_id: int | None = None) -> None:
        if entry_id is None:
            entry_id = self.meta.next_counter(txn, b"next_entry", 1)
        db = self.meta.db
        if not txn.put(M.dentry_key(parent, name), M.dentry_val(ino, entry_id), db=db["dentries"], overwrite=False):
            raise Exists(f"{name!r} exists")
        txn.put(M.dirent_key(parent, entry_id), name, db=db["dirents"])
        self.meta.add_link(txn, ino, parent, name)

    def _remove_entry(self, txn, parent: int, name: bytes) -> int:
        db = self.meta.db
        key = M.dentry_key(parent, name)
        raw = txn.get(key, db=db["dentries"])
        if raw is None:
            raise NotFound(f"{name!r} not found")
        ino, entry_id = M.parse_dentry_val(raw)
        txn.delete(key, db=db["dentries"])
        txn.delete(M.dirent_key(parent, entry_id), db=db["dirents"])
        self.meta.remove_link(txn, ino, parent, name)
        return ino

    def _touch_dir(self, txn, parent: M.Inode, t: int, nlink_delta: int = 0) -> None:
        parent.mtime_ns = parent.ctime_ns = t
        parent.nlink += nlink_delta
        self.meta.put_inode(txn, parent)

    def _in_use(self, ino: int) -> bool:
        # Only open files need an unlinked inode's data: the kernel reads and writes
        # through open handles (mmap holds one too), so a name the kernel merely still
        # caches does not keep space that an unlink or an eviction gave back.
        return ino in self._open

    def _drop_link(self, txn, inode: M.Inode, t: int, effects: list) -> None:
        inode.nlink -= 1
        if stat.S_ISDIR(inode.mode):
            inode.nlink = 0
        inode.ctime_ns = t
        if inode.nlink > 0:
            self.meta.put_inode(txn, inode)
        elif self._in_use(inode.ino):
            self.meta.put_inode(txn, inode)
            txn.put(M.ino_key(inode.ino), b"", db=self.meta.db["orphans"])
        else:
            self._purge_inode(txn, inode.ino, effects, collections.Counter())

    def _purge_inode(self, txn, ino: int, effects: list, releasing) -> None:
        for h in self.meta.delete_inode_records(txn, ino):
            self._decref(txn, h, effects, releasing)

    def _purge_orphans(self, txn, effects: list) -> int:
        """Purge every unlinked inode that was kept for a reference now gone."""
        orphans = [M.parse_u64(key) for key, _ in txn.cursor(db=self.meta.db["orphans"])]
        for ino in orphans:
            self._purge_inode(txn, ino, effects, collections.Counter())
        return len(orphans)

    def _decref(self, txn, h: bytes, effects: list, releasing) -> None:
        rec = self.meta.get_block(txn, h)
        if rec is None or rec.refcount == 0:
            # Metadata was already inconsistent: there is nothing to free. Failing here
            # would turn it into a failed unlink, unmount or recovery; fsck repairs it.
            self.counters["refcount_errors"] += 1
            log.error("block %s: a reference was dropped that was not counted; run kvfs fsck --repair", h.hex())
            return
        rec.refcount -= 1
        self._settle(txn, h, rec, effects, releasing)

    def _settle(self, txn, h: bytes, rec: M.BlockRecord, effects: list, releasing) -> None:
        """Store `rec`, or free it if nothing refers to it and no open file pins it."""
        if rec.refcount == 0 and self._held.get(h, 0) - releasing.get(h, 0) <= 0:
            self._free_block(txn, h, rec, effects)
        else:
            self.meta.put_block(txn, h, rec)

    def _free_block(self, txn, h: bytes, rec: M.BlockRecord, effects: list) -> None:
        """Delete block `h`'s record (its quarantine record goes with it) and give its
        extent back: to the free map now, to the allocator by _apply(effects)."""
        self.meta.delete_block(txn, h)
        self._free_copy(txn, h, rec.dev, rec.offset, rec.stored_len, effects)

    def _free_copy(self, txn, h: bytes, dev: int, off: int, length: int, effects: list) -> None:
        """Give back the extent of a stored copy of block `h` that nothing names any more."""
        self.bad_blocks.discard((h, dev, off))
        self.meta.free_add(txn, dev, off, round_up(length))
        effects.append((dev, off, length))

    def _apply(self, effects: list) -> None:
        for dev, off, length in effects:
            self.devices.release(dev, off, length)

    def _new_inode(self, txn, mode: int, uid: int, gid: int, parent: M.Inode, rdev: int = 0) -> M.Inode:
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        t = now_ns()
        ino = self.meta.next_counter(txn, b"next_ino", M.ROOT_INO + 1)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        flags = parent.flags & M.F_PINNED  # pin and ttl are inherited from the directory
        codec = self._dir_codec(txn, parent)
        if codec == codecs.CODEC_ZSTD:
            flags |= M.F_COMPRESS
        return M.Inode(ino, mode, nlink, uid, gid, 0, t, t, t, rdev, flags, parent.ttl)

    def _dir_codec(self, txn, parent: M.Inode) -> int:
        raw = txn.get(M.xattr_key(parent.ino, b"user.kvfs.compress"), db=self.meta.db["xattrs"])
        if raw is not None:
            try:
                return codecs.codec_by_name(raw.decode().strip())
            except (Invalid, UnicodeDecodeError):
                pass
        return self.default_codec

    # -- namespace --------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> M.Inode:
        if len(name) > NAME_MAX:
            raise NameTooLong("name too long")
        with self._lock, self.meta.begin() as txn:
            self._get_dir(txn, parent)
            found = self._find(txn, parent, name)
            if found is None:
                self.counters["lookup_miss"] += 1
                raise NotFound(f"{name!r} not found")
            self.counters["lookup_hit"] += 1
            return self._live(self._get_inode(txn, found[0]))

    def getattr(self, ino: int) -> M.Inode:
        with self._lock, self.meta.begin() as txn:
            return self._live(self._get_inode(txn, ino))

    def _maybe_purge(self, ino: int) -> None:
        if self.readonly or self._in_use(ino):
            return
        with self.meta.begin() as txn:
            if txn.get(M.ino_key(ino), db=self.meta.db["orphans"]) is None:
                return
        effects: list = []
        with self.meta.begin(write=True) as txn:
            self._purge_inode(txn, ino, effects, collections.Counter())
        self._apply(effects)

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              rdev: int = 0, target: bytes | None = None, incomplete: bool = False,
              pid: int = 0) -> M.Inode:
        check_name(name)
        self._check_writable()
        with self._lock, self.meta.begin(write=True) as txn:
            pdir = self._get_dir(txn, parent)
            if self._find(txn, parent, name) is not None:
                raise Exists(f"{name!r} exists")
            inode = self._new_inode(txn, mode, uid, gid, pdir, rdev)
            self._add_entry(txn, parent, name, inode.ino)
            if target is not None:
                inode.size = len(target)
                txn.put(M.ino_key(inode.ino), target, db=self.meta.db["symlinks"])
            if incomplete:
                inode.flags |= M.F_INCOMPLETE
                txn.put(M.ino_key(inode.ino), M.u64(parent) + name, db=self.meta.db["incomplete"])
            self.meta.put_inode(txn, inode)
            self.meta.put_lineage(txn, inode.ino, M.Lineage(inode.ctime_ns, uid, gid, pid, 0, _process_name(pid)))
            self._touch_dir(txn, pdir, inode.ctime_ns, 1 if stat.S_ISDIR(mode) else 0)
            return inode

    # uid, gid and pid are the caller's: the new inode's owner, and its lineage record.

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              pid: int = 0) -> M.Inode:
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise Invalid("unsupported file type")
        return self._make(parent, name, mode, uid, gid, rdev, pid=pid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, pid: int = 0) -> M.Inode:
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, pid=pid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, pid: int = 0) -> M.Inode:
        if len(target) > 4095:
            raise NameTooLong("symlink target too long")
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target, pid=pid)

    def readlink(self, ino: int) -> bytes:
        with self.meta.begin() as txn:
            target = txn.get(M.ino_key(ino), db=self.meta.db["symlinks"])
        if target is None:
            raise Invalid("not a symbolic link")
        return target

    def link(self, ino: int, new_parent: int, new_name: bytes) -> M.Inode:
        check_name(new_name)
        self._check_writable()
        with self._lock, self.meta.begin(write=True) as txn:
            inode = self._get_inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise KvfsError("hard links to directories are not allowed", errno.EPERM)
            if inode.nlink == 0:
                raise NotFound("file was removed")
            pdir = self._get_dir(txn, new_parent)
            self._add_entry(txn, new_parent, new_name, ino)
            t = now_ns()
            inode.nlink += 1
            inode.ctime_ns = t
            # A second name makes the file part of the namespace for good.
            if txn.delete(M.ino_key(ino), db=self.meta.db["incomplete"]):
                inode.flags &= ~M.F_INCOMPLETE
            self.meta.put_inode(txn, inode)
            self._touch_dir(txn, pdir, t)
            return self._live(inode)

    def unlink(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, directory=False)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._remove(parent, name, directory=True)

    def _remove(self, parent: int, name: bytes, directory: bool) -> None:
        self._check_writable()
        effects: list = []
        with self._lock:
            with self.meta.begin(write=True) as txn:
                pdir = self._get_dir(txn, parent)
                found = self._find(txn, parent, name)
                if found is None:
                    raise NotFound(f"{name!r} not found")
                inode = self._get_inode(txn, found[0])
                is_dir = stat.S_ISDIR(inode.mode)
                if is_dir and not directory:
                    raise IsADirectory(f"{name!r} is a directory")
                if directory and not is_dir:
                    raise NotADirectory(f"{name!r} is not a directory")
                if is_dir and self._dir_has_entries(txn, inode.ino):
                    raise NotEmpty(f"{name!r} is not empty")
                self._remove_entry(txn, parent, name)
                t = now_ns()
                self._touch_dir(txn, pdir, t, -1 if is_dir else 0)
                self._drop_link(txn, inode, t, effects)
            self._apply(effects)

    def _dir_has_entries(self, txn, ino: int) -> bool:
        for _ in self.meta.iter_prefix(txn, "dentries", M.ino_key(ino)):
            return True
        return False

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        check_name(new_name)
        self._check_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise Invalid("bad rename flags")
        effects: list = []
        db = self.meta.db
        with self._lock:
            with self.meta.begin(write=True) as txn:
                opdir = self._get_dir(txn, old_parent)
                npdir = opdir if new_parent == old_parent else self._get_dir(txn, new_parent)
                src = self._find(txn, old_parent, old_name)
                if src is None:
                    raise NotFound(f"{old_name!r} not found")
                dst = self._find(txn, new_parent, new_name)
                src_inode = self._get_inode(txn, src[0])
                src_dir = stat.S_ISDIR(src_inode.mode)
                t = now_ns()
                if flags & RENAME_EXCHANGE:
                    if dst is None:
                        raise NotFound(f"{new_name!r} not found")
                    dst_inode = self._get_inode(txn, dst[0])
                    txn.put(M.dentry_key(old_parent, old_name), M.dentry_val(dst[0], src[1]), db=db["dentries"])
                    txn.put(M.dentry_key(new_parent, new_name), M.dentry_val(src[0], dst[1]), db=db["dentries"])
                    if src[0] != dst[0]:  # two names of one inode: its links stay as they are
                        self.meta.remove_link(txn, src[0], old_parent, old_name)
                        self.meta.remove_link(txn, dst[0], new_parent, new_name)
                        self.meta.add_link(txn, src[0], new_parent, new_name)
                        self.meta.add_link(txn, dst[0], old_parent, old_name)
                    if old_parent != new_parent:
                        delta = int(src_dir) - int(stat.S_ISDIR(dst_inode.mode))
                        opdir.nlink -= delta
                        npdir.nlink += delta
                    for node in (src_inode, dst_inode):
                        node.ctime_ns = t
                        self.meta.put_inode(txn, node)
                    self._move_incomplete(txn, src[0], new_parent, new_name)
                    self._move_incomplete(txn, dst[0], old_parent, old_name)
                else:
                    if dst is not None:
                        if flags & RENAME_NOREPLACE:
                            raise Exists(f"{new_name!r} exists")
                        if dst[0] == src[0]:
                            return  # two names of one inode: POSIX says do nothing
                        dst_inode = self._get_inode(txn, dst[0])
                        dst_dir = stat.S_ISDIR(dst_inode.mode)
                        if src_dir and not dst_dir:
                            raise NotADirectory(f"{new_name!r} is not a directory")
                        if dst_dir and not src_dir:
                            raise IsADirectory(f"{new_name!r} is a directory")
                        if dst_dir and self._dir_has_entries(txn, dst[0]):
                            raise NotEmpty(f"{new_name!r} is not empty")
                        self._remove_entry(txn, new_parent, new_name)
                        if dst_dir:
                            npdir.nlink -= 1
                        self._drop_link(txn, dst_inode, t, effects)
                    self._remove_entry(txn, old_parent, old_name)
                    # A replaced name keeps its readdir offset: it never stops existing, so
                    # a listing taken meanwhile must show it once, not again at the end.
                    self._add_entry(txn, new_parent, new_name, src[0], dst[1] if dst is not None else None)
                    if src_dir and old_parent != new_parent:
                        opdir.nlink -= 1
                        npdir.nlink += 1
                    src_inode.ctime_ns = t
                    self.meta.put_inode(txn, src_inode)
                    self._move_incomplete(txn, src[0], new_parent, new_name)
                self._touch_dir(txn, opdir, t)
                if npdir is not opdir:
                    self._touch_dir(txn, npdir, t)
            self._apply(effects)
            if self.shared is not None:  # a file under its new name is published there
                self.share_later(src[0])
                if flags & RENAME_EXCHANGE:
                    self.share_later(dst[0])

    def _move_incomplete(self, txn, ino: int, parent: int, name: bytes) -> None:
        db = self.meta.db["incomplete"]
        if txn.get(M.ino_key(ino), db=db) is not None:
            txn.put(M.ino_key(ino), M.u64(parent) + name, db=db)

    def readdir(self, ino: int, start_id: int, limit: int = 512) -> list[tuple[bytes, M.Inode, int]]:
        """Entries after offset `start_id`: (name, inode, offset of the next entry)."""
        out = []
        with self._lock, self.meta.begin() as txn:
            self._get_dir(txn, ino)
            start = M.dirent_key(ino, start_id + 1)
            for key, name in self.meta.iter_prefix(txn, "dirents", M.ino_key(ino), start):
                _, entry_id = M.parse_dirent_key(key)
                found = self._find(txn, ino, name)
                if found is None:
                    continue
                out.append((name, self._live(self._get_inode(txn, found[0])), entry_id))
                if len(out) >= limit:
                    break
        return out

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> M.Inode:
        self._check_writable()
        if size is not None:
            self.prepare_resize(ino, size)  # a remote file's data: dropped (size 0) or fetched
        with self._lock:
            t = now_ns()
            if size is not None:
                if size < 0 or size > MAX_FILE_SIZE:
                    raise FileTooBig(f"size {size} out of range") if size > 0 else Invalid("negative size")
                with self.meta.begin() as txn:
                    inode = self._get_inode(txn, ino)
                if stat.S_ISDIR(inode.mode):
                    raise IsADirectory("cannot truncate a directory")
                if not stat.S_ISREG(inode.mode):
                    raise Invalid("cannot truncate this file type")
                of = self._file(inode)
                try:
                    self._truncate(of, size)
                    of.mtime_ns = t
                    of.changed = True
                    self._commit(of)
                except KvfsError:
                    if of.handles == 0:
                        self._discard(of)  # the truncate failed: nothing of it remains
                    raise
                finally:
                    self._maybe_close(of)
            with self.meta.begin(write=True) as txn:
                inode = self._get_inode(txn, ino)
                if mode is not None:
                    inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
                if uid is not None:
                    inode.uid = uid
                if gid is not None:
                    inode.gid = gid
                if atime_ns is not None:
                    inode.atime_ns = atime_ns
                    self._accessed.pop(ino, None)  # an explicit time wins over an earlier use
                if mtime_ns is not None:
                    inode.mtime_ns = mtime_ns
                    of = self._open.get(ino)
                    if of is not None:
                        of.mtime_ns = mtime_ns
                inode.ctime_ns = t
                self.meta.put_inode(txn, inode)
                return self._live(inode)

    # -- extended attributes ------------------------------------------------------------
    #
    # user.kvfs.pin and user.kvfs.ttl are not stored as attributes: they read and write
    # the inode's pin flag and ttl, which the eviction indexes are derived from. Set on a
    # directory, they apply to everything below it, now and (inherited) later.

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self.meta.begin() as txn:
            inode = self._get_inode(txn, ino)
            if name == PIN_XATTR and inode.flags & M.F_PINNED:
                return b"1"
            if name == TTL_XATTR and inode.ttl:
                return str(inode.ttl).encode()
            quota = self.meta.get_quota(txn, ino) if name == QUOTA_XATTR else None
            if quota is not None:
                return str(quota[0]).encode()
            val = None if name in POLICY_XATTRS else txn.get(M.xattr_key(ino, name), db=self.meta.db["xattrs"])
        if val is None:
            raise NoAttr(f"no attribute {name!r}")
        return val

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._check_writable()
        if not name or len(name) > XATTR_NAME_MAX:
            raise KvfsError("attribute name out of range", errno.ERANGE)
        if len(value) > XATTR_SIZE_MAX:
            raise KvfsError("attribute value too large", errno.E2BIG)
        if name == PIN_XATTR:
            return self.set_pin(ino, _parse_flag(value))
        if name == TTL_XATTR:
            return self.set_ttl(ino, _parse_ttl(value))
        if name == QUOTA_XATTR:
            return self.set_quota(ino, _parse_quota(value))
        if name == b"user.kvfs.compress":
            codecs.codec_by_name(value.decode(errors="replace").strip())
        with self._lock, self.meta.begin(write=True) as txn:
            inode = self._get_inode(txn, ino)
            txn.put(M.xattr_key(ino, name), value, db=self.meta.db["xattrs"])
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)
        if self.shared is not None and name.startswith(b"user."):
            self.share_later(ino)  # annotations are part of what is shared

    def listxattr(self, ino: int) -> list[bytes]:
        with self.meta.begin() as txn:
            inode = self._get_inode(txn, ino)
            prefix = M.ino_key(ino)
            names = [k[8:] for k, _ in self.meta.iter_prefix(txn, "xattrs", prefix)]
            quota = self.meta.get_quota(txn, ino)
        if inode.flags & M.F_PINNED:
            names.append(PIN_XATTR)
        if inode.ttl:
            names.append(TTL_XATTR)
        if quota is not None:
            names.append(QUOTA_XATTR)
        return names

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_writable()
        if name in POLICY_XATTRS:
            self.getxattr(ino, name)  # ENODATA when not set
            if name == QUOTA_XATTR:
                return self.set_quota(ino, None)
            return self.set_pin(ino, False) if name == PIN_XATTR else self.set_ttl(ino, 0)
        with self._lock, self.meta.begin(write=True) as txn:
            inode = self._get_inode(txn, ino)
            if not txn.delete(M.xattr_key(ino, name), db=self.meta.db["xattrs"]):
                raise NoAttr(f"no attribute {name!r}")
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)

    def set_pin(self, ino: int, pinned: bool) -> int:
        """Pin (never evict or expire) or unpin a file, or a directory and all below it.
        Returns the number of inodes changed."""
        def change(inode: M.Inode) -> bool:
            flags = inode.flags | M.F_PINNED if pinned else inode.flags & ~M.F_PINNED
            inode.flags, old = flags, inode.flags
            return flags != old
        return self._apply_to_tree(ino, change)

    def set_ttl(self, ino: int, ttl: int) -> int:
        """Make a file, or a directory and all below it, expire `ttl` seconds after the
        last access (0: never). Returns the number of inodes changed."""
        def change(inode: M.Inode) -> bool:
            inode.ttl, old = ttl, inode.ttl
            return ttl != old
        return self._apply_to_tree(ino, change)

    def set_quota(self, ino: int, limit: int | None) -> None:
        """Limit what may be stored below directory `ino` to `limit` bytes of file sizes
        (None: no limit); growing past it fails with EDQUOT. Its usage is counted now."""
        self._check_writable()
        with self._lock, self.meta.begin(write=True) as txn:
            inode = self._get_inode(txn, ino)
            if not stat.S_ISDIR(inode.mode):
                raise NotADirectory("a quota is set on a directory")
            self.meta.set_quota(txn, ino, limit)
            self._quotas_exist = self.meta.has_quotas(txn)
            inode.ctime_ns = now_ns()
            self.meta.put_inode(txn, inode)
            for of in self._open.values():  # quota directories above open files may change
                if not of.pending:
                    of.quota_roots = None

    def _charge(self, of: OpenFile, new_size: int) -> None:
        """Count `of` growing to `new_size` against the quotas above it, QuotaExceeded if
        that would pass one; a shrink gives back what was counted."""
        if not of.pending and not self._quotas_exist:
            return
        pending = max(0, new_size - of.base_size)
        delta = pending - of.pending
        if not delta:
            return
        with self.meta.begin() as txn:
            if of.quota_roots is None:
                of.quota_roots = sorted({r for parent, _ in self.meta.names_of(txn, of.ino)
                                         for r in self.meta.quota_roots(txn, parent)})
            for r in of.quota_roots if delta > 0 else ():
                limit, usage = self.meta.get_quota(txn, r) or (1 << 63, 0)
                if usage + self._quota_pending[r] + delta > limit:
                    self.counters["quota_refusals"] += 1
                    raise QuotaExceeded(f"quota of directory inode {r} ({limit} bytes) would be exceeded")
        for r in of.quota_roots:
            self._quota_pending[r] += delta
        of.pending = pending

    def _settle_quota(self, of: OpenFile, committed_size: int) -> None:
        """The file's size is committed (or back to the committed one): its growth is in
        the quotas' usage now, not pending."""
        for r in of.quota_roots or ():
            self._quota_pending[r] -= of.pending
        of.pending = 0
        of.base_size = committed_size

    def _apply_to_tree(self, ino: int, change) -> int:
        """Apply change(inode) -> changed to `ino` and, for a directory, to every inode
        below it, REAP_BATCH entries per transaction with the lock let go in between (a
        big tree does not stall other clients). What is created meanwhile inherits from
        its directory, which is changed before its entries are visited."""
        self._check_writable()
        changed = 0
        with self._lock, self.meta.begin(write=True) as txn:
            inode = self._get_inode(txn, ino)
            if change(inode):
                inode.ctime_ns = now_ns()
                self.meta.put_inode(txn, inode)
                changed += 1
        stack = [(ino, 0)] if stat.S_ISDIR(inode.mode) else []  # (directory, last entry id)
        while stack:
            with self._lock, self.meta.begin(write=True) as txn:
                budget = REAP_BATCH
                while stack and budget:
                    d, last = stack[-1]
                    entry = next(self.meta.iter_prefix(txn, "dirents", M.ino_key(d), M.dirent_key(d, last + 1)), None)
                    if entry is None:
                        stack.pop()
                        continue
                    stack[-1] = (d, M.parse_dirent_key(entry[0])[1])
                    found = self._find(txn, d, entry[1])
                    child = None if found is None else self.meta.get_inode(txn, found[0])
                    budget -= 1
                    if child is None:
                        continue
                    if change(child):
                        self.meta.put_inode(txn, child)
                        changed += 1
                    if stat.S_ISDIR(child.mode):
                        stack.append((child.ino, 0))
        return changed

    # -- space --------------------------------------------------------------------------

    def statfs(self) -> dict:
        with self.meta.begin() as txn:
            inodes = txn.stat(self.meta.db["inodes"])["entries"]
            blocks = txn.stat(self.meta.db["blocks"])["entries"]
        capacity = self.devices.capacity
        free = self.devices.free_bytes
        return {
            "capacity": capacity,
            "free": free,
            "used": capacity - free,
            "inodes": inodes,
            "blocks": blocks,
            "block_size": self.block_size,
            "devices": [
                {"index": d.index, "path": d.path, "size": d.size - DATA_START, "free": f.free_bytes,
                 "reads": d.reads, "read_bytes": d.read_bytes, "writes": d.writes,
                 "write_bytes": d.write_bytes}
                for d, f in zip(self.devices.devices, self.devices.free)
            ],
        }

    # -- capacity: access times, eviction, expiry, retire --------------------------------

    def _flush_access(self) -> None:
        """Write the access times gathered since the last flush, in one transaction: the
        eviction order costs no metadata write per read."""
        if self.readonly or not self._accessed:
            return
        with self._lock:
            accessed, self._accessed = self._accessed, {}
            opens, self._opens = self._opens, collections.Counter()
            with self.meta.begin(write=True) as txn:
                for ino, t in accessed.items():
                    inode = self.meta.get_inode(txn, ino)
                    if inode is None:
                        continue
                    if t - inode.atime_ns >= ACCESS_GRANULARITY_NS:
                        inode.atime_ns = t
                        self.meta.put_inode(txn, inode)
                    lineage = self.meta.get_lineage(txn, ino) if opens[ino] else None
                    if lineage is not None:
                        lineage.opens += opens[ino]
                        self.meta.put_lineage(txn, ino, lineage)

    def _allocate(self, length: int, prefer: int) -> tuple[int, int]:
        """An extent for `length` bytes. A full warehouse makes room by evicting, inline;
        NoSpace only when all that is left is pinned or open."""
        loc = self.devices.allocate(length, prefer)
        deadline = time.monotonic() + 5.0
        while loc is None:
            # Freed extents are reusable once the free is durable (a checkpoint) and no
            # read that started before it still runs.
            self.checkpoint()
            loc = self.devices.allocate(length, prefer)
            if loc is not None:
                break
            files, _ = self._evict(max(length, INLINE_EVICT_BYTES), "evicted")
            if not files and not (time.monotonic() < deadline and self.devices.wait_readers(0.5)):
                free = self.devices.free_bytes
                if free >= round_up(length):
                    log.warning("no free extent of %d bytes although %d bytes are free: the free "
                                "space is fragmented between pinned or open files", length, free)
                    raise NoSpace(f"no free extent of {length} bytes: free space ({free} bytes) is "
                                  "fragmented between pinned or open files")
                raise NoSpace("warehouse is full: everything stored is pinned or open")
            loc = self.devices.allocate(length, prefer)
        if self.over_high_watermark():
            self.pressure.set()
        return loc

    def _evict(self, want: int, reason: str, deadline_ns: int | None = None) -> tuple[int, int]:
        """Remove up to EVICT_BATCH files, least recently used first (with deadline_ns:
        files whose ttl ran out by then), until `want` bytes are freed. A file open for
        writing is skipped; one open for reading loses its name now and its data at the
        last close. Returns (files removed, bytes freed)."""
        if self.readonly:
            return 0, 0
        index = "lru" if deadline_ns is None else "expiry"
        effects: list = []
        removed: list = []
        files = freed = logical = 0
        with self._lock:
            self._flush_access()  # recent reads move files away from the front
            with self.meta.begin(write=True) as txn:
                victims = []
                for key, _ in txn.cursor(db=self.meta.db[index]):
                    t, ino = M.parse_time_key(key)
                    if deadline_ns is not None and t > deadline_ns:
                        break
                    of = self._open.get(ino)
                    if of is not None and (of.writers or of.changed or of.changes or of.dirty):
                        continue
                    victims.append(ino)
                    if len(victims) >= EVICT_BATCH:
                        break
                for ino in victims:
                    if freed >= want:
                        break
                    before = len(effects)
                    logical += self._remove_names(txn, ino, effects, removed).size
                    files += 1
                    freed += sum(round_up(e[2]) for e in effects[before:])
            self._apply(effects)
            self.counters[f"{reason}_files"] += files
            self.counters[f"{reason}_bytes"] += logical
        if files:
            log.info("%s %d files (%d bytes stored, %d freed)", reason, files, logical, freed)
        self._notify_removed(removed)
        return files, freed

    def _remove_names(self, txn, ino: int, effects: list, removed: list) -> M.Inode:
        """Unlink every name of `ino` (its data goes now, or at its last close)."""
        inode = self._get_inode(txn, ino)
        names = self.meta.names_of(txn, ino)
        if not names:
            log.error("inode %d is indexed for eviction but has no name; dropping it (run kvfs fsck)", ino)
            inode.nlink = 1
            names = [(None, None)]
        t = now_ns()
        for parent, name in names:
            if parent is not None:
                self._remove_entry(txn, parent, name)
                pdir = self.meta.get_inode(txn, parent)
                if pdir is not None:
                    self._touch_dir(txn, pdir, t)
                removed.append((parent, name, ino))
            self._drop_link(txn, inode, t, effects)
        return inode

    def _notify_removed(self, removed: list) -> None:
        if removed and self.on_removed is not None:
            try:
                self.on_removed(removed)
            except Exception:
                log.exception("telling the kernel about %d removed names failed", len(removed))

    def over_high_watermark(self) -> bool:
        return self.devices.used_bytes > self.high_watermark * self.devices.capacity

    def evict_to_low_watermark(self) -> tuple[int, int]:
        """Evict until use is under the low watermark (the mount daemon's evictor calls
        this when `pressure` is set). Returns (files, bytes freed)."""
        total_files = total_freed = 0
        while not self.readonly:
            excess = self.devices.used_bytes - int(self.low_watermark * self.devices.capacity)
            if excess <= 0:
                break
            files, freed = self._evict(excess, "evicted")
            if not files:
                break
            total_files += files
            total_freed += freed
            self.checkpoint()  # what was freed becomes reusable for writers
        return total_files, total_freed

    def expire(self) -> int:
        """Remove every file whose ttl ran out; returns how many."""
        total = 0
        while True:
            now = now_ns()
            with self.meta.begin() as txn:
                cur = txn.cursor(db=self.meta.db["expiry"])
                if not cur.first() or M.parse_time_key(cur.key())[0] > now:
                    return total
            files, _ = self._evict(1 << 62, "expired", deadline_ns=now)
            if not files:
                return total
            total += files

    def set_watermarks(self, high: float | None = None, low: float | None = None) -> tuple[float, float]:
        """Change the watermarks (kept in the superblock); eviction follows at once."""
        self._check_writable()
        with self._lock:
            high = self.high_watermark if high is None else high
            low = self.low_watermark if low is None else low
            check_watermarks(high, low)
            with self.meta.begin(write=True) as txn:
                sb = self.meta.get_json(txn, b"superblock")
                sb["high_watermark"], sb["low_watermark"] = high, low
                self.meta.put_json(txn, b"superblock", sb)
            self.sb = sb
            self.high_watermark, self.low_watermark = high, low
        if self.over_high_watermark():
            self.pressure.set()
        return high, low

    def resolve(self, path: str | bytes) -> tuple[int, bytes, int]:
        """(parent, name, inode) of a path relative to the root, e.g. 'models/llama'."""
        parts = M.path_parts(path)
        if not parts:
            raise Invalid("the root itself has no name")
        if b".." in parts:
            raise Invalid("'..' is not allowed in a warehouse path")
        for part in parts:
            check_name(part)
        ino = M.ROOT_INO
        with self.meta.begin() as txn:
            for part in parts:
                parent = ino
                self._get_dir(txn, parent)
                found = self._find(txn, parent, part)
                if found is None:
                    raise NotFound(f"{os.fsdecode(path)}: no such file or directory")
                ino = found[0]
        return parent, parts[-1], ino

    def exists_many(self, paths: list[str], uid: int, gid: int) -> list[bool]:
        """Whether each path (relative to the root) names something, as far as a caller
        with `uid` and `gid` may know: every directory on the way must let it search, as
        the kernel would check for a lookup (supplementary groups are not known here, so
        this may say no where a lookup would find). One read transaction for the batch."""
        searchable: dict[int, bool] = {}

        def may_search(txn, ino: int) -> bool:
            if ino not in searchable:
                d = self.meta.get_inode(txn, ino)
                bit = 0 if d is None or not stat.S_ISDIR(d.mode) else (
                    0o111 if uid == 0 else 0o100 if uid == d.uid else 0o010 if gid == d.gid else 0o001)
                searchable[ino] = bool(d is not None and d.mode & bit)
            return searchable[ino]

        out = []
        with self.meta.begin() as txn:
            for path in paths:
                try:
                    parts = M.path_parts(path)
                except Invalid:  # no bytes spell it: no file has that name
                    parts = []
                ino, found = M.ROOT_INO, bool(parts) and b".." not in parts
                for part in parts if found else ():
                    hit = may_search(txn, ino) and len(part) <= NAME_MAX and self._find(txn, ino, part)
                    if not hit:
                        found = False
                        break
                    ino = hit[0]
                out.append(found)
        hits = sum(out)
        self.counters["lookup_hit"] += hits
        self.counters["lookup_miss"] += len(out) - hits
        return out

    def retire(self, path: str | bytes) -> dict:
        """Remove `path` (relative to the root). A directory is detached at once (its name
        is gone, nothing can be created in it) and its subtree is deleted by reap(), in
        short batches; open files keep their data until their last close."""
        self._check_writable()
        parent, name, ino = self.resolve(path)
        effects: list = []
        with self._lock:
            with self.meta.begin(write=True) as txn:
                found = self._find(txn, parent, name)
                if found is None:
                    raise NotFound(f"{os.fsdecode(path)}: no such file or directory")
                inode = self._get_inode(txn, found[0])
                is_dir = stat.S_ISDIR(inode.mode)
                self._remove_entry(txn, parent, name)
                t = now_ns()
                self._touch_dir(txn, self._get_inode(txn, parent), t, -1 if is_dir else 0)
                if is_dir:
                    inode.nlink = 0
                    inode.ctime_ns = t
                    self.meta.put_inode(txn, inode)
                    txn.put(M.ino_key(inode.ino), M.u64(parent) + name, db=self.meta.db["retiring"])
                else:
                    self._drop_link(txn, inode, t, effects)
                    self.counters["retired_files"] += 1
                    self.counters["retired_bytes"] += inode.size
            self._apply(effects)
        self._notify_removed([(parent, name, inode.ino)])
        log.info("retired %s (inode %d%s)", os.fsdecode(path), inode.ino, ", a directory" if is_dir else "")
        return {"ino": inode.ino, "directory": is_dir}

    def retiring(self) -> list[int]:
        """Directories detached by retire whose subtrees are still being deleted."""
        with self.meta.begin() as txn:
            return [M.parse_u64(k) for k, _ in txn.cursor(db=self.meta.db["retiring"])]

    def reap(self, budget: int = REAP_BATCH) -> bool:
        """Delete up to `budget` entries of retired subtrees in one transaction, deepest
        first; returns True while retired subtrees remain. Restartable at any point (it
        keeps no state but the metadata), after a crash too."""
        if self.readonly:
            return False
        effects: list = []
        files = logical = 0
        db = self.meta.db
        with self._lock:
            with self.meta.begin(write=True) as txn:
                cur = txn.cursor(db=db["retiring"])
                if not cur.first():
                    return False
                t = now_ns()
                stack = [(M.parse_u64(cur.key()), None, None)]  # (directory, parent, name)
                while stack and budget > 0:
                    d, parent, name = stack[-1]
                    entry = next(self.meta.iter_prefix(txn, "dirents", M.ino_key(d)), None)
                    if entry is None:  # an empty directory: it goes too
                        stack.pop()
                        if parent is not None:
                            self._remove_entry(txn, parent, name)
                            pdir = self._get_inode(txn, parent)
                            # The detached root has nlink 0 already (nothing may be made in it).
                            self._touch_dir(txn, pdir, t, -1 if pdir.nlink else 0)
                        self._purge_inode(txn, d, effects, collections.Counter())
                        budget -= 1
                        continue
                    key, cname = entry
                    found = self._find(txn, d, cname)
                    if found is None:  # a readdir record without its entry
                        txn.delete(key, db=db["dirents"])
                        continue
                    child = self._get_inode(txn, found[0])
                    if stat.S_ISDIR(child.mode):
                        stack.append((child.ino, d, cname))
                        continue
                    self._remove_entry(txn, d, cname)
                    self._drop_link(txn, child, t, effects)
                    files += 1
                    logical += child.size
                    budget -= 1
                more = txn.cursor(db=db["retiring"]).first()
            self._apply(effects)
            self.counters["retired_files"] += files
            self.counters["retired_bytes"] += logical
        return more

    def stats_totals(self) -> dict[str, int]:
        """Counters over the warehouse's life: persisted ones plus this open's."""
        names = set(self._stats_base) | set(self.counters)
        return {n: self._stats_base.get(n, 0) + self.counters.get(n, 0) for n in sorted(names)}

    def stats(self) -> dict:
        """What `kvfs stat`, .kvfs/stats.json and the metrics show: nothing here scans."""
        st = self.statfs()
        with self.meta.begin() as txn:
            totals = self.meta.get_totals(txn)
            st["evictable_files"] = txn.stat(self.meta.db["lru"])["entries"]
            st["expiring_files"] = txn.stat(self.meta.db["expiry"])["entries"]
            st["retiring"] = txn.stat(self.meta.db["retiring"])["entries"]
            st["quotas"] = txn.stat(self.meta.db["quotas"])["entries"]
            qdb = self.meta.db.get("quarantine")  # (absent in a read-only open of an older warehouse)
            st["quarantined_blocks"] = txn.stat(qdb)["entries"] if qdb is not None else 0
            state = self.meta.get_json(txn, b"state") or {}
            counters = self.stats_totals()
            shared = self.shared_stats(txn, counters)
        hits, misses = counters.get("lookup_hit", 0), counters.get("lookup_miss", 0)
        st.update(
            warehouse=self.path,
            uuid=self.sb["uuid"],
            mountpoint=state.get("mountpoint") if not state.get("clean") else None,
            clean=bool(state.get("clean")),
            readonly=self.readonly,
            high_watermark=self.high_watermark,
            low_watermark=self.low_watermark,
            files=totals.files,
            file_bytes=totals.file_bytes,
            block_bytes=totals.block_bytes,
            stored_bytes=totals.stored_bytes,
            referenced_bytes=totals.referenced_bytes,
            dedup_ratio=round(totals.referenced_bytes / totals.block_bytes, 3) if totals.block_bytes else 1.0,
            compression_ratio=round(totals.block_bytes / totals.stored_bytes, 3) if totals.stored_bytes else 1.0,
            hit_rate=round(hits / (hits + misses), 4) if hits + misses else None,
            open_files=len(self._open),
            counters=counters,
            shared=shared,
        )
        return st

    # -- files --------------------------------------------------------------------------

    def _file(self, inode: M.Inode) -> OpenFile:
        of = self._open.get(inode.ino)
        if of is None:
            codec = codecs.CODEC_ZSTD if inode.flags & M.F_COMPRESS else codecs.CODEC_NONE
            of = OpenFile(inode.ino, inode.size, codec)
            of.mtime_ns = inode.mtime_ns
            self._open[inode.ino] = of
        return of

    def _maybe_close(self, of: OpenFile) -> None:
        if of.handles == 0 and not of.changed and not of.changes and not of.dirty:
            self._open.pop(of.ino, None)
            self._maybe_purge(of.ino)

    def open(self, ino: int, write: bool = False, append: bool = False) -> int:
        if write:
            self._check_writable()
        self.fill_remote(ino)  # data still in the shared tier is fetched first, not under the lock
        with self._lock, self.meta.begin() as txn:
            inode = self._get_inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise IsADirectory("is a directory")
            of = self._file(inode)
            of.handles += 1
            of.writers += write
            fh = self._next_fh
            self._next_fh += 1
            h = self._handles[fh] = Handle(ino, write, append)
            self._accessed[ino] = now_ns()
            self._opens[ino] += 1
            if not write and of.size and time.monotonic() - self._read_through.get(ino, -READ_THROUGH_S) >= READ_THROUGH_S:
                # Clients read cached KV whole: its first blocks are on their way from the
                # devices while the first read request is still in the kernel. Not for a
                # file read to its end lately: the kernel's page cache (keep_cache) has it,
                # no read request will come, and reading ahead would only cost CPU.
                h.ahead = self._read_ahead_locked(
                    ino, of, txn, 0, min(self._ahead_blocks(), -(-of.size // self.block_size)))
            return fh

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               pid: int = 0) -> tuple[int, M.Inode]:
        with self._lock:  # made and opened at once: never an unfinished file nobody has open
            inode = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid, incomplete=True, pid=pid)
            fh = self.open(inode.ino, write=True)
            self._open[inode.ino].changed = True  # the first commit marks it complete
        return fh, inode

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise KvfsError(f"bad file handle {fh}", errno.EBADF)
        return h

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            of = self._open[h.ino]
            of.handles -= 1
            of.writers -= h.writable
            try:
                if h.writable or of.changed:
                    try:
                        self._commit(of)
                    except KvfsError:
                        if of.handles == 0:
                            # Nobody can retry: drop what could not be published (the
                            # error already reached the client at flush) and its pins.
                            self._discard(of)
                        raise
                    if self.durability == "close":
                        self.checkpoint()
            finally:
                self._maybe_close(of)

    def flush(self, fh: int) -> None:
        with self._lock:
            h = self._handle(fh)
            if h.writable:
                self._commit(self._open[h.ino])

    def fsync(self, fh: int, datasync: bool = False) -> None:
        with self._lock:
            h = self._handle(fh)
            of = self._open[h.ino]
            if h.writable or of.changed:
                self._commit(of)
            self.checkpoint()

    # Resolving what a block index of a file holds, newest state first.
    def _resolve(self, txn, of: OpenFile | None, ino: int, idx: int):
        """Return ('buf', bytearray) | ('zero', None) | ('blk', (hash, dev, off, slen, rlen, codec))."""
        if of is not None:
            buf = of.dirty.get(idx)
            if buf is not None:
                return "buf", buf
            if idx in of.changes:
                p = of.changes[idx]
                if p is None:
                    return "zero", None
                return "blk", (p.hash, p.dev, p.offset, p.stored_len, p.raw_len, p.codec)
            if of.trunc_blocks is not None and idx >= of.trunc_blocks:
                return "zero", None
        h = txn.get(M.bmap_key(ino, idx), db=self.meta.db["bmap"])
        if h is None:
            return "zero", None
        rec = self.meta.get_block(txn, h)
        if rec is None:
            raise Corrupt(f"inode {ino} block {idx}: block {h.hex()} has no record")
        return "blk", (h, rec.dev, rec.offset, rec.stored_len, rec.raw_len, rec.codec)

    def _fetch(self, loc) -> bytes:
        """The verified bytes of a block: Damaged (EIO) if its stored copy fails
        verification or is quarantined, never data. The caller, once its read is over
        (read_end: a quarantine takes the lock, which an allocator waiting for running
        reads may hold), hands that to _quarantine. A block a read-ahead thread is reading
        is waited for; one it has not started yet is read here (and skipped there)."""
        h = loc[0]
        while True:
            with self._cache_lock:
                data = self._cache.get(h)
                if data is not None:
                    self._cache.move_to_end(h)
                    self._unused.pop(h, None)
                    self.counters["cache_hits"] += 1
                    return data
                job = self._fetching.get(h)
                if job is None or not job.started:
                    if job is not None:
                        job.started = True
                        self.counters["read_ahead_late"] += 1
                    break
                self.counters["read_ahead_waits"] += 1
            # Being read ahead: wait, then take it from the cache (or, if that read failed
            # or the block was pushed out of the cache already, read it here).
            job.done.wait()
        try:
            return self._read_block(loc)
        finally:
            if job is not None:
                self._fetched(h, job)

    def _fetched(self, h: bytes, job: _Fetching) -> None:
        with self._cache_lock:
            if self._fetching.get(h) is job:
                del self._fetching[h]
        job.done.set()

    def _read_block(self, loc, ahead: bool = False) -> bytes:
        """Read a block from its device, verify it and keep it in the block cache.
        ahead: for read-ahead (its failures are counted by the reader that reads again)."""
        h, dev, off, slen, rlen, codec = loc
        if (h, dev, off) in self.bad_blocks:
            raise Damaged(f"block {h.hex()} is quarantined (failed verification earlier)", loc)
        try:
            stored = self.devices.devices[dev].pread(slen, off)
        except Corrupt as exc:  # (a short read)
            raise Damaged(str(exc), loc) from None
        except KvfsError:
            if not ahead:
                self.counters["device_errors"] += 1
            raise
        try:
            data = codecs.decode(stored, codec, rlen, h)
        except Corrupt as exc:
            raise Damaged(str(exc), loc) from None
        self.counters["device_reads"] += 1
        with self._cache_lock:
            if h not in self._cache:
                self._cache[h] = data
                self._cache_bytes += len(data)
                if ahead:
                    self._unused[h] = time.monotonic()
                while self._cache_bytes > BLOCK_CACHE_BYTES:
                    old_h, old = self._cache.popitem(last=False)
                    self._cache_bytes -= len(old)
                    self._served.pop(old_h, None)
                    if self._unused.pop(old_h, None) is not None:
                        self.counters["read_ahead_wasted"] += 1
        return data

    def _ahead_blocks(self) -> int:
        return max(1, min(32, READ_AHEAD_BYTES // self.block_size))

    def _read_ahead_locked(self, ino: int, of: OpenFile, txn, first: int, stop: int) -> int:
        """Have the read-ahead threads fetch blocks first..stop-1 of a file into the block
        cache; returns the last index dealt with (queued, cached or in flight already, or
        a hole), first - 1 if none. Called under the lock whose transaction `txn` resolves
        them, so that no free of theirs is reused before their reads are registered
        (read_begin, each its own). Advisory: it stops early when as much as half the block
        cache is in flight or read ahead and not read yet (many readers at once), or at a
        block it cannot resolve (the read of that block reports it), and never raises."""
        done = first - 1
        for idx in range(first, stop):
            try:
                kind, loc = self._resolve(txn, of, ino, idx)
            except Exception:  # (a damaged record: the read of that block reports it)
                break
            if kind == "blk" and (loc[0], loc[1], loc[2]) not in self.bad_blocks:
                h = loc[0]
                with self._cache_lock:
                    if h in self._cache:
                        self._cache.move_to_end(h)  # (wanted again: not first to go)
                        job = None
                    elif h not in self._fetching:
                        # (blocks read ahead for a reader that went away stop counting)
                        old = time.monotonic() - READ_AHEAD_UNUSED_S
                        while self._unused and next(iter(self._unused.values())) < old:
                            self._unused.popitem(last=False)
                        if (len(self._fetching) + len(self._unused)) * self.block_size >= BLOCK_CACHE_BYTES // 2:
                            break
                        job = self._fetching[h] = _Fetching()
                    else:
                        job = None
                if job is not None:
                    gen = self.devices.read_begin()
                    try:
                        if self._ahead_pool is None:
                            self._ahead_pool = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_THREADS, "kvfs-ahead")
                        self._ahead_pool.submit(self._read_ahead, gen, loc, job)
                    except RuntimeError as exc:  # no thread could be started, or closing
                        # The task may be queued all the same (a thread that exists runs
                        # it later) or never run: unless it is running now, end its
                        # registration here and keep it from reading.
                        with self._cache_lock:
                            running, claimed = job.ahead, job.started
                            job.started = True
                        if not running:
                            self._end_ahead_read(gen, job)
                            if not claimed:
                                self._fetched(h, job)
                        log.warning("read-ahead not started: %s", exc)
                        break
            done = idx
        return done

    def _end_ahead_read(self, gen: int, job: _Fetching) -> None:
        with self._cache_lock:
            if job.ended:
                return
            job.ended = True
        self.devices.read_end(gen)

    def _read_ahead(self, gen: int, loc, job: _Fetching) -> None:
        try:
            with self._cache_lock:
                if job.started:
                    return  # a reader took it over (or it was called off)
                job.started = job.ahead = True
            try:
                self._read_block(loc, ahead=True)
                self.counters["read_ahead_blocks"] += 1
            except KvfsError:
                self.counters["read_ahead_errors"] += 1  # a reader that needs it reads it again and reports
            except Exception:  # never leave a reader waiting for it
                log.exception("read-ahead of block %s", loc[0].hex())
            finally:
                self._fetched(loc[0], job)
        finally:
            self._end_ahead_read(gen, job)

    def _quarantine(self, damage: "Damaged", ino: int) -> None:
        """Remember (in LMDB) that the stored copy of a block is damaged, so that it is never
        read or deduplicated against again, and drop file `ino`, in which it was found, if
        the file still holds it: its names go now (its data at its last close). A file open
        for writing keeps its names (its writer may yet replace the block); other files that
        share the block are dropped when they read it. A later write of the same content
        heals the block. Call it outside any read (see _fetch)."""
        h, dev, off, slen = damage.loc[:4]
        reason = str(damage)
        effects: list = []
        removed: list = []
        with self._lock:
            if self.readonly:
                if (h, dev, off) not in self.bad_blocks:
                    self.bad_blocks.add((h, dev, off))
                    self.counters["corrupt_blocks"] += 1
                    log.error("block %s on device %d at %d failed verification (%s): returning EIO "
                              "(read-only mount: not recorded; run kvfs fsck --verify-data)", h.hex(), dev, off, reason)
                return
            with self.meta.begin(write=True) as txn:
                rec = self.meta.get_block(txn, h)
                if rec is None or (rec.dev, rec.offset) != (dev, off):
                    return  # healed or freed meanwhile: the copy that failed is nobody's now
                self.bad_blocks.add((h, dev, off))
                if self.meta.get_quarantine(txn, h) is None:
                    self.meta.put_quarantine(txn, h, M.Quarantined(dev, off, slen, now_ns(), ino, reason))
                    self.counters["corrupt_blocks"] += 1
                    log.error("block %s on device %d at %d failed verification (%s): quarantined",
                              h.hex(), dev, off, reason)
                inode = self.meta.get_inode(txn, ino)
                of = self._open.get(ino)
                if inode is None or inode.nlink == 0 or not stat.S_ISREG(inode.mode) or (of is not None and of.writers):
                    return
                if not any(v == h for _, v in self.meta.iter_prefix(txn, "bmap", M.ino_key(ino))):
                    return  # rewritten meanwhile: what it holds now is not this block
                path = self.meta.path_of(txn, ino)
                self._remove_names(txn, ino, effects, removed)
                self.counters["quarantined_files"] += 1
                self.counters["quarantined_bytes"] += inode.size
            self._apply(effects)
        log.error("%s (inode %d, %d bytes): dropped, it holds damaged block %s", path, ino, inode.size, h.hex())
        self._notify_removed(removed)

    def drop_cache(self) -> None:
        """Forget the daemon's cache of verified blocks (the next reads go to the devices)."""
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._unused.clear()
            self._served.clear()

    def read(self, fh: int, offset: int, size: int):
        """The bytes of a read (a bytes-like object: bytes, a memoryview of a cached block
        or a bytearray)."""
        gen, ino, parts = self._plan(fh, offset, size, cached_only=False)
        if gen is None:
            return self._assemble(parts)
        return self._verified(gen, ino, self._assemble, parts)

    def read_cached(self, fh: int, offset: int, size: int):
        """The bytes of a read if the daemon holds all of them (block cache, unpublished
        buffers, holes), else None: no device I/O and no waiting, so that the FUSE layer
        may answer it without a thread hop."""
        plan = self._plan(fh, offset, size, cached_only=True)
        return None if plan is None else self._assemble(plan[2])

    def _plan(self, fh: int, offset: int, size: int, cached_only: bool):
        """Resolve a read into parts (see _assemble) and start reading ahead for a
        sequential reader. Returns (gen, ino, parts), the read registered as `gen`
        (read_begin) if it needs the devices, else gen None. cached_only: None if it would
        need them (and nothing changed)."""
        if offset < 0 or size < 0:
            raise Invalid("negative offset or size")
        bs = self.block_size
        # On the event loop (cached_only) never wait for the lock: a checkpoint holds it
        # through device and metadata syncs. The read then takes the thread path.
        if not self._lock.acquire(blocking=not cached_only):
            return None
        try:
            h = self._handle(fh)
            of = self._open.get(h.ino)
            fsize = of.size
            end = min(offset + size, fsize)
            if offset >= end:
                return None, h.ino, []
            parts = []
            device = False
            hits = []  # (hash, bytes asked, block length) of blocks the cache holds
            with self.meta.begin() as txn:
                for idx in range(offset // bs, (end - 1) // bs + 1):
                    base = idx * bs
                    lo, hi = max(offset, base) - base, min(end, base + bs) - base
                    kind, what = self._resolve(txn, of, h.ino, idx)
                    if kind == "buf":
                        chunk = bytes(what[lo:hi])  # a dirty buffer ends early: zeros follow
                        parts.append(("data", chunk + bytes(hi - lo - len(chunk)), 0, hi - lo))
                        continue
                    if kind == "blk":
                        with self._cache_lock:
                            data = self._cache.get(what[0])
                        if data is not None:
                            hits.append((what[0], hi - lo, len(data)))
                            kind, what = "cached", data
                        elif cached_only:
                            return None
                        else:
                            device = True
                    parts.append((kind, what, lo, hi))
                last = (end - 1) // bs
                if abs(offset - h.read_end) <= bs:
                    # A sequential reader's next blocks are read ahead into the block cache
                    # while this request is answered.
                    stop = min(last + 1 + self._ahead_blocks(), (fsize + bs - 1) // bs)
                    h.ahead = max(h.ahead, self._read_ahead_locked(h.ino, of, txn, max(last + 1, h.ahead + 1), stop))
                else:
                    h.ahead = last  # a seek: reading ahead starts again from here
                h.read_end = end
                if end == fsize:
                    if len(self._read_through) > 65536:
                        stale = time.monotonic() - READ_THROUGH_S
                        self._read_through = {i: t for i, t in self._read_through.items() if t > stale}
                    self._read_through[h.ino] = time.monotonic()
            if hits:
                # A block answered whole (in any order of requests) is done with: other
                # readers of the file have the kernel's page cache. It is first to go.
                with self._cache_lock:
                    for bh, asked, length in hits:
                        if bh in self._cache:
                            served = self._served.pop(bh, 0) + asked
                            if served < length:
                                self._served[bh] = served
                            self._cache.move_to_end(bh, last=served < length)
                            self._unused.pop(bh, None)
            self._accessed[h.ino] = now_ns()
            self.counters["cache_hits"] += len(hits)
            return (self.devices.read_begin() if device else None), h.ino, parts
        finally:
            self._lock.release()

    def _verified(self, gen: int, ino: int, fn, *args):
        """fn(*args) as a read registered as `gen` (read_begin), ended here. A damaged block
        it finds is quarantined once the read is over: _quarantine takes the lock, which an
        allocator waiting for running reads may hold."""
        try:
            return fn(*args)
        except Damaged as damage:
            failed = damage
        finally:
            self.devices.read_end(gen)
        self._quarantine(failed, ino)
        raise failed

    def _assemble(self, parts: list):
        """The bytes of a read from its resolved parts (see _plan): a memoryview of one
        block where the read lies in one, else a bytearray (the FUSE layer takes either)."""
        if len(parts) == 1 and parts[0][0] in ("blk", "cached"):
            kind, what, lo, hi = parts[0]
            data = what if kind == "cached" else self._fetch(what)
            if hi <= len(data):
                return memoryview(data)[lo:hi] if (lo, hi) != (0, len(data)) else data
        if not parts:
            return b""
        out = bytearray()
        for kind, what, lo, hi in parts:
            if kind == "data":
                out += what
            elif kind == "zero":
                out += bytes(hi - lo)
            else:
                data = what if kind == "cached" else self._fetch(what)
                chunk = memoryview(data)[lo:hi]
                out += chunk
                if len(chunk) < hi - lo:
                    out += bytes(hi - lo - len(chunk))
        return out

    def _load_block(self, of: OpenFile, idx: int) -> bytearray:
        """Block `idx` as a dirty buffer: its stored bytes (none for a hole)."""
        with self.meta.begin() as txn:
            kind, what = self._resolve(txn, of, of.ino, idx)
        if kind == "buf":
            return bytearray(what)
        if kind == "blk":
            return bytearray(self._verified(self.devices.read_begin(), of.ino, self._fetch, what))
        return bytearray()

    def write(self, fh: int, offset: int, data) -> int:
        if offset < 0:
            raise Invalid("negative offset")
        n = len(data)
        if n == 0:
            return 0
        bs = self.block_size
        with self._lock:
            h = self._handle(fh)
            if not h.writable:
                raise KvfsError("file not open for writing", errno.EBADF)
            of = self._open[h.ino]
            if h.append:
                offset = of.size
            end = offset + n
            if end > MAX_FILE_SIZE:
                raise FileTooBig("write past the maximum file size")
            view = memoryview(data)
            old_size = of.size
            if end > of.size:
                self._charge(of, end)
                of.size = end
            of.changed = True
            of.mtime_ns = now_ns()
            pos = 0
            try:
                while pos < n:
                    idx, boff = divmod(offset + pos, bs)
                    take = min(bs - boff, n - pos)
                    if take == bs:
                        self._store(of, idx, view[pos:pos + take])
                        of.dirty.pop(idx, None)
                    else:
                        buf = of.dirty.get(idx)
                        if buf is None:
                            buf = self._load_block(of, idx)
                            of.dirty[idx] = buf
                        if len(buf) < boff:
                            buf.extend(bytes(boff - len(buf)))
                        buf[boff:boff + take] = view[pos:pos + take]
                        if boff + take == bs:
                            try:
                                self._store(of, idx, buf)
                                del of.dirty[idx]
                            except NoSpace:
                                pass  # stays dirty in memory; flush/close reports it
                    pos += take
            except KvfsError:
                # Bytes before `pos` are written (in memory or stored); the rest is not.
                of.size = max(old_size, offset + pos)
                if pos == 0:
                    raise
                return pos
            return n

    def _store(self, of: OpenFile, idx: int, data) -> None:
        """Make block `idx` of `of` hold `data` (up to the file size) as a pending block."""
        raw_len = min(self.block_size, of.size - idx * self.block_size)
        view = memoryview(data)[:max(raw_len, 0)]
        old = of.changes.get(idx, False)
        if raw_len <= 0:
            return
        if len(view) < raw_len:  # a dirty buffer that ends early: zeros follow
            view = memoryview(bytes(view) + bytes(raw_len - len(view)))
        h = codecs.block_hash(view)
        if h == _zero_hash(len(view)):
            of.changes[idx] = None
            if old:
                self._drop_pending(old)
            return
        if old and old.hash == h:
            return
        with self.meta.begin() as txn:
            rec = self.meta.get_block(txn, h)
        if rec is not None and (h, rec.dev, rec.offset) not in self.bad_blocks:
            p = Pending(h, rec.dev, rec.offset, rec.stored_len, rec.raw_len, rec.codec, False)
            self.counters["dedup_blocks"] += 1
        else:
            stored, used = codecs.encode(view, of.codec)
            dev, off = self._allocate(len(stored), (of.ino + idx) % len(self.devices.devices))
            try:
                self.devices.devices[dev].pwrite(stored, off)
            except BaseException as exc:
                self.devices.release(dev, off, len(stored), durable=False)
                if isinstance(exc, KvfsError):
                    self.counters["device_errors"] += 1
                raise
            p = Pending(h, dev, off, len(stored), raw_len, used, True)
            self.counters["stored_blocks"] += 1
        self._held[h] += 1
        of.changes[idx] = p
        if old:
            self._drop_pending(old)

    def _drop_pending(self, p: Pending) -> None:
        """Forget an uncommitted block: release its hold, give back an extent we wrote."""
        left = self._held[p.hash] - 1
        if left:
            self._held[p.hash] = left
        else:
            del self._held[p.hash]
            effects: list = []
            with self.meta.begin(write=True) as txn:
                rec = self.meta.get_block(txn, p.hash)
                if rec is not None and rec.refcount == 0:
                    self._settle(txn, p.hash, rec, effects, collections.Counter())
            self._apply(effects)
        if p.own:
            self.devices.release(p.dev, p.offset, p.stored_len, durable=False)

    def _truncate(self, of: OpenFile, size: int) -> None:
        bs = self.block_size
        self._charge(of, size)
        if size < of.size:
            keep = (size + bs - 1) // bs
            tail = size % bs
            buf = None
            if tail:  # may raise (EIO): before anything is changed
                buf = bytearray(of.dirty[keep - 1]) if keep - 1 in of.dirty else self._load_block(of, keep - 1)
                del buf[tail:]  # what was cut reads as zeros if the file grows again
            for idx in [i for i in of.dirty if i >= keep]:
                del of.dirty[idx]
            for idx in [i for i in of.changes if i >= keep]:
                p = of.changes.pop(idx)
                if p is not None:
                    self._drop_pending(p)
            if of.trunc_blocks is None or keep < of.trunc_blocks:
                of.trunc_blocks = keep
            if buf is not None:
                of.dirty[keep - 1] = buf
        of.size = size

    def _commit(self, of: OpenFile) -> None:
        """Publish an open file's pending state in one metadata transaction.

        New references are counted before old ones are dropped, so a block that only moves
        within the file (or stays referenced elsewhere in it) never passes through zero."""
        if self.readonly:
            return
        for idx in sorted(of.dirty):
            self._store(of, idx, of.dirty[idx])
            del of.dirty[idx]  # only once it is safely stored (NoSpace keeps it dirty)
        if not of.changed and not of.changes:
            return
        effects: list = []
        releasing = collections.Counter(p.hash for p in of.changes.values() if p is not None)
        db = self.meta.db
        dropped: list[bytes] = []  # old references, released after all new ones are counted
        with self.meta.begin(write=True) as txn:
            inode = self.meta.get_inode(txn, of.ino)
            if inode is not None:
                if of.trunc_blocks is not None:
                    start = M.bmap_key(of.ino, of.trunc_blocks)
                    for key, h in list(self.meta.iter_prefix(txn, "bmap", M.ino_key(of.ino), start)):
                        if M.parse_bmap_key(key)[1] not in of.changes:
                            txn.delete(key, db=db["bmap"])
                            dropped.append(h)
                for idx, p in of.changes.items():
                    key = M.bmap_key(of.ino, idx)
                    old = txn.get(key, db=db["bmap"])
                    if p is None:
                        if old is not None:
                            txn.delete(key, db=db["bmap"])
                            dropped.append(old)
                        continue
                    if old == p.hash:
                        if p.own:
                            effects.append((p.dev, p.offset, p.stored_len))
                        continue
                    self._reference(txn, p, effects)
                    txn.put(key, p.hash, db=db["bmap"])
                    if old is not None:
                        dropped.append(old)
                for h in dropped:
                    self._decref(txn, h, effects, releasing)
                inode.size = of.size
                inode.mtime_ns = inode.ctime_ns = of.mtime_ns or now_ns()
                if inode.flags & M.F_INCOMPLETE:
                    inode.flags &= ~M.F_INCOMPLETE
                    txn.delete(M.ino_key(of.ino), db=db["incomplete"])
                self.meta.put_inode(txn, inode)
        if inode is None:  # purged meanwhile: nothing to publish into
            self._discard(of)
            return
        for h, n in releasing.items():
            left = self._held[h] - n
            if left > 0:
                self._held[h] = left
            else:
                del self._held[h]
        of.changes.clear()
        of.trunc_blocks = None
        of.changed = False
        self._settle_quota(of, of.size)
        self._apply(effects)
        self.counters["commits"] += 1
        if self.shared is not None:
            self.share_later(of.ino)  # published here: queued for the shared tier

    def _reference(self, txn, p: Pending, effects: list) -> None:
        """Count one more reference to pending block `p`, creating its record if needed."""
        rec = self.meta.get_block(txn, p.hash)
        if rec is None:
            if not p.own:
                raise Corrupt(f"held block {p.hash.hex()} vanished before commit")
            self.meta.put_block(txn, p.hash, M.BlockRecord(p.dev, p.offset, p.stored_len, p.raw_len, p.codec, 1))
            self.meta.free_remove(txn, p.dev, p.offset, round_up(p.stored_len))
            return
        if not p.own and (p.hash, rec.dev, rec.offset) in self.bad_blocks:
            # Found stored when written, found damaged since: the bytes are not kept, so the
            # commit fails (EIO) rather than publish a block that cannot be read.
            raise Corrupt(f"block {p.hash.hex()} that this file shares was found damaged before "
                          "its commit; write the file again")
        rec.refcount += 1
        if p.own and (rec.dev, rec.offset) != (p.dev, p.offset):
            if (p.hash, rec.dev, rec.offset) in self.bad_blocks:
                # The stored copy failed verification: heal it with the copy just written.
                self._free_copy(txn, p.hash, rec.dev, rec.offset, rec.stored_len, effects)
                self.meta.delete_quarantine(txn, p.hash)
                self.counters["healed_blocks"] += 1
                rec.dev, rec.offset, rec.stored_len = p.dev, p.offset, p.stored_len
                rec.raw_len, rec.codec = p.raw_len, p.codec
                self.meta.free_remove(txn, p.dev, p.offset, round_up(p.stored_len))
                self._repoint(p)
            else:
                effects.append((p.dev, p.offset, p.stored_len))
        self.meta.put_block(txn, p.hash, rec)

    def _repoint(self, p: Pending) -> None:
        """A heal moved block p.hash to p's copy: other open files' uncommitted references
        to it (found stored when they wrote it) follow, never naming the freed copy."""
        moved = Pending(p.hash, p.dev, p.offset, p.stored_len, p.raw_len, p.codec, False)
        for of in self._open.values():
            for idx, q in of.changes.items():
                if q is not None and not q.own and q.hash == p.hash:
                    of.changes[idx] = moved

    def _discard(self, of: OpenFile) -> None:
        """Drop an open file's unpublished state; it is back to what was committed."""
        if of.changes or of.dirty or of.changed or of.trunc_blocks is not None:
            self.discarded.add(of.ino)
        for p in of.changes.values():
            if p is not None:
                self._drop_pending(p)
        of.changes.clear()
        of.dirty.clear()
        of.changed = False
        of.trunc_blocks = None
        with self.meta.begin() as txn:
            inode = self.meta.get_inode(txn, of.ino)
        if inode is not None:
            of.size, of.mtime_ns = inode.size, inode.mtime_ns
        self._settle_quota(of, of.size)

    def take_discarded(self) -> set[int]:
        with self._lock:
            out, self.discarded = self.discarded, set()
            return out


def check_watermarks(high: float, low: float) -> None:
    if not (0 < low <= high <= 1):
        raise Invalid(f"watermarks must satisfy 0 < low <= high <= 1 (got high {high}, low {low})")


def _parse_flag(value: bytes) -> bool:
    v = value.strip().lower()
    if v in (b"1", b"true", b"yes", b"on"):
        return True
    if v in (b"", b"0", b"false", b"no", b"off"):
        return False
    raise Invalid(f"{PIN_XATTR.decode()} takes 1 or 0, not {value[:40]!r}")


def _parse_quota(value: bytes) -> int:
    try:
        limit = parse_size(value.decode())
    except (UnicodeDecodeError, ValueError):
        limit = -1
    if not 0 <= limit < 1 << 64:  # kept as an unsigned 64-bit number (kvfs.meta)
        raise Invalid(f"{QUOTA_XATTR.decode()} takes a size in bytes (e.g. 500G), not {value[:40]!r}")
    return limit


def _parse_ttl(value: bytes) -> int:
    try:
        ttl = int(value.strip() or b"0")
    except ValueError:
        ttl = -1
    if not 0 <= ttl < 1 << 32:
        raise Invalid(f"{TTL_XATTR.decode()} takes seconds (0 to 4294967295), not {value[:40]!r}")
    return ttl


def _process_name(pid: int) -> bytes:
    if pid <= 0:
        return b""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(16).rstrip(b"\n")
    except OSError:  # gone already
        return b""


def _lock(path: str) -> int:
    """Take the warehouse's exclusive lock; one process (a mount, fsck) at a time."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise QuietError(f"{path} is in use ({holder or 'locked by another process'})", EXIT_IN_USE) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(path: str) -> int | None:
    """Pid of the process holding (or last holding) the warehouse lock, as _lock wrote it."""
    try:
        with open(os.path.join(path, LOCK_FILE)) as f:
            word, _, pid = f.read().strip().partition(" ")
        return int(pid) if word == "pid" else None
    except (OSError, ValueError):
        return None


def default_size(path: str) -> int:
    """Size of the default file-backed device: 4 GiB, at most half the free space."""
    st = os.statvfs(path)
    half_free = st.f_bavail * st.f_frsize // 2
    return max(64 << 20, min(4 << 30, half_free)) // (1 << 20) * (1 << 20)
