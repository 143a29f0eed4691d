"""Fast byte-level BPE encoding: a word -> ids cache in front of the `tokenizers` library's own BPE model.

Where the time goes in `Tokenizer.encode_batch` for byte-level BPE (measured on TinyStories, 2 cores): the
pre-tokenizer (Oniguruma regex plus per-byte offset bookkeeping) alone runs at about 1 MB/s, and the
Encoding objects (offsets, masks, type ids) cost as much again; BPE itself is cheap thanks to the library's
cache. BPE is applied to each pre-tokenized word independently, so a word's ids never depend on its
neighbours: this module splits text with Python's `re` using the same pattern as the library (character
classes spelled out from `unicodedata`), looks every word up in a dict and runs the library's BPE model
(`model.tokenize`) only on words it has not seen. The result is identical to the library's by construction,
and tests compare the two on corpora, on every code point and on arbitrary Unicode (hypothesis).

For the byte-level (GPT-2) pattern, ASCII texts skip even that: `AsciiWords` finds the word starts with numpy
over the bytes and looks the words up in a numpy hash table by their first 16 bytes, so no Python object is
made per word (~40 MB per CPU-second against ~14 through `re`); longer words go through the dict.

Text with a character that Python's Unicode database does not know (newer than this Python, or private
ranges above U+3FFFF) goes through the library: its tables could classify it differently.
`encode_parallel` runs encoders in worker processes, in order, with a bounded number of batches in flight.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import unicodedata
from array import array
from collections import deque
from collections.abc import Iterator
from itertools import chain, repeat

import numpy as np
from tokenizers import Tokenizer

from pocketlm.tokenizer import SPLIT_PATTERNS, bytes_to_unicode

# Code points classified here from unicodedata: the BMP and the emoji blocks. Keeping the classes to these
# lets `re` test membership with one bitmap lookup (other ranges are scanned one by one).
KNOWN = ((0, 0x10000), (0x1F000, 0x1FB00))
# Unicode White_Space: what the library's \s matches (Python's \s also takes \x1c-\x1f)
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
ASCII_PUNCT = r"\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"
ASCII_CLASSES = {"L": "A-Za-z", "N": "0-9", "P": ASCII_PUNCT, "S": "\t\n\x0b\x0c\r "}
MAX_WORDS = 1 << 20  # cached words; the cache starts over when full, so memory stays flat


def _ranges(pred) -> str:
    """A regex character class body for the KNOWN code points where `pred(category)` holds."""
    out = []
    for lo, hi in KNOWN:
        start = None
        for cp in range(lo, hi + 1):
            ok = cp < hi and not 0xD800 <= cp <= 0xDFFF and pred(unicodedata.category(chr(cp)))
            if ok and start is None:
                start = cp
            elif not ok and start is not None:
                out.append(re.escape(chr(start)) + (f"-{re.escape(chr(cp - 1))}" if cp - 1 > start else ""))
                start = None
    return "".join(out)


@functools.cache
def _classes() -> dict[str, str]:
    return {"L": _ranges(lambda c: c[0] == "L"), "N": _ranges(lambda c: c[0] == "N"),
            "P": _ranges(lambda c: c[0] == "P") + ASCII_PUNCT, "S": WHITESPACE,
            "unknown": _ranges(lambda c: c == "Cn") + "\ud800-\udfff\U00010000-\U0001efff\U0001fb00-\U0010ffff"}


@functools.cache
def python_pattern(pre: str, ascii: bool = False) -> re.Pattern:
    """The library's pre-tokenizer `pre` as a Python regex over the classes above (`ascii`: for ASCII text)."""
    c = ASCII_CLASSES if ascii else _classes()
    L, N, P, S = c["L"], c["N"], c["P"], c["S"]
    pattern = {
        "byte-level": rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+",
        "metaspace": SPLIT_PATTERNS["metaspace"],
        "metaspace-punctuation": rf" ?[^ {P}]+|[{P}]| ",
        "whitespace-punctuation": rf"[{S}]+|[{P}]|[^{S}{P}]+",
    }[pre]
    return re.compile(pattern)


@functools.cache
def _unknown() -> re.Pattern:
    return re.compile(f"[{_classes()['unknown']}]")


