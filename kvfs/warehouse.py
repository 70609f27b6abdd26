"""The warehouse: an open warehouse wired from its layers, behind one synchronous,
thread-safe API that kvfs.fs, kvfs.fsck, the tools and the tests use.

Owns: opening a warehouse (lock, metadata, devices, recovery after an
unclean shutdown), checkpoints, metadata backups, a clean close, and its statistics. The
rest is done by the layers it holds, and its other methods hand each call to one of them:

  namespace  kvfs.namespace     names and inodes: the POSIX operations, paths
  files      kvfs.files         open files: handles, writes, truncation, commit
  reader     kvfs.reads         reads of open files
  cache      kvfs.blockcache    verified block reads, the block cache, read-ahead
  policy     kvfs.policy        pins, TTLs, quotas, watermarks, eviction, retire, quarantine
  blocks     kvfs.blocks        block records: dedup, holds, refcounts, freeing
  sharing    kvfs.shared_files  the shared tier's remote files and upload queue
  direct     kvfs.direct        batched lookups, reads and stores of the direct path

They share one kvfs.core.Core (metadata, devices, the lock, counters, open files). Imports
point down: this module imports the layers, none of them imports it, and none imports
pyfuse3 or trio. The layers' methods raise KvfsError; kvfs.fs turns them into errnos.
"""

import contextlib
import logging
import os
import shutil
import time

from . import codec as codecs
from . import meta as M
from .blockcache import BlockCache
from .blocks import BlockStore
from .core import Core, now_ns
from .direct import Direct
from .errors import KvfsError, QuietError, EXIT_NEEDS_FSCK, EXIT_NO_WAREHOUSE
from .files import Files
from .layout import BACKUP_DIRS, META_DIR, POWER_CUT_DIR, take_lock
from .mkfs import make_warehouse
from .namespace import Namespace
from .policy import POLICY_XATTRS, REAP_BATCH, Policy
from .reads import Reader
from .shared_files import SharedFiles
from .store import DATA_START, Device, DeviceSet, Faults, FreeMap

log = logging.getLogger("kvfs.warehouse")

