"""Store KV chunks through LMCache's remote backend (its fs connector) in one process and
load them in another: `python lmcache_xproc.py store|load N`, LMCACHE_CONFIG_FILE set.

Uses LMCache's own classes (RemoteBackend, LocalCPUBackend, CacheEngineKey) as its
basic_check does; the contents are a function of the key, so the loading process checks
every byte without sharing anything but the files."""

import json
import sys

import torch
from lmcache.integration.vllm.utils import lmcache_get_or_create_config
from lmcache.v1.check.utils import EventLoopManager, _get_default_metadata, create_test_key
from lmcache.v1.storage_backend import RemoteBackend
from lmcache.v1.storage_backend.connector import InstrumentedRemoteConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

MODEL = "kvfs-xproc-model"


def expected(i: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(like.shape, generator=g).to(like.dtype)


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    config = lmcache_get_or_create_config()
    metadata = _get_default_metadata(MODEL)
    loop = EventLoopManager()
    loop.start()
    cpu = LocalCPUBackend(config=config, metadata=metadata, dst_device="cpu")
    backend = RemoteBackend(config=config, metadata=metadata, loop=loop.get_loop(),
                            local_cpu_backend=cpu, dst_device="cpu")
    conn = backend.connection
    if isinstance(conn, InstrumentedRemoteConnector):
        conn = conn.getWrappedConnector()
    out = {"stored": 0, "found": 0, "equal": 0}
    try:
        for i in range(n):
            key = create_test_key(MODEL, f"chunk-{i}")
            if mode == "store":
                obj = cpu.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt)
                obj.tensor.copy_(expected(i, obj.tensor))
                backend.submit_put_task(key, obj).result(timeout=30)
                out["stored"] += 1
            else:
                if not backend.contains(key):
                    continue
                out["found"] += 1
                got = backend.get_blocking(key)
                if got is not None and torch.equal(got.tensor, expected(i, got.tensor)):
                    out["equal"] += 1
    finally:
        backend.close()
        loop.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
