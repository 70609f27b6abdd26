"""The shared tier: a warehouse's files shared through an S3-compatible object store.

`kvfs mount ... --shared s3://BUCKET/PREFIX` makes the files published on this node
available to every other node mounted on the same bucket and prefix, and the files
published there available here, with the store doing replication, durability and
membership. This module owns everything that talks to the store (boto3); the warehouse's
side (remote files, the persistent upload queue, snapshots) is kvfs.shared_files. It
imports neither pyfuse3 nor trio: kvfs.mount starts it, kvfs.fs calls lookup().

Key layout (the only place it is written down; PREFIX may be empty):

    PREFIX/blocks/<hash>   one block's raw (uncompressed) bytes, <hash> the 32 hex digits of
                           their xxh3-128, exactly as kvfs names blocks locally. Anyone can
                           check an object against its name. Created only if absent (a
                           conditional PutObject, If-None-Match: *), never overwritten,
                           never deleted by kvfs (expiry is the store's lifecycle rules).
                           Not compressed: KV tensors hardly compress as they are, and a
                           raw block is verified with no codec in the way.
    PREFIX/files/<path>    the manifest of the file or directory at <path> (relative to the
                           mount's root, UTF-8): JSON, see Manifest. Written after every
                           block it names is in the store (data before manifest), replaced
                           only by a newer version (last writer wins, compare-and-swap on
                           the ETag), deleted only by `kvfs retire --shared`.

Write-back. A file published on this node (closed after writing, renamed, annotated) is
queued (kvfs.shared_files); one uploader thread takes the oldest entry once it is SETTLE
seconds old (a temporary file renamed at once is uploaded under its final name), puts the
blocks the store lacks, then the manifest: its own version (the publication time, then the
node's warehouse uuid) replaces a missing or older manifest; if the store holds a newer one,
another node published the path later: this node's copy is replaced by that version (it
is read through), so that one version wins everywhere. The other order (this node's older
version lands first, a newer one after it) is caught by looking at each manifest put here
again RECHECKS seconds later: a newer version found then replaces the local copy too.

Read-through. A lookup that misses locally GETs the manifest at that path (a bounded wait);
if there is one, the file (or directory) appears, its data fetched at its first open, each
block verified against its hash (a mismatch is refused: EIO, counted, logged, never stored
or served) and kept locally, under the normal eviction rules. A miss is remembered for
MISS_TTL seconds. A local copy is authoritative while it exists: a newer version published
elsewhere is seen here once the local copy is evicted, unlinked or retired, or when this
node's own upload of the path (or its recheck) finds it.

Store outage. Every request has the configured timeout (connect and read) and no retries;
a lookup waits for its manifest at most that long, whatever the store does. After a failure
the store is deemed down for a back-off period (0.5 s doubling to MAX_BACKOFF) during which
lookups are misses at once and fetches fail at once (EIO); the uploader keeps its queue and
tries again after each back-off.
"""

import base64
import collections
import concurrent.futures
import hashlib
import heapq
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from . import codec as codecs
from .errors import Corrupt, KvfsError
from .files import MAX_FILE_SIZE
from .namespace import XATTR_NAME_MAX, XATTR_SIZE_MAX
from .shared_files import DEFAULT_QUEUE_LIMIT, RemoteMissing, SharedUnavailable

log = logging.getLogger("kvfs.shared")

DEFAULT_TIMEOUT = 2.0  # seconds: every store request, and the longest a lookup waits
SETTLE = 0.5  # seconds a published file waits in the queue before it is uploaded
MISS_TTL = 5.0  # seconds a lookup that found no manifest is remembered (here and in the kernel)
MISS_CACHE = 100_000  # paths remembered as misses, at most
MIN_BACKOFF = 0.5
MAX_BACKOFF = 5.0  # seconds: the longest the store is deemed down before it is tried again
DIR_TTL = 60.0  # seconds a directory manifest this node put is not put again
KNOWN_BLOCKS = 100_000  # hashes remembered as present in the store (not put again)
KNOWN_TTL = 600.0  # seconds they are remembered (lifecycle rules may expire blocks)
FETCH_WINDOW = 8  # blocks of one file being fetched at once
LOOKUP_THREADS = 40  # trio.to_thread's default limit: every lookup the event loop runs at once
UPLOAD_THREADS = 4
MAX_MANIFEST = 64 << 20  # bytes: a larger object at a manifest key is not one
MANIFEST_FORMAT = 1
CAS_ATTEMPTS = 8
RECHECKS = (5.0, 60.0)  # seconds after putting a manifest that it is looked at again
RECHECK_LIMIT = 10_000  # manifests waiting to be looked at again, at most