class Warehouse:
    """An open warehouse. All public methods are thread-safe and raise KvfsError."""

    # Making one: kvfs.mkfs (Warehouse.mkfs is the same function).
    mkfs = staticmethod(make_warehouse)

    # -- opening, recovery, closing ---------------------------------------------------

    def __init__(self, path: str, readonly: bool = False, mountpoint: str | None = None,
                 compression: str | None = None, durability: str = "fsync",
                 check_only: bool = False, lock_fd: int | None = None):
        """Open (and lock) a warehouse. A read-write open runs recovery if the warehouse was
        not closed cleanly; check_only opens it read-only as it is (for fsck). lock_fd: the
        warehouse lock, already taken by the caller (kvfs.layout.take_lock); this open owns
        it from then."""
        readonly = readonly or check_only
        self.path = os.path.abspath(path)
        meta_dir = os.path.join(self.path, META_DIR)
        if not os.path.isdir(meta_dir):
            raise QuietError(f"{self.path} is not a kvfs warehouse (no {META_DIR}/; run kvfs mkfs)", EXIT_NO_WAREHOUSE)
        self._lock_fd = take_lock(self.path) if lock_fd is None else lock_fd
        try:
            meta, sb, devices = self._open_meta(meta_dir, readonly)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.meta, self.devices = meta, devices
        core = self.core = Core(self.path, sb, meta, devices, readonly, durability)
        self.counters = core.counters
        self._lock = core.lock
        self.recovery: dict | None = None
        # The layers, lowest first; each is handed what it uses (see the module docstring).
        default_codec = codecs.codec_by_name(compression or sb.get("compression", "none"))
        self.blocks = BlockStore(core)
        self.namespace = Namespace(core, self.blocks, default_codec)
        self.policy = Policy(core, self.namespace, self.blocks, self.checkpoint)
        self.cache = BlockCache(core, self.blocks, on_damaged=self.policy.quarantine)
        self.files = Files(core, self.namespace, self.blocks, self.cache, self.policy, self.checkpoint)
        self.reader = Reader(core, self.files, self.cache)
        self.sharing = SharedFiles(core, self.namespace, self.files, self.blocks, self.cache)
        self.direct = Direct(core, self.namespace, self.blocks, self.cache, self.policy, self.files,
                             self.sharing, self.checkpoint)
        try:
            if not readonly:
                with meta.begin(write=True) as txn:
                    state = meta.get_json(txn, b"state") or {}
                    if not state.get("clean", False):
                        self.recovery = self._recover(txn)
                    meta.put_json(txn, b"state", {
                        "clean": False, "pid": os.getpid(), "mountpoint": mountpoint,
                        "since": time.time(),
                    })
                self._sync_meta()
            elif not check_only:
                with meta.begin() as txn:
                    state = meta.get_json(txn, b"state") or {}
                if not state.get("clean", False):
                    raise QuietError(
                        f"{self.path} was not cleanly unmounted; mount it read-write once "
                        "(recovery runs) or run kvfs fsck before a read-only mount",
                        EXIT_NEEDS_FSCK,
                    )
            self._load_free_maps()  # after recovery: it frees extents in the persistent map
            with meta.begin() as txn:
                self.blocks.load_quarantine(txn)
                self._stats_base = meta.get_stats(txn)
                self.policy.load(txn)
        except BaseException:
            devices.close()
            meta.close()
            os.close(self._lock_fd)
            raise

    def _open_meta(self, meta_dir: str, readonly: bool):
        """(Meta, superblock, DeviceSet) of the warehouse, or QuietError saying what is wrong."""
        import lmdb

        meta = None
        try:
            meta = M.Meta(meta_dir, readonly=readonly)
            meta.quick_check(meta_dir)
            with meta.begin() as txn:
                sb = meta.get_json(txn, b"superblock")
        except (lmdb.Error, ValueError) as exc:
            if meta is not None:
                meta.close()
            raise QuietError(f"{self.path}: metadata is damaged ({exc}); run kvfs fsck {self.path} "
                             "(--repair restores the newest metadata backup)", EXIT_NEEDS_FSCK) from None
        if sb is None:
            meta.close()
            raise QuietError(f"{self.path}: no superblock; not a kvfs warehouse or damaged (run kvfs fsck)", EXIT_NEEDS_FSCK)
        if sb.get("format") not in M.FORMAT_READABLE:
            meta.close()
            raise QuietError(
                f"{self.path}: format revision {sb.get('format')} is not supported "
                f"(this kvfs reads revisions {', '.join(map(str, M.FORMAT_READABLE))})", EXIT_NO_WAREHOUSE)
        devs = []
        try:
            for index, d in enumerate(sb["devices"]):
                p = d["path"] if os.path.isabs(d["path"]) else os.path.join(self.path, d["path"])
                devs.append(Device(index, p, d["size"], sb["uuid"], readonly=readonly))
        except BaseException:
            for d in devs:
                d.close()
            meta.close()
            raise
        return meta, sb, DeviceSet(devs, Faults.from_env())

    def _load_free_maps(self) -> None:
        self.devices.free = [FreeMap() for _ in self.devices.devices]
        with self.meta.begin() as txn:
            for key, val in txn.cursor(db=self.meta.db["free"]):
                dev, off = M.parse_free_key(key)
                self.devices.free[dev].add(off, M.parse_u64(val))

    def _recover(self, txn) -> dict:
        """Bring metadata to a clean state after a crash (called in a write txn)."""
        report = {"incomplete_files": 0, "orphans": 0, "unreferenced_blocks": 0}
        effects: list = []
        for key, _ in list(txn.cursor(db=self.meta.db["incomplete"])):
            self.namespace.drop_incomplete(txn, M.parse_u64(key), effects)
            report["incomplete_files"] += 1
        report["orphans"] = self.namespace.purge_orphans(txn, effects)
        for key, val in list(txn.cursor(db=self.meta.db["blocks"])):
            rec = M.BlockRecord.unpack(val)
            if rec.refcount == 0:  # nothing is held at open: settle frees it
                self.blocks.settle(txn, key, rec, effects)
                report["unreferenced_blocks"] += 1
        log.warning("recovered after unclean shutdown: %s", report)
        return report

    def close(self) -> None:
        """Commit every open file, mark the warehouse clean and release it."""
        self.direct.close()  # (not under the lock: its requests in flight take it)
        with self._lock:
            if self._lock_fd < 0:
                return
            try:
                if not self.readonly:
                    for of in list(self.core.open.values()):
                        try:
                            self.files.commit(of)
                        except KvfsError as exc:
                            log.error("commit of inode %d at close failed, its unpublished "
                                      "changes are dropped: %s", of.ino, exc)
                        self.files.discard(of)
                    self.policy.flush_access()
                    # Unlinked inodes kept for open files go now: nothing is open any more.
                    # Holds left now are an upload's that did not finish (the shared tier
                    # gave up waiting for it): nothing will release them, and a block only
                    # they kept must not stay as an unreferenced record of a clean warehouse.
                    with self.meta.begin(write=True) as txn:
                        self.namespace.purge_orphans(txn, [])
                        self.blocks.drop_holds(txn, [])
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
                self.cache.close()  # its reads end before the devices close
                self.devices.close()
                self.meta.close()
                os.close(self._lock_fd)
                self._lock_fd = -1

    def checkpoint(self) -> None:
        """Make everything committed so far durable: device data first, then metadata.

        The devices are synced twice: first without the lock, while requests go on (that
        sync writes out nearly everything), then under it, where only what was written
        meanwhile is left, just before the metadata that may refer to it."""
        if self.readonly or self._lock_fd < 0:
            return
        self._sync_devices()
        with self._lock:
            if self._lock_fd < 0:
                return
            self.policy.flush_access()
            with self.meta.begin(write=True) as txn:
                self.meta.put_stats(txn, self.stats_totals())
            self._sync_devices()
            self._sync_meta()
            self.devices.checkpointed()

    def backup_meta(self, only_if_missing: bool = False) -> str | None:
        """Copy the metadata (a consistent, compacted snapshot; writers are not held up) to
        the newest backup directory, keeping the one before it. fsck --repair falls back to
        them when the metadata is damaged. Returns the backup's path (None if skipped)."""
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

    # -- for fsck and gc ----------------------------------------------------------------

    def is_open(self, ino: int) -> bool:
        return ino in self.core.open

    def held_blocks(self) -> set[bytes]:
        """Blocks that files being written refer to before their commit."""
        with self._lock:
            return set(self.blocks.held)

    def maintain(self, fn):
        """Run fn(txn, effects, removed) under the lock in one write transaction, then give
        back the extents it listed in effects [(device, offset, length)] and tell the
        kernel about the names it listed in removed [(parent, name, ino)] (gc)."""
        self.core.check_writable()
        effects: list = []
        removed: list = []
        with self._lock:
            with self.meta.begin(write=True) as txn:
                result = fn(txn, effects, removed)
            self.blocks.apply(effects)
        self.core.notify_removed(removed)
        return result

    @contextlib.contextmanager
    def snapshot(self):
        """A read transaction and, taken at the same instant, the blocks that files being
        written hold and the inodes that are open (gc scans them without the lock)."""
        with self._lock:
            txn = self.meta.begin()
            held, open_inos = set(self.blocks.held), set(self.core.open)
        try:
            yield txn, held, open_inos
        finally:
            txn.abort()

    def drop_incomplete(self, txn, ino: int, effects: list, removed: list | None = None) -> None:
        self.namespace.drop_incomplete(txn, ino, effects, removed)

    def purge_unlinked(self, txn, ino: int, effects: list) -> None:
        """Delete an unlinked inode kept for an open file that is gone (gc)."""
        self.namespace.purge_inode(txn, ino, effects)

    # -- statistics ----------------------------------------------------------------------

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
            shared = self.sharing.shared_stats(txn, counters)
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
            open_files=len(self.core.open),
            counters=counters,
            shared=shared,
        )
        return st

    # -- state the mount and the tools read -------------------------------------------------

    sb = property(lambda self: self.core.sb, doc="The superblock as last written.")
    readonly = property(lambda self: self.core.readonly)
    durability = property(lambda self: self.core.durability)
    block_size = property(lambda self: self.core.block_size)
    pressure = property(lambda self: self.core.pressure, doc="Set above the high watermark.")
    high_watermark = property(lambda self: self.policy.high_watermark)
    low_watermark = property(lambda self: self.policy.low_watermark)
    discarded = property(lambda self: self.files.discarded, doc="See take_discarded.")
    shared = property(lambda self: self.sharing.shared, doc="The shared tier, or None.")

    @property
    def on_removed(self):
        """Called (outside any lock) with [(parent, name, ino)] of names that the warehouse
        removed by itself (eviction, expiry, retire, quarantine): kvfs.fs tells the kernel."""
        return self.core.on_removed

    @on_removed.setter
    def on_removed(self, fn) -> None:
        self.core.on_removed = fn

    # -- the namespace (kvfs.namespace) -------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> M.Inode:
        return self.namespace.lookup(parent, name)

    def getattr(self, ino: int) -> M.Inode:
        return self.namespace.getattr(ino)

    def mknod(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              pid: int = 0) -> M.Inode:
        return self.namespace.mknod(parent, name, mode, uid, gid, rdev, pid)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, pid: int = 0) -> M.Inode:
        return self.namespace.mkdir(parent, name, mode, uid, gid, pid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int, pid: int = 0) -> M.Inode:
        return self.namespace.symlink(parent, name, target, uid, gid, pid)

    def readlink(self, ino: int) -> bytes:
        return self.namespace.readlink(ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> M.Inode:
        return self.namespace.link(ino, new_parent, new_name)

    def unlink(self, parent: int, name: bytes) -> None:
        self.namespace.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self.namespace.rmdir(parent, name)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.namespace.rename(old_parent, old_name, new_parent, new_name, flags)

    def readdir(self, ino: int, start_id: int, limit: int = 512) -> list[tuple[bytes, M.Inode, int]]:
        return self.namespace.readdir(ino, start_id, limit)

    def resolve(self, path: str | bytes) -> tuple[int, bytes, int]:
        return self.namespace.resolve(path)

    def exists_many(self, paths: list[str], uid: int, gid: int) -> list[bool]:
        return self.namespace.exists_many(paths, uid, gid)

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None,
                atime_ns: int | None = None, mtime_ns: int | None = None) -> M.Inode:
        self.core.check_writable()
        if size is not None:
            self.sharing.prepare_resize(ino, size)  # a remote file's data: dropped (size 0) or fetched
        with self._lock:
            t = now_ns()
            if size is not None:
                self.files.resize(ino, size, t)
            return self.namespace.set_attributes(ino, t, mode, uid, gid, atime_ns, mtime_ns)

    # Extended attributes: user.kvfs.pin, .ttl and .quota are the policy's, the rest the
    # namespace's.

    def _xattrs(self, name: bytes):
        return self.policy if name in POLICY_XATTRS else self.namespace

    def getxattr(self, ino: int, name: bytes) -> bytes:
        return self._xattrs(name).getxattr(ino, name)

    def setxattr(self, ino: int, name: bytes, value: bytes) -> int | None:
        """Set an attribute; for user.kvfs.pin and .ttl, returns the inodes changed."""
        return self._xattrs(name).setxattr(ino, name, value)

    def listxattr(self, ino: int) -> list[bytes]:
        with self.meta.begin() as txn:  # one view of the inode, its attributes and its quota
            inode = self.namespace.get_inode(txn, ino)
            return self.namespace.xattr_names(txn, ino) + self.policy.xattr_names(txn, inode)

    def removexattr(self, ino: int, name: bytes) -> int | None:
        return self._xattrs(name).removexattr(ino, name)

    # -- open files and reads (kvfs.files, kvfs.reads, kvfs.blockcache) ----------------------

    def open(self, ino: int, write: bool = False, append: bool = False) -> int:
        if write:
            self.core.check_writable()
        self.sharing.fill_remote(ino)  # data still in the shared tier is fetched first, not under the lock
        return self.files.open(ino, write, append)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               pid: int = 0) -> tuple[int, M.Inode]:
        return self.files.create(parent, name, mode, uid, gid, pid)

    def write(self, fh: int, offset: int, data) -> int:
        return self.files.write(fh, offset, data)

    def flush(self, fh: int) -> None:
        self.files.flush(fh)

    def fsync(self, fh: int, datasync: bool = False) -> None:
        self.files.fsync(fh, datasync)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    def take_discarded(self) -> set[int]:
        """Inodes whose unpublished changes were dropped since the last call."""
        return self.files.take_discarded()

    def read(self, fh: int, offset: int, size: int):
        return self.reader.read(fh, offset, size)

    def read_cached(self, fh: int, offset: int, size: int):
        return self.reader.read_cached(fh, offset, size)

    def drop_cache(self) -> None:
        """Forget the daemon's cache of verified blocks (the next reads go to the devices)."""
        self.cache.drop()

    # -- policy (kvfs.policy) --------------------------------------------------------------

    def set_pin(self, ino: int, pinned: bool) -> int:
        return self.policy.set_pin(ino, pinned)

    def set_ttl(self, ino: int, ttl: int) -> int:
        return self.policy.set_ttl(ino, ttl)

    def set_quota(self, ino: int, limit: int | None) -> None:
        self.policy.set_quota(ino, limit)

    def set_watermarks(self, high: float | None = None, low: float | None = None) -> tuple[float, float]:
        return self.policy.set_watermarks(high, low)

    def over_high_watermark(self) -> bool:
        return self.policy.over_high_watermark()

    def evict_to_low_watermark(self) -> tuple[int, int]:
        return self.policy.evict_to_low_watermark()

    def expire(self) -> int:
        return self.policy.expire()

    def retire(self, path: str | bytes) -> dict:
        return self.policy.retire(path)

    def retiring(self) -> list[int]:
        return self.policy.retiring()

    def reap(self, budget: int = REAP_BATCH) -> bool:
        return self.policy.reap(budget)

    # -- the shared tier's files (kvfs.shared_files) -------------------------------------

    def remote_pending(self, ino: int) -> bool:
        return self.sharing.remote_pending(ino)

    def fill_remote(self, ino: int) -> None:
        self.sharing.fill_remote(ino)

    def drop_remote(self, ino: int) -> None:
        self.sharing.drop_remote(ino)