def pre_tokenizer_of(model: dict) -> str | None:
    """Which of our pre-tokenizers a tokenizer.json uses (GPT-2's included), or None for anything else."""
    pre = model.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "byte-level"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2:
        return None
    split, bl = parts
    if bl.get("type") != "ByteLevel" or bl.get("use_regex", True) or bl.get("add_prefix_space"):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return next((k for k, v in SPLIT_PATTERNS.items() if split.get("pattern", {}).get("Regex") == v), None)


class WordCacheEncoder:
    """Ordinary encoding (no special tokens) of byte-level BPE through a word -> ids cache.

    The cache maps a word to its row in a flat table of token ids (offsets and lengths beside it), so a
    batch is encoded with one dict lookup per word and a numpy gather, not a Python list per word.
    """

    def __init__(self, tk: Tokenizer, pre: str) -> None:
        self.model = tk.model
        self.pattern = python_pattern(pre)
        self.ascii_pattern = python_pattern(pre, ascii=True)  # the same split on ASCII text, 2-3x faster
        self.unknown = _unknown()
        b2u = bytes_to_unicode()
        self.to_bytes_alphabet = {i: b2u[i] for i in range(256)}  # latin-1 code point i = byte i
        self._reset()

    def _reset(self) -> None:
        self.cache: dict[str, int] = {}  # word -> row
        self.table = array("I")  # token ids of every cached word, back to back
        self.offsets = array("q")  # row -> first index in table
        self.lengths = array("q")  # row -> number of tokens
        # byte-level ASCII text: word boundaries and keys from numpy, (key -> row) in a numpy hash table
        self.ascii_words = AsciiWords() if self.pattern.pattern == python_pattern("byte-level").pattern else None

    @classmethod
    def for_tokenizer(cls, tk: Tokenizer) -> WordCacheEncoder | None:
        model = json.loads(tk.to_str())
        m = model["model"]
        if model.get("normalizer") or m["type"] != "BPE" or m.get("dropout") or m.get("byte_fallback"):
            return None
        if any(not t["special"] for t in model.get("added_tokens", [])):
            return None  # plain added tokens are matched in text before pre-tokenization
        pre = pre_tokenizer_of(model)
        return cls(tk, pre) if pre else None

    def known(self, text: str) -> bool:
        return text.isascii() or self.unknown.search(text) is None

    def split(self, text: str) -> list[str]:
        return (self.ascii_pattern if text.isascii() else self.pattern).findall(text)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids, ids per text) of texts that are all `known`."""
        if self.ascii_words is None or not texts:
            return self._encode_words(texts)
        fast = [t.isascii() and "\0" not in t for t in texts]
        if all(fast):
            return self._encode_ascii(texts)
        if not any(fast):
            return self._encode_words(texts)
        a = [i for i, f in enumerate(fast) if f]
        b = [i for i, f in enumerate(fast) if not f]
        return _interleave([self._encode_ascii([texts[i] for i in a]), self._encode_words([texts[i] for i in b])],
                           [a, b], len(texts))

    def _encode_words(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Split with `re`, then one dict lookup per word."""
        word_lists = [self.split(t) for t in texts]
        words = list(chain.from_iterable(word_lists))
        ids, per_word = self._gather(self._rows(words))
        return ids, _sum_per_text(per_word, np.fromiter(map(len, word_lists), np.int64, len(texts)))

    def _encode_ascii(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Word boundaries and keys computed with numpy over the bytes; no Python object per word."""
        data = ("\0" + "\0".join(texts) + "\0").encode("ascii")  # NUL: the texts' edges (no text has one)
        starts, lengths, k0, k1 = self.ascii_words.split(data)
        is_edge = k0 == 0  # the NUL between texts is a "word" of its own, whose key is 0
        is_long = lengths > 16  # keys hold 16 bytes: longer words go through the dict
        long = np.flatnonzero(is_long)
        long_words = [data[a:a + n].decode("ascii") for a, n in zip(starts[long].tolist(), lengths[long].tolist())]
        while True:
            rows = self.ascii_words.lookup(k0, k1)
            rows[is_edge] = 0
            rows[long] = np.fromiter(map(self.cache.get, long_words, repeat(-1)), np.int64, len(long))
            if (rows >= 0).all():
                break
            first = np.flatnonzero((rows < 0) & ~is_long)  # one occurrence of each missing short word
            if len(first):
                first = first[np.unique(np.stack([k0[first], k1[first]], 1), axis=0, return_index=True)[1]]
            words = [data[a:a + n].decode("ascii") for a, n in zip(starts[first].tolist(), lengths[first].tolist())]
            if self._learn(words + [w for w in long_words if w not in self.cache]):
                self.ascii_words.insert(k0[first], k1[first], self._rows(words))
            # else the cache started over and the rows found so far are stale: look everything up again
        ids, per_word = self._gather(rows[~is_edge])
        return ids, _sum_per_text(per_word, np.diff(np.flatnonzero(is_edge)) - 1)

    def _rows(self, words: list[str]) -> np.ndarray:
        try:
            return np.fromiter(map(self.cache.__getitem__, words), dtype=np.int64, count=len(words))
        except KeyError:
            self._learn(words)
            return np.fromiter(map(self.cache.__getitem__, words), dtype=np.int64, count=len(words))

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of the cached words `rows`, back to back; each word's number of ids)."""
        table = np.frombuffer(self.table, dtype=np.uint32) if self.table else np.zeros(0, np.uint32)
        lens = np.frombuffer(self.lengths, dtype=np.int64)[rows] if len(rows) else np.zeros(0, np.int64)
        starts = np.frombuffer(self.offsets, dtype=np.int64)[rows] if len(rows) else np.zeros(0, np.int64)
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        # output position i of word k reads table[starts[k] + i - (ends[k] - lens[k])]
        flat = table[np.repeat(starts - (ends - lens), lens) + np.arange(total)]
        del table  # the arrays may grow again only once no view of them is alive
        return flat, lens

    def _learn(self, words: list[str]) -> bool:
        """Cache the words not yet cached; False if the cache had to start over (rows found so far are stale)."""
        new = set(words).difference(self.cache)
        kept = not new or len(self.cache) + len(new) <= MAX_WORDS  # a batch alone may hold more words
        if not kept:
            self._reset()
            new = set(words)
        for w in new:
            mapped = w.encode("utf-8").decode("latin-1").translate(self.to_bytes_alphabet)
            ids = [t.id for t in self.model.tokenize(mapped)]
            self.cache[w] = len(self.offsets)
            self.offsets.append(len(self.table))
            self.lengths.append(len(ids))
            self.table.extend(ids)
        return kept

    def encode_batch(self, texts: list[str], library: Tokenizer) -> list[list[int]]:
        """Known texts through the cache, the others through `library` (a tokenizer without special tokens)."""
        out: list = [None] * len(texts)
        known = [i for i, t in enumerate(texts) if self.known(t)]
        if known:
            flat, lengths = self.encode_flat([texts[i] for i in known])
            for i, ids in zip(known, np.split(flat, np.cumsum(lengths)[:-1])):
                out[i] = ids.tolist()
        rest = [i for i, x in enumerate(out) if x is None]
        if rest:
            for i, e in zip(rest, library.encode_batch([texts[i] for i in rest], add_special_tokens=False)):
                out[i] = e.ids
        return out


def _sum_per_text(per_word: np.ndarray, words_per_text: np.ndarray) -> np.ndarray:
    cum = np.concatenate([[0], np.cumsum(per_word)])
    last = np.cumsum(words_per_text)
    return cum[last] - cum[last - words_per_text]


def _interleave(parts: list[tuple[np.ndarray, np.ndarray]], where: list[list[int]], n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Put the (ids, ids per text) of groups of texts back into the texts' order (`where`: each group's indices)."""
    per_text = np.zeros(n, dtype=np.int64)
    for (_, counts), idx in zip(parts, where):
        per_text[idx] = counts
    dest_start = np.cumsum(per_text) - per_text
    flat = np.empty(int(per_text.sum()), dtype=np.uint32)
    for (ids, counts), idx in zip(parts, where):
        src_start = np.cumsum(counts) - counts
        flat[np.repeat(dest_start[idx] - src_start, counts) + np.arange(len(ids))] = ids
    return flat, per_text


class AsciiWords:
    """GPT-2's split of ASCII text, vectorised: word starts by numpy over the bytes, and a hash table of words.

    Equivalent to the byte-level pattern (`'s|'t|'re|'ve|'m|'ll|'d| ?L+| ?N+| ?[^SLN]+|S+(?!\\S)|S+` with
    L letters, N digits, S whitespace): a word starts where the character class changes, except that a
    space before a letter, digit or other mark starts that mark's run; a whitespace run before one ends
    one character early (its last character is a word of its own or that space); and a contraction `'s`...
    is a word when its quote starts a match, i.e. follows a letter, digit, text edge or non-space whitespace.
    A word's key is its first 16 bytes as two little-endian uint64 (zero-padded): exact for words up to 16
    bytes, since text bytes are never zero. NUL bytes mark the edges of texts.
    """

    CLASS = np.full(256, 4, dtype=np.uint8)  # 0 edge, 1 whitespace, 2 letter, 3 digit, 4 anything else
    CLASS[0] = 0
    CLASS[np.frombuffer(b"\t\n\x0b\x0c\r ", np.uint8)] = 1
    CLASS[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = 2
    CLASS[np.frombuffer(b"0123456789", np.uint8)] = 3
    CLASS_BYTES = CLASS.tobytes()
    MASKS = np.array([(1 << 8 * m) - 1 for m in range(9)], dtype=np.uint64)  # the low m bytes of a uint64
    MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))

    def __init__(self) -> None:
        self._table(1 << 12)
        self.size = 0

    def _table(self, slots: int) -> None:
        self.k0 = np.zeros(slots, dtype=np.uint64)  # 0 = empty slot (no word starts with a NUL byte)
        self.k1 = np.zeros(slots, dtype=np.uint64)
        self.rows = np.full(slots, -1, dtype=np.int64)
        self.shift = np.uint64(64 - slots.bit_length() + 1)

    def split(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(start offset, length, key k0, key k1) of every word of `data`, which begins and ends with a NUL."""
        b = np.frombuffer(data, dtype=np.uint8)
        c = np.frombuffer(data.translate(self.CLASS_BYTES), dtype=np.uint8)  # 10x a numpy gather
        start = np.empty(len(b), dtype=bool)
        start[0] = True
        np.not_equal(c[1:], c[:-1], out=start[1:])
        start[c == 0] = True  # every edge NUL is a word (texts may be empty)
        # the last character of a whitespace run before a non-space word starts a word ...
        last_ws = (c[:-1] == 1) & (c[1:] >= 2)
        start[:-1] |= last_ws
        # ... and a space there takes the next run with it
        start[1:] &= ~(last_ws & (b[:-1] == 32))
        q = np.flatnonzero(b == 39)  # "'": a contraction where a match starts at it
        if len(q):
            prev, c1, c2 = c[q - 1], b[q + 1], b[np.minimum(q + 2, len(b) - 1)]
            at_start = (prev == 0) | (prev == 2) | (prev == 3) | ((prev == 1) & (b[q - 1] != 32))
            two = (c1 == 115) | (c1 == 116) | (c1 == 109) | (c1 == 100)  # 's 't 'm 'd
            three = ((c1 == 114) | (c1 == 118)) & (c2 == 101) | (c1 == 108) & (c2 == 108)  # 're 've 'll
            q, n = q[at_start & (two | three)], 2 + three[at_start & (two | three)]
            start[q + 1] = False
            start[q + n] = True
        starts = np.flatnonzero(start)
        lengths = np.diff(starts, append=len(b))
        pad = np.zeros(len(b) + 16, dtype=np.uint8)
        pad[:len(b)] = b
        # the 8 bytes at every offset, as little-endian uint64 (an unaligned view, no copy)
        at = np.ndarray((len(b) + 8,), dtype="<u8", buffer=pad, strides=(1,))
        k0 = at[starts] & self.MASKS[np.minimum(lengths, 8)]
        k1 = at[starts + 8] & self.MASKS[np.clip(lengths - 8, 0, 8)]
        return starts, lengths, k0, k1

    def _slot(self, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
        return ((k0 * self.MIX[0]) ^ (k1 * self.MIX[1])) >> self.shift

    def lookup(self, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where the table lacks it (linear probing, every probe vectorised)."""
        slot = self._slot(k0, k1).astype(np.intp)
        t0 = self.k0[slot]
        hit = (t0 == k0) & (self.k1[slot] == k1)
        rows = np.where(hit, self.rows[slot], -1)
        todo = np.flatnonzero(~hit & (t0 != 0))  # neither found nor at an empty slot: probe the next ones
        slot, mask = slot[todo], len(self.k0) - 1
        while len(todo):
            slot = (slot + 1) & mask
            t0 = self.k0[slot]
            hit = (t0 == k0[todo]) & (self.k1[slot] == k1[todo])
            rows[todo[hit]] = self.rows[slot[hit]]
            go = ~hit & (t0 != 0)
            todo, slot = todo[go], slot[go]
        return rows

    def insert(self, k0: np.ndarray, k1: np.ndarray, rows: np.ndarray) -> None:
        """Add keys that are not in the table (distinct), growing it to stay at most half full."""
        if 2 * (self.size + len(k0)) > len(self.k0):
            old = self.k0 != 0
            keys = (self.k0[old], self.k1[old], self.rows[old])
            slots = len(self.k0)
            while 2 * (self.size + len(k0)) > slots:
                slots *= 2
            self._table(slots)
            self.size = 0
            self.insert(*keys)
        self.size += len(k0)
        slot = self._slot(k0, k1).astype(np.intp)
        mask = len(self.k0) - 1
        while len(k0):
            free = np.flatnonzero(self.k0[slot] == 0)
            _, first = np.unique(slot[free], return_index=True)  # one key per free slot in each round
            won = free[first]
            self.k0[slot[won]], self.k1[slot[won]], self.rows[slot[won]] = k0[won], k1[won], rows[won]
            lost = np.ones(len(k0), dtype=bool)
            lost[won] = False
            k0, k1, rows, slot = k0[lost], k1[lost], rows[lost], (slot[lost] + 1) & mask


# ---- worker processes ---------------------------------------------------------------------------------

_worker_tok = None


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks of up to 32 MiB instead of handing them back to the OS at once.

    Every batch makes numpy temporaries of a few MiB; by default each is a fresh mmap, and touching its
    pages costs a page fault per 4 KiB: a sixth of `prepare`'s CPU time went to the kernel (422k faults per
    100 MB, 26k with this). Memory stays bounded by the largest batch. A no-op where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below it come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: free heap above it goes back to the OS
    except (OSError, AttributeError, TypeError):  # no C library by that name, or no mallopt in it
        pass


def _init_worker(tokenizer_json: str, eot: str | None) -> None:
    global _worker_tok
    keep_freed_memory()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the pool is the parallelism
    from pocketlm.tokenizer import Tok

    _worker_tok = Tok(Tokenizer.from_str(tokenizer_json), eot)


def encode_flat(tok, texts: list[str], ordinary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All ids of `texts` in one array, and each text's number of ids."""
    words = tok.words
    if words is not None and (ordinary or not tok.has_special(texts)) and all(map(words.known, texts)):
        return words.encode_flat(texts)
    ids = tok.encode_batch(texts, ordinary=ordinary)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    if ids and isinstance(ids[0], np.ndarray):
        return np.concatenate(ids).astype(np.uint32, copy=False), lengths
    return np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum())), lengths


def _texts(batch) -> list[str]:
    """A batch is a list of texts, or (function, args) that returns one, called where the batch is encoded
    (a worker reading its own part of a file instead of receiving the text through a pipe)."""
    if isinstance(batch, list):
        return batch
    fn, args = batch
    return fn(*args)


def _encode_task(batch, ordinary: bool) -> tuple[np.ndarray, np.ndarray]:
    return encode_flat(_worker_tok, _texts(batch), ordinary)


def encode_parallel(tok, batches: Iterator, workers: int, ordinary: bool = False,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode batches of texts in `workers` processes; yields each batch's `encode_flat` in input order.

    A batch is a list of texts or a (function, args) pair that returns them (see `_texts`). At most
    2 x workers batches are in flight, so memory does not depend on the corpus size.
    """
    if workers <= 1:
        for batch in batches:
            yield encode_flat(tok, _texts(batch), ordinary)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process whose Rust thread pools may be running
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.tk.to_str(), tok.eot_token)) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_task, (texts, ordinary)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
