"""kvfs.data: cached context as training data, straight from files.

`iter_chunks` walks the kvfs.kv chunks of a model (or of any directory of .kv files) in a
stable order and yields them mapped, not read (kvfs.kv.Chunk: token ids and per-layer K and V
as np.memmap views of the file's pages). It works on a read-only mount, and a chunk evicted
or retired while the walk goes on is skipped, not an error. `ChunkDataset` is a PyTorch
IterableDataset over the same walk that gives each DataLoader worker (and each rank, given
rank and world_size) its own share of the files.
"""

import os

from .kv import Chunk, open_chunk


def chunk_paths(directory: str) -> list[str]:
    """Every .kv file below `directory`, sorted (the same order on every reader)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory, onerror=lambda exc: None):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".kv"))
    return out


def model_dir(root: str, model: str, namespace: str = "default") -> str:
    """Where kvfs.kv.KVStore(root, model, namespace) keeps its chunks."""
    return os.path.join(root, namespace, model)


def iter_chunks(directory: str, shard: int = 0, shards: int = 1, skipped: list | None = None):
    """Yield the chunks below `directory` (this shard's share of them: every shards-th file
    from the shard-th), mapped. Files that vanish meanwhile are skipped (and appended to
    `skipped` when given)."""
    for path in chunk_paths(directory)[shard::shards]:
        try:
            yield open_chunk(path)
        except FileNotFoundError:  # evicted, expired or retired since the listing
            if skipped is not None:
                skipped.append(path)


try:  # the PyTorch adapter, when torch is installed
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError:  # numpy users need nothing more
    torch = None
    IterableDataset = object


class ChunkDataset(IterableDataset):
    """Chunks below a directory as (tokens, kv) pairs of torch tensors: tokens (int64,
    [chunk_tokens]) and kv shaped (layers, 2, chunk_tokens, ...). Each DataLoader worker of
    each rank reads a disjoint share of the files. Needs torch."""

    def __init__(self, directory: str, rank: int = 0, world_size: int = 1):
        if torch is None:
            raise ImportError("kvfs.data.ChunkDataset needs torch")
        self.directory, self.rank, self.world_size = directory, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for chunk in iter_chunks(self.directory, self.rank * workers + worker, self.world_size * workers):
            yield to_torch(chunk)


def to_torch(chunk: Chunk):
    """(tokens, kv) of a chunk as torch tensors (copied out of the mapping)."""
    import numpy as np

    return torch.from_numpy(np.asarray(chunk.tokens, dtype=np.int64)), torch.from_numpy(chunk.kv())
