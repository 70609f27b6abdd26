"""The direct path's engine: batched lookups, reads and stores of whole batches of files for
kvfs-aware clients, between the devices and memory the client shares with the daemon.

Owns: checking a caller's permission for each file as the kernel checks a FUSE request
(POSIX mode bits, the caller's supplementary groups), resolving a batch of paths in one
transaction, reading a batch's blocks with several threads straight into the caller's
memory (each block verified against its hash before the reply says it was read,
decompressed, holes zero-filled), and storing a batch of files (hashed here, deduplicated,
written, then published in one metadata transaction). Who the caller is and where its
memory lies is kvfs.direct_server's: this module knows nothing of sockets or FUSE.

What holds here as on the mount:
- Reads resolve a file's blocks under Core.lock and run as one registered read
  (DeviceSet.read_begin): eviction, retire, unlink, rename-over or a rewrite racing a load
  never has an extent reused under it. A block that fails verification is EIO for every
  file of the batch that needs it, and is quarantined (BlockCache.on_damaged) once the read
  is over; its bytes are never reported as read.
- A stored file is a new inode that replaces the name (a rename-over): readers of the old
  file keep the old bytes, and nobody ever sees a half-stored file. Blocks are written
  before the metadata that names them is committed, and commits become durable only at
  checkpoints, which sync the devices first. Blocks written for a batch that is never
  published are held in memory only: the next mount, gc and fsck find them free.
- The caller's bytes are copied into the daemon before they are hashed: a client changing
  its buffer while a store runs can only store what it wrote, never a block whose bytes
  differ from its hash.
- Quotas, watermarks and eviction apply as to any writer (kvfs.policy).
"""

import concurrent.futures
import ctypes
import errno
import functools
import logging
import mmap
import os
import stat
from dataclasses import dataclass, field

from . import codec as codecs
from . import meta as M
from .core import Layer, now_ns
from .errors import Corrupt, Damaged, Invalid, KvfsError
from .files import MAX_FILE_SIZE, OpenFile
from .namespace import NAME_MAX, check_name

log = logging.getLogger("kvfs.direct")

DIRECT_THREADS = 16  # device reads and block stores of direct requests in flight at once
MAX_ITEMS = 1 << 20  # files or ranges in one request
MAX_TIER_ROUNDS = 16  # lookups in the shared tier: a path installs one component a round
INLINE_BYTES = 64 << 10  # files up to this size are stored by the request's thread itself
# Direct reads use O_DIRECT where the block and every piece of memory it lands in are
# ALIGN-aligned ("1"), or always the page cache ("0"); KVFS_DIRECT_ODIRECT overrides it.
# kvfs.kv lays chunk files out so that their tensors are aligned. BENCHMARKS.md has both.
ODIRECT = "1"
ALIGN = 4096

R_OK, W_OK, X_OK = 4, 2, 1


@dataclass(frozen=True)
class Caller:
    """Who asks: the peer's credentials as the kernel reported them (SO_PEERCRED), and its
    supplementary groups."""

    uid: int
    gid: int
    groups: frozenset = field(default_factory=frozenset)
    pid: int = 0

    def may(self, inode: M.Inode, want: int) -> bool:
        """Whether the caller may read (4), write (2) or search (1) `inode`, by the mode
        bits as the kernel checks them under default_permissions (no ACLs here)."""
        if self.uid == 0:
            # root reads and writes anything; it searches a directory always, and executes
            # a file only if someone may
            return not want & X_OK or stat.S_ISDIR(inode.mode) or bool(inode.mode & 0o111)
        if self.uid == inode.uid:
            bits = inode.mode >> 6
        elif inode.gid == self.gid or inode.gid in self.groups:
            bits = inode.mode >> 3
        else:
            bits = inode.mode
        return bits & want == want


class _Refused(Exception):
    """One file of a batch fails with `errno`; the others go on. missing: for ENOENT, the
    (directory ino, name) that was not there (the shared tier may have it)."""

    def __init__(self, err: int, missing: tuple | None = None):
        self.errno = err
        self.missing = missing


