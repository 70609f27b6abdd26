"""kvfs.lmcache_plugin: an LMCache storage plugin that keeps KV chunks in a kvfs warehouse.

Owns: naming LMCache's keys as files, the chunk file format, and LMCache's storage-backend
interface (StoragePluginInterface of LMCache 0.5.6) on top of kvfs.direct_client and plain
file I/O. Only LMCache loads this module (it imports torch and lmcache); nothing in kvfs
imports it.

    storage_plugins: ["kvfs"]
    extra_config:
      storage_plugin.kvfs.module_path: kvfs.lmcache_plugin
      storage_plugin.kvfs.class_name: KvfsBackend
      storage_plugin.kvfs.root: /mnt/kvfs/lmcache      # a directory that exists
      # storage_plugin.kvfs.direct: true               # false: file I/O only
      # storage_plugin.kvfs.staging_mb: 64             # shared memory per direction

A chunk lives at <root>/<model>/<hh>/<name>.kv: <model> is the key's model name ("/" as
"--"), <name> the rest of the key's string (world size, worker, chunk hash, dtype, layer,
tags; "@"-separated, as LMCache writes it; an xxh3-128 of it when longer than 200 bytes),
<hh> two hex digits of an xxh3 of <name>. The file is safetensors: tensor "kv" holds the
MemoryObj's bytes exactly (its dtype and shape when it is one tensor of a safetensors
dtype, else U8), "positions" (I64) its cached positions when it has them, and metadata
{format, key, fmt, shapes, dtypes, bytes} from which get() allocates the MemoryObj: there
is no index in memory, the warehouse is the index (a new process, or one after a remount,
finds what any other stored).

On a mount that serves the direct path (kvfs-direct(7)) a batch of puts is one write
request (the files serialized into memory shared with the daemon, published at once), a
batch of contains is one lookup request and a batch of gets one read request into shared
memory, copied from there into the MemoryObjs LMCache allocates. Elsewhere (another
filesystem, -o direct=off, a refused client) the same files are written to a temporary name
and renamed, and read with plain reads. A failed direct request switches to file I/O and
the direct path is tried again after RECONNECT_S (a remounted daemon has a new socket).

Puts copy the chunks' bytes when they are submitted (LMCache may free or reuse its buffers
as soon as the call returns, and at shutdown frees them under writers still running) and
are written by one thread in the background. Errors never reach the engine: a missing root
(an unmounted kvfs, say), EACCES, EROFS, ENOSPC or a broken mount make lookups misses and
puts skipped, each kind of failure logged in one line at most once a minute.
"""

import asyncio
import errno
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xxhash
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from .direct_client import DirectError, connect
from .kv import _batch_exists, _find_lookup_file, safetensors_head

log = logging.getLogger("kvfs.lmcache")

FORMAT = "kvfs.lmcache/1"
PREFIX = "storage_plugin.kvfs."
RECONNECT_S = 5.0
WARN_EVERY_S = 60.0
MAX_NAME = 200
HINTS = 1 << 16
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st


# -- names and the file format -------------------------------------------------------------

def key_path(root: str, key) -> str:
    """Where the chunk of a CacheEngineKey (or LayerCacheEngineKey) lives under root."""
    s = key.to_string()
    model = key.model_name
    name = s[len(model) + 1:] if s.startswith(model + "@") else s
    name = name.replace("/", "%2F")
    if len(name.encode()) > MAX_NAME:
        name = xxhash.xxh3_128_hexdigest(name.encode())
    model = model.replace("/", "--") or "_"
    if model.startswith("."):
        model = "_" + model
    hh = xxhash.xxh3_64_hexdigest(name.encode())[:2]
    return os.path.join(root, model, hh, name + ".kv")


