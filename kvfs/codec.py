"""Block naming and framing: content hashes and the codecs a stored block may use.

A block is named by the xxh3-128 hash of its *uncompressed* bytes, so the name is the same
whatever codec stored it, and verification after decoding proves the bytes are the ones that
were written.
"""

import threading

import xxhash
import zstandard

from .errors import Corrupt, Invalid

HASH_LEN = 16

CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_NAMES = {"none": CODEC_NONE, "zstd": CODEC_ZSTD}

_ZSTD_LEVEL = 3
# zstd contexts are not thread-safe (two threads in one crash the process). Blocks are
# compressed in many threads at once (writers, direct stores) outside any lock: one
# compressor per thread. Decompression makes one per call (cheap).
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return c


def block_hash(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def block_hasher():
    """A streaming block_hash: update() with the block's pieces in order, then digest()."""
    return xxhash.xxh3_128()


def codec_by_name(name: str) -> int:
    try:
        return CODEC_NAMES[name]
    except KeyError:
        raise Invalid(f"unknown codec {name!r} (known: {', '.join(CODEC_NAMES)})") from None


def encode(data, codec: int) -> tuple[bytes, int]:
    """Return (stored bytes, codec actually used). Incompressible data is stored raw.

    Raw blocks are stored without their trailing zeros (a partly written block of a sparse
    or padded file takes the space of its data); decode() pads them back."""
    if codec == CODEC_ZSTD:
        packed = _compressor().compress(data)
        # Keep compression only where it saves at least one 4 KiB allocation unit.
        if len(packed) + 4096 <= len(data):
            return packed, CODEC_ZSTD
    return bytes(data).rstrip(b"\0"), CODEC_NONE


def decode(stored: bytes, codec: int, raw_len: int, expect_hash: bytes) -> bytes:
    """Decode a stored block and verify it against its content hash (raise Corrupt)."""
    if codec == CODEC_NONE:
        data = stored if len(stored) >= raw_len else stored + bytes(raw_len - len(stored))
    elif codec == CODEC_ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise Corrupt(f"zstd frame does not decode: {exc}") from None
    else:
        raise Corrupt(f"unknown codec {codec}")
    if len(data) != raw_len or block_hash(data) != expect_hash:
        raise Corrupt("block content does not match its hash")
    return data
