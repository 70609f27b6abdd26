"""The warehouse's side of the shared tier: remote files, the upload queue, snapshots.

Owns: the warehouse's records of remote files, the upload queue and the snapshots the
uploader reads. It is a component the warehouse holds (Warehouse.sharing): engine code that
uses the namespace, open files and block store through their own interfaces; kvfs.shared,
which talks to the object store, drives it. Nothing here does network I/O itself, and no
network I/O happens under the lock. The layers below never call it: a publication reaches
it through Core.on_published.

Remote files. A lookup that the shared tier answers creates a complete local inode from
the manifest in one transaction (install_remote): size, mode, owner, mtime, annotations,
and a `remote` record with the manifest's block hashes; its block map stays empty. The
first open fetches the blocks this warehouse does not hold already, each verified against
its hash by kvfs.shared, and stores them through the ordinary write path (_store, then one
_commit), so that deduplication, refcounts, eviction and fsck treat them like any written
block; then the record goes (fill_remote). A truncate to zero drops the record instead of
fetching (drop_remote). Nothing ever reads the empty block map of a remote file: open and
truncate fill it first, and a mount without a shared tier (or a read-only one) refuses to
open it with EIO rather than serve zeros. The first remote file marks the warehouse
FORMAT_REMOTE, which older kvfs versions refuse to open.

The upload queue. A file published here (committed, renamed, annotated) is queued in the
`shared_queue` sub-database, so uploads survive restarts; a file queued again moves to the
back. The queue holds at most `queue_limit` files: past that the oldest files that are not
pinned are dropped (counted as shared_dropped_files). Pinned files are never dropped,
however many are queued: what must be shared stays queued until it is.

Snapshots. The uploader reads a queued file's committed state in one transaction
(share_snapshot) and holds its blocks, so that nothing frees or reuses their extents while
it reads them (read_block); share_release lets them go.
"""

import contextlib
import errno
import stat
import threading
from dataclasses import dataclass, field

from . import meta as M
from .blocks import Pending, record_loc
from .core import Layer, now_ns
from .errors import KvfsError, NotFound
from .namespace import check_name
from .policy import POLICY_XATTRS

DEFAULT_QUEUE_LIMIT = 10_000  # files
# The shared tier's counters (kept with the warehouse's, as shared_NAME), all in stats().
COUNTERS = {  # name -> what it counts (stats, and the metric kvfs_shared_NAME)
    "uploaded_files": "Files whose manifest this node put in the shared tier.",
    "uploaded_blocks": "Blocks put in the shared tier.",
    "uploaded_bytes": "Bytes of the blocks put in the shared tier.",
    "present_blocks": "Blocks not put: the shared tier had them.",
    "lookup_hits": "Local misses that the shared tier had.",
    "lookup_misses": "Local misses that the shared tier did not have.",
    "lookups_busy": "Local misses answered without asking: every lookup thread was busy.",
    "fetched_files": "Files whose data was fetched from the shared tier.",
    "fetched_blocks": "Blocks fetched from the shared tier and verified.",
    "fetched_bytes": "Bytes of the blocks fetched.",
    "failures": "Requests to the shared tier that failed or timed out.",
    "corrupt_blocks": "Blocks from the shared tier refused: not matching their hash.",
    "bad_manifests": "Objects under files/ that are not valid manifests (treated as absent).",
    "dropped_files": "Unpinned files dropped from a full upload queue.",
    "superseded_files": "Local versions replaced by a newer one from the shared tier.",
    "retired_manifests": "Manifests deleted by kvfs retire --shared.",
}
SHARED_COMM = b"kvfs-shared"  # the "creating process" of read-through files in the catalog


class SharedUnavailable(KvfsError):
    """A file's data is in the shared tier and cannot be fetched now (EIO)."""

    errno = errno.EIO


class RemoteMissing(SharedUnavailable):
    """A block that a manifest names is not in the store (expired by a lifecycle rule,
    say): the file cannot be had from there. It is dropped here like an evicted file."""


@dataclass
class Snapshot:
    """A published file as the uploader sees it: committed state, blocks held."""

    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    block_size: int
    hashes: list  # per block: 16-byte hash, or None for a hole
    xattrs: dict  # name -> value (bytes), user.* only
    names: list  # (parent ino, name, path relative to the root) for each name it has
    held: list = field(default_factory=list)  # distinct hashes held until share_release


def _regular_published(inode: M.Inode | None) -> bool:
    return (inode is not None and stat.S_ISREG(inode.mode) and inode.nlink > 0
            and not inode.flags & M.F_INCOMPLETE)


