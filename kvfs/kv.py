"""kvfs.kv: the kvfs-native layout of cached context, for code that is written for kvfs.

A prompt's token ids are cut into chunks of `chunk_tokens`; only whole chunks are stored.
Chunk i is named by its *chain hash*: xxh3-128 over a canonical encoding of

    b"kvfs.kv/1" | parent chain hash (16 bytes; zeros for the first chunk)
                 | extra keys, sorted, each as len(key) key len(value) value (u32 LE + UTF-8)
                 | the chunk's token ids as little-endian u32

where the extra keys are the model, its revision, the dtype and layout of the KV, the LoRA
adapter and a tenant salt (any that are set), and any keys a caller adds (extra_keys: an
engine's block size, its tensor-parallel rank, ...). No pickle, no hash(), no PYTHONHASHSEED: the
same tokens give the same name in every process, on every machine, in every Python.

A chunk lives at <root>/<namespace>/<model>/<hh>/<chain hash>.kv (hh: the first two hex
digits, so no directory grows past 1/256 of the model's chunks). The file is safetensors:
"tokens" (uint32) and "layer.<i>.k", "layer.<i>.v" (the chunk's slice of every layer), with
metadata: format, model, revision, dtype, layout, chunk index, chain and parent hash, so
any safetensors reader can open it. Files are written to a temporary name and renamed into
place: readers never see half a chunk, and concurrent writers of the same chunk are harmless
(they write the same bytes). On a kvfs mount, chunks that two prompts share are stored once.

On a kvfs mount that serves the direct path (kvfs.direct_client, kvfs-direct(7)), lookups,
stores and loads use it by themselves: one request looks up a whole chain, one stores a
batch of chunk files (serialized straight into memory shared with the daemon, published
at once), and loads read every tensor's bytes straight into the returned array, which lives
in shared memory (no copy after the daemon's read). Where the direct path cannot be used
(another filesystem, an older daemon, a mount with -o direct=off, a refused client, or a
failure midway) the same calls use file I/O through the mount: the same bytes either way.
Lookups then ask the mount's .kvfs/lookup file (one round trip), or stat each chunk elsewhere.
"""

import errno
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import xxhash

log = logging.getLogger("kvfs.kv")

FORMAT = "kvfs.kv/1"
STAGING_BYTES = 64 << 20  # client memory shared with the daemon for stores and chunk headers
WINDOW_BYTES = 256 << 20  # a load reads this much per request, then hands it on (device=)
HASH_BYTES = 16
_ROOT_PARENT = bytes(HASH_BYTES)
_SAFETENSORS_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": None,
    "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
    "U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
}


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def chain_hashes(tokens, chunk_tokens: int, extra: dict[str, str] | None = None) -> list[bytes]:
    """The chain hash of every whole chunk of `tokens` (ints below 2**32)."""
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError("tokens must be a flat sequence of token ids")
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError("token ids must lie in [0, 2**32)")
    keys = b"".join(_u32(len(k.encode())) + k.encode() + _u32(len(v.encode())) + v.encode()
                    for k, v in sorted((extra or {}).items()) if v != "")
    ids = ids.astype("<u4")
    out, parent = [], _ROOT_PARENT
    for start in range(0, len(ids) - chunk_tokens + 1, chunk_tokens):
        h = xxhash.xxh3_128_digest(FORMAT.encode() + parent + keys + ids[start:start + chunk_tokens].tobytes())
        out.append(h)
        parent = h
    return out