class SharedError(KvfsError):
    """The store refused a request for one object (a key or body it will not take)."""


class StoreRefused(SharedError):
    """The store refuses everything: credentials, permissions, no such bucket."""


class Unreachable(SharedUnavailable):
    """The store did not answer in time, or answered that it is not available (5xx)."""


class TooLarge(SharedError):
    """An object is larger than what its key may hold."""


def parse_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://"):
        raise ValueError(f"a shared tier is an s3://BUCKET[/PREFIX] URL, not {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not 3 <= len(bucket) <= 63 or "/" in bucket:
        raise ValueError(f"{url!r}: a bucket name has 3 to 63 characters")
    return bucket, prefix.strip("/")


class Keys:
    """The key layout (see the module docstring)."""

    def __init__(self, prefix: str):
        self.base = prefix.strip("/") + "/" if prefix.strip("/") else ""

    def block(self, h: bytes) -> str:
        return f"{self.base}blocks/{h.hex()}"

    def manifest(self, path: bytes) -> str | None:
        """The key of the manifest of `path`, or None if no key can name it (not UTF-8,
        or longer than S3's 1024 bytes)."""
        try:
            text = path.decode("utf-8")
        except UnicodeDecodeError:
            return None
        key = f"{self.base}files/{text}"
        return key if len(key.encode()) <= 1024 else None


@dataclass
class Manifest:
    """What `PREFIX/files/<path>` holds, as JSON:

        {"kvfs_manifest": 1, "type": "file" | "dir", "path": "a/b",
         "size": bytes, "block_size": bytes, "blocks": ["<32 hex>" | null (a hole), ...],
         "mode": permission bits, "uid": n, "gid": n, "mtime_ns": n,
         "xattrs": {"user.kvfs.model": "llama-3-8b", "user.x": {"base64": "..."}},
         "node": "<uuid of the writing warehouse>", "version": publication time (ns)}

    Versions order as (version, node): the greater one wins. Directory manifests (so that
    a lookup learns a directory with one GET) have version 0: a file's manifest wins."""

    kind: str
    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    block_size: int = 0
    hashes: list = field(default_factory=list)
    xattrs: dict = field(default_factory=dict)
    node: str = ""
    version: int = 0

    @property
    def order(self) -> tuple[int, str]:
        return self.version, self.node

    def encode(self) -> bytes:
        xattrs = {}
        for k, v in self.xattrs.items():
            try:
                xattrs[k.decode()] = v.decode()
            except UnicodeDecodeError:
                xattrs[k.decode(errors="replace")] = {"base64": base64.b64encode(v).decode()}
        doc = {"kvfs_manifest": MANIFEST_FORMAT, "type": self.kind, "path": self.path,
               "mode": self.mode, "uid": self.uid, "gid": self.gid, "mtime_ns": self.mtime_ns,
               "xattrs": xattrs, "node": self.node, "version": self.version}
        if self.kind == "file":
            doc.update(size=self.size, block_size=self.block_size,
                       blocks=[None if h is None else h.hex() for h in self.hashes])
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Manifest":
        """Parse and check a manifest; ValueError if it is not a valid one."""
        def want(cond, what):
            if not cond:
                raise ValueError(f"manifest: {what}")

        try:
            doc = json.loads(raw)
        except RecursionError:  # nested too deep to be a manifest
            raise ValueError("manifest: nested too deep") from None
        want(isinstance(doc, dict) and doc.get("kvfs_manifest") == MANIFEST_FORMAT, "not a kvfs manifest of format 1")
        kind = doc.get("type")
        want(kind in ("file", "dir"), "type is neither file nor dir")
        ints = {}
        for name in ("mode", "uid", "gid", "mtime_ns", "version") + (("size", "block_size") if kind == "file" else ()):
            v = doc.get(name, 0)
            want(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64, f"{name} is not a count")
            ints[name] = v
        want(ints["uid"] < 1 << 32 and ints["gid"] < 1 << 32, "uid or gid out of range")
        want(isinstance(doc.get("node", ""), str) and isinstance(doc.get("path", ""), str), "node or path is not text")
        xattrs = {}
        raw_x = doc.get("xattrs", {})
        want(isinstance(raw_x, dict), "xattrs is not an object")
        for k, v in raw_x.items():
            name = k.encode()
            if isinstance(v, dict) and isinstance(v.get("base64"), str):
                value = base64.b64decode(v["base64"], validate=True)
            else:
                want(isinstance(v, str), f"xattr {k!r} is not text")
                value = v.encode()
            want(name.startswith(b"user.") and len(name) <= XATTR_NAME_MAX and len(value) <= XATTR_SIZE_MAX,
                 f"xattr {k!r} out of range")
            xattrs[name] = value
        m = cls(kind, doc.get("path", ""), ints["mode"] & 0o7777, ints["uid"], ints["gid"], ints["mtime_ns"],
                xattrs=xattrs, node=doc.get("node", ""), version=ints["version"])
        if kind == "file":
            size, bs = ints["size"], ints["block_size"]
            want(size <= MAX_FILE_SIZE, "size out of range")
            want(4096 <= bs <= 16 << 20 and bs & (bs - 1) == 0, "block size out of range")
            blocks = doc.get("blocks")
            want(isinstance(blocks, list) and len(blocks) == (size + bs - 1) // bs, "blocks do not cover the size")
            hashes = []
            for h in blocks:
                want(h is None or (isinstance(h, str) and len(h) == 2 * codecs.HASH_LEN), "a block hash is malformed")
                hashes.append(None if h is None else bytes.fromhex(h))
            m.size, m.block_size, m.hashes = size, bs, hashes
        return m


class Store:
    """An S3 bucket through boto3, with bounded requests and a circuit breaker.

    Every request has `timeout` seconds to connect and `timeout` for each read, and is
    not retried. A request that cannot reach the store raises Unreachable and marks the
    store down for a back-off period, during which requests raise Unreachable at once. A
    refusal of everything (credentials, permissions, no such bucket) raises StoreRefused;
    a refusal of one object (a key or body it will not take) SharedError."""

    def __init__(self, bucket: str, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        import boto3
        import botocore.config

        self.bucket = bucket
        self.endpoint = endpoint
        session = boto3.session.Session()
        cfg = dict(connect_timeout=timeout, read_timeout=timeout,
                   retries={"total_max_attempts": 1, "mode": "standard"},
                   max_pool_connections=32,
                   # Blocks carry their own hash (checked on download) and uploads a
                   # Content-MD5; the newer default checksum trailers (aws-chunked) are
                   # not understood by every S3-compatible store.
                   request_checksum_calculation="when_required",
                   response_checksum_validation="when_required")
        if endpoint:
            cfg["s3"] = {"addressing_style": "path"}  # a host name per bucket rarely resolves
        self.client = session.client("s3", endpoint_url=endpoint or None,
                                     region_name=session.region_name or "us-east-1",
                                     config=botocore.config.Config(**cfg))
        self.conditional = True  # the store honours If-None-Match / If-Match on PutObject
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = 0.0
        self.last_error: str | None = None

    # -- the breaker ----------------------------------------------------------------

    def down(self) -> float:
        """Seconds until the store is tried again (0: it may be tried now)."""
        return max(0.0, self._down_until - time.monotonic())

    def trip(self, why: str) -> None:
        with self._lock:
            self._backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self._backoff * 2))
            self._down_until = time.monotonic() + self._backoff
            if self.last_error != why:
                log.warning("shared tier unreachable (%s); retrying in %.1f s", why, self._backoff)
            self.last_error = why

    def _reached(self) -> None:
        if self._backoff or self.last_error:
            with self._lock:
                if self.last_error:
                    log.info("shared tier reachable again")
                self._backoff = 0.0
                self._down_until = 0.0
                self.last_error = None

    def _call(self, op: str, **kw):
        """Run one request; returns its response, or None for 404 (no such key) and
        "conflict" for 412 (a condition did not hold)."""
        import botocore.exceptions as bx

        if self.down():
            raise Unreachable(f"shared tier unreachable ({self.last_error}); not tried again yet")
        try:
            out = getattr(self.client, op)(Bucket=self.bucket, **kw)
        except bx.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "InvalidToken", "ExpiredToken", "AllAccessDisabled"):
                self._reached()
                self.last_error = f"{code}: {err.get('Message', '')}".strip()
                raise StoreRefused(f"shared tier refused {op}: {self.last_error}") from None
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                self._reached()
                return None
            if status == 412 or code == "PreconditionFailed":
                self._reached()
                return "conflict"
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
                if status == 501 or code == "NotImplemented":
                    self._reached()
                    return "unsupported"
                self.trip(f"{code or status}")
                raise Unreachable(f"shared tier: {op} failed with {code or status}") from None
            self._reached()
            raise SharedError(f"shared tier refused {op}: {code or status} {err.get('Message', '')}".strip()) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoRegionError) as exc:
            self.last_error = str(exc)
            raise StoreRefused(f"shared tier: {exc}") from None
        except bx.ParamValidationError as exc:  # a bug, not an outage
            raise SharedError(f"shared tier: {op}: {exc}") from None
        except (bx.BotoCoreError, OSError) as exc:  # connect, read and DNS failures, timeouts
            self.trip(type(exc).__name__)
            raise Unreachable(f"shared tier unreachable: {exc}") from None
        self._reached()
        return out

    # -- requests --------------------------------------------------------------------

    def get(self, key: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """(body, ETag) of `key`, or None if there is none."""
        import botocore.exceptions as bx

        out = self._call("get_object", Key=key)
        if out is None or out == "conflict":
            return None
        if limit is not None and out.get("ContentLength", 0) > limit:
            out["Body"].close()
            raise TooLarge(f"shared tier: {key} is {out['ContentLength']} bytes, more than {limit}")
        try:
            body = out["Body"].read()
        except (bx.BotoCoreError, OSError) as exc:  # the body stalled or broke off
            self.trip(type(exc).__name__)
            raise Unreachable(f"shared tier: reading {key}: {exc}") from None
        return body, out.get("ETag", "")

    def put(self, key: str, body: bytes, if_none_match: bool = False, if_match: str | None = None) -> bool:
        """Put `body` at `key`; with if_none_match only if there is no object there, with
        if_match only if its ETag is still that. False when the condition did not hold."""
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        kw = {"Key": key, "Body": body, "ContentMD5": md5}
        if self.conditional and if_none_match:
            kw["IfNoneMatch"] = "*"
        elif self.conditional and if_match:
            kw["IfMatch"] = if_match
        out = self._call("put_object", **kw)
        if out == "unsupported" and self.conditional:
            log.warning("the store does not support conditional PutObject: blocks are checked with "
                        "HEAD before PUT and manifests compared just before they are replaced")
            self.conditional = False
            return self.put(key, body, if_none_match, if_match)
        if out == "unsupported":
            raise SharedError(f"shared tier: PutObject of {key} is not implemented")
        if out is None:  # 404 on a PUT: the bucket is gone (some stores say so this way)
            raise StoreRefused(f"shared tier: PutObject of {key} answered 404 (no bucket?)")
        return out != "conflict"

    def exists(self, key: str) -> bool:
        return self._call("head_object", Key=key) not in (None, "conflict")

    def delete_tree(self, key: str) -> int:
        """Delete `key` and every key under `key/`; returns how many there were."""
        n = 0
        keys = [key] if self.exists(key) else []
        token = None
        while True:
            kw = {"Prefix": key + "/", "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self._call("list_objects_v2", **kw) or {}
            keys += [o["Key"] for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                batch = keys[i:i + 1000]
                out = self._call("delete_objects", Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                errors = (out or {}).get("Errors") if isinstance(out, dict) else None
                if errors:
                    raise SharedError(f"shared tier: deleting {errors[0].get('Key')}: {errors[0].get('Code')}")
                n += len(batch)
            keys = []
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return n


class SharedTier:
    """A mount's shared tier: the uploader thread, read-through lookups, block fetches.

    The warehouse calls fetch_blocks() (at a remote file's first open) and wake() (a file
    was queued); kvfs.fs calls lookup() (in a worker thread); kvfs.mount start()s and
    stop()s it; kvfs.control calls retire(); Warehouse.stats() shows describe()."""

    def __init__(self, wh, url: str, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 queue_limit: int | None = None):
        bucket, prefix = parse_url(url)
        if not timeout > 0:
            raise ValueError("the shared tier's timeout must be positive")
        self.wh = wh
        self.url = url
        self.keys = Keys(prefix)
        self.store = Store(bucket, endpoint, timeout)
        self.timeout = timeout
        self.node = wh.sb["uuid"]
        # As many as the event loop may run lookups at once (trio's worker thread limit):
        # a lookup that waits for a free thread is not a store that does not answer.
        self._lookups = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, "kvfs-shared-lookup")
        self._fetches = concurrent.futures.ThreadPoolExecutor(FETCH_WINDOW, "kvfs-shared-fetch")
        self._uploads = concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS, "kvfs-shared-upload")
        self._misses: dict[bytes, float] = {}  # path -> when the miss is forgotten
        self._dirs: dict[bytes, float] = {}  # directory path -> until when its manifest is known put
        self._known: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # block -> put when
        self._known_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._publish_lock = threading.Lock()  # a manifest put against a retire --shared
        self._rechecks: list = []  # heap of (when, n, later delays, key, parent, name, ino, mtime_ns, order)
        self._recheck_n = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploading = None  # the path being uploaded, for stats
        self.sharing = wh.sharing  # kvfs.shared_files: the warehouse's side of the tier
        self.sharing.attach_shared(self, queue_limit or DEFAULT_QUEUE_LIMIT)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvfs-shared-uploader", daemon=True)
        self._thread.start()
        log.info("shared tier %s (endpoint %s, timeout %.1f s, queue %d files, %d queued)", self.url,
                 self.store.endpoint or "from the AWS configuration", self.timeout, self.sharing.queue_limit,
                 self.sharing.queue_length())

    def stop(self) -> None:
        """Stop uploading (what is queued stays queued) within about one timeout."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout * 2 + 1)
            if self._thread.is_alive():
                log.warning("the shared tier's uploader is still in a request; not waiting for it")
        for pool in (self._lookups, self._fetches, self._uploads):
            pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    def count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.wh.counters["shared_" + name] += n

    def describe(self) -> dict:
        down = self.store.down()
        return {
            "url": self.url,
            "endpoint": self.store.endpoint,
            "timeout": self.timeout,
            "queue_limit": self.sharing.queue_limit,
            "state": "unreachable" if down else ("failing" if self.store.last_error else "ok"),
            "last_error": self.store.last_error,
            "retry_in": round(down, 3),
            "uploading": self.uploading,
        }

    # -- read-through ---------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> tuple:
        """(inode, 0) if the shared tier has `name` in directory `parent` (it is installed
        locally); (None, seconds) if not, with how long that answer holds: MISS_TTL when
        the store said so, 0 when it could not be asked. Never waits more than the timeout
        for the store."""
        base = self.sharing.path_of(parent)
        if base is None:
            return None, MISS_TTL
        path = base + b"/" + name if base else name
        key = self.keys.manifest(path)
        if key is None:
            return None, MISS_TTL
        now = time.monotonic()
        until = self._misses.get(path, 0)  # (read once: another thread may clear the cache)
        if until > now:
            return None, until - now
        if self.store.down():
            return None, 0
        future = self._lookups.submit(self.store.get, key, MAX_MANIFEST)
        try:
            got = future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():  # never started: every lookup thread was busy; not the store's fault
                self.count("lookups_busy")
                return None, 0
            self.store.trip(f"no answer in {self.timeout:g} s")
            self.count("failures")
            return None, 0
        except KvfsError as exc:
            self.count("failures")
            log.debug("lookup of %s in the shared tier: %s", key, exc)
            return None, 0
        if got is None:
            self.remember_miss(path)
            self.count("lookup_misses")
            return None, MISS_TTL
        try:
            m = Manifest.decode(got[0])
        except ValueError as exc:
            self.count("bad_manifests")
            log.warning("shared tier: %s is not a valid manifest (%s); treated as absent", key, exc)
            return None, MISS_TTL
        inode = self.sharing.install_remote(parent, name, m)
        self.count("lookup_hits")
        return inode, 0

    def remember_miss(self, path: bytes) -> None:
        """Answer lookups of `path` with a miss for a while (its manifest is of no use)."""
        if len(self._misses) >= MISS_CACHE:
            self._misses.clear()
        self._misses[path] = time.monotonic() + MISS_TTL

    def fetch_blocks(self, items: list[tuple[bytes, int]]):
        """Yield (hash, bytes) for each (hash, length) of `items`, in order, each fetched
        and verified, FETCH_WINDOW at a time. Raises Corrupt for a block whose bytes do not
        match its name, SharedUnavailable if one cannot be had."""
        pending: collections.deque = collections.deque()
        nxt = 0
        try:
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) < FETCH_WINDOW:
                    h, n = items[nxt]
                    nxt += 1
                    pending.append((h, self._fetches.submit(self._fetch_block, h, n)))
                h, future = pending.popleft()
                yield h, future.result()
        finally:
            for _, future in pending:
                future.cancel()

    def _fetch_block(self, h: bytes, length: int) -> bytes:
        key = self.keys.block(h)
        try:
            got = self.store.get(key, limit=length)
        except TooLarge:
            got = (b"", "")  # not this block: refused below
        except KvfsError:
            self.count("failures")
            raise
        if got is None:
            self.count("failures")
            log.error("shared tier: block %s is named by a manifest and missing from the store "
                      "(expired by a lifecycle rule?): the file is treated as absent", key)
            raise RemoteMissing(f"block {h.hex()} is missing from the shared tier")
        data = got[0]
        # A block may be shorter than its place in the file (written short, the file grown
        # past it since): it is read as if zeros followed, and its hash is of what it holds.
        if len(data) > length or codecs.block_hash(data) != h:
            self.count("corrupt_blocks")
            log.error("shared tier: %s does not match its hash (%d bytes, expected %d): refused",
                      key, len(data), length)
            raise Corrupt(f"block {h.hex()} from the shared tier does not match its hash")
        self.count("fetched_blocks")
        self.count("fetched_bytes", length)
        return data

    # -- write-back -----------------------------------------------------------------

    def _run(self) -> None:
        pause = 0.0
        refused = None
        while not self._stop.is_set():
            if pause:
                self._stop.wait(pause)
                pause = 0.0
                continue
            try:
                if self._rechecks and self._rechecks[0][0] <= time.monotonic() and not self.store.down():
                    self._recheck(heapq.heappop(self._rechecks))
                    continue
                item = self.sharing.next_upload()
            except Exception:  # the uploader must not die of one bad answer or record
                self.count("failures")
                log.exception("shared tier: the uploader hit an error; going on in %.0f s", MAX_BACKOFF)
                pause = MAX_BACKOFF
                continue
            if item is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            seq, ino, published_ns = item
            wait = published_ns / 1e9 + SETTLE - time.time()
            if wait > 0:
                self._wake.wait(min(wait, 1.0))
                self._wake.clear()
                continue
            if self.store.down():
                pause = self.store.down()
                continue
            try:
                self._upload(ino, published_ns)
                refused = None
            except Unreachable:
                self.count("failures")
                continue  # the store is down now: the entry waits for it
            except StoreRefused as exc:  # the store refuses all: tried again, logged once per reason
                self.count("failures")
                if str(exc) != refused:
                    log.error("shared tier: cannot upload (%s); retrying every %.0f s", exc, MAX_BACKOFF)
                    refused = str(exc)
                pause = MAX_BACKOFF
                continue
            except KvfsError as exc:  # this file cannot be shared (unreadable block, a refused key)
                self.count("failures")
                log.error("shared tier: inode %d is not shared: %s", ino, exc)
            except Exception:
                self.count("failures")
                log.exception("shared tier: uploading inode %d failed; it is not shared", ino)
            finally:
                self.uploading = None
            self.sharing.finish_upload(seq, ino)

    def _upload(self, ino: int, version: int) -> None:
        snap = self.sharing.share_snapshot(ino)
        if snap is None:
            return  # removed, or read through from the store, since it was queued
        try:
            names = [(parent, name, path, self.keys.manifest(path)) for parent, name, path in snap.names]
            for _, _, path, key in names:
                if key is None:
                    log.warning("shared tier: %r cannot be a key (not UTF-8, or too long): not shared", path)
            names = [n for n in names if n[3] is not None]
            if not names:
                return
            self.uploading = names[0][2].decode(errors="replace")
            self._put_blocks(snap)
            m = Manifest("file", "", snap.mode & 0o7777, snap.uid, snap.gid, snap.mtime_ns, snap.size,
                         snap.block_size, snap.hashes, snap.xattrs, self.node, version)
            uploaded = False
            for parent, name, path, key in names:
                self._put_dirs(path)
                with self._publish_lock:
                    if path not in self.sharing.paths_now(ino):
                        continue  # renamed, unlinked or retired meanwhile
                    m.path = path.decode()
                    if self._put_manifest(key, m, snap, parent, name):
                        uploaded = True
                        self._recheck_later(RECHECKS, key, parent, name, snap.ino, snap.mtime_ns, m.order)
                    self._misses.pop(path, None)  # a lookup before the file was made here
            if uploaded:
                self.count("uploaded_files")
        finally:
            self.sharing.share_release(snap)

    def _known_present(self, h: bytes) -> bool:
        with self._known_lock:
            t = self._known.get(h)
            return t is not None and time.monotonic() - t < KNOWN_TTL

    def _note_present(self, h: bytes) -> None:
        with self._known_lock:
            self._known[h] = time.monotonic()
            self._known.move_to_end(h)
            while len(self._known) > KNOWN_BLOCKS:
                self._known.popitem(last=False)

    def _put_blocks(self, snap) -> None:
        todo = [h for h in snap.held if not self._known_present(h)]
        futures = [self._uploads.submit(self._put_block, h) for h in todo]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()

    def _put_block(self, h: bytes) -> None:
        key = self.keys.block(h)
        if not self.store.conditional and self.store.exists(key):
            created = False
        else:
            data = self.sharing.read_block(h)
            # Content-addressed: a racing put of the same key by another node (or, without
            # conditional puts, between the HEAD and the PUT) writes the very same bytes.
            created = self.store.put(key, data, if_none_match=True)
            if created:
                self.count("uploaded_blocks")
                self.count("uploaded_bytes", len(data))
        if not created:
            self.count("present_blocks")
        self._note_present(h)

    def _put_dirs(self, path: bytes) -> None:
        """Put the manifests of the directories above `path` that this node has not put
        lately (created only if absent: a directory's manifest never replaces anything)."""
        parts = path.split(b"/")[:-1]
        now = time.monotonic()
        for i in range(1, len(parts) + 1):
            d = b"/".join(parts[:i])
            if self._dirs.get(d, 0) > now:
                continue
            info = self.sharing.dir_attributes(d)
            key = self.keys.manifest(d)
            if info is None or key is None:
                return
            mode, uid, gid, mtime_ns, xattrs = info
            m = Manifest("dir", d.decode(), mode & 0o7777, uid, gid, mtime_ns, xattrs=xattrs, node=self.node)
            if not self.store.conditional and self.store.exists(key):
                pass
            else:
                self.store.put(key, m.encode(), if_none_match=True)
            if len(self._dirs) >= MISS_CACHE:
                self._dirs.clear()
            self._dirs[d] = now + DIR_TTL

    def _put_manifest(self, key: str, m: Manifest, snap, parent: int, name: bytes) -> bool:
        """Publish manifest `m` at `key` unless the store has a newer version; True if it
        was put. Compare-and-swap on the ETag, so that a concurrent writer elsewhere
        cannot be overwritten by an older version."""
        body = m.encode()
        for _ in range(CAS_ATTEMPTS):
            got = self.store.get(key, MAX_MANIFEST)
            theirs = None
            if got is not None:
                try:
                    theirs = Manifest.decode(got[0])
                except ValueError:
                    log.warning("shared tier: replacing %s, which is not a valid manifest", key)
            if theirs is not None and theirs.kind == "file" and theirs.order >= m.order:
                if theirs.node != self.node:  # not a later upload of this very node
                    self._adopt(theirs, (snap.ino, snap.mtime_ns), parent, name, key)
                return False
            if self.store.put(key, body, if_none_match=got is None, if_match=got[1] if got else None):
                return True
        raise Unreachable(f"shared tier: {key} changed {CAS_ATTEMPTS} times while it was being replaced")

    def _adopt(self, theirs: Manifest, ours: tuple[int, int], parent: int, name: bytes, key: str) -> None:
        """Another node published this path later: its version replaces ours, (inode,
        mtime) as uploaded, here too (if it is still that copy, and not being written)."""
        try:
            done = self.sharing.install_remote(parent, name, theirs, replace=ours)
        except KvfsError as exc:
            log.warning("shared tier: keeping this node's copy of %s: %s", key, exc)
            return
        if done is not None:
            self.count("superseded_files")
            log.info("shared tier: %s was published later by node %s; that version replaces this "
                     "node's", key, theirs.node)

    def _recheck_later(self, delays, key, parent, name, ino, mtime_ns, order) -> None:
        if delays and len(self._rechecks) < RECHECK_LIMIT:  # past the limit, not looked at again
            heapq.heappush(self._rechecks, (time.monotonic() + delays[0], next(self._recheck_n), delays[1:],
                                            key, parent, name, ino, mtime_ns, order))

    def _recheck(self, item) -> None:
        """Look again at a manifest this node put: a newer version from another node that
        landed after ours replaces our local copy, as it would have had it landed first."""
        _, _, later, key, parent, name, ino, mtime_ns, order = item
        try:
            got = self.store.get(key, MAX_MANIFEST)
            theirs = Manifest.decode(got[0]) if got is not None else None
        except Unreachable:
            heapq.heappush(self._rechecks, item)  # when the store is back
            return
        except (KvfsError, ValueError):
            return
        if theirs is None or theirs.kind != "file":
            return
        if theirs.order > order and theirs.node != self.node:
            self._adopt(theirs, (ino, mtime_ns), parent, name, key)
        else:
            self._recheck_later(later, key, parent, name, ino, mtime_ns, order)

    # -- retire --shared ------------------------------------------------------------------

    def retire(self, path: str | bytes) -> int:
        """Delete the manifests of `path` and of everything below it from the store (the
        blocks stay, for the lifecycle rules); returns how many were deleted."""
        from . import meta as M

        rel = b"/".join(M.path_parts(path))
        key = self.keys.manifest(rel)
        if key is None:
            raise SharedError(f"{rel!r} cannot be a key in the shared tier")
        with self._publish_lock:
            n = self.store.delete_tree(key)
            self._dirs.clear()
            self._misses.clear()
        self.count("retired_manifests", n)
        log.info("shared tier: retired %s (%d manifests)", key, n)
        return n
