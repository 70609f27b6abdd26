"""kvfs.kv: the kvfs-native layout of cached context, for code that is written for kvfs.

A prompt's token ids are cut into chunks of `chunk_tokens`; only whole chunks are stored.
Chunk i is named by its *chain hash*: xxh3-128 over a canonical encoding of

    b"kvfs.kv/1" | parent chain hash (16 bytes; zeros for the first chunk)
                 | extra keys, sorted, each as len(key) key len(value) value (u32 LE + UTF-8)
                 | the chunk's token ids as little-endian u32

where the extra keys are the model, its revision, the dtype and layout of the KV, the LoRA
adapter and a tenant salt (any that are set). No pickle, no hash(), no PYTHONHASHSEED: the
same tokens give the same name in every process, on every machine, in every Python.

A chunk lives at <root>/<namespace>/<model>/<hh>/<chain hash>.kv (hh: the first two hex
digits, so no directory grows past 1/256 of the model's chunks). The file is safetensors:
"tokens" (uint32) and "layer.<i>.k", "layer.<i>.v" (the chunk's slice of every layer), with
metadata: format, model, revision, dtype, layout, chunk index, chain and parent hash, so
any safetensors reader can open it. Files are written to a temporary name and renamed into
place: readers never see half a chunk, and concurrent writers of the same chunk are harmless
(they write the same bytes). On a kvfs mount, chunks that two prompts share are stored once.

Lookups ask about a whole batch of candidate chunks in one round trip on a kvfs mount (the
mount's .kvfs/lookup file) and fall back to one existence check each elsewhere.
"""

import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

FORMAT = "kvfs.kv/1"
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
    _lookup_file: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for part in (self.namespace, self.model):
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"namespace and model must be plain names, not {part!r}")
        self.dir = os.path.join(self.root, self.namespace, self.model)
        self._lookup_file = _find_lookup_file(self.root)

    @property
    def extra(self) -> dict[str, str]:
        return {"model": self.model, "revision": self.revision, "dtype": self.dtype,
                "layout": self.layout, "lora": self.lora, "salt": self.salt}

    def chain(self, tokens) -> list[bytes]:
        return chain_hashes(tokens, self.chunk_tokens, self.extra)

    def path(self, chain_hash: bytes) -> str:
        h = chain_hash.hex()
        return os.path.join(self.dir, h[:2], h + ".kv")

    def paths(self, tokens) -> list[str]:
        return [self.path(h) for h in self.chain(tokens)]

    # -- writing ---------------------------------------------------------------------------

    def store(self, tokens, kv) -> list[str]:
        """Store every whole chunk of `tokens` with its slice of `kv` (layers, 2, tokens,
        ...); chunks already stored are not written again. Returns the chunks' paths."""
        kv = _to_numpy(kv)
        if kv.ndim < 3 or kv.shape[1] != 2 or kv.shape[2] < len(tokens) - len(tokens) % self.chunk_tokens:
            raise ValueError("kv must be shaped (layers, 2, tokens, ...) with a slice for every token")
        ids = np.asarray(tokens, dtype=np.int64)
        chain = self.chain(ids)
        have = self.exists(chain)
        paths = []
        for i, (h, present) in enumerate(zip(chain, have)):
            path = self.path(h)
            paths.append(path)
            if present:
                continue
            lo, hi = i * self.chunk_tokens, (i + 1) * self.chunk_tokens
            tensors = {"tokens": ids[lo:hi].astype(np.uint32)}
            for layer in range(kv.shape[0]):
                tensors[f"layer.{layer}.k"] = np.ascontiguousarray(kv[layer, 0, lo:hi])
                tensors[f"layer.{layer}.v"] = np.ascontiguousarray(kv[layer, 1, lo:hi])
            meta = {"format": FORMAT, "model": self.model, "revision": self.revision,
                    "dtype": self.dtype or str(kv.dtype), "layout": self.layout,
                    "chunk_index": str(i), "chunk_tokens": str(self.chunk_tokens),
                    "chain": h.hex(), "parent": chain[i - 1].hex() if i else ""}
            _write_atomic(path, tensors, meta)
        return paths

    # -- reading ---------------------------------------------------------------------------

    def exists(self, chain: list[bytes]) -> list[bool]:
        """Which of these chunks are stored: one round trip on a kvfs mount."""
        paths = [self.path(h) for h in chain]
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

    def load(self, tokens, framework: str = "np"):
        """(cached token count, kv shaped (layers, 2, tokens, ...)) for the longest cached
        prefix; kv is None when nothing is cached. framework "pt" gives a torch tensor."""
        chunks = self.load_chunks(tokens)
        if not chunks:
            return 0, None
        kv = np.concatenate([c.kv() for c in chunks], axis=2)
        n = len(chunks) * self.chunk_tokens
        if framework == "pt":
            import torch

            return n, torch.from_numpy(kv)
        return n, kv


@dataclass
class Chunk:
    """One stored chunk, mapped: `tokens`, k(layer) and v(layer) are np.memmap views."""

    path: str
    metadata: dict[str, str]
    tensors: dict[str, np.ndarray]

    @property
    def tokens(self) -> np.ndarray:
        return self.tensors["tokens"]

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
        dtype = _SAFETENSORS_DTYPES.get(t["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {t['dtype']}, which numpy cannot map")
        start, end = t["data_offsets"]
        shape = tuple(t["shape"])
        if end == start:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return Chunk(path, meta, tensors)


def _to_numpy(kv) -> np.ndarray:
    if isinstance(kv, np.ndarray):
        return kv
    if hasattr(kv, "detach"):  # a torch tensor
        return kv.detach().cpu().numpy()
    return np.asarray(kv)


def _write_atomic(path: str, tensors: dict, meta: dict) -> None:
    from safetensors.numpy import save

    data = save(tensors, metadata=meta)
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
    path = os.path.abspath(root)
    while True:
        candidate = os.path.join(path, ".kvfs", "lookup")
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _batch_exists(lookup_file: str, root: str, paths: list[str]) -> list[bool]:
    from .control import exchange

    mount = os.path.dirname(os.path.dirname(lookup_file))
    rel = [os.path.relpath(os.path.abspath(p), mount) for p in paths]
    answer = json.loads(exchange(lookup_file, json.dumps(rel).encode()))
    if not isinstance(answer, list) or len(answer) != len(paths):
        raise OSError("malformed lookup reply")
    return [bool(a) for a in answer]
