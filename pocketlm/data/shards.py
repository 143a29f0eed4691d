"""Token shards: a 1 KiB versioned header, then token ids as a flat little-endian array (memory-mapped).

Header (int64 x 128): magic, format version, bytes per token (2 or 4), number of tokens, number of documents.
Written to a temp file and renamed, so a shard on disk is always complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

MAGIC = 0x53544D4C4B434F50  # b"POCKLMTS" little-endian
VERSION = 1
HEADER_BYTES = 1024


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ShardWriter:
    """Append token ids in chunks; `close()` writes the header and renames into place."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.dtype = dtype_for(vocab_size)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.n_tokens = 0
        self.n_docs = 0

    def write(self, ids: list[int] | np.ndarray, docs: int = 0) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.f.write(arr.tobytes())
        self.n_tokens += arr.size
        self.n_docs += docs

    def close(self) -> None:
        header = np.zeros(HEADER_BYTES // 8, dtype="<i8")
        header[:5] = [MAGIC, VERSION, self.dtype.itemsize, self.n_tokens, self.n_docs]
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def read_header(path: Path) -> tuple[np.dtype, int, int]:
    if not Path(path).is_file():
        raise PocketLMError(f"{path} is missing: the dataset is incomplete, run `pocketlm prepare` again")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise PocketLMError(f"{path} is truncated (no shard header): run `pocketlm prepare` again")
    header = np.frombuffer(raw, dtype="<i8")
    if header[0] != MAGIC:
        raise PocketLMError(f"{path} is not a pocketlm token shard: run `pocketlm prepare` to make one")
    if header[1] != VERSION:
        raise PocketLMError(f"{path} has shard format v{header[1]}; this pocketlm reads v{VERSION}: prepare again")
    if int(header[2]) not in (2, 4):
        raise PocketLMError(f"{path} has a corrupt header (token width {header[2]}): run `pocketlm prepare` again")
    dtype = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}[int(header[2])]
    return dtype, int(header[3]), int(header[4])


def open_shard(path: Path) -> np.ndarray:
    """The token ids as a read-only memory map (no copy; pages load on demand)."""
    dtype, n, _ = read_header(path)
    expected = HEADER_BYTES + n * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise PocketLMError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes, expected {expected})")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))
