"""kvfs.vllm_connector without vLLM: its chunk names are the same in every process and
differ per model, revision, dtype, layout, block and chunk size, salt and rank; importing
it loads neither vLLM nor torch; its block tiles and kvfs.kv's token-major K/V convert both
ways; KVStore's extra keys and store(offset=) that it relies on. The connector in the real
engine: bash scripts/integration-vllm-kvfs.sh."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvfs.kv import KVStore
from kvfs.vllm_connector import chunk_names

BASE = dict(model="llama-tiny", revision="main", dtype="bfloat16", layout="vllm-paged/cpu/h2/d64",
            block_size=32, chunk_tokens=128)
TOKENS = list(range(7, 7 + 300))


def test_chunk_names_are_the_same_in_every_process():
    probe = textwrap.dedent(f'''
        import sys
        from kvfs.vllm_connector import chunk_names
        print(" ".join(chunk_names({TOKENS!r}, **{BASE!r})))
        print(sorted({{"vllm", "torch"}} & set(sys.modules)))
    ''')
    seen = set()
    for seed in ("0", "1", "random"):
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        names, imported = res.stdout.splitlines()
        seen.add(names)
        assert imported == "[]"  # vLLM (and torch) only when KvfsConnector is asked for
    assert seen == {" ".join(chunk_names(TOKENS, **BASE))}
    assert len(chunk_names(TOKENS, **BASE)) == 2  # whole chunks only


@pytest.mark.parametrize("change", [
    {"model": "llama-other"}, {"revision": "v2"}, {"dtype": "float16"}, {"layout": "vllm-paged/cuda/h2/d64"},
    {"block_size": 16}, {"chunk_tokens": 64}, {"salt": "tenant-b"}, {"tp_rank": 1, "tp_size": 2},
    {"tp_size": 2}, {"pp_rank": 1, "pp_size": 2},
])
def test_chunk_names_differ_per_model_dtype_layout_size_salt_and_rank(change):
    mine = chunk_names(TOKENS, **BASE)
    theirs = chunk_names(TOKENS, **{**BASE, **change})
    assert not set(mine) & set(theirs)


def test_chunk_names_are_chained():
    """A prompt that shares the first chunk shares its name, and only that one."""
    a = chunk_names(TOKENS, **BASE)
    b = chunk_names(TOKENS[:128] + [1] * 172, **BASE)
    assert a[0] == b[0] and a[1] != b[1]


def test_the_connectors_names_are_kvstore_paths(tmp_path):
    """What chunk_names gives is what a KVStore with the connector's keys stores."""
    from kvfs.vllm_connector import chunk_keys

    keys = chunk_keys(BASE["model"], revision="main", dtype="bfloat16", layout=BASE["layout"], block_size=32,
                      chunk_tokens=128)
    store = KVStore(str(tmp_path), model=BASE["model"], revision="main", dtype="bfloat16", layout=BASE["layout"],
                    chunk_tokens=128, extra_keys=keys, direct=False)
    kv = np.random.default_rng(0).standard_normal((2, 2, 256, 2, 64)).astype(np.float16)
    store.store(TOKENS, kv[:, :, 128:], offset=128)  # the second chunk only, as the connector stores a step's
    names = chunk_names(TOKENS, **BASE)
    assert [os.path.exists(store.path(bytes.fromhex(n))) for n in names] == [False, True]
    assert store.lookup(TOKENS) == 0
    store.store(TOKENS, kv)  # the first one too (the second is there: not written again)
    n, got = store.load(TOKENS)
    assert n == 256 and np.array_equal(got, kv)
    with pytest.raises(ValueError):
        KVStore(str(tmp_path), model="m", extra_keys={"dtype": "x"}, direct=False).extra


@pytest.mark.parametrize("device_rows_first", [True, False])
def test_block_tiles_and_token_major_kv_convert_both_ways(monkeypatch, device_rows_first):
    import torch
    from kvfs import vllm_connector as vc

    monkeypatch.setattr(vc, "_kv_rows_first", lambda t: device_rows_first)
    bs, heads, d = 32, 2, 64
    tiles = torch.randn(4, heads, bs, 2 * d).to(torch.bfloat16)  # vLLM's [B, H, N, C] per-layer view
    kv = vc._from_tiles(tiles, bs)
    assert kv.shape == (2, 4 * bs, heads, d)
    assert torch.equal(vc._to_tiles(kv, tiles, bs), tiles)
    if device_rows_first:  # CPU attention: a tile is (H, 2N, D), K rows then V rows
        flat = tiles.reshape(4, heads, 2 * bs, d)
        assert torch.equal(kv[0, bs + 3, 1], flat[1, 1, 3]) and torch.equal(kv[1, 5, 0], flat[0, 0, bs + 5])
