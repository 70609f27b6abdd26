"""kvfs.vllm_connector: a vLLM KV connector (KVConnectorBase_V1) that keeps prompts' KV in
kvfs.kv chunk files, so a later request, a restarted engine or another engine on the same
mount loads what an earlier one computed instead of computing it again.

    LLM(model, kv_transfer_config={
        "kv_connector": "KvfsConnector", "kv_connector_module_path": "kvfs.vllm_connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"root": "/mnt/kvfs/kv"}})

Extra config: root (required: a directory, normally on a kvfs mount), model (the name of
the model's directory under root; default: the last part of the model's path), revision
(default: the model's revision), namespace (default "vllm"), chunk_tokens (a multiple of
the block size; default the multiple of it nearest 256), salt (a tenant's: its chunks get
other names), store (false: load only).

Scheduler side: get_num_new_matched_tokens names the prompt's whole chunks and asks kvfs
which are stored with ONE batched lookup (KVStore.exists: the direct path, else the mount's
.kvfs/lookup file, else stat); update_state_after_alloc and build_connector_meta record,
per request and step, the tokens to load (the leading stored chunks past what vLLM's own
prefix cache had) and the chunks to store (whole prompt chunks computed by this step and
not stored yet), with the request's block ids.
Worker side: start_load_kv loads the chunks (KVStore.load: the direct path reads them
straight into shared memory, file I/O otherwise) and copies them into the paged KV cache,
block by block through the block table; save_kv_layer copies each layer's blocks of the
chunks to store out of the paged cache (so vLLM may free them at once), and wait_for_save
hands the step's chunks to a writer thread, which stores them with KVStore.store (one
lookup and one batched store per request on the direct path). Loads and stores move whole
blocks (chunks are whole blocks, and vLLM presents block-aligned hits), so a backend's
layout inside a block only decides which half is called K and which V in the file.

Chunk names are kvfs.kv chain hashes (xxh3-128; no hash(), no PYTHONHASHSEED) whose keys
cover the model, its revision, the KV dtype, the layout (platform, heads, head size), block
and chunk size and the tensor- and pipeline-parallel rank: engines of the same model and
shape share chunks, nothing of one model or rank loads into another. chunk_keys() and
chunk_names() give them without vLLM (vLLM is imported only when KvfsConnector is).

Failures never stop the engine: a root that is missing, not a directory, not writable or
full, a lookup or a store that fails, each gives one log line (once per kind) and the
request is computed as without the connector. A chunk evicted between the lookup and the
load is reported through get_block_ids_with_load_errors: with kv_load_failure_policy
"recompute" vLLM recomputes those blocks (vLLM's default, "fail", fails the request).
Not handled (such requests are neither looked up nor stored): LoRA adapters, multimodal
inputs, per-request cache salts, hybrid (HMA) and MLA caches.
"""

import atexit
import errno
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field

from .kv import KVStore, chain_hashes

log = logging.getLogger("vllm.kvfs")  # under vLLM's logger: its format and level

DEFAULT_CHUNK_TOKENS = 256
WRITE_QUEUE = 16  # steps of stores waiting for the writer; past that a step's are dropped


def chunk_keys(model: str, *, revision: str = "", dtype: str, layout: str, block_size: int,
               chunk_tokens: int, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
               pp_size: int = 1) -> dict[str, str]:
    """The extra keys of a KVStore for one rank of one engine shape: with `model`,
    `revision`, `dtype` and `layout` (KVStore's own fields) they make the chunk names."""
    return {"engine": "vllm", "block_size": str(block_size), "chunk_tokens": str(chunk_tokens),
            "tp": f"{tp_rank}/{tp_size}", "pp": f"{pp_rank}/{pp_size}"}


