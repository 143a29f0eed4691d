"""Words and word n-gram hashes: the shared vocabulary of dedupe (shingles) and split (leakage check).

A word is a run of letters/digits (with inner apostrophes), case-folded. Each word gets a stable 64-bit hash
(blake2b, cached, so the same across runs and processes - unlike Python's `hash`); an n-gram's hash is a
polynomial over its words' hashes computed for all positions at once with numpy (uint64 arithmetic wraps,
which is the modulus we want), then mixed so that every output bit depends on every input bit.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the rolling polynomial
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64 finaliser
_CACHE_MAX = 1 << 20  # word -> hash cache entries; cleared when full so memory stays bounded


def words(text: str) -> list[str]:
    """Case-folded words of `text`, punctuation and whitespace dropped."""
    return WORD_RE.findall(text.casefold())


class WordHasher:
    """Stable 64-bit word hashes with a bounded cache (most words of a corpus repeat)."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def _hash(self, w: str) -> int:
        if len(self.cache) >= _CACHE_MAX:
            self.cache.clear()
        h = self.cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        return h

    def __call__(self, ws: list[str]) -> np.ndarray:
        get = self.cache.get
        return np.fromiter((get(w) or self._hash(w) for w in ws), dtype=np.uint64, count=len(ws))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of `n` consecutive words, shape (len - n + 1,); empty when there are fewer words."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        g = np.zeros(count, dtype=np.uint64)
        for k in range(n):  # Horner's rule over the window, all windows at once
            g = g * _POLY + word_hashes[k:k + count]
        return mix64(g + np.uint64(n))