def _u8(buf) -> torch.Tensor:
    """A uint8 tensor over a writable buffer (no copy)."""
    return torch.frombuffer(buf, dtype=torch.uint8)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def encode(key_str: str, obj) -> tuple[bytes, torch.Tensor, bytes]:
    """(safetensors head: 8 bytes + header, a private copy of the object's bytes, the
    cached positions' bytes or b"") of a chunk file."""
    meta = obj.metadata
    nbytes = obj.get_size()
    shapes = list(meta.shapes) if meta.shapes else [meta.shape]
    dtypes = list(meta.dtypes) if meta.dtypes else [meta.dtype]
    data = _u8(obj.byte_array).clone() if nbytes else torch.empty(0, dtype=torch.uint8)
    one = len(shapes) == 1 and dtypes[0] in _ST_DTYPES
    if one and shapes[0].numel() * dtypes[0].itemsize == nbytes:
        entry = {"dtype": _ST_DTYPES[dtypes[0]], "shape": list(shapes[0])}
    else:
        entry = {"dtype": "U8", "shape": [nbytes]}
    entries = {"kv": {**entry, "data_offsets": [0, nbytes]}}
    positions = b""
    if meta.cached_positions is not None:
        pos = meta.cached_positions.detach().to("cpu", torch.int64).contiguous().reshape(-1)
        positions = pos.numpy().tobytes()
        entries["positions"] = {"dtype": "I64", "shape": [pos.numel()],
                                "data_offsets": [nbytes, nbytes + len(positions)]}
    entries["__metadata__"] = {
        "format": FORMAT, "key": key_str, "fmt": meta.fmt.name, "bytes": str(nbytes),
        "shapes": json.dumps([list(s) for s in shapes]),
        "dtypes": json.dumps([_dtype_name(d) for d in dtypes]),
    }
    return safetensors_head(entries), data, positions


class Layout:
    """A chunk file's header, parsed and checked: where its bytes lie and what to allocate."""

    def __init__(self, head: bytes, key_str: str, size: int | None = None):
        if len(head) < 8:
            raise ValueError("short file")
        (n,) = struct.unpack_from("<Q", head)
        if n > 1 << 20 or len(head) < 8 + n:
            raise ValueError("bad header length")
        entries = json.loads(bytes(head[8:8 + n]))
        meta = entries.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        if meta.get("key") != key_str:
            raise ValueError(f"holds {meta.get('key')!r}")
        self.data_start = 8 + n
        self.nbytes = int(meta["bytes"])
        kv = entries["kv"]["data_offsets"]
        if kv != [0, self.nbytes]:
            raise ValueError("bad kv offsets")
        self.positions = tuple(entries["positions"]["data_offsets"]) if "positions" in entries else None
        end = self.positions[1] if self.positions else self.nbytes
        self.size = self.data_start + end
        if size is not None and size != self.size:
            raise ValueError(f"{size} bytes, its header says {self.size}")
        self.shapes = [torch.Size(s) for s in json.loads(meta["shapes"])]
        self.dtypes = [_torch_dtype(d) for d in json.loads(meta["dtypes"])]
        self.fmt = MemoryFormat[meta["fmt"]]

    def allocate(self, allocator, busy_loop: bool = True):
        if len(self.shapes) == 1:
            obj = allocator.allocate(self.shapes[0], self.dtypes[0], self.fmt, busy_loop=busy_loop)
        else:
            obj = allocator.allocate(self.shapes, self.dtypes, self.fmt, busy_loop=busy_loop)
        if obj is not None and obj.get_size() != self.nbytes:
            obj.ref_count_down()
            raise ValueError(f"LMCache allocated {obj.get_size()} bytes for {self.nbytes}")
        return obj

    def finish(self, obj, data) -> None:
        """Copy the file's bytes (`data`: a buffer over the whole file) into obj."""
        if self.nbytes:
            _u8(obj.byte_array).copy_(_u8(data[self.data_start:self.data_start + self.nbytes]))
        if self.positions:
            lo, hi = self.positions
            raw = bytes(data[self.data_start + lo:self.data_start + hi])
            obj.metadata.cached_positions = torch.frombuffer(bytearray(raw), dtype=torch.int64)


def _atomic_write(path: str, parts) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- the backend ---------------------------------------------------------------------------

