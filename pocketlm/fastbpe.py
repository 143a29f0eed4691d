"""Fast byte-level BPE encoding: a word -> ids cache in front of the `tokenizers` library's own BPE model.

Where the time goes in `Tokenizer.encode_batch` for byte-level BPE (measured on TinyStories, 2 cores): the
pre-tokenizer (Oniguruma regex plus per-byte offset bookkeeping) alone runs at about 1 MB/s, and the
Encoding objects (offsets, masks, type ids) cost as much again; BPE itself is cheap thanks to the library's
cache. BPE is applied to each pre-tokenized word independently, so a word's ids never depend on its
neighbours: this module splits text with Python's `re` using the same pattern as the library (character
classes spelled out from `unicodedata`), looks every word up in a dict and runs the library's BPE model
(`model.tokenize`) only on words it has not seen. The result is identical to the library's by construction,
and tests compare the two on corpora, on every code point and on arbitrary Unicode (hypothesis).

Text with a character that Python's Unicode database does not know (newer than this Python, or private
ranges above U+3FFFF) goes through the library: its tables could classify it differently.
`encode_parallel` runs encoders in worker processes, in order, with a bounded number of batches in flight.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from array import array
from collections import deque
from collections.abc import Iterator
from itertools import chain

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
        word_lists = [self.split(t) for t in texts]
        words = list(chain.from_iterable(word_lists))
        try:
            rows = np.fromiter(map(self.cache.__getitem__, words), dtype=np.int64, count=len(words))
        except KeyError:
            self._learn(words)
            rows = np.fromiter(map(self.cache.__getitem__, words), dtype=np.int64, count=len(words))
        table = np.frombuffer(self.table, dtype=np.uint32) if self.table else np.zeros(0, np.uint32)
        lens = np.frombuffer(self.lengths, dtype=np.int64)[rows] if len(rows) else np.zeros(0, np.int64)
        starts = np.frombuffer(self.offsets, dtype=np.int64)[rows] if len(rows) else np.zeros(0, np.int64)
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        # output position i of word k reads table[starts[k] + i - (ends[k] - lens[k])]
        flat = table[np.repeat(starts - (ends - lens), lens) + np.arange(total)]
        del table  # the arrays may grow again only once no view of them is alive
        per_text = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(texts))
        cum = np.concatenate([[0], ends])
        last = np.cumsum(per_text)
        return flat, cum[last] - cum[last - per_text]

    def _learn(self, words: list[str]) -> None:
        new = set(words).difference(self.cache)
        if len(self.cache) + len(new) > MAX_WORDS:
            self._reset()
            new = set(words)
        for w in new:
            mapped = w.encode("utf-8").decode("latin-1").translate(self.to_bytes_alphabet)
            ids = [t.id for t in self.model.tokenize(mapped)]
            self.cache[w] = len(self.offsets)
            self.offsets.append(len(self.table))
            self.lengths.append(len(ids))
            self.table.extend(ids)

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


# ---- worker processes ---------------------------------------------------------------------------------

_worker_tok = None


def _init_worker(tokenizer_json: str, eot: str | None) -> None:
    global _worker_tok
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


def _encode_task(texts: list[str], ordinary: bool) -> tuple[np.ndarray, np.ndarray]:
    return encode_flat(_worker_tok, texts, ordinary)


def encode_parallel(tok, batches: Iterator[list[str]], workers: int, ordinary: bool = False,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode batches of texts in `workers` processes; yields each batch's `encode_flat` in input order.

    At most 2 x workers batches are in flight, so memory does not depend on the corpus size.
    """
    if workers <= 1:
        for texts in batches:
            yield encode_flat(tok, texts, ordinary)
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