def chunk_names(tokens, model: str, *, revision: str = "", dtype: str, layout: str, block_size: int,
                chunk_tokens: int, salt: str = "", **ranks) -> list[str]:
    """The names (hex chain hashes) of the whole chunks of `tokens` as the connector stores
    them: the same in every process; different for another model, revision, dtype, layout,
    block or chunk size, salt or rank."""
    extra = {"model": model, "revision": revision, "dtype": dtype, "layout": layout, "lora": "", "salt": salt,
             **chunk_keys(model, revision=revision, dtype=dtype, layout=layout, block_size=block_size,
                          chunk_tokens=chunk_tokens, **ranks)}
    return [h.hex() for h in chain_hashes(tokens, chunk_tokens, extra)]


def model_name(path: str) -> str:
    """A model's directory name under root: the last part of its path or hub id."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(os.path.normpath(path or "model")))
    return name if name not in ("", ".", "..") else "model"


class _Once:
    """One log line per kind of failure (the rest are counted, not logged)."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, kind: str, msg: str, *args, level=logging.WARNING) -> None:
        with self.lock:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            first = self.seen[kind] == 1
        if first:
            log.log(level, "kvfs connector: " + msg + " (logged once)", *args)


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the warehouse is full"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not permitted"
    if exc.errno == errno.EROFS:
        return "the mount is read-only"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "the root is gone (unmounted?)"
    return exc.strerror or str(exc)


# -- what the scheduler tells the workers ---------------------------------------------------

@dataclass
class LoadSpec:
    req_id: str
    tokens: list[int]  # the prompt's tokens up to `end`
    block_ids: list[int]  # the request's blocks, from its first token
    start: int  # the first token to put into the cache (those before are vLLM's own hits)
    end: int


@dataclass
class SaveSpec:
    req_id: str
    tokens: list[int]  # the prompt's tokens up to `end`
    block_ids: list[int]
    start: int  # whole chunks [start, end) to store
    end: int


@dataclass
class _Meta:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    request: object
    prompt: list[int]
    stored: int = 0  # leading prompt chunks kvfs had at the lookup
    saved: int = 0  # leading chunks stored or handed to the workers to store
    load: tuple[int, int] | None = None  # tokens [start, end) to load, until scheduled
    block_ids: list[int] = field(default_factory=list)


