"""Exact and near-duplicate detection for streams of documents, keeping only hashes and signatures in memory.

Exact: a 64-bit hash of the document's case-folded words (punctuation and spacing ignored).
Near: MinHash over word n-gram shingles with locality-sensitive hashing (Broder 1997; the banding scheme
of Leskovec et al., "Mining of Massive Datasets" ch. 3, as in datasketch's MinHashLSH). The i-th MinHash
value is min over shingles x of h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 (multiply-add-shift, a universal
family for 32-bit x; the minimum is taken over the 64-bit values, whose top halves order the same way),
computed for a whole batch of documents as one numpy matrix. Signatures are cut into
`bands` bands of `rows` values; documents sharing a band are candidates, and a candidate counts as a
duplicate only when the signatures agree on at least `threshold` of their values (the MinHash estimate of
Jaccard similarity), so band collisions never remove a document on their own. Memory per kept document:
its signature (num_perm x 4 bytes) and one dict entry per band.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pocketlm.data.ngrams import mix64, ngram_hashes

_CHUNK_ROWS = 1 << 16  # signatures are stored in blocks of this many rows
_BATCH_SHINGLES = 1 << 14  # shingles hashed per numpy matrix: 16k x num_perm x 8 bytes (16 MB at 128)


def exact_key(ws: list[str]) -> int:
    """Hash of a document's words: identical up to case, punctuation and whitespace -> identical key."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(ws).encode(), digest_size=8).digest(), "little")


class ExactDeduper:
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def is_duplicate(self, ws: list[str]) -> bool:
        """True if a document with the same words was seen before; otherwise remember this one."""
        key = exact_key(ws)
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def _area(y: np.ndarray, lo: float, hi: float) -> float:
    return float((y[:-1] + y[1:]).sum() / 2 * (hi - lo) / (len(y) - 1))  # trapezoid rule


def _false_positive(t: float, b: int, r: int) -> float:
    x = np.linspace(0.0, t, 201)
    return _area(1 - (1 - x ** r) ** b, 0.0, t)


def _false_negative(t: float, b: int, r: int) -> float:
    x = np.linspace(t, 1.0, 201)
    return _area((1 - x ** r) ** b, t, 1.0)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the equally weighted false positive and
    false negative areas of the LSH S-curve around `threshold` (datasketch's rule)."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = 0.5 * _false_positive(threshold, b, r) + 0.5 * _false_negative(threshold, b, r)
            if err < best_err:
                best, best_err = (b, r), err
    return best


class MinHasher:
    """MinHash signatures of word-shingle sets, `num_perm` 32-bit values each, reproducible from `seed`."""

    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle = num_perm, shingle
        self.a = rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2 ** 63, num_perm, dtype=np.uint64)

    def shingles(self, word_hashes: np.ndarray) -> np.ndarray:
        """32-bit shingle values: word n-grams; a document shorter than n words is one shingle."""
        n = min(self.shingle, len(word_hashes))
        return ngram_hashes(word_hashes, n) >> np.uint64(32) if n else np.empty(0, np.uint64)

    def _permute(self, x: np.ndarray) -> np.ndarray:
        """(S, num_perm) full 64-bit a*x + b; the caller takes the minimum first and the top 32 bits after
        (the smallest 64-bit value has the smallest top half), saving a pass over the matrix."""
        with np.errstate(over="ignore"):
            h = np.multiply.outer(x, self.a)
            h += self.b
            return h

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """(D, num_perm) uint32; a document with no shingles gets all 0xFFFFFFFF (and is never matched)."""
        out = np.full((len(shingle_sets), self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        group: list[int] = []
        size = 0
        for i, x in enumerate(shingle_sets):
            if len(x) > _BATCH_SHINGLES:  # one huge document: stream its shingles
                for s in range(0, len(x), _BATCH_SHINGLES):
                    out[i] = np.minimum(out[i], self._permute(x[s:s + _BATCH_SHINGLES]).min(axis=0))
                continue
            if len(x) == 0:
                continue
            if size + len(x) > _BATCH_SHINGLES:
                self._group(shingle_sets, group, out)
                group, size = [], 0
            group.append(i)
            size += len(x)
        self._group(shingle_sets, group, out)
        return (out >> np.uint64(32)).astype(np.uint32)

    def _group(self, shingle_sets: list[np.ndarray], group: list[int], out: np.ndarray) -> None:
        if not group:
            return
        xs = [shingle_sets[i] for i in group]
        starts = np.cumsum([0] + [len(x) for x in xs[:-1]])
        out[group] = np.minimum.reduceat(self._permute(np.concatenate(xs)), starts, axis=0)


class NearDeduper:
    """Streaming near-duplicate filter: the first document of each near-duplicate cluster is kept."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, shingle, seed)
        self.bands, self.rows = optimal_bands(threshold, num_perm)
        rng = np.random.default_rng(seed + 1)
        self.band_mult = rng.integers(0, 2 ** 63, self.rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.tables: list[dict[int, Any]] = [{} for _ in range(self.bands)]
        self.blocks: list[np.ndarray] = []
        self.count = 0

    def _signature(self, i: int) -> np.ndarray:
        return self.blocks[i // _CHUNK_ROWS][i % _CHUNK_ROWS]

    def _store(self, sig: np.ndarray) -> int:
        i = self.count
        if i % _CHUNK_ROWS == 0:
            self.blocks.append(np.empty((_CHUNK_ROWS, self.hasher.num_perm), dtype=np.uint32))
        self.blocks[-1][i % _CHUNK_ROWS] = sig
        self.count += 1
        return i

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(D, bands) uint64: one hash per band of each signature."""
        d = sigs.shape[0]
        bands = sigs[:, :self.bands * self.rows].astype(np.uint64).reshape(d, self.bands, self.rows)
        with np.errstate(over="ignore"):
            return mix64((bands * self.band_mult).sum(axis=2, dtype=np.uint64))

    def check_batch(self, word_hash_lists: list[np.ndarray]) -> list[int | None]:
        """For each document in order: the id of an earlier kept near-duplicate, or None (then it is kept
        and indexed). Documents of one batch are compared with each other too, in order."""
        sigs = self.hasher.signatures([self.hasher.shingles(h) for h in word_hash_lists])
        keys = self.band_keys(sigs).tolist()
        empty = (sigs == 0xFFFFFFFF).all(axis=1)
        out: list[int | None] = []
        for sig, row, is_empty in zip(sigs, keys, empty):
            if is_empty:
                out.append(None)
                continue
            dup = self._find(sig, row)
            out.append(dup)
            if dup is None:
                self._insert(sig, row)
        return out

    def _find(self, sig: np.ndarray, row: list[int]) -> int | None:
        seen: set[int] = set()
        for table, key in zip(self.tables, row):
            hit = table.get(key)
            if hit is None:
                continue
            for c in hit if isinstance(hit, list) else (hit,):
                if c not in seen:
                    seen.add(c)
                    if np.count_nonzero(self._signature(c) == sig) >= self.threshold * len(sig):
                        return c
        return None

    def _insert(self, sig: np.ndarray, row: list[int]) -> None:
        i = self._store(sig)
        for table, key in zip(self.tables, row):
            hit = table.get(key)
            if hit is None:
                table[key] = i
            elif isinstance(hit, list):
                hit.append(i)
            else:
                table[key] = [hit, i]

    def memory_bytes(self) -> int:
        """Signature blocks plus an estimate of the band tables (about 100 bytes per entry)."""
        return sum(b.nbytes for b in self.blocks) + 100 * sum(len(t) for t in self.tables)