class _Paths:
    """Resolving many paths in one transaction, as `caller` may: directories found (or
    refused) once per batch."""

    def __init__(self, namespace, txn, caller: Caller):
        self.namespace = namespace
        self.meta = namespace.meta
        self.txn = txn
        self.caller = caller
        self._checked: dict[tuple, tuple | _Refused] = {}
        self._split: dict[str, tuple] = {}  # directory part of a path -> its checked parts

    @staticmethod
    def split(path) -> tuple:
        """The parts of a path relative to the mount's root (str or bytes)."""
        if not isinstance(path, (str, bytes)):
            raise _Refused(errno.EINVAL)
        try:
            parts = M.path_parts(path)
        except Invalid:
            raise _Refused(errno.EINVAL) from None
        if not parts or b".." in parts or parts[0] == b".kvfs":
            raise _Refused(errno.EINVAL)
        for part in parts:
            if len(part) > NAME_MAX:
                raise _Refused(errno.ENAMETOOLONG)
            try:
                check_name(part)  # (a NUL in a name, say: no FUSE client could name it)
            except KvfsError as exc:
                raise _Refused(exc.errno) from None
        return tuple(parts)

    def parts(self, path) -> tuple:
        return _split_cached(path, self._split)

    def directory(self, parts: tuple, write: bool = False) -> tuple[int, M.Inode]:
        """(ino, inode) of the directory `parts`, which the caller may search (and, with
        write, write into). Each answer is kept for the batch."""
        key = (parts, write)
        found = self._checked.get(key)
        if found is None:
            try:
                found = self._directory(parts, write)
            except _Refused as exc:
                found = exc
            self._checked[key] = found
        if isinstance(found, _Refused):
            raise found
        return found

    def _directory(self, parts: tuple, write: bool) -> tuple[int, M.Inode]:
        if parts:
            parent, _ = self.directory(parts[:-1])
            found = self.namespace.find(self.txn, parent, parts[-1])
            if found is None:
                raise _Refused(errno.ENOENT, (parent, parts[-1]))
            ino = found[0]
        else:
            ino = M.ROOT_INO
        inode = self.meta.get_inode(self.txn, ino)
        if inode is None:
            raise _Refused(errno.ENOENT)
        if not stat.S_ISDIR(inode.mode):
            raise _Refused(errno.ENOTDIR)
        if not self.caller.may(inode, X_OK | (W_OK if write else 0)):
            raise _Refused(errno.EACCES)
        return ino, inode

    def file(self, parts: tuple, want: int) -> M.Inode:
        """The regular file `parts`, which the caller may open for `want` (R_OK)."""
        parent, _ = self.directory(parts[:-1])
        found = self.namespace.find(self.txn, parent, parts[-1])
        if found is None:
            raise _Refused(errno.ENOENT, (parent, parts[-1]))
        inode = self.meta.get_inode(self.txn, found[0])
        if inode is None:
            raise _Refused(errno.ENOENT)
        if stat.S_ISDIR(inode.mode):
            raise _Refused(errno.EISDIR)
        if not stat.S_ISREG(inode.mode):
            raise _Refused(errno.EINVAL)
        if not self.caller.may(inode, want):
            raise _Refused(errno.EACCES)
        return inode


def _split_cached(path, cache: dict) -> tuple:
    """_Paths.split(path), the directory part of it checked once per batch (`cache`): many
    files of a batch share a directory."""
    if isinstance(path, str) and "/" in path:
        head, _, name = path.rpartition("/")
        if name and name not in (".", "..", ".kvfs"):
            dir_parts = cache.get(head)
            if dir_parts is None:
                dir_parts = cache[head] = _Paths.split(head + "/x")[:-1]
            return dir_parts + _Paths.split(name)
    return _Paths.split(path)


class _Store:
    """One file of a store batch on its way: its parts, its bytes, its blocks."""

    __slots__ = ("index", "parts", "data", "mode", "of", "parent", "error")

    def __init__(self, index: int, parts: tuple, data, mode: int):
        self.index = index
        self.parts = parts
        self.data = data
        self.mode = mode
        self.of: OpenFile | None = None
        self.parent = 0
        self.error = 0


