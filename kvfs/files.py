"""Open files: handles, write buffering, truncation, and publishing a file's new state.

Owns: file handles, the uncommitted state of each open regular file (partial blocks in
memory, blocks stored and not yet published, a pending truncation), and the commit that
publishes it in one metadata transaction. Blocks are hashed, deduplicated or written through
kvfs.blocks, extents come from kvfs.policy (which evicts to make room and counts quotas),
and partial blocks are read back through kvfs.blockcache. Runs under Core.lock.

Write path: a file's bytes are cut into fixed-size blocks. A block that is fully written is
hashed (xxh3-128), and either found already stored (dedup: nothing is written) or written to
a freshly allocated extent. Nothing becomes visible in metadata until the file is committed
(flush, fsync or close): then one LMDB transaction adds the new block records, points the
file's block map at them, adjusts reference counts and takes the new extents out of the
persistent free map. A crash before the commit leaves the previous version of the file (or,
for a file created and never closed, nothing: recovery removes it).
"""

import collections
import errno
import functools
import stat
from dataclasses import dataclass

from . import codec as codecs
from . import meta as M
from .blocks import Pending, record_loc
from .core import Layer, now_ns
from .errors import Corrupt, FileTooBig, Invalid, IsADirectory, KvfsError, NoSpace

MAX_FILE_SIZE = 1 << 50


@functools.lru_cache(maxsize=64)
def _zero_hash(n: int) -> bytes:
    return codecs.block_hash(bytes(n))


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

    def busy(self) -> bool:
        """Being written, or holding what is not published yet: not to be evicted or replaced."""
        return bool(self.writers or self.changed or self.changes or self.dirty)


@dataclass
class Handle:
    ino: int
    writable: bool
    append: bool
    read_end: int = 0  # where the last read on this handle ended (sequential detection)
    ahead: int = -1  # the highest block index read ahead for it


