"""Store KV chunks through LMCache's StorageManager with the kvfs storage plugin in one
process and find and load them in another: `python lmcache_plugin_xproc.py store|load N`,
LMCACHE_CONFIG_FILE set (storage_plugins: ["kvfs"] and its extra_config).

LMCache builds the plugin itself (storage_plugin_launcher) from the config; chunks go in
through StorageManager.batched_put and come back through batched_contains, batched_get,
get and the prefetch path (batched_async_contains + batched_get_non_blocking). Contents
are a function of the key, so the loading process checks every byte without sharing
anything but the files. Prints one JSON line."""

import asyncio
import json
import sys

import torch
from lmcache.integration.vllm.utils import lmcache_get_or_create_config
from lmcache.v1.check.utils import create_test_key
from lmcache.v1.event_manager import EventManager
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.storage_manager import StorageManager

MODEL = "org/kvfs-plugin-model"  # a "/" as in real model names
LAYERS, TOKENS, HEADS, HEAD = 4, 256, 8, 64
SHAPE = torch.Size([2, LAYERS, TOKENS, HEADS * HEAD])  # KV_2LTD, 2 MiB in bf16


def expected(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(SHAPE, generator=g).to(torch.bfloat16)


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    config = lmcache_get_or_create_config()
    metadata = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16,
                               kv_shape=(LAYERS, 2, TOKENS, HEADS, HEAD))
    sm = StorageManager(config=config, metadata=metadata, event_manager=EventManager())
    plugin = sm.storage_backends.get("kvfs")
    keys = [create_test_key(MODEL, f"chunk-{i}") for i in range(n)]
    out = {"plugin": type(plugin).__name__, "direct": bool(getattr(plugin, "uses_direct_path", False))}
    try:
        if mode == "store":
            objs = []
            for i in range(n):
                obj = sm.allocate(SHAPE, torch.bfloat16, fmt=MemoryFormat.KV_2LTD)
                obj.tensor.copy_(expected(i))
                if i == 0:
                    obj.metadata.cached_positions = torch.arange(TOKENS, dtype=torch.int64) * 3
                objs.append(obj)
            sm.batched_put(keys[: n // 2], objs[: n // 2])  # two batches
            sm.batched_put(keys[n // 2:], objs[n // 2:])
            plugin.flush(60)
            out["stored"] = sum(plugin.contains(k) for k in keys)
        else:
            missing = create_test_key(MODEL, "never-stored")
            hits, mapping = sm.batched_contains(keys + [missing])
            out["hits"] = hits
            out["by"] = {name: len(ks) for name, ks in mapping.items()}
            out["contains_missing"] = plugin.contains(missing)
            got = sm.batched_get(keys, location="kvfs")
            out["equal"] = sum(o is not None and torch.equal(o.tensor, expected(i)) for i, o in enumerate(got))
            pos = got[0].metadata.cached_positions if got and got[0] is not None else None
            out["positions"] = pos is not None and torch.equal(pos, torch.arange(TOKENS, dtype=torch.int64) * 3)
            for o in got:
                if o is not None:
                    o.ref_count_down()
            one = plugin.get_blocking(keys[-1])
            out["get_blocking"] = one is not None and torch.equal(one.tensor, expected(n - 1))
            if one is not None:
                one.ref_count_down()
            out["get_missing"] = plugin.get_blocking(missing) is None

            async def prefetch():
                hit = await plugin.batched_async_contains("lookup-1", keys + [missing])
                return hit, await plugin.batched_get_non_blocking("lookup-1", keys[:hit])

            hit, objs = asyncio.run_coroutine_threadsafe(prefetch(), sm.loop).result(60)
            out["prefetch"] = [hit, sum(torch.equal(o.tensor, expected(i)) for i, o in enumerate(objs))]
            for o in objs:
                o.ref_count_down()
    finally:
        sm.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