class Direct(Layer):
    """Batched lookups, reads and stores for the direct path (see the module docstring).
    `sharing`: the shared tier's remote files (fetched before they are read)."""

    def __init__(self, core, namespace, blocks, cache, policy, files, sharing, checkpoint):
        super().__init__(core)
        self.namespace = namespace
        self.blocks = blocks
        self.cache = cache
        self.policy = policy
        self.files = files
        self.sharing = sharing
        self.checkpoint = checkpoint
        self._pool = concurrent.futures.ThreadPoolExecutor(DIRECT_THREADS, thread_name_prefix="kvfs-direct")
        # Device reads of the direct path bypass the page cache where aligned (see ODIRECT).
        self.odirect = os.environ.get("KVFS_DIRECT_ODIRECT", ODIRECT) == "1"

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, caller: Caller, paths: list) -> list[int]:
        """The size of each path's regular file, or -errno (ENOENT, EACCES, EISDIR, ...):
        what a stat() by the caller through the mount would find. One transaction."""
        _check_count(paths)
        for _ in range(MAX_TIER_ROUNDS):
            misses: set = set()
            out = self._lookup(caller, paths, misses)
            if not self._ask_tier(misses):
                break
        hits = sum(1 for n in out if n >= 0)
        self.counters["lookup_hit"] += hits
        self.counters["lookup_miss"] += len(out) - hits
        self.counters["direct_lookups"] += len(out)
        return out

    def _lookup(self, caller: Caller, paths: list, misses: set) -> list[int]:
        out = []
        with self.core.lock, self.meta.begin() as txn:
            resolver = _Paths(self.namespace, txn, caller)
            for path in paths:
                try:
                    inode = resolver.file(resolver.parts(path), 0)
                except _Refused as exc:
                    out.append(-exc.errno)
                    if exc.missing is not None:
                        misses.add(exc.missing)
                    continue
                of = self.files.open_files.get(inode.ino)
                out.append(of.size if of is not None else inode.size)
        return out

    def _ask_tier(self, misses: set) -> bool:
        """Ask the shared tier (if the mount has one) for names that were missing, as a
        lookup through the mount does; True if it installed any (resolve again: a path
        installs one component a round)."""
        tier = self.sharing.shared
        if tier is None or not misses:
            return False
        return any(self._pool.map(lambda m: tier.lookup(*m)[0] is not None, misses))

    # -- reads ------------------------------------------------------------------------------

    def read(self, caller: Caller, items: list) -> list[int]:
        """Read each item (path, offset, length, dest), dest a writable buffer of `length`
        bytes: into dest go the file's bytes from `offset`. Returns per item the bytes read
        (fewer than asked at the end of the file), or -errno; what dest holds past the bytes
        read, or for an item that failed, is unspecified."""
        _check_count(items)
        results = [0] * len(items)
        for _ in range(MAX_TIER_ROUNDS):  # what the shared tier has is installed, then planned again
            misses: set = set()
            plan = self._plan_read(caller, items, results, misses)
            if isinstance(plan, set):
                if self._ask_tier(plan):
                    continue
                plan = self._plan_read(caller, items, results, None)
            if not isinstance(plan, list):
                break
            for ino in plan:
                try:
                    self.sharing.fill_remote(ino)
                except KvfsError as exc:
                    log.warning("direct read: fetching inode %d from the shared tier failed: %s", ino, exc)
        else:
            raise KvfsError("files of the shared tier kept changing under a direct read", errno.EAGAIN)
        gen, blocks, inos = plan
        if gen is None:
            return results
        damaged: list = []
        try:
            futures = [self._pool.submit(self._read_block, loc, dests) for loc, dests in blocks.items()]
            for fut, dests in zip(futures, blocks.values()):
                try:
                    fut.result()
                except Damaged as exc:
                    damaged.append((exc, dests))
                    for i, *_ in dests:
                        results[i] = -errno.EIO
                except KvfsError as exc:
                    for i, *_ in dests:
                        results[i] = -exc.errno
        finally:
            self.devices.read_end(gen)
        for exc, dests in damaged:
            self.cache.on_damaged(exc, inos[dests[0][0]])
        for r in results:
            if r > 0:
                self.counters["direct_read_bytes"] += r
        return results

    def _plan_read(self, caller: Caller, items: list, results: list, misses: set | None):
        """Resolve a read batch under the lock: fill what the daemon holds in memory (holes,
        unpublished buffers) at once, and return (read registration or None, {block loc:
        [(item, lo, hi, dest)]}, item -> ino) for the blocks to read; or, if files of the
        batch are still in the shared tier, the list of their inodes; or, if names were
        missing and the mount has a shared tier (misses not None), the set of them."""
        bs = self.block_size
        blocks: dict[tuple, list] = {}
        inos: dict[int, int] = {}
        remote = []
        t = now_ns()
        files: dict = {}  # path -> inode or _Refused: a file's ranges resolve it once
        with self.core.lock, self.meta.begin() as txn:
            resolver = _Paths(self.namespace, txn, caller)
            for i, (path, offset, length, dest) in enumerate(items):
                try:
                    if offset < 0 or length < 0 or offset > MAX_FILE_SIZE:
                        raise _Refused(errno.EINVAL)
                    inode = files.get(path) if isinstance(path, str) else None
                    if inode is None:
                        try:
                            inode = resolver.file(resolver.parts(path), R_OK)
                        except _Refused as exc:
                            inode = exc
                        if isinstance(path, str):
                            files[path] = inode
                    if isinstance(inode, _Refused):
                        raise inode
                except _Refused as exc:
                    results[i] = -exc.errno
                    if exc.missing is not None and misses is not None:
                        misses.add(exc.missing)
                    continue
                ino = inode.ino
                if self.sharing.remote_pending(ino):
                    remote.append(ino)
                    continue
                of = self.files.open_files.get(ino)
                end = min(offset + length, of.size if of is not None else inode.size)
                results[i] = n = max(0, end - offset)
                inos[i] = ino
                resolve = functools.partial(self.files.resolve, txn, of, ino)
                for idx in range(offset // bs, (end - 1) // bs + 1) if n else ():
                    base = idx * bs
                    lo, hi = max(offset, base) - base, min(end, base + bs) - base
                    out = dest[base + lo - offset:base + hi - offset]
                    kind, what = resolve(idx)
                    if kind == "blk":
                        blocks.setdefault(what, []).append((i, lo, hi, out))
                    elif kind == "buf":
                        chunk = what[lo:hi]
                        out[:len(chunk)] = chunk
                        out[len(chunk):] = bytes(hi - lo - len(chunk))
                    else:
                        out[:] = bytes(hi - lo)
            if misses and self.sharing.shared is not None:
                return misses
            if remote:
                return remote
            for ino in inos.values():
                self.core.accessed[ino] = t
                self.core.opens[ino] += 1
            self.counters["direct_reads"] += len(items)
            return (self.devices.read_begin() if blocks else None), blocks, inos

    def _read_block(self, loc, dests: list) -> None:
        """Read block `loc` once, verify it, and copy what each (item, lo, hi, dest) asks
        for into dest. A raw block lands in the callers' memory directly and is verified
        there; if that fails, a private copy is read and verified before the block is called
        damaged (the callers' memory is shared: they may change it under the hash)."""
        h, dev, off, slen, rlen, codec = loc
        cached = self.cache.cached(h)
        if cached is not None:
            self.counters["cache_hits"] += 1
            for _, lo, hi, out in dests:
                out[:] = cached[lo:hi]
            return
        if self.blocks.is_damaged(h, dev, off):
            raise Damaged(f"block {h.hex()} is quarantined (failed verification earlier)", loc)
        device = self.devices.devices[dev]
        if codec == codecs.CODEC_NONE and slen <= rlen and self._scatter(device, loc, dests):
            return
        stored = bytearray(slen)
        self._device_read(device, [memoryview(stored)], off, loc)
        try:
            data = codecs.decode(bytes(stored), codec, rlen, h)
        except KvfsError as exc:
            raise Damaged(str(exc), loc) from None
        self.counters["device_reads"] += 1
        for _, lo, hi, out in dests:
            out[:] = data[lo:hi]

    def _scatter(self, device, loc, dests: list) -> bool:
        """Read raw block `loc` straight into the callers' memory: one preadv whose pieces
        are the destinations (and scratch for what nobody asked for), then the block's hash
        over the pieces in order. No copy but the kernel's. False if the hash does not
        match: the caller then judges the block by a private copy."""
        h, dev, off, slen, rlen, _ = loc
        pieces, extra, pos = [], [], 0  # (lo, hi, view) tiling [0, rlen)
        for d in sorted(dests, key=lambda d: d[1]):
            _, lo, hi, out = d
            if lo < pos:  # overlaps what a piece already gets: copied from it afterwards
                extra.append(d)
                continue
            if lo > pos:
                pieces.append((pos, lo, _scratch(lo - pos)))
            pieces.append((lo, hi, out))
            pos = hi
        if pos < rlen:
            pieces.append((pos, rlen, _scratch(rlen - pos)))
        iov = [view[:max(0, min(hi, slen) - lo)] for lo, hi, view in pieces if lo < slen]
        # O_DIRECT (no page cache, no kernel copy) where every piece is aligned as it needs.
        odirect = self.odirect and slen % ALIGN == 0 and all(_aligned(v) for v in iov)
        self._device_read(device, iov, off, loc, odirect)
        if odirect:
            self.counters["direct_unbuffered_reads"] += 1
        digest = codecs.block_hasher()
        for lo, hi, view in pieces:
            if hi > slen:  # raw blocks are stored without their trailing zeros
                start = max(lo, slen) - lo
                view[start:] = bytes(hi - lo - start)
            digest.update(view)
        if digest.digest() != h:
            return False  # damaged, or a client changed its memory meanwhile: see _read_block
        self.counters["device_reads"] += 1
        for _, lo, hi, out in extra:
            for plo, phi, view in pieces:
                a, b = max(lo, plo), min(hi, phi)
                if a < b:
                    out[a - lo:b - lo] = view[a - plo:b - plo]
        return True

    def _device_read(self, device, views: list, off: int, loc, odirect: bool = False) -> None:
        try:
            device.preadinto(views, off, odirect)
        except Corrupt as exc:  # a short read
            raise Damaged(str(exc), loc) from None
        except KvfsError:
            self.counters["device_errors"] += 1
            raise

    # -- stores -----------------------------------------------------------------------------

    def store(self, caller: Caller, items: list, parents: bool = False, sync: bool = False) -> list[int]:
        """Store each item (path, data, mode) as a new regular file with `data` (a buffer)
        that replaces whatever file the path names, all published in one transaction.
        parents: make missing directories (mode 0755, the caller's). sync: durable before
        the reply (as fsync). Returns 0 or -errno per item."""
        _check_count(items)
        self.core.check_writable()
        todo = []
        results = [0] * len(items)
        dirs: dict = {}
        for i, (path, data, mode) in enumerate(items):
            try:
                if not isinstance(mode, int) or mode & ~0o7777:
                    raise _Refused(errno.EINVAL)
                if caller.uid != 0:
                    mode &= ~0o6000  # no set-id bits from a store (the kernel strips them too)
                if len(data) > MAX_FILE_SIZE:
                    raise _Refused(errno.EFBIG)
                todo.append(_Store(i, _split_cached(path, dirs), data, mode))
            except _Refused as exc:
                results[i] = -exc.errno
        # Directories made on the way: the kernel may hold a cached miss of their names
        # (a client probing for .kvfs/direct from inside them, say); drop it.
        self.core.notify_removed(self._prepare(caller, todo, parents))
        live = [s for s in todo if not s.error]
        # Blocks go to the threads; small files are stored here, one after another (a thread
        # hop and the lock's hand-over would cost more than hashing and writing them).
        futures = [(s, self._pool.submit(self._store_block, s, idx)) for s in live if len(s.data) > INLINE_BYTES
                   for idx in range(-(-len(s.data) // self.block_size))]
        for s in live:
            if len(s.data) <= INLINE_BYTES:
                try:
                    for idx in range(-(-len(s.data) // self.block_size)):  # (blocks may be 4 KiB)
                        self._store_block(s, idx)
                except KvfsError as exc:
                    s.error = exc.errno
        for s, fut in futures:
            try:
                fut.result()
            except KvfsError as exc:
                s.error = s.error or exc.errno
        self._publish(caller, todo)
        for s in todo:
            results[s.index] = -s.error
            if not s.error:
                self.counters["direct_write_bytes"] += len(s.data)
        self.counters["direct_stores"] += len(todo)
        if any(r == 0 for r in results) and (sync or self.core.durability == "close"):
            self.checkpoint()
        return results

    def _prepare(self, caller: Caller, todo: list, parents: bool) -> list:
        """Check where each file goes (making missing directories if asked) and count it
        against the quotas above it. Returns the (parent, name, 0) of directories made."""
        made: list = []
        unmade: dict = {}  # directory -> why it could not be made
        with self.core.lock:
            if parents:
                made = self._make_parents(caller, {s.parts[:-1] for s in todo}, unmade)
            with self.meta.begin() as txn:
                resolver = _Paths(self.namespace, txn, caller)
                quotas = self.meta.has_quotas(txn)
                per_dir: dict[int, tuple] = {}  # parent -> (codec, quota roots)
                for s in todo:
                    try:
                        s.parent, pdir = resolver.directory(s.parts[:-1], write=True)
                        self._check_replace(txn, caller, s.parent, pdir, s.parts[-1])
                        if s.parent not in per_dir:
                            per_dir[s.parent] = (self.namespace.dir_codec(txn, pdir),
                                                 self.meta.quota_roots(txn, s.parent) if quotas else [])
                        codec, roots = per_dir[s.parent]
                        s.of = of = OpenFile(s.index, len(s.data), codec)
                        of.base_size = 0
                        of.quota_roots = roots
                    except _Refused as exc:
                        # a directory that could not be made: why (EACCES, ...), as mkdir -p says
                        s.error = unmade.get(s.parts[:-1], exc.errno) if exc.errno == errno.ENOENT else exc.errno
            for s in todo:
                if not s.error:
                    try:
                        self.policy.charge(s.of, len(s.data))
                    except KvfsError as exc:
                        s.error = exc.errno
        return made

    def _make_parents(self, caller: Caller, dirs: set, unmade: dict) -> list:
        """Make the missing directories of `dirs` (and above), as mkdir -p by the caller.
        Returns the (parent, name, 0) of each directory made; puts in `unmade` the errno of
        each directory of `dirs` it could not make."""
        made = []
        with self.meta.begin() as txn:  # most batches go where directories are already
            resolver = _Paths(self.namespace, txn, caller)
            missing = []
            for parts in dirs:
                try:
                    resolver.directory(parts)
                except _Refused:
                    missing.append(parts)
        for parts in sorted(missing, key=len):
            for n in range(1, len(parts) + 1):
                with self.meta.begin() as txn:
                    resolver = _Paths(self.namespace, txn, caller)
                    try:
                        resolver.directory(parts[:n])
                        continue
                    except _Refused as exc:
                        if exc.errno != errno.ENOENT:
                            break
                    try:
                        parent, _ = resolver.directory(parts[:n - 1], write=True)
                    except _Refused as exc:
                        unmade[parts] = exc.errno
                        break
                try:
                    check_name(parts[n - 1])
                    self.namespace.mkdir(parent, parts[n - 1], 0o755, caller.uid, caller.gid, caller.pid)
                except KvfsError as exc:
                    unmade[parts] = exc.errno
                    break  # its files report why
                made.append((parent, parts[n - 1], 0))
        return made

    def _check_replace(self, txn, caller: Caller, parent: int, pdir: M.Inode, name: bytes) -> M.Inode | None:
        """What a store into parent/name replaces; refused where rename(2) would be."""
        found = self.namespace.find(txn, parent, name)
        if found is None:
            return None
        old = self.meta.get_inode(txn, found[0])
        if old is None:
            return None
        if stat.S_ISDIR(old.mode):
            raise _Refused(errno.EISDIR)
        if pdir.mode & stat.S_ISVTX and caller.uid not in (0, old.uid, pdir.uid):
            raise _Refused(errno.EPERM)
        return old

    def _store_block(self, s: _Store, idx: int) -> None:
        if s.error:
            return
        bs = self.block_size
        data = bytes(s.data[idx * bs:(idx + 1) * bs])  # the daemon's own copy (see the docstring)
        self.files.store(s.of, idx, data)

    def _publish(self, caller: Caller, todo: list) -> None:
        """Publish every stored file of the batch in one transaction; drop what failed."""
        with self.core.lock:
            for s in todo:
                if s.error and s.of is not None:
                    self._drop(s)
            live = [s for s in todo if not s.error]
            while live:
                effects: list = []
                touched: list = []
                try:
                    replaced = self._commit(caller, live, effects, touched)
                    break
                except _Failed as failed:  # that file fails, the rest is tried again
                    failed.store.error = failed.errno
                    self._drop(failed.store)
                    live.remove(failed.store)
                except BaseException:  # nothing was published: let go of all of it
                    for s in live:
                        s.error = s.error or errno.EIO
                        self._drop(s)
                    raise
            else:
                return
            held = [p.hash for s in live for p in s.of.changes.values() if p is not None]
            if replaced:
                # A file the batch replaced may have been one of its own (a path named twice):
                # its blocks lost their reference in the same transaction, kept only by
                # these holds, so letting go settles them (freed if nothing refers to them).
                self.blocks.release(held)
            else:
                for h in held:
                    self.blocks.unhold(h)
            for s in live:
                s.of.changes.clear()
                self.policy.settle_quota(s.of, s.of.size)
            self.blocks.apply(effects)
            self.counters["commits"] += 1
        self.core.notify_removed(touched)
        for s in live:
            self.core.published(s.of.ino)

    def _commit(self, caller: Caller, live: list, effects: list, touched: list) -> bool:
        """Publish `live` in one transaction; True if it replaced any file."""
        db = self.meta.db
        t = now_ns()
        dirs = {}
        replaced = False
        with self.meta.begin(write=True) as txn, self.meta.batch(txn):
            quotas = self.meta.has_quotas(txn)
            for s in live:
                try:
                    pdir = dirs.get(s.parent) or self.namespace.get_dir(txn, s.parent)
                    if not caller.may(pdir, W_OK | X_OK):  # (changed since _prepare)
                        raise _Refused(errno.EACCES)
                    old = self._check_replace(txn, caller, s.parent, pdir, s.parts[-1])
                except _Refused as exc:
                    raise _Failed(s, exc.errno) from None
                except KvfsError as exc:
                    raise _Failed(s, exc.errno) from None
                dirs[s.parent] = pdir
                name = s.parts[-1]
                entry_id = None
                if old is not None:
                    entry_id = M.parse_dentry_val(txn.get(M.dentry_key(s.parent, name), db=db["dentries"]))[1]
                    self.namespace.remove_entry(txn, s.parent, name)
                    self.namespace.drop_link(txn, old, t, effects)
                    replaced = True
                inode = self.namespace.new_inode(txn, stat.S_IFREG | s.mode, caller.uid, caller.gid, pdir)
                self.namespace.add_entry(txn, s.parent, name, inode.ino, entry_id)
                if quotas:
                    self.meta.put_inode(txn, inode)  # size 0 first: the size is then counted in quotas
                self.meta.put_lineage(txn, inode.ino, M.Lineage(t, caller.uid, caller.gid, caller.pid, 0, b"direct"))
                for idx, p in sorted(s.of.changes.items()):
                    if p is None:
                        continue
                    try:
                        if self.blocks.reference(txn, p, effects):
                            self.files.repoint(p)
                    except KvfsError as exc:
                        raise _Failed(s, exc.errno) from None
                    txn.put(M.bmap_key(inode.ino, idx), p.hash, db=db["bmap"])
                inode.size = len(s.data)
                self.meta.put_inode(txn, inode)
                s.of.ino = inode.ino
                touched.append((s.parent, name, 0))
            for pdir in dirs.values():
                self.namespace.touch_dir(txn, pdir, t)
        for s in live:
            self.core.accessed[s.of.ino] = t
        return replaced

    def _drop(self, s: _Store) -> None:
        """A file of the batch failed: what it holds is let go. Under the lock."""
        for p in s.of.changes.values():
            if p is not None:
                self.blocks.drop_pending(p)
        s.of.changes.clear()
        self.policy.settle_quota(s.of, 0)


def _scratch(n: int) -> memoryview:
    """Memory for bytes of a block nobody asked for: page-aligned (O_DIRECT may read into it)."""
    return memoryview(mmap.mmap(-1, n)) if n >= ALIGN else memoryview(bytearray(n))


def _aligned(view: memoryview) -> bool:
    return len(view) % ALIGN == 0 and ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


class _Failed(Exception):
    def __init__(self, store: _Store, err: int):
        self.store = store
        self.errno = err


def _check_count(items) -> None:
    if not isinstance(items, list):
        raise Invalid("a batch is a list")
    if len(items) > MAX_ITEMS:
        raise Invalid(f"a batch holds at most {MAX_ITEMS} items")