class Files(Layer):
    """The open files of a warehouse (see the module docstring). `checkpoint`: makes what
    is committed durable (Warehouse.checkpoint)."""

    def __init__(self, core, namespace, blocks, cache, policy, checkpoint):
        super().__init__(core)
        self.namespace = namespace
        self.blocks = blocks
        self.cache = cache
        self.policy = policy
        self.checkpoint = checkpoint
        self.open_files = core.open  # ino -> OpenFile
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        # Inodes whose unpublished changes were dropped: a client (the kernel) may cache
        # bytes or attributes that are no longer true and must be told (take_discarded).
        self.discarded: set[int] = set()

    # -- open and close ----------------------------------------------------------------------

    def file(self, inode: M.Inode) -> OpenFile:
        of = self.open_files.get(inode.ino)
        if of is None:
            codec = codecs.CODEC_ZSTD if inode.flags & M.F_COMPRESS else codecs.CODEC_NONE
            of = OpenFile(inode.ino, inode.size, codec)
            of.mtime_ns = inode.mtime_ns
            self.open_files[inode.ino] = of
        return of

    def maybe_close(self, of: OpenFile) -> None:
        if of.handles == 0 and not of.changed and not of.changes and not of.dirty:
            self.open_files.pop(of.ino, None)
            self.namespace.maybe_purge(of.ino)

    def open(self, ino: int, write: bool = False, append: bool = False) -> int:
        if write:
            self.core.check_writable()
        with self.core.lock, self.meta.begin() as txn:
            inode = self.namespace.get_inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise IsADirectory("is a directory")
            of = self.file(inode)
            of.handles += 1
            of.writers += write
            fh = self._next_fh
            self._next_fh += 1
            h = self._handles[fh] = Handle(ino, write, append)
            self.core.accessed[ino] = now_ns()
            self.core.opens[ino] += 1
            if not write and of.size and not self.cache.read_through_lately(ino):
                # Clients read cached KV whole: its first blocks are on their way from the
                # devices while the first read request is still in the kernel. Not for a
                # file read to its end lately: the kernel's page cache (keep_cache) has it,
                # no read request will come, and reading ahead would only cost CPU.
                stop = min(self.cache.ahead_blocks(), -(-of.size // self.block_size))
                h.ahead = self.cache.read_ahead(functools.partial(self.resolve, txn, of, ino), 0, stop)
            return fh

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               pid: int = 0) -> tuple[int, M.Inode]:
        with self.core.lock:  # made and opened at once: never an unfinished file nobody has open
            inode = self.namespace.make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid,
                                        incomplete=True, pid=pid)
            fh = self.open(inode.ino, write=True)
            self.open_files[inode.ino].changed = True  # the first commit marks it complete
        return fh, inode

    def handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise KvfsError(f"bad file handle {fh}", errno.EBADF)
        return h

    def release(self, fh: int) -> None:
        with self.core.lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return
            of = self.open_files[h.ino]
            of.handles -= 1
            of.writers -= h.writable
            published = self._publishes(h, of)
            try:
                if published:
                    try:
                        self.commit(of)
                    except KvfsError:
                        if of.handles == 0:
                            # Nobody can retry: drop what could not be published (the
                            # error already reached the client at flush) and its pins.
                            self.discard(of)
                        raise
            finally:
                self.maybe_close(of)
        if published and self.core.durability == "close":
            self.checkpoint()  # (not under the lock: others are served while it syncs)

    def flush(self, fh: int) -> None:
        with self.core.lock:
            h = self.handle(fh)
            if h.writable:
                self.commit(self.open_files[h.ino])

    def fsync(self, fh: int, datasync: bool = False) -> None:
        with self.core.lock:
            h = self.handle(fh)
            of = self.open_files[h.ino]
            if self._publishes(h, of):
                self.commit(of)
        self.checkpoint()  # everything committed so far: this file's state too

    @staticmethod
    def _publishes(h: Handle, of: OpenFile) -> bool:
        """Whether closing or fsyncing handle `h` publishes `of`'s changes: a writer's
        handle does; another (a reader's) only publishes changes left when no writer is
        left to (a commit that failed at the writer's close, say). A reader that comes and
        goes while a file is written must not publish the writer's first half: a crash
        would then leave that half as the file."""
        return h.writable or (of.changed and not of.writers)

    def take_discarded(self) -> set[int]:
        with self.core.lock:
            out, self.discarded = self.discarded, set()
            return out

    # -- what a block holds -------------------------------------------------------------------

    def resolve(self, txn, of: OpenFile | None, ino: int, idx: int):
        """What block `idx` of a file holds, newest state first: ('buf', bytearray) |
        ('zero', None) | ('blk', (hash, dev, off, stored_len, raw_len, codec))."""
        if of is not None:
            buf = of.dirty.get(idx)
            if buf is not None:
                return "buf", buf
            if idx in of.changes:
                p = of.changes[idx]
                if p is None:
                    return "zero", None
                return "blk", p.loc()
            if of.trunc_blocks is not None and idx >= of.trunc_blocks:
                return "zero", None
        h = txn.get(M.bmap_key(ino, idx), db=self.meta.db["bmap"])
        if h is None:
            return "zero", None
        rec = self.meta.get_block(txn, h)
        if rec is None:
            raise Corrupt(f"inode {ino} block {idx}: block {h.hex()} has no record")
        return "blk", record_loc(h, rec)

    def _load_block(self, of: OpenFile, idx: int) -> bytearray:
        """Block `idx` as a dirty buffer: its stored bytes (none for a hole)."""
        with self.meta.begin() as txn:
            kind, what = self.resolve(txn, of, of.ino, idx)
        if kind == "buf":
            return bytearray(what)
        if kind == "blk":
            return bytearray(self.cache.read(of.ino, what))
        return bytearray()

    # -- writes ---------------------------------------------------------------------------------

    def write(self, fh: int, offset: int, data) -> int:
        """Write `data` at `offset`. Whole blocks are hashed, compressed and written to the
        devices outside Core.lock (see store); the file grows block by block as each one's
        bytes are in place, so a commit meanwhile publishes whole blocks only."""
        if offset < 0:
            raise Invalid("negative offset")
        n = len(data)
        if n == 0:
            return 0
        bs = self.block_size
        with self.core.lock:
            h = self.handle(fh)
            if not h.writable:
                raise KvfsError("file not open for writing", errno.EBADF)
            of = self.open_files[h.ino]
            if h.append:
                offset = of.size
            end = offset + n
            if end > MAX_FILE_SIZE:
                raise FileTooBig("write past the maximum file size")
            if end > of.size:
                self.policy.charge(of, end)
            of.changed = True
            of.mtime_ns = now_ns()
        view = memoryview(data)
        pos = 0
        try:
            while pos < n:
                idx, boff = divmod(offset + pos, bs)
                take = min(bs - boff, n - pos)
                if take == bs:
                    self.store(of, idx, view[pos:pos + take], grow_to=offset + pos + take)
                else:
                    with self.core.lock:
                        buf = of.dirty.get(idx)
                        if buf is None:
                            buf = self._load_block(of, idx)
                            of.dirty[idx] = buf
                        if len(buf) < boff:
                            buf.extend(bytes(boff - len(buf)))
                        buf[boff:boff + take] = view[pos:pos + take]
                        of.size = max(of.size, offset + pos + take)
                        if boff + take == bs:
                            try:
                                self.store(of, idx, buf)
                                del of.dirty[idx]
                            except NoSpace:
                                pass  # stays dirty in memory; flush/close reports it
                pos += take
        except KvfsError:
            # Bytes before `pos` are written (in memory or stored), and the file has grown
            # to cover them; the rest is not.
            if pos == 0:
                raise
            return pos
        return n

    def store(self, of: OpenFile, idx: int, data, grow_to: int | None = None) -> None:
        """Make block `idx` of `of` hold `data` (up to the file size, or `grow_to` to which
        the file grows with it) as a pending block.

        Hashing, compression and the device write of a new block run outside Core.lock
        (unless the caller holds it); the dedup check, which holds a block found stored
        and puts it in place at once, the allocation, and putting a new block in place are
        each one short hold of it. `data` must not change meanwhile: a caller passing a
        dirty buffer holds the lock throughout."""
        with self.core.lock:
            size = of.size if grow_to is None else max(of.size, grow_to)
        raw_len = min(self.block_size, size - idx * self.block_size)
        if raw_len <= 0:
            return
        view = memoryview(data)[:raw_len]
        if len(view) < raw_len:  # a dirty buffer that ends early: zeros follow
            view = memoryview(bytes(view) + bytes(raw_len - len(view)))
        h = codecs.block_hash(view)
        if h == _zero_hash(len(view)):
            with self.core.lock:
                self._put(of, idx, None, grow_to)  # a hole
            return
        with self.core.lock:
            old = of.changes.get(idx)
            if old is not None and old.hash == h:  # the same bytes again
                self._put(of, idx, old, grow_to)
                return
            if self.reuse(of, idx, h, grow_to):
                return
        stored, used = codecs.encode(view, of.codec)
        with self.core.lock:
            dev, off = self.policy.allocate(len(stored), (of.ino + idx) % len(self.devices.devices))
        p = self.blocks.write(h, stored, dev, off, raw_len, used)
        with self.core.lock:
            self.blocks.hold(h)
            self._put(of, idx, p, grow_to)

    def _put(self, of: OpenFile, idx: int, p: Pending | None, grow_to: int | None) -> None:
        """Block `idx` of `of` is pending block `p` (held; None: a hole) now. Under the lock."""
        old = of.changes.get(idx, False)
        if old is not p:
            of.changes[idx] = p
            if old:
                self.blocks.drop_pending(old)
        if grow_to is not None:
            of.dirty.pop(idx, None)  # a whole block written over a partial one
            of.size = max(of.size, grow_to)

    def reuse(self, of: OpenFile, idx: int, h: bytes, grow_to: int | None = None) -> bool:
        """Point block `idx` of `of` at the stored block `h`, if it is stored and sound
        (as store does when it finds written bytes stored already). Under the lock."""
        p = self.blocks.dedup(h)
        if p is None:
            return False
        self.blocks.hold(h)
        self._put(of, idx, p, grow_to)
        return True

    def resize(self, ino: int, size: int, t: int) -> None:
        """Truncate (or extend) regular file `ino` to `size` and publish it, at time `t`."""
        if size < 0 or size > MAX_FILE_SIZE:
            raise FileTooBig(f"size {size} out of range") if size > 0 else Invalid("negative size")
        with self.core.lock:
            with self.meta.begin() as txn:
                inode = self.namespace.get_inode(txn, ino)
            if stat.S_ISDIR(inode.mode):
                raise IsADirectory("cannot truncate a directory")
            if not stat.S_ISREG(inode.mode):
                raise Invalid("cannot truncate this file type")
            of = self.file(inode)
            try:
                self._truncate(of, size)
                of.mtime_ns = t
                of.changed = True
                self.commit(of)
            except KvfsError:
                if of.handles == 0:
                    self.discard(of)  # the truncate failed: nothing of it remains
                raise
            finally:
                self.maybe_close(of)

    def _truncate(self, of: OpenFile, size: int) -> None:
        bs = self.block_size
        self.policy.charge(of, size)
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
                    self.blocks.drop_pending(p)
            if of.trunc_blocks is None or keep < of.trunc_blocks:
                of.trunc_blocks = keep
            if buf is not None:
                of.dirty[keep - 1] = buf
        of.size = size

    # -- publishing ------------------------------------------------------------------------------

    def commit(self, of: OpenFile) -> None:
        """Publish an open file's pending state in one metadata transaction.

        New references are counted before old ones are dropped, so a block that only moves
        within the file (or stays referenced elsewhere in it) never passes through zero."""
        if self.core.readonly:
            return
        for idx in sorted(of.dirty):
            self.store(of, idx, of.dirty[idx])
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
                    if self.blocks.reference(txn, p, effects):
                        self.repoint(p)
                    txn.put(key, p.hash, db=db["bmap"])
                    if old is not None:
                        dropped.append(old)
                for h in dropped:
                    self.blocks.decref(txn, h, effects, releasing)
                inode.size = of.size
                inode.mtime_ns = inode.ctime_ns = of.mtime_ns or now_ns()
                if inode.flags & M.F_INCOMPLETE:
                    inode.flags &= ~M.F_INCOMPLETE
                    txn.delete(M.ino_key(of.ino), db=db["incomplete"])
                self.meta.put_inode(txn, inode)
        if inode is None:  # purged meanwhile: nothing to publish into
            self.discard(of)
            return
        for h, n in releasing.items():
            self.blocks.unhold(h, n)
        of.changes.clear()
        of.trunc_blocks = None
        of.changed = False
        self.policy.settle_quota(of, of.size)
        self.blocks.apply(effects)
        self.counters["commits"] += 1
        self.core.published(of.ino)  # published here: queued for the shared tier

    def repoint(self, p: Pending) -> None:
        """A heal moved block p.hash to p's copy: other open files' uncommitted references
        to it (found stored when they wrote it) follow, never naming the freed copy."""
        moved = Pending(p.hash, p.dev, p.offset, p.stored_len, p.raw_len, p.codec, False)
        for of in self.open_files.values():
            for idx, q in of.changes.items():
                if q is not None and not q.own and q.hash == p.hash:
                    of.changes[idx] = moved

    def discard(self, of: OpenFile) -> None:
        """Drop an open file's unpublished state; it is back to what was committed."""
        if of.changes or of.dirty or of.changed or of.trunc_blocks is not None:
            self.discarded.add(of.ino)
        for p in of.changes.values():
            if p is not None:
                self.blocks.drop_pending(p)
        of.changes.clear()
        of.dirty.clear()
        of.changed = False
        of.trunc_blocks = None
        with self.meta.begin() as txn:
            inode = self.meta.get_inode(txn, of.ino)
        if inode is not None:
            of.size, of.mtime_ns = inode.size, inode.mtime_ns
        self.policy.settle_quota(of, of.size)
