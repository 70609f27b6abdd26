"""SGLang's HiCache file backend (sglang.srt.mem_cache.hicache_storage.HiCacheFile), unchanged,
on a directory: `python sglang_roundtrip.py write|read DIR PAGES`. The writer stores pages
the way SGLang's cache controller does (batch_set of sha256 page keys); the reader, another
process, finds them with batch_exists and loads them with batch_get, checking every byte.
Run by scripts/integration-sglang.sh with SGLang's interpreter."""

import hashlib
import json
import os
import sys

import torch

from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

PAGE_SHAPE = (2, 32, 8, 64)  # K/V, layers, page tokens x heads, head dim: 256 KiB of fp16


def key(i: int) -> str:
    return hashlib.sha256(f"page-{i}".encode()).hexdigest()


def page(i: int) -> torch.Tensor:
    return torch.randn(PAGE_SHAPE, generator=torch.Generator().manual_seed(i)).to(torch.float16)


def main() -> None:
    mode, directory, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = directory
    config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                  attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                  is_page_first_layout=True, model_name="kvfs/test-model")
    store = HiCacheFile(config)
    keys = [key(i) for i in range(pages)]
    if mode == "write":
        ok = store.batch_set(keys, [page(i) for i in range(pages)])
        print(json.dumps({"written": pages if ok else 0}))
        return
    present = [store.exists(k) for k in keys]
    targets = [torch.empty(PAGE_SHAPE, dtype=torch.float16) for _ in keys]
    got = store.batch_get(keys, targets)
    equal = sum(1 for i, t in enumerate(got) if t is not None and torch.equal(t, page(i)))
    print(json.dumps({"present": sum(present), "equal": equal, "missing": store.exists(key(pages + 1))}))


if __name__ == "__main__":
    main()