@dataclass
class KVStore:
    """Cached context of one model under `root` (a directory on a kvfs mount, or anywhere).

    kv arrays are laid out (layers, 2, tokens, ...): K and V of every layer, tokens on
    axis 2 (numpy arrays, or torch tensors when torch is installed)."""

    root: str
    model: str
    namespace: str = "default"
    chunk_tokens: int = 256
    revision: str = ""
    dtype: str = ""
    layout: str = "LKTD"
    lora: str = ""
    salt: str = ""  # per tenant: the same prompt of two tenants gets two names
    direct: bool = True  # use the mount's direct path where it is served
    extra_keys: dict[str, str] = field(default_factory=dict)  # more keys the chain hashes cover
    _lookup_file: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for part in (self.namespace, self.model):
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"namespace and model must be plain names, not {part!r}")
        self.dir = os.path.join(self.root, self.namespace, self.model)
        self._lookup_file = _find_lookup_file(self.root)
        self._conn = None
        self._pid = os.getpid()
        self._staging = None
        self._outputs: list = []
        # One caller at a time on the direct path: its staging memory and result buffers are
        # shared by every call (a connector's writer thread and its loader, say).
        self._lock = threading.RLock()
        if self.direct:
            from .direct_client import connect

            self._conn = connect(self.root)

    @property
    def _client(self):
        """The direct path's connection, or None. A forked child (a worker process) must not
        talk over its parent's connection or use its parent's shared memory: it connects
        anew (and leaves those alone: its parent still uses them)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._staging, self._outputs = None, []
            if self._conn is not None:
                from .direct_client import connect

                self._conn = connect(self.root)
        return self._conn

    @_client.setter
    def _client(self, value) -> None:
        self._conn = value

    @property
    def uses_direct_path(self) -> bool:
        return self._client is not None

    def empty(self, shape, dtype) -> np.ndarray:
        """An array in memory shared with the daemon, for load(out=...) (direct path)."""
        with self._lock:
            if self._client is None:
                raise ValueError("empty() needs the direct path (this store uses file I/O)")
            dtype = np.dtype(dtype)
            buf = self._new_buffer(max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize))
            return np.ndarray(tuple(shape), dtype=dtype, buffer=buf.mm)

    KEPT_OUTPUTS = 8  # result buffers kept registered for load(out=...); older ones are let go

    def _new_buffer(self, size: int):
        buf = self._client.buffer(size)
        self._outputs.append(buf)
        while len(self._outputs) > self.KEPT_OUTPUTS:
            self._outputs.pop(0).close()  # (its arrays stay valid; they just cannot be out= any more)
        return buf

    def _buffer_of(self, arr: np.ndarray):
        lo = arr.ctypes.data
        for buf in self._outputs:
            start = _address(buf)
            if start <= lo and lo + arr.nbytes <= start + buf.size:
                return buf
        return None

    def close(self) -> None:
        """Let go of the direct path's connection and shared memory (also done at exit)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._pid != os.getpid():  # a forked child: all of it is its parent's
            self._pid, self._conn, self._staging, self._outputs = os.getpid(), None, None, []
            return
        for buf in getattr(self, "_outputs", []):
            buf.close()
        self._outputs = []
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _fall_back(self, exc: Exception) -> None:
        log.warning("kvfs.kv: the direct path failed (%s); using file I/O from now on", exc)
        self._close()

    def _staging_buffer(self, size: int):
        if self._staging is None or self._staging.size < size:
            if self._staging is not None:
                self._staging.close()
            self._staging = self._client.buffer(max(size, STAGING_BYTES))
        return self._staging

    @property
    def extra(self) -> dict[str, str]:
        keys = {"model": self.model, "revision": self.revision, "dtype": self.dtype,
                "layout": self.layout, "lora": self.lora, "salt": self.salt}
        for k, v in self.extra_keys.items():
            if k in keys:
                raise ValueError(f"extra key {k!r} is a field of KVStore: set it there")
            keys[k] = str(v)
        return keys

    def chain(self, tokens) -> list[bytes]:
        return chain_hashes(tokens, self.chunk_tokens, self.extra)

    def path(self, chain_hash: bytes) -> str:
        h = chain_hash.hex()
        return os.path.join(self.dir, h[:2], h + ".kv")

    def paths(self, tokens) -> list[str]:
        return [self.path(h) for h in self.chain(tokens)]

    # -- writing ---------------------------------------------------------------------------

    def store(self, tokens, kv, offset: int = 0) -> list[str]:
        """Store every whole chunk of `tokens` with its slice of `kv` (layers, 2, tokens,
        ...); chunks already stored are not written again. Returns the chunks' paths.

        offset (a multiple of chunk_tokens): kv holds the tokens from there on (kv[:, :, 0]
        is token `offset`) and only the chunks from there on are stored; `tokens` is still
        the whole prefix, which names them."""
        kv, kv_dtype = _to_numpy(kv)
        if offset < 0 or offset % self.chunk_tokens:
            raise ValueError("offset must be a multiple of chunk_tokens")
        if kv.ndim < 3 or kv.shape[1] != 2 or kv.shape[2] < len(tokens) - len(tokens) % self.chunk_tokens - offset:
            raise ValueError("kv must be shaped (layers, 2, tokens, ...) with a slice for every token")
        ids = np.asarray(tokens, dtype=np.int64)
        chain = self.chain(ids)
        first = offset // self.chunk_tokens
        have = [True] * first + self.exists(chain[first:])
        paths = [self.path(h) for h in chain]
        todo = []
        for i, (h, present) in enumerate(zip(chain, have)):
            if present:
                continue
            lo, hi = i * self.chunk_tokens, (i + 1) * self.chunk_tokens
            tensors = {"tokens": ids[lo:hi].astype(np.uint32)}
            for layer in range(kv.shape[0]):
                tensors[f"layer.{layer}.k"] = kv[layer, 0, lo - offset:hi - offset]
                tensors[f"layer.{layer}.v"] = kv[layer, 1, lo - offset:hi - offset]
            meta = {"format": FORMAT, "model": self.model, "revision": self.revision,
                    "dtype": self.dtype or kv_dtype, "layout": self.layout,
                    "chunk_index": str(i), "chunk_tokens": str(self.chunk_tokens),
                    "chain": h.hex(), "parent": chain[i - 1].hex() if i else ""}
            todo.append((paths[i], tensors, meta, kv_dtype))
        with self._lock:
            if todo and self._client is not None:
                try:
                    self._store_direct(todo)
                    return paths
                except OSError as exc:
                    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
                        raise  # file I/O would fail alike
                    self._fall_back(exc)
        for path, tensors, meta, st_dtype in todo:
            _write_atomic(path, tensors, meta, st_dtype)
        return paths

    def _store_direct(self, todo: list) -> None:
        """Serialize chunk files into shared memory and store them in batches, each batch
        published at once."""
        layouts = [_layout(tensors, meta, st_dtype) for _, tensors, meta, st_dtype in todo]
        biggest = max(size for _, _, size in layouts)
        buf = self._staging_buffer(biggest)
        batch, used = [], 0
        for (path, tensors, _, _), (header, offsets, size) in zip(todo, layouts):
            if used + size > buf.size:
                self._flush_stores(batch)
                batch, used = [], 0
            view = np.frombuffer(buf.mm, np.uint8, size, used)
            view[:len(header)] = np.frombuffer(header, np.uint8)
            for name, (start, end) in offsets.items():
                t = tensors[name]
                dst = view[len(header) + start:len(header) + end].view(t.dtype).reshape(t.shape)
                np.copyto(dst, t)
            del view, dst
            batch.append((path, buf, used, size, 0o644))
            used += size
        self._flush_stores(batch)

    def _flush_stores(self, batch: list) -> None:
        if not batch:
            return
        for (path, *_), r in zip(batch, self._client.write(batch, parents=True)):
            if r < 0:
                raise OSError(-r, f"storing {path}: {os.strerror(-r)}")

    # -- reading ---------------------------------------------------------------------------

    def exists(self, chain: list[bytes]) -> list[bool]:
        """Which of these chunks are stored: one round trip on a kvfs mount."""
        paths = [self.path(h) for h in chain]
        with self._lock:
            if self._client is not None and paths:
                try:
                    return [n >= 0 for n in self._client.lookup(paths)]
                except OSError as exc:
                    self._fall_back(exc)
        if self._lookup_file and paths:
            try:
                return _batch_exists(self._lookup_file, self.root, paths)
            except OSError:
                pass  # an older mount, or a path outside it: ask one by one
        return [os.path.exists(p) for p in paths]

    def lookup(self, tokens) -> int:
        """How many leading tokens are cached (a multiple of chunk_tokens)."""
        n = 0
        for present in self.exists(self.chain(tokens)):
            if not present:
                break
            n += 1
        return n * self.chunk_tokens

    def load_chunks(self, tokens, limit: int | None = None) -> list["Chunk"]:
        """The leading cached chunks of `tokens` (at most `limit` tokens' worth), each
        mapped, not read: its arrays are views of the file's pages."""
        out = []
        for h in self.chain(tokens)[: None if limit is None else limit // self.chunk_tokens]:
            try:
                out.append(open_chunk(self.path(h)))
            except FileNotFoundError:  # not stored, or evicted since
                break
        return out

    def load(self, tokens, framework: str = "np", device: str | None = None, out=None):
        """(cached token count, kv shaped (layers, 2, tokens, ...)) for the longest cached
        prefix; kv is None when nothing is cached. framework "pt" gives a torch tensor;
        device (e.g. "cuda") puts it there (torch), copied in as the chunks arrive.

        On the direct path the result lives in memory shared with the daemon, which reads
        into it directly. Fresh memory costs the kernel a page allocation per 4 KiB (about
        as much as the read): a caller loading again passes `out`, an array from empty() or
        an earlier load, and the bytes land there (out[:, :, :tokens])."""
        with self._lock:
            if out is not None and self._client is None:
                raise ValueError("out= needs the direct path (this store uses file I/O)")
            if self._client is not None:
                try:
                    got = self._load_direct(tokens, framework, device, out)
                    if got is not None:
                        return got
                except OSError as exc:
                    self._fall_back(exc)
        chunks = self.load_chunks(tokens)
        if not chunks:
            return 0, None
        kv = np.concatenate([c.kv() for c in chunks], axis=2)
        n = len(chunks) * self.chunk_tokens
        if framework == "pt" or device is not None:
            bf16 = any(c.dtype == "BF16" for c in chunks)
            out = _torch(kv, "BF16" if bf16 else "")
            return n, out.to(device) if device is not None else out
        return n, kv  # (BF16: its raw 16-bit words, as on the direct path)

    def _load_direct(self, tokens, framework: str, device: str | None, out=None):
        """load() on the direct path: the chunks' first blocks (their headers) into staging
        memory, then every tensor's bytes straight into the result, which lives in memory
        shared with the daemon. None if a chunk's layout is not what this reads (file I/O
        then)."""
        return _DirectLoad(self, self._client).run(tokens, framework, device, out)


@dataclass
class Chunk:
    """One stored chunk, mapped: `tokens`, k(layer) and v(layer) are np.memmap views."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> safetensors dtype

    @property
    def tokens(self) -> np.ndarray:
        return self.tensors["tokens"]

    @property
    def dtype(self) -> str:
        """The safetensors dtype of the K/V tensors (BF16 ones are mapped as raw uint16 words)."""
        return self.dtypes.get("layer.0.k", self.metadata.get("dtype", ""))

    @property
    def layers(self) -> int:
        return sum(1 for name in self.tensors if name.endswith(".k"))

    def k(self, layer: int) -> np.ndarray:
        return self.tensors[f"layer.{layer}.k"]

    def v(self, layer: int) -> np.ndarray:
        return self.tensors[f"layer.{layer}.v"]

    def kv(self) -> np.ndarray:
        """The chunk's KV shaped (layers, 2, tokens, ...) (a copy out of the mapping)."""
        return np.stack([np.stack([self.k(layer), self.v(layer)]) for layer in range(self.layers)])


def open_chunk(path: str) -> Chunk:
    """Map a chunk file: parse its safetensors header and make a memmap per tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors = {}
    for name, t in header.items():
        dtype = np.uint16 if t["dtype"] == "BF16" else _SAFETENSORS_DTYPES.get(t["dtype"])  # (BF16: raw words)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {t['dtype']}, which numpy cannot map")
        start, end = t["data_offsets"]
        shape = tuple(t["shape"])
        if end == start:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return Chunk(path, meta, tensors, {name: t["dtype"] for name, t in header.items()})


def _to_numpy(kv) -> tuple[np.ndarray, str]:
    """(an array of kv's bytes, its safetensors dtype). A torch bfloat16 tensor, which numpy
    cannot hold, comes as its raw 16-bit words, dtype BF16."""
    if hasattr(kv, "detach"):  # a torch tensor
        kv = kv.detach().cpu()
        if str(kv.dtype) == "torch.bfloat16":
            import torch

            return kv.view(torch.int16).numpy().view(np.uint16), "BF16"
        kv = kv.numpy()
    kv = np.asarray(kv)
    name = _DTYPE_NAMES.get(np.dtype(kv.dtype).str)
    if name is None:
        raise ValueError(f"kv dtype {kv.dtype} has no safetensors name")
    return kv, name


_DTYPE_NAMES = {np.dtype(v).str: k for k, v in _SAFETENSORS_DTYPES.items() if v is not None}


def _layout(tensors: dict, meta: dict, kv_dtype: str) -> tuple[bytes, dict, int]:
    """A safetensors file's layout: (its first 8 + header bytes, name -> (start, end) of
    the data after them, file size). Tensors lie in the dict's order, contiguous."""
    entries, offsets, pos = {}, {}, 0
    # The token ids go last: the layer tensors (whole multiples of 4 KiB in any chunk big
    # enough to be aligned) then all start aligned after the padded header.
    for name, t in sorted(tensors.items(), key=lambda kv: kv[0] == "tokens"):
        n = t.size * t.dtype.itemsize
        dtype = "U32" if name == "tokens" else kv_dtype
        entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        offsets[name] = (pos, pos + n)
        pos += n
    entries["__metadata__"] = meta
    # For a chunk of a MiB or more the header is padded to 4 KiB: its tensors then start
    # 4 KiB-aligned in the file, and a direct load reads them past the page cache (O_DIRECT)
    # straight into the caller's array.
    head = safetensors_head(entries, 4096 if pos >= 1 << 20 else 8)
    return head, offsets, len(head) + pos


def safetensors_head(entries: dict, align: int = 8) -> bytes:
    """The first bytes of a safetensors file: its header's length (u64 LE) and the JSON
    header of `entries`, padded with spaces (which safetensors allows) so that the data
    after it starts at a multiple of `align` (8 at least)."""
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % align if align > 8 else -len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _write_atomic(path: str, tensors: dict, meta: dict, kv_dtype: str) -> None:
    """Write a chunk file (the same bytes the direct path stores) under a temporary name
    and rename it into place."""
    head, offsets, size = _layout(tensors, meta, kv_dtype)
    data = bytearray(size)
    data[:len(head)] = head
    for name, (start, end) in offsets.items():
        t = tensors[name]
        np.copyto(np.frombuffer(data, t.dtype, t.size, len(head) + start).reshape(t.shape), t)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)  # another writer's identical chunk may land first: harmless
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _find_lookup_file(root: str) -> str | None:
    """The .kvfs/lookup file of the kvfs mount `root` is on, if any."""
    from .direct_client import control_file

    return control_file(root, "lookup")