class KvfsBackend(StoragePluginInterface):
    """LMCache's storage backend over a kvfs directory (see the module docstring)."""

    def __init__(self, dst_device: str = "cpu", config=None, metadata=None,
                 local_cpu_backend=None, loop=None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        extra = dict((config.extra_config if config is not None else None) or {})
        root = extra.get(PREFIX + "root")
        if not root:
            raise ValueError(f"the kvfs storage plugin needs extra_config {PREFIX}root (a directory on a kvfs mount)")
        self.root = os.path.abspath(str(root))
        self.want_direct = str(extra.get(PREFIX + "direct", True)).lower() not in ("false", "0", "no", "off")
        self.staging = max(1, int(float(extra.get(PREFIX + "staging_mb", 64)))) << 20
        self._lock = threading.Lock()          # the client and its buffers
        self._rlock = threading.Lock()         # the read staging buffer
        self._client = None
        self._rbuf = self._wbuf = None
        self._retry_at = 0.0
        self._warned: dict[str, float] = {}
        self._hints: OrderedDict[str, int] = OrderedDict()  # path -> size seen (a guess, checked)
        self._hint_lock = threading.Lock()
        self._pending: dict = {}
        self._pending_lock = threading.Lock()
        self._puts = ThreadPoolExecutor(1, thread_name_prefix="kvfs-put")
        self._reads = ThreadPoolExecutor(4, thread_name_prefix="kvfs-get")
        self._closed = False
        self._lookup_file = _find_lookup_file(self.root)
        if not os.path.isdir(self.root):
            self._warn("root", f"kvfs: {self.root} is not a directory (is the kvfs mount there?): "
                               "every lookup misses and puts are skipped until it is")
        self._get_client()
        log.info("kvfs storage plugin on %s (%s)", self.root,
                 "direct path" if self._client is not None else "file I/O")

    def __str__(self) -> str:
        return "KvfsBackend"

    @property
    def uses_direct_path(self) -> bool:
        return self._client is not None

    # -- plumbing ----------------------------------------------------------------------------

    def _warn(self, kind: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[kind] = now
            log.warning("%s", msg)

    def _get_client(self):
        if not self.want_direct:
            return None
        with self._lock:
            if self._client is None and time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + RECONNECT_S
                self._client = connect(self.root)
            return self._client

    def _drop_client(self, client, exc: Exception) -> None:
        self._warn("direct", f"kvfs: the direct path of {self.root} failed ({exc}); using file I/O "
                             f"(retried in {RECONNECT_S:.0f} s)")
        with self._lock:
            if self._client is client:
                self._client = None
                self._rbuf = self._wbuf = None
                self._retry_at = time.monotonic() + RECONNECT_S
            try:
                client.close()
            except OSError:
                pass

    def _buffer(self, client, which: str, size: int):
        """The client's read or write staging buffer, at least `size` bytes."""
        with self._lock:
            buf = self._rbuf if which == "r" else self._wbuf
            if buf is None or buf.client is not client or buf.size < size:
                if buf is not None and buf.client is client:
                    buf.close()
                buf = client.buffer(max(size, self.staging))
                if which == "r":
                    self._rbuf = buf
                else:
                    self._wbuf = buf
            return buf

    def _hint(self, path: str, size: int | None) -> None:
        with self._hint_lock:
            if size is None:
                self._hints.pop(path, None)
                return
            self._hints[path] = size
            self._hints.move_to_end(path)
            while len(self._hints) > HINTS:
                self._hints.popitem(last=False)

    # -- contains ----------------------------------------------------------------------------

    def _exists(self, keys) -> list[bool]:
        """Which keys are stored: one request on the direct path."""
        paths = [key_path(self.root, k) for k in keys]
        if not paths:
            return []
        client = self._get_client()
        if client is not None:
            try:
                sizes = client.lookup(paths)
                for p, n in zip(paths, sizes):
                    self._hint(p, n if n > 0 else None)
                return [n > 0 for n in sizes]
            except (DirectError, ValueError) as exc:
                self._drop_client(client, exc)
        try:
            if self._lookup_file:
                try:
                    return _batch_exists(self._lookup_file, self.root, paths)
                except (OSError, ValueError):
                    pass
            return [os.path.isfile(p) for p in paths]
        except OSError as exc:
            self._warn("lookup", f"kvfs: lookups under {self.root} fail ({exc}): answered as misses")
            return [False] * len(paths)

    def contains(self, key, pin: bool = False) -> bool:
        return self._exists([key])[0]

    def batched_contains(self, keys, pin: bool = False) -> int:
        n = 0
        for present in self._exists(list(keys)):
            if not present:
                break
            n += 1
        return n

    async def batched_async_contains(self, lookup_id: str, keys, pin: bool = False) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._reads, self.batched_contains, keys, pin)

    def exists_in_put_tasks(self, key) -> bool:
        with self._pending_lock:
            return key in self._pending

    # -- put ---------------------------------------------------------------------------------

    def batched_submit_put_task(self, keys, objs, transfer_spec=None, on_complete_callback=None):
        """Copy the chunks now, write them in the background (one batch, one request)."""
        if self._closed:
            return None
        todo = []
        with self._pending_lock:
            for key, obj in zip(keys, objs):
                if key in self._pending:
                    continue
                try:
                    head, data, positions = encode(key.to_string(), obj)
                except Exception as exc:  # an object this cannot represent: skipped, said once
                    self._warn("encode", f"kvfs: cannot store {key.to_string()}: {exc}")
                    continue
                self._pending[key] = True
                todo.append((key, key_path(self.root, key), head, data, positions))
        if not todo:
            return None
        return [self._puts.submit(self._put_batch, todo, on_complete_callback)]

    def submit_put_task(self, key, obj, on_complete_callback=None):
        futures = self.batched_submit_put_task([key], [obj], on_complete_callback=on_complete_callback)
        return futures[0] if futures else None

    def _put_batch(self, todo: list, callback) -> int:
        stored = []
        try:
            stored = self._write(todo)
        except Exception as exc:  # never into the engine
            self._warn("put", f"kvfs: storing {len(todo)} chunks under {self.root} failed: {exc}")
        finally:
            with self._pending_lock:
                for key, *_ in todo:
                    self._pending.pop(key, None)
        if callback is not None:
            for key in stored:
                try:
                    callback(key)
                except Exception as exc:
                    log.warning("kvfs: on_complete_callback failed for %s: %s", key, exc)
        return len(stored)

    def _write(self, todo: list) -> list:
        """Store the chunks not yet stored; the keys stored (or already there)."""
        if not os.path.isdir(self.root):
            self._warn("root", f"kvfs: {self.root} is not a directory (is the kvfs mount there?): "
                               f"{len(todo)} chunks not stored")
            return []
        present = self._exists([key for key, *_ in todo])
        done = [item[0] for item, p in zip(todo, present) if p]
        todo = [item for item, p in zip(todo, present) if not p]
        client = self._get_client()
        if todo and client is not None:
            try:
                return done + self._write_direct(client, todo)
            except (DirectError, ValueError) as exc:
                self._drop_client(client, exc)
        for key, path, head, data, positions in todo:
            try:
                _atomic_write(path, [head, data.numpy(), positions])
                self._hint(path, len(head) + data.numel() + len(positions))
                done.append(key)
            except OSError as exc:
                self._warn(f"put-{exc.errno}", f"kvfs: chunk not stored under {self.root}: {exc}")
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    break
        return done

    def _write_direct(self, client, todo: list) -> list:
        done = []
        limit = max(1, client.max_items)
        i = 0
        while i < len(todo):
            sizes = [len(h) + d.numel() + len(p) for _, _, h, d, p in todo[i:i + limit]]
            n, total = 0, 0
            while n < len(sizes) and (n == 0 or total + sizes[n] <= self.staging):
                total += sizes[n]
                n += 1
            batch = todo[i:i + n]
            buf = self._buffer(client, "w", total)
            items, at = [], 0
            for (key, path, head, data, positions), size in zip(batch, sizes):
                view = _u8(buf.view[at:at + size])
                view[:len(head)].copy_(_u8(bytearray(head)))
                view[len(head):len(head) + data.numel()].copy_(data)
                if positions:
                    view[len(head) + data.numel():].copy_(_u8(bytearray(positions)))
                del view
                items.append((path, buf, at, size, 0o644))
                at += size
            for (key, path, *_), size, r in zip(batch, sizes, client.write(items, parents=True)):
                if r < 0:
                    self._warn(f"put-{-r}", f"kvfs: chunk not stored under {self.root}: {os.strerror(-r)}")
                else:
                    self._hint(path, size)
                    done.append(key)
            i += n
        return done

    # -- get ---------------------------------------------------------------------------------

    def get_blocking(self, key):
        return self.batched_get_blocking([key])[0]

    def get_non_blocking(self, key, location=None) -> Future | None:
        return self._reads.submit(self.get_blocking, key)

    def batched_get_blocking(self, keys, busy_loop: bool = True) -> list:
        keys = list(keys)
        if not keys or self.local_cpu_backend is None:
            return [None] * len(keys)
        paths = [key_path(self.root, k) for k in keys]
        client = self._get_client()
        if client is not None:
            try:
                return self._get_direct(client, keys, paths, busy_loop)
            except (DirectError, ValueError) as exc:
                self._drop_client(client, exc)
        return [self._get_file(k, p, busy_loop) for k, p in zip(keys, paths)]

    async def batched_get_non_blocking(self, lookup_id: str, keys, transfer_spec=None) -> list:
        """The leading chunks found (LMCache's prefetch)."""
        got = await asyncio.get_running_loop().run_in_executor(
            self._reads, lambda: self.batched_get_blocking(keys, busy_loop=False))
        out = []
        for i, obj in enumerate(got):
            if obj is None:
                for rest in got[i + 1:]:
                    if rest is not None:
                        rest.ref_count_down()
                break
            out.append(obj)
        return out

    def _get_direct(self, client, keys, paths, busy_loop: bool) -> list:
        """Sizes (remembered from lookups and writes, else one lookup), then windows of
        one read request each into shared memory, copied into LMCache's MemoryObjs."""
        sizes = [self._hints.get(p) for p in paths]
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if unknown:
            for i, n in zip(unknown, client.lookup([paths[i] for i in unknown])):
                sizes[i] = n if n > 0 else -1
        out: list = [None] * len(keys)
        retry = []
        with self._rlock:
            i = 0
            while i < len(keys):
                n, total = 0, 0
                while i + n < len(keys) and n < client.max_items and (
                        n == 0 or total + max(sizes[i + n], 0) <= self.staging):
                    total += max(sizes[i + n], 0)
                    n += 1
                window = [j for j in range(i, i + n) if sizes[j] > 0]
                buf = self._buffer(client, "r", max(total, 1))
                offsets, at = {}, 0
                for j in window:
                    offsets[j] = at
                    at += sizes[j]
                results = client.read([(paths[j], 0, sizes[j], buf, offsets[j]) for j in window]) if window else []
                for j, r in zip(window, results):
                    if r != sizes[j]:
                        self._hint(paths[j], None)
                        if r >= 0:
                            retry.append(j)  # changed since it was sized: once more, sized anew
                        continue
                    out[j] = self._finish(keys[j], paths[j], buf.view[offsets[j]:offsets[j] + r], busy_loop)
                i += n
        for j in retry:
            out[j] = self._get_file(keys[j], paths[j], busy_loop)
        return out

    def _finish(self, key, path, data, busy_loop: bool):
        try:
            layout = Layout(data, key.to_string(), len(data))
            obj = layout.allocate(self.local_cpu_backend, busy_loop)
        except (ValueError, KeyError, TypeError) as exc:
            self._warn("format", f"kvfs: {path} is not a chunk of this key ({exc}): a miss")
            return None
        if obj is None:
            self._warn("alloc", "kvfs: LMCache could not allocate memory for a chunk: a miss")
            return None
        layout.finish(obj, data)
        return obj

    def _get_file(self, key, path, busy_loop: bool):
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                first = f.read(min(size, 64 << 10))
                (n,) = struct.unpack_from("<Q", first) if len(first) >= 8 else (0,)
                if 8 + n > len(first):
                    first += f.read(8 + n - len(first))
                layout = Layout(first, key.to_string(), size)
                obj = layout.allocate(self.local_cpu_backend, busy_loop)
                if obj is None:
                    self._warn("alloc", "kvfs: LMCache could not allocate memory for a chunk: a miss")
                    return None
                try:
                    f.seek(layout.data_start)
                    if layout.nbytes:
                        view = obj.byte_array
                        got = 0
                        while got < layout.nbytes:
                            r = f.readinto(view[got:])
                            if not r:
                                raise ValueError("the file is shorter than its header says")
                            got += r
                    if layout.positions:
                        lo, hi = layout.positions
                        raw = f.read(hi - lo)
                        obj.metadata.cached_positions = torch.frombuffer(bytearray(raw), dtype=torch.int64)
                except BaseException:
                    obj.ref_count_down()
                    raise
                return obj
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._warn(f"get-{getattr(exc, 'errno', None)}", f"kvfs: reading {path} failed ({exc}): a miss")
            return None

    # -- the rest of the interface -----------------------------------------------------------

    def pin(self, key) -> bool:
        return True  # kvfs keeps what LRU eviction spares; a later miss is tolerated

    def unpin(self, key) -> bool:
        return True

    def remove(self, key, force: bool = True) -> bool:
        path = key_path(self.root, key)
        self._hint(path, None)
        try:
            os.unlink(path)
            return True
        except OSError:
            return False

    def touch_cache(self) -> None:
        pass  # kvfs keeps its own LRU order (every read counts)

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the puts submitted so far to be written."""
        self._puts.submit(lambda: None).result(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._puts.shutdown(wait=True)
        self._reads.shutdown(wait=True)
        with self._lock:
            for buf in (self._rbuf, self._wbuf):
                if buf is not None:
                    buf.close()
            self._rbuf = self._wbuf = None
            if self._client is not None:
                self._client.close()
                self._client = None
