"""Verified block reads: the daemon's block cache and read-ahead.

Owns: reading a stored block from its device and verifying it against its hash before a
byte of it is returned (a mismatch is Damaged: EIO, then quarantine through the
`on_damaged` hook, never data), the cache of verified blocks, and the read-ahead threads
that fill it for sequential readers. Its own lock (`_cache_lock`) guards the cache; it takes
Core.lock only through on_damaged, after a read has ended. Knows nothing of files or names: callers resolve a file's blocks to
locations (hash, device, offset, stored length, raw length, codec) first.

Read registration: every device read runs between DeviceSet.read_begin and read_end, so an
extent freed meanwhile is not reused under it. A read-ahead registers when it is queued, under
the lock and transaction that resolved the extent.
"""

import collections
import concurrent.futures
import logging
import threading
import time

from . import codec as codecs
from .core import Layer
from .errors import Corrupt, Damaged, KvfsError

log = logging.getLogger("kvfs.warehouse")

BLOCK_CACHE_BYTES = 64 << 20
READ_AHEAD_BYTES = 8 << 20  # how far ahead of a sequential reader blocks are fetched into the block cache
READ_AHEAD_THREADS = 4  # threads reading ahead: the devices see this many reads at once (besides readers')
READ_AHEAD_UNUSED_S = 2.0  # blocks read ahead and not read within this long stop limiting read-ahead
READ_THROUGH_S = 30.0  # a file read to its end this recently is in the kernel's page cache: no read-ahead at open
READ_THROUGH_KEPT = 65536  # files remembered as read through before stale ones are forgotten


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


class BlockCache(Layer):
    """Verified reads of stored blocks, cached (see the module docstring). on_damaged(damage,
    ino): what to do with a block found damaged, once its read is over (kvfs.policy)."""

    def __init__(self, core, blocks, on_damaged):
        super().__init__(core)
        self.blocks = blocks
        self.on_damaged = on_damaged
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._fetching: dict[bytes, _Fetching] = {}  # blocks being read ahead (_cache_lock)
        # Blocks read ahead into the cache and not read yet -> when (_cache_lock)
        self._unused: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._served: dict[bytes, int] = {}  # bytes of a cached block answered so far (_cache_lock)
        self._read_through: dict[int, float] = {}  # ino -> when a read last reached its end (Core.lock)
        self._ahead_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Wait for the read-ahead threads: their reads end before the devices close."""
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True)

    # -- reads ------------------------------------------------------------------------------

    def verified(self, gen: int, ino: int, fn, *args):
        """fn(*args) as a read registered as `gen` (read_begin), ended here. A damaged block
        it finds goes to on_damaged once the read is over: a quarantine takes Core.lock,
        which an allocator waiting for running reads may hold."""
        try:
            return fn(*args)
        except Damaged as damage:
            failed = damage
        finally:
            self.devices.read_end(gen)
        self.on_damaged(failed, ino)
        raise failed

    def read(self, ino: int, loc) -> bytes:
        """The verified bytes of the block at `loc`, as one registered read (file `ino`'s)."""
        return self.verified(self.devices.read_begin(), ino, self.fetch, loc)

    def cached(self, h: bytes):
        """Block `h` if the cache holds it, else None (nothing else happens)."""
        with self._cache_lock:
            return self._cache.get(h)

    def fetch(self, loc) -> bytes:
        """The verified bytes of a block: Damaged (EIO) if its stored copy fails
        verification or is quarantined, never data. Call it inside a registered read and
        hand Damaged to quarantine once that read is over (see verified). A block a
        read-ahead thread is reading is waited for; one it has not started yet is read here
        (and skipped there)."""
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
        if self.blocks.is_damaged(h, dev, off):
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

    def served(self, hits: list) -> None:
        """Reads were answered from cached blocks: [(hash, bytes asked, block length)]. A
        block answered whole (in any order of requests) is done with: other readers of the
        file have the kernel's page cache. It is first to go."""
        with self._cache_lock:
            for h, asked, length in hits:
                if h in self._cache:
                    served = self._served.pop(h, 0) + asked
                    if served < length:
                        self._served[h] = served
                    self._cache.move_to_end(h, last=served < length)
                    self._unused.pop(h, None)

    def drop(self) -> None:
        """Forget the cache of verified blocks (the next reads go to the devices)."""
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0
            self._unused.clear()
            self._served.clear()

    # -- read-ahead ---------------------------------------------------------------------------

    def ahead_blocks(self) -> int:
        return max(1, min(32, READ_AHEAD_BYTES // self.block_size))

    def read_through(self, ino: int) -> None:
        """A read of file `ino` reached its end: the kernel's page cache has it now."""
        if len(self._read_through) > READ_THROUGH_KEPT:
            stale = time.monotonic() - READ_THROUGH_S
            self._read_through = {i: t for i, t in self._read_through.items() if t > stale}
        self._read_through[ino] = time.monotonic()

    def read_through_lately(self, ino: int) -> bool:
        return time.monotonic() - self._read_through.get(ino, -READ_THROUGH_S) < READ_THROUGH_S

    def read_ahead(self, resolve, first: int, stop: int) -> int:
        """Have the read-ahead threads fetch blocks first..stop-1 of a file into the cache;
        resolve(index) -> (kind, loc) says what each holds (kvfs.files.Files.resolve).
        Returns the last index dealt with (queued, cached or in flight already, or a hole),
        first - 1 if none. Called under the lock whose transaction `resolve` reads, so that
        no free of theirs is reused before their reads are registered (read_begin, each its
        own). Advisory: it stops early when as much as half the cache is in flight or read
        ahead and not read yet (many readers at once), or at a block it cannot resolve (the
        read of that block reports it), and never raises."""
        done = first - 1
        for idx in range(first, stop):
            try:
                kind, loc = resolve(idx)
            except Exception:  # (a damaged record: the read of that block reports it)
                break
            if kind == "blk" and not self.blocks.is_damaged(*loc[:3]):
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
                if job is not None and not self._start(loc, job):
                    break
            done = idx
        return done

    def _start(self, loc, job: _Fetching) -> bool:
        """Queue the read-ahead of `loc` (registered now); False if no thread could take it."""
        gen = self.devices.read_begin()
        try:
            if self._ahead_pool is None:
                self._ahead_pool = concurrent.futures.ThreadPoolExecutor(READ_AHEAD_THREADS, "kvfs-ahead")
            self._ahead_pool.submit(self._read_ahead, gen, loc, job)
            return True
        except RuntimeError as exc:  # no thread could be started, or closing
            # The task may be queued all the same (a thread that exists runs it later) or
            # never run: unless it is running now, end its registration here and keep it
            # from reading.
            with self._cache_lock:
                running, claimed = job.ahead, job.started
                job.started = True
            if not running:
                self._end_ahead_read(gen, job)
                if not claimed:
                    self._fetched(loc[0], job)
            log.warning("read-ahead not started: %s", exc)
            return False

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