class SharedFiles(Layer):
    """The engine's side of the shared tier (see the module docstring)."""

    def __init__(self, core, namespace, files, blocks, cache):
        super().__init__(core)
        self.ns = namespace
        self.files = files
        self.blocks = blocks
        self.cache = cache
        self.shared = None  # the kvfs.shared.SharedTier of this mount, or None
        self.queue_limit = DEFAULT_QUEUE_LIMIT
        self._any_remote = None  # whether remote records may exist (opens skip the check if not)
        self._filling: set[int] = set()  # files being filled: their commit is not a publication

    def attach_shared(self, tier, queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        """Serve the shared tier `tier` (kvfs.shared calls this once, at mount)."""
        self._shared_lock = threading.Lock()  # the per-file fill locks and the queue index
        self._fills: dict[int, list] = {}  # ino -> [lock, users]: one fill per file at a time
        self._queued: dict[int, int] = {}  # ino -> its sequence number in shared_queue
        self._queue_next = 1
        self.queue_limit = queue_limit
        if not self.core.readonly:
            with self.meta.begin() as txn:
                for key, val in txn.cursor(db=self.meta.db["shared_queue"]):
                    seq = M.parse_u64(key)
                    self._queued[M.parse_queue_val(val)[0]] = seq
                    self._queue_next = seq + 1
        self.shared = tier
        self.core.on_published = self.share_later

    # -- remote files ---------------------------------------------------------------

    def _remote_record(self, txn, ino: int) -> tuple[int, list] | None:
        db = self.meta.db.get("remote")  # absent on a read-only open of an older warehouse
        raw = None if db is None else txn.get(M.ino_key(ino), db=db)
        return None if raw is None else M.parse_remote_val(raw)

    def _maybe_remote(self) -> bool:
        if self._any_remote is None:
            with self.meta.begin() as txn:
                db = self.meta.db.get("remote")
                self._any_remote = db is not None and txn.stat(db)["entries"] > 0
        return self._any_remote

    def remote_pending(self, ino: int) -> bool:
        """Whether `ino` is a remote file whose data has not been fetched yet."""
        if not self._maybe_remote():
            return False
        with self.meta.begin() as txn:
            return self._remote_record(txn, ino) is not None

    def install_remote(self, parent: int, name: bytes, m, replace: tuple[int, int] | None = None):
        """Make `name` in directory `parent` the file (or directory) manifest `m` describes
        (a kvfs.shared.Manifest: kind, mode, uid, gid, size, mtime_ns, block_size, hashes,
        xattrs) and return its inode. If the name exists meanwhile, return what is there.

        replace=(ino, mtime_ns): put it in place of local file `ino` (a version that lost
        to `m`), only if the name still is that file, unchanged and not being written;
        else return None."""
        check_name(name)
        self.core.check_writable()
        effects: list = []
        removed: list = []
        db = self.meta.db
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                pdir = self.ns.get_dir(txn, parent)
                found = self.ns.find(txn, parent, name)
                if replace is None and found is not None:
                    return self.ns.live(self.ns.get_inode(txn, found[0]))
                old = None
                if replace is not None:
                    ino, mtime_ns = replace
                    if found is None or found[0] != ino:
                        return None
                    old = self.ns.get_inode(txn, ino)
                    of = self.core.open.get(ino)
                    if old.mtime_ns != mtime_ns or (of is not None and of.busy()):
                        return None
                is_dir = m.kind == "dir"
                # Not set-user/group-ID from a manifest: a store's writer is not to grant that.
                mode = (stat.S_IFDIR if is_dir else stat.S_IFREG) | (m.mode & 0o1777)
                inode = self.ns.new_inode(txn, mode, m.uid, m.gid, pdir)
                if old is not None:
                    inode.flags |= old.flags & M.F_PINNED  # a pinned file stays pinned
                if not is_dir:
                    inode.size = m.size
                    inode.mtime_ns = m.mtime_ns
                    if any(h is not None for h in m.hashes):
                        txn.put(M.ino_key(inode.ino), M.remote_val(m.block_size, m.hashes), db=db["remote"])
                        self._mark_remote_format(txn)
                        self._any_remote = True
                for key, value in m.xattrs.items():
                    if key not in POLICY_XATTRS and key.startswith(b"user."):
                        txn.put(M.xattr_key(inode.ino, key), value, db=db["xattrs"])
                t = now_ns()
                if old is not None:
                    self.ns.remove_entry(txn, parent, name)
                    self.ns.drop_link(txn, old, t, effects)
                    removed.append((parent, name, old.ino))
                # The inode first: linking it then counts its size in the quotas above.
                self.meta.put_inode(txn, inode)
                self.ns.add_entry(txn, parent, name, inode.ino)
                self.meta.put_lineage(txn, inode.ino, M.Lineage(inode.ctime_ns, m.uid, m.gid, 0, 0, SHARED_COMM))
                self.ns.touch_dir(txn, pdir, t, 1 if is_dir else 0)
            self.blocks.apply(effects)
        self.core.notify_removed(removed)
        return inode

    def _mark_remote_format(self, txn) -> None:
        if self.core.sb.get("format") != M.FORMAT_REMOTE:
            sb = self.meta.get_json(txn, b"superblock")
            sb["format"] = M.FORMAT_REMOTE
            self.meta.put_json(txn, b"superblock", sb)
            self.core.sb = sb

    @contextlib.contextmanager
    def _fill_lock(self, ino: int):
        with self._shared_lock:
            entry = self._fills.setdefault(ino, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._shared_lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._fills[ino]

    def _check_fillable(self, ino: int) -> None:
        if self.core.readonly:
            raise SharedUnavailable(f"inode {ino}: its data is still in the shared tier, and a "
                                    "read-only mount cannot fetch it")
        if self.shared is None:
            raise SharedUnavailable(f"inode {ino}: its data is still in the shared tier, and this "
                                    "mount has none (mount with --shared to read it)")

    def fill_remote(self, ino: int) -> None:
        """Fetch the data of remote file `ino` and publish it locally (nothing if it is
        not remote). Raises SharedUnavailable or Corrupt (EIO): the file stays remote and
        the next open tries again."""
        if not self.remote_pending(ino):
            return
        self._check_fillable(ino)
        with self._fill_lock(ino):
            with self.meta.begin() as txn:
                rec = self._remote_record(txn, ino)
                inode = self.meta.get_inode(txn, ino)
            if rec is None or inode is None:
                return  # filled (or removed) while this one waited
            self._fill(inode, *rec)

    def _fill(self, inode: M.Inode, remote_bs: int, hashes: list) -> None:
        bs = self.block_size
        size = inode.size
        nblocks = (size + bs - 1) // bs
        with self.core.lock:
            of = self.files.file(inode)
            self._filling.add(inode.ino)
        try:
            if remote_bs == bs:
                plan = [(idx, h) for idx, h in enumerate(hashes[:nblocks]) if h is not None]
                with self.meta.begin() as txn:
                    missing, seen = [], set()
                    for idx, h in plan:
                        if h not in seen and not self._usable(txn, h):
                            missing.append((h, min(bs, size - idx * bs)))
                        seen.add(h)
                fetched = self.shared.fetch_blocks(missing)
                planned = {h for h, _ in missing}
                firsts: dict[bytes, Pending] = {}
                for idx, h in plan:
                    with self.core.lock:
                        if h in firsts:  # the same block again in this file
                            p = firsts[h]
                            self.blocks.hold(h)
                            of.changes[idx] = Pending(h, p.dev, p.offset, p.stored_len, p.raw_len, p.codec, False)
                            continue
                        if self.files.reuse(of, idx, h):
                            continue
                    data = None
                    # In plan order; skips what was reused meanwhile. A block that was local
                    # at planning is not in the stream: scanning for it would drain it.
                    for got, blob in fetched if h in planned else ():
                        if got == h:
                            data = blob
                            break
                    if data is None:  # local at planning, gone since: fetch it now
                        data = next(iter(self.shared.fetch_blocks([(h, min(bs, size - idx * bs))])))[1]
                    with self.core.lock:
                        self.files.store(of, idx, data)
                        p = of.changes.get(idx)
                        if p is not None:
                            firsts[h] = p
            else:
                # Another block size than this warehouse's: the file's bytes in order, cut
                # again into local blocks (each remote block still verified on arrival).
                rlens = [min(remote_bs, size - j * remote_bs) for j in range((size + remote_bs - 1) // remote_bs)]
                fetched = iter(self.shared.fetch_blocks([(h, n) for h, n in zip(hashes, rlens) if h is not None]))
                buf = bytearray()
                idx = 0
                for h, n in zip(hashes, rlens):
                    data = b"" if h is None else next(fetched)[1]
                    buf += data + bytes(n - len(data))  # a hole, or a block stored short
                    while len(buf) >= bs or (buf and idx * bs + len(buf) >= size):
                        with self.core.lock:
                            self.files.store(of, idx, buf[:bs])
                        del buf[:bs]
                        idx += 1
            with self.core.lock:
                of.changed = True
                self.files.commit(of)
                with self.meta.begin(write=True) as txn:
                    txn.delete(M.ino_key(inode.ino), db=self.meta.db["remote"])
                self._filling.discard(inode.ino)
                self.files.maybe_close(of)
                self.counters["shared_fetched_files"] += 1
        except BaseException as exc:
            with self.core.lock:
                self.files.discard(of)
                self._filling.discard(inode.ino)
                self.files.maybe_close(of)
            if isinstance(exc, RemoteMissing):
                self._forget_remote(inode.ino)
                raise NotFound(f"inode {inode.ino}: {exc}; dropped, as if evicted") from None
            raise

    def _forget_remote(self, ino: int) -> None:
        """Drop remote file `ino`, whose data the store no longer has, as eviction drops a
        file (its names go, the kernel is told); its paths count as misses for a while."""
        effects: list = []
        removed: list = []
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                if self._remote_record(txn, ino) is None:
                    return
                for parent, name in self.meta.names_of(txn, ino):
                    base = self.ns.dir_path(txn, parent)
                    if base is not None and self.shared is not None:
                        self.shared.remember_miss(base + b"/" + name if base else name)
                self.ns.remove_names(txn, ino, effects, removed)
            self.blocks.apply(effects)
        self.core.notify_removed(removed)

    def _usable(self, txn, h: bytes) -> bool:
        rec = self.meta.get_block(txn, h)
        return rec is not None and not self.blocks.is_damaged(h, rec.dev, rec.offset)

    def drop_remote(self, ino: int) -> None:
        """A remote file is truncated to nothing: its data need not be fetched. The record
        goes in the transaction that makes its size 0, so no state has size without data."""
        if not self.remote_pending(ino):  # (a read first: no write transaction for nothing)
            return
        with self._fill_lock(ino) if self.shared is not None else contextlib.nullcontext():
            with self.core.lock, self.meta.begin(write=True) as txn:
                if self._remote_record(txn, ino) is None:
                    return
                self.core.check_writable()
                txn.delete(M.ino_key(ino), db=self.meta.db["remote"])
                inode = self.ns.get_inode(txn, ino)
                inode.size = 0
                inode.mtime_ns = inode.ctime_ns = now_ns()
                self.meta.put_inode(txn, inode)

    def prepare_resize(self, ino: int, size: int) -> None:
        """Before a remote file's size changes: drop (size 0) or fetch its data."""
        if size == 0:
            self.drop_remote(ino)
        else:
            self.fill_remote(ino)

    # -- the upload queue -------------------------------------------------------------

    def share_later(self, ino: int) -> None:
        """Queue `ino` for upload: it was published here (called by _commit, rename and
        setxattr, with or without the lock held)."""
        if self.shared is None or self.core.readonly or ino in self._filling:
            return
        db = self.meta.db["shared_queue"]
        dropped = 0
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                if not _regular_published(self.meta.get_inode(txn, ino)):
                    return
                old = self._queued.pop(ino, None)
                if old is not None:
                    txn.delete(M.u64(old), db=db)
                seq = self._queue_next
                self._queue_next += 1
                txn.put(M.u64(seq), M.queue_val(ino, now_ns()), db=db)
                self._queued[ino] = seq
                if len(self._queued) > self.queue_limit:
                    dropped = self._drop_unpinned(txn, len(self._queued) - self.queue_limit)
            if dropped:
                self.counters["shared_dropped_files"] += dropped
        self.shared.wake()

    def _drop_unpinned(self, txn, n: int) -> int:
        """Drop the `n` oldest queued files that are not pinned; returns how many were
        files that still exist (the others were queued and removed since)."""
        db = self.meta.db["shared_queue"]
        victims, dropped = [], 0
        for key, val in txn.cursor(db=db):
            ino = M.parse_queue_val(val)[0]
            inode = self.meta.get_inode(txn, ino)
            if inode is not None and inode.flags & M.F_PINNED:
                continue
            victims.append((key, ino))
            dropped += inode is not None
            if len(victims) >= n:
                break
        for key, ino in victims:
            txn.delete(key, db=db)
            if self._queued.get(ino) == M.parse_u64(key):
                del self._queued[ino]
        return dropped

    def queue_length(self) -> int:
        return len(self._queued)

    def next_upload(self) -> tuple[int, int, int] | None:
        """The oldest queued file: (sequence, ino, published_ns), or None."""
        with self.meta.begin() as txn:
            cur = txn.cursor(db=self.meta.db["shared_queue"])
            if not cur.first():
                return None
            return (M.parse_u64(cur.key()), *M.parse_queue_val(cur.value()))

    def finish_upload(self, seq: int, ino: int) -> None:
        """Take entry `seq` off the queue (unless the file was queued again since)."""
        with self.core.lock:
            with self.meta.begin(write=True) as txn:
                txn.delete(M.u64(seq), db=self.meta.db["shared_queue"])
            if self._queued.get(ino) == seq:
                del self._queued[ino]

    # -- snapshots for the uploader ------------------------------------------------------

    def path_of(self, ino: int) -> bytes | None:
        with self.meta.begin() as txn:
            return self.ns.dir_path(txn, ino)

    def paths_now(self, ino: int) -> set[bytes]:
        """The paths under which file `ino` can be found now."""
        with self.meta.begin() as txn:
            return {path for _, _, path in self.ns.paths(txn, ino)}

    def dir_attributes(self, path: bytes) -> tuple | None:
        """(mode, uid, gid, mtime_ns, user.* xattrs) of the directory at `path`, or None."""
        with self.meta.begin() as txn:
            ino = M.ROOT_INO
            for part in M.path_parts(path):
                found = self.ns.find(txn, ino, part)
                if found is None:
                    return None
                ino = found[0]
            inode = self.meta.get_inode(txn, ino)
            if inode is None or not stat.S_ISDIR(inode.mode):
                return None
            xattrs = {k[8:]: bytes(v) for k, v in self.meta.iter_prefix(txn, "xattrs", M.ino_key(ino))
                      if k[8:].startswith(b"user.")}
            return inode.mode, inode.uid, inode.gid, inode.mtime_ns, xattrs

    def share_snapshot(self, ino: int) -> Snapshot | None:
        """The committed state of published file `ino`, its blocks held; None if it is
        gone, not a published regular file, or a remote file (its data came from there)."""
        with self.core.lock, self.meta.begin() as txn:
            inode = self.meta.get_inode(txn, ino)
            if not _regular_published(inode) or self._remote_record(txn, ino) is not None:
                return None
            names = self.ns.paths(txn, ino)
            bs = self.block_size
            hashes = [None] * ((inode.size + bs - 1) // bs)
            for key, h in self.meta.iter_prefix(txn, "bmap", M.ino_key(ino)):
                idx = M.parse_bmap_key(key)[1]
                if idx < len(hashes):
                    hashes[idx] = bytes(h)
            xattrs = {k[8:]: bytes(v) for k, v in self.meta.iter_prefix(txn, "xattrs", M.ino_key(ino))
                      if k[8:].startswith(b"user.")}
            snap = Snapshot(ino, inode.mode, inode.uid, inode.gid, inode.size, inode.mtime_ns, bs,
                            hashes, xattrs, names)
            snap.held = sorted({h for h in hashes if h is not None})
            for h in snap.held:
                self.blocks.hold(h)
            return snap

    def share_release(self, snap: Snapshot) -> None:
        with self.core.lock:
            held, snap.held = snap.held, []
            self.blocks.release(held)  # (a block whose file went meanwhile is freed)

    def read_block(self, h: bytes) -> bytes:
        """The verified bytes of stored block `h` (held by a snapshot)."""
        with self.core.lock, self.meta.begin() as txn:
            rec = self.meta.get_block(txn, h)
            if rec is None:
                raise NotFound(f"block {h.hex()} is not stored")
            gen = self.devices.read_begin()
        # A damaged block is never uploaded: quarantined (it belongs to no one file here).
        return self.cache.verified(gen, 0, self.cache.fetch, record_loc(h, rec))

    def shared_stats(self, txn, totals: dict[str, int]) -> dict | None:
        """The shared tier's part of stats() (its read transaction, its counters): None if
        this warehouse never had one."""
        counters = {k[len("shared_"):]: v for k, v in totals.items() if k.startswith("shared_")}
        queue_db, remote_db = self.meta.db.get("shared_queue"), self.meta.db.get("remote")
        queue = txn.stat(queue_db)["entries"] if queue_db is not None else 0
        remote = txn.stat(remote_db)["entries"] if remote_db is not None else 0
        if self.shared is None and not counters and not queue and not remote:
            return None
        out = {"queue": queue, "remote_files": remote, **dict.fromkeys(COUNTERS, 0), **counters}
        out.update(self.shared.describe() if self.shared is not None else {"url": None, "state": "not configured"})
        return out


__all__ = ["SharedFiles", "SharedUnavailable", "Snapshot"]