class _Impl:
    """KvfsConnector without vLLM's base class (see the module docstring)."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        self._once = _Once()
        self._is_scheduler = role == KVConnectorRole.SCHEDULER
        tc = vllm_config.kv_transfer_config
        cfg = dict(tc.kv_connector_extra_config or {})
        self._block_size = vllm_config.cache_config.block_size
        ct = int(cfg.get("chunk_tokens") or max(1, round(DEFAULT_CHUNK_TOKENS / self._block_size)) * self._block_size)
        if ct % self._block_size:
            raise ValueError(f"kvfs connector: chunk_tokens {ct} is not a multiple of the block size {self._block_size}")
        self._chunk = ct
        self._save_enabled = tc.kv_role in ("kv_producer", "kv_both") and cfg.get("store", True) not in (False, "false", "0")
        self._load_enabled = tc.kv_role in ("kv_consumer", "kv_both")
        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        spec = self._attention_spec(kv_cache_config)
        dtype = str(spec.dtype).replace("torch.", "") if spec is not None else str(mc.dtype).replace("torch.", "")
        from vllm.platforms import current_platform

        heads, head = (spec.num_kv_heads, spec.head_size) if spec is not None else (0, 0)
        self._layout = f"vllm-paged/{current_platform.device_type}/h{heads}/d{head}"
        self._heads, self._head = heads, head
        base = dict(root=str(cfg.get("root", "")), model=str(cfg.get("model") or model_name(mc.model)),
                    namespace=str(cfg.get("namespace", "vllm")), chunk_tokens=ct,
                    revision=str(cfg.get("revision") or mc.revision or ""), dtype=dtype, layout=self._layout,
                    salt=str(cfg.get("salt", "")))
        self._tp, self._pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
        ranks = [(t, p) for p in range(self._pp) for t in range(self._tp)] if self._is_scheduler else [self._rank()]
        self._stores: list[KVStore] = []
        self._enabled = self._check_root(base["root"]) and (self._load_enabled or self._save_enabled)
        if self._enabled:
            try:
                for t, p in ranks:
                    keys = chunk_keys(base["model"], revision=base["revision"], dtype=dtype, layout=self._layout,
                                      block_size=self._block_size, chunk_tokens=ct, tp_rank=t, tp_size=self._tp,
                                      pp_rank=p, pp_size=self._pp)
                    self._stores.append(KVStore(**base, extra_keys=keys, direct=len(self._stores) == 0))
            except (OSError, ValueError) as exc:
                self._once("init", "cannot use %s: %s; serving without it", base["root"], exc, level=logging.ERROR)
                self._enabled = False
        if self._enabled:
            st = self._stores[0]
            log.info("kvfs connector (%s): %s/%s/%s, chunks of %d tokens, %s, %s%s",
                     "scheduler" if self._is_scheduler else "worker", st.root, st.namespace, st.model, ct, dtype,
                     "direct path" if st.uses_direct_path else "file I/O",
                     "" if self._save_enabled else ", load only")
            if self._is_scheduler and getattr(tc, "kv_load_failure_policy", "recompute") != "recompute":
                log.info("kvfs connector: kv_load_failure_policy is %r: a chunk evicted between lookup and load "
                         "fails its request; \"recompute\" recomputes it", tc.kv_load_failure_policy)
        # scheduler
        self._reqs: dict[str, _ReqState] = {}
        self.matched_tokens = 0  # tokens found in kvfs and loaded (scheduler's count)
        self.queried_tokens = 0
        # worker
        self._pending: dict[str, list] = {}
        self._load_errors: set[int] = set()
        self._writes: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if self._enabled and not self._is_scheduler and self._save_enabled:
            self._writes = queue.Queue(WRITE_QUEUE)
            self._writer = threading.Thread(target=self._write_loop, name="kvfs-writer", daemon=True)
            self._writer.start()
            atexit.register(self._flush)

    # -- setup ------------------------------------------------------------------------------

    @staticmethod
    def _attention_spec(kv_cache_config):
        try:
            specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
        except AttributeError:
            return None
        return specs[0] if len(specs) == 1 and hasattr(specs[0], "num_kv_heads") else None

    def _rank(self) -> tuple[int, int]:
        try:
            from vllm.distributed.parallel_state import get_pp_group, get_tp_group

            return get_tp_group().rank_in_group, get_pp_group().rank_in_group
        except Exception:  # parallel state not set up (a single process)
            return 0, 0

    def _check_root(self, root: str) -> bool:
        if not root:
            self._once("root", "no root in kv_connector_extra_config; serving without kvfs", level=logging.ERROR)
            return False
        if not os.path.isdir(root):
            parent = os.path.dirname(os.path.abspath(root))
            if os.path.isdir(parent) and self._save_enabled:
                try:
                    os.makedirs(root, exist_ok=True)
                except OSError as exc:
                    self._once("root", "cannot make root %s: %s; serving without kvfs", root, _describe(exc),
                               level=logging.ERROR)
                    return False
            else:
                self._once("root", "root %s does not exist (is the warehouse mounted?); serving without kvfs", root,
                           level=logging.ERROR)
                return False
        from .direct_client import find_mount
        from .kv import _find_lookup_file

        if find_mount(root) is None and _find_lookup_file(root) is None:
            self._once("mount", "%s is not on a kvfs mount; using plain file I/O there", root)
        if self._save_enabled and not os.access(root, os.W_OK | os.X_OK):
            self._once("root", "cannot write under %s (not permitted); loading only", root)
            self._save_enabled = False
        return True

    # -- scheduler side ---------------------------------------------------------------------

    def _usable(self, request) -> bool:
        return (getattr(request, "lora_request", None) is None and not getattr(request, "mm_features", None)
                and not getattr(request, "cache_salt", None))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        if not self._enabled or not self._usable(request):
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request, prompt)
        st.load = None
        st.stored = self._lookup(prompt)
        st.saved = max(st.saved, st.stored)
        # vLLM computes at least the prompt's last token itself
        hit = min(st.stored * self._chunk, (len(prompt) - 1) // self._block_size * self._block_size)
        if not self._load_enabled or hit <= num_computed_tokens:
            return 0, False
        st.load = (num_computed_tokens, hit)
        return hit - num_computed_tokens, False

    def _lookup(self, prompt: list[int]) -> int:
        """How many leading chunks of the prompt every rank has: one batched lookup."""
        try:
            chains = [s.chain(prompt) for s in self._stores]
            n = len(chains[0])
            if not n:
                return 0
            have = self._stores[0].exists([h for chain in chains for h in chain])
        except (OSError, ValueError) as exc:
            self._once("lookup", "lookup failed (%s); computing", _describe(exc) if isinstance(exc, OSError) else exc)
            return 0
        k = 0
        while k < n and all(have[r * n + k] for r in range(len(chains))):
            k += 1
        return k

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens <= 0 or st.load is None:
            st.load = None
            return
        start = st.load[0]
        st.load = (start, start + num_external_tokens)
        self.queried_tokens += len(st.prompt)
        self.matched_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output):
        meta = _classes()["KvfsConnectorMetadata"]()
        if not self._enabled:
            return meta
        new = [(r.req_id, r.block_ids[0] if r.block_ids else [], r.num_computed_tokens, True)
               for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cached.req_ids):
            blocks = cached.new_block_ids[i]
            new.append((req_id, blocks[0] if blocks else [], cached.num_computed_tokens[i], req_id in resumed))
        for req_id, block_ids, computed, replace in new:
            st = self._reqs.get(req_id)
            if st is None:
                continue
            st.block_ids = list(block_ids) if replace else st.block_ids + list(block_ids)
            if st.load is not None:
                start, end = st.load
                meta.loads.append(LoadSpec(req_id, st.prompt[:end], list(st.block_ids), start, end))
                st.load = None
            done = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            upto = min(done, len(st.prompt)) // self._chunk
            if self._save_enabled and upto > st.saved:
                end = upto * self._chunk
                meta.saves.append(SaveSpec(req_id, st.prompt[:end], list(st.block_ids[:end // self._block_size]),
                                           st.saved * self._chunk, end))
                st.saved = upto
        return meta

    def request_finished(self, request, block_ids):
        self._reqs.pop(request.request_id, None)
        return False, None

    # -- worker side ------------------------------------------------------------------------

    def start_load_kv(self, forward_context, **kwargs) -> None:
        if not self._enabled or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not meta.loads:
            return
        layers = self._attention_layers(forward_context)
        for spec in meta.loads:
            try:
                self._load_one(spec, layers)
            except Exception as exc:  # the blocks are reported; vLLM recomputes them
                self._once("load", "loading failed (%s); recomputing", exc)
                bs = self._block_size
                self._load_errors.update(spec.block_ids[spec.start // bs:spec.end // bs])

    def _attention_layers(self, forward_context) -> list[tuple[str, object]]:
        found = []
        for name, layer in forward_context.no_compile_layers.items():
            kv = getattr(layer, "kv_cache", None)
            if kv is not None and hasattr(kv, "shape") and kv.dim() == 4:
                found.append((name, kv))
        return sorted(found, key=lambda item: _layer_index(item[0]))

    def _load_one(self, spec: LoadSpec, layers) -> None:
        import torch

        bs = self._block_size
        n, kv = self._stores[0].load(spec.tokens, framework="pt")
        got = min(n, spec.end)
        if got < spec.end:
            self._once("evicted", "chunks were evicted between lookup and load; recomputing them")
            self._load_errors.update(spec.block_ids[max(got, spec.start) // bs:spec.end // bs])
        if got <= spec.start:
            return
        if kv.shape[0] != len(layers):
            raise ValueError(f"stored chunks have {kv.shape[0]} layers, this engine {len(layers)}")
        blocks = torch.tensor(spec.block_ids[spec.start // bs:got // bs], dtype=torch.long)
        for li, (_, cache) in enumerate(layers):
            tiles = _to_tiles(kv[li, :, spec.start:got], cache, bs)
            cache.index_copy_(0, blocks.to(cache.device), tiles.to(cache.device, cache.dtype))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        if not self._enabled or self._writes is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not meta.saves or kv_layer is None or kv_layer.dim() != 4:
            return
        import torch

        bs = self._block_size
        for spec in meta.saves:
            blocks = torch.tensor(spec.block_ids[spec.start // bs:spec.end // bs], dtype=torch.long,
                                  device=kv_layer.device)
            tiles = kv_layer.index_select(0, blocks)  # a copy: vLLM may reuse the blocks
            self._pending.setdefault(spec.req_id, []).append((_layer_index(layer_name), tiles))

    def wait_for_save(self):
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        specs = {s.req_id: s for s in (meta.saves if meta is not None else [])}
        batch = []
        for req_id, layers in pending.items():
            spec = specs.get(req_id)
            if spec is None:
                continue
            layers.sort(key=lambda item: item[0])
            batch.append((spec, [t for _, t in layers]))
        try:
            self._writes.put_nowait(batch)
        except queue.Full:
            self._once("slow", "stores fall behind; dropping some (they are recomputed when asked for)")

    def _write_loop(self) -> None:
        import torch

        while True:
            batch = self._writes.get()
            try:
                if batch is None:
                    return
                for spec, layers in batch:
                    kv = torch.stack([_from_tiles(t.cpu(), self._block_size) for t in layers])
                    try:
                        self._stores[0].store(spec.tokens, kv, offset=spec.start)
                    except OSError as exc:
                        self._once(f"store-{exc.errno}", "storing failed: %s; computing without storing",
                                   _describe(exc), level=logging.ERROR)
                    except Exception as exc:  # never take the engine down for a cache write
                        self._once("store", "storing failed: %r", exc, level=logging.ERROR)
            finally:
                self._writes.task_done()

    def _flush(self) -> None:
        if self._writes is not None and self._writer is not None and self._writer.is_alive():
            self._writes.join()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self):
        self._flush()
        for s in self._stores:
            s.close()


def _layer_index(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _to_tiles(kv, cache, block_size: int):
    """kv (2, tokens, heads, head size), whole blocks, as the cache's block tiles
    (blocks, H, N, C): the inverse of _from_tiles."""
    _, h, n, c = cache.shape
    two, tokens, heads, d = kv.shape
    nb = tokens // block_size
    if _kv_rows_first(cache):  # CPU: a tile is (H, 2N, D), K rows before V rows
        return kv.reshape(2, nb, block_size, heads, d).permute(1, 3, 0, 2, 4).reshape(nb, h, n, c)
    return kv.reshape(2, nb, block_size, heads, d).permute(1, 3, 2, 0, 4).reshape(nb, h, n, c)


def _from_tiles(tiles, block_size: int):
    """Block tiles (blocks, H, N, C) of one layer as (2, tokens, heads, head size): token-
    major K and V, the kvfs.kv layout."""
    nb, h, n, c = tiles.shape
    d = c // 2
    if _kv_rows_first(tiles):
        return tiles.reshape(nb, h, 2, n, d).permute(2, 0, 3, 1, 4).reshape(2, nb * n, h, d)
    return tiles.reshape(nb, h, n, 2, d).permute(3, 0, 2, 1, 4).reshape(2, nb * n, h, d)


def _kv_rows_first(t) -> bool:
    return t.device.type == "cpu"


_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if not _CLASSES:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata

        try:
            from vllm.distributed.kv_transfer.kv_connector.v1.base import CacheHitSource

            source = {"_cache_hit_source": getattr(CacheHitSource, "DISK", CacheHitSource.EXTERNAL_UNSPECIFIED)}
        except ImportError:
            source = {}
        meta = type("KvfsConnectorMetadata", (_Meta, KVConnectorMetadata), {"__module__": __name__})
        conn = type("KvfsConnector", (_Impl, KVConnectorBase_V1), {"__module__": __name__, **source})
        _CLASSES.update(KvfsConnectorMetadata=meta, KvfsConnector=conn)
    return _CLASSES


def __getattr__(name: str):
    """KvfsConnector and KvfsConnectorMetadata, made (importing vLLM) when first asked for."""
    if name in ("KvfsConnector", "KvfsConnectorMetadata"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