def _batch_exists(lookup_file: str, root: str, paths: list[str]) -> list[bool]:
    from .control import exchange

    mount = os.path.dirname(os.path.dirname(lookup_file))
    rel = [os.path.relpath(os.path.abspath(p), mount) for p in paths]
    answer = json.loads(exchange(lookup_file, json.dumps(rel).encode()))
    if not isinstance(answer, list) or len(answer) != len(paths):
        raise OSError("malformed lookup reply")
    return [bool(a) for a in answer]


class _DirectLoad:
    """KVStore.load on the direct path (see KVStore._load_direct). First the chunks' first
    blocks (their safetensors headers and first tensor bytes) are read into staging memory,
    a staging buffer's worth per request; then every other tensor byte is read straight
    into its place in the result: in one request, or for a device in windows of about
    WINDOW_BYTES, each copied on while the next is read."""

    def __init__(self, store: KVStore, client):
        self.store = store
        self.client = client
        self.bs = client.block_size

    def run(self, tokens, framework: str, device: str | None, into: np.ndarray | None = None):
        st, c, bs = self.store, self.client, self.bs
        chain = st.chain(tokens)
        if not chain:
            return 0, None
        paths = [st.path(h) for h in chain]
        sizes = c.lookup(paths)
        n = next((i for i, s in enumerate(sizes) if s < 0), len(sizes))
        if n == 0:
            return 0, None
        per = max(1, STAGING_BYTES // bs)
        staging = st._staging_buffer(min(n, per) * bs)
        out = shape = outbuf = None
        ct = st.chunk_tokens
        gpu = None
        items: list = []  # per chunk: [(path, file offset, length, buffer, buffer offset)]
        try:
            w0 = 0
            while w0 < n:  # the first blocks, a staging buffer's worth at a time
                window = range(w0, min(n, w0 + per))
                heads = c.read([(paths[i], 0, min(sizes[i], bs), staging, (i - w0) * bs) for i in window])
                for k, i in enumerate(window):
                    layout = None
                    if heads[k] == min(sizes[i], bs):
                        layout = _parse_head(staging.mm, k * bs, heads[k], sizes[i], ct)
                    if layout is None or (shape is not None and layout[0] != shape):
                        if i == 0:
                            return None  # not a layout read here: file I/O reads it
                        n = i  # evicted meanwhile, or another layout: the prefix ends here
                        break
                    shape = layout[0]
                    if out is None:
                        out, outbuf = self._result(shape, n * ct, into)
                        if device is not None:
                            gpu = _Gpu(out, device, shape[3], (_address(outbuf), outbuf.size))
                    items.append(self._place(out, outbuf, staging, k * bs, i, paths[i], layout[1]))
                w0 = window.stop
            # The rest of every chunk, straight into the result.
            step = n if gpu is None else max(1, WINDOW_BYTES // max(1, sizes[0]))
            for w0 in range(0, n, step):
                window = range(w0, min(n, w0 + step))
                batch = [(i, item) for i in window for item in items[i]]
                for lo in range(0, len(batch), c.max_items):
                    part = batch[lo:lo + c.max_items]
                    for (i, item), r in zip(part, c.read([item for _, item in part])):
                        if r != item[2]:
                            n = min(n, i)  # evicted or damaged meanwhile: the prefix ends before it
                if gpu is not None:
                    gpu.copy(w0 * ct, min(n, window.stop) * ct)
        except BaseException:
            if gpu is not None:
                gpu.close()  # (copies in flight end, the memory is unpinned)
            raise
        kv = out if n * ct == out.shape[2] else out[:, :, :n * ct]
        if gpu is not None:
            return n * ct, gpu.finish(n * ct)
        if framework == "pt":
            return n * ct, _torch(kv, shape[3])
        return n * ct, kv  # (BF16: its raw 16-bit words, which numpy cannot hold as bf16)

    def _result(self, shape, total: int, into):
        """(the result array for `total` tokens, the shared buffer it lies in)."""
        st = self.store
        layers, dtype, rest, _ = shape
        if into is not None:
            if into.shape[:2] != (layers, 2) or into.shape[3:] != rest or into.dtype != dtype \
                    or into.shape[2] < total:
                raise ValueError(f"out is shaped {into.shape} ({into.dtype}); this context needs "
                                 f"{(layers, 2, total, *rest)} ({dtype})")
            outbuf = st._buffer_of(into)
            if outbuf is None or not into.flags.c_contiguous:
                raise ValueError("out must be a whole array from KVStore.empty() or an earlier load")
            return into[:, :, :total], outbuf
        row = int(np.prod(rest, dtype=np.int64)) * dtype.itemsize
        outbuf = st._new_buffer(max(1, layers * 2 * total * row))
        return np.ndarray((layers, 2, total, *rest), dtype=dtype, buffer=outbuf.mm), outbuf

    def _place(self, out, outbuf, staging, at: int, i: int, path: str, tensors: dict) -> list:
        """Put chunk i's bytes that the staging memory holds (its first block, at `at`) in
        place in the result; the read items for the rest of them."""
        bs, ct, origin = self.bs, self.store.chunk_tokens, _address(outbuf)
        items = []
        for (layer, half), (start, end) in tensors.items():
            flat = out[layer, half, i * ct:(i + 1) * ct].reshape(-1).view(np.uint8)
            split = min(max(start, bs), end)  # what lies in the first block is in staging
            if split > start:
                flat[:split - start] = np.frombuffer(staging.mm, np.uint8, split - start, at + start)
            if end > split:
                items.append((path, split, end - split, outbuf, flat.ctypes.data - origin + split - start))
        return items


def _address(buf) -> int:
    return np.frombuffer(buf.mm, np.uint8, 1).ctypes.data


def _torch(arr: np.ndarray, st_dtype: str):
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if st_dtype == "BF16" else t


class _Gpu:
    """A load's result copied to a torch device while the rest is read, a window at a time.
    For CUDA the shared memory the daemon reads into is registered as pinned host memory
    and each window is copied asynchronously on a stream of its own, overlapping the next
    window's read. (The suite has no GPU: it runs this with device="cpu".)"""

    def __init__(self, out: np.ndarray, device: str, st_dtype: str, region: tuple[int, int]):
        import torch

        self.torch = torch
        self.host = _torch(out, st_dtype)
        dev = torch.device(device)
        self.dev = torch.empty(self.host.shape, dtype=self.host.dtype, device=dev)
        self.pinned, self.stream, self.region = False, None, region
        if dev.type == "cuda":
            rc = torch.cuda.cudart().cudaHostRegister(region[0], region[1], 0)
            self.pinned = int(getattr(rc, "value", rc)) == 0
            if not self.pinned:
                log.info("kvfs.kv: could not pin the load's memory (cudaHostRegister: %s); copies wait", rc)
            self.stream = torch.cuda.Stream(device=dev)

    def copy(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        if self.stream is None:
            self.dev[:, :, lo:hi].copy_(self.host[:, :, lo:hi])
            return
        with self.torch.cuda.stream(self.stream):
            self.dev[:, :, lo:hi].copy_(self.host[:, :, lo:hi], non_blocking=self.pinned)

    def close(self) -> None:
        """Wait for the copies in flight and unpin the memory (once)."""
        if self.stream is not None:
            self.stream.synchronize()
        if self.pinned:
            self.torch.cuda.cudart().cudaHostUnregister(self.region[0])
            self.pinned = False

    def finish(self, tokens: int):
        self.close()
        return self.dev[:, :, :tokens]


def _parse_head(mm, at: int, got: int, size: int, ct: int):
    try:
        return _parse_header(mm, at, got, size, ct)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None  # not a header this reads: file I/O reads the file


def _parse_header(mm, at: int, got: int, size: int, ct: int):
    """((layers, dtype, rest shape, safetensors dtype), {(layer, 0|1): (start, end) in the
    file}) from a chunk file's first bytes at mm[at:at+got], or None if it is not a kvfs.kv
    chunk of `ct` tokens whose every tensor this reads."""
    if got < 8:
        return None
    (n,) = struct.unpack_from("<Q", mm, at)
    if 8 + n > got:
        return None  # a header past the first block: file I/O reads it
    try:
        header = json.loads(bytes(mm[at + 8:at + 8 + n]))
    except ValueError:
        return None
    header.pop("__metadata__", None)
    tensors, shape = {}, None
    for name, t in header.items():
        if name == "tokens":
            continue
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layer" or parts[2] not in ("k", "v") or not parts[1].isdigit():
            return None
        dtype = np.uint16 if t.get("dtype") == "BF16" else _SAFETENSORS_DTYPES.get(t.get("dtype"))
        if dtype is None or not t.get("shape") or t["shape"][0] != ct:
            return None
        this = (np.dtype(dtype), tuple(t["shape"][1:]), t["dtype"])
        if shape is not None and this != shape:
            return None
        shape = this
        start, end = t["data_offsets"]
        want = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start and end - start == want):
            return None  # its bytes are not its shape's: file I/O (and its checks) read it
        tensors[(int(parts[1]), int(parts[2] == "v"))] = (8 + n + start, 8 + n + end)
    layers = len(tensors) // 2
    if not layers or set(tensors) != {(l, h) for l in range(layers) for h in (0, 1)}:
        return None
    ranges = sorted(tensors.values())
    if ranges[-1][1] > size or any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        return None  # past the file, or overlapping
    return (layers, shape[0], shape[1], shape[2]), tensors
