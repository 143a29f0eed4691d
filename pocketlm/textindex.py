"""A suffix-array index over a training text: does a word sequence occur in it, and how long a copy is there?

The text is normalised to words: every document becomes " w1 w2 ... wn " (whitespace runs collapsed to one
space, one space at each end) and documents are joined by "\\n", which normalised text never contains. A
sequence of words then occurs in the training text, within one document and on word boundaries, exactly
when " w_i ... w_j " is a substring of the normalised bytes, which a binary search over the suffix array
answers in O(m log N) for a pattern of m bytes, reading only the pages it touches.

The suffix array is built by libdivsufsort (pydivsufsort, the `track` extra) when installed, else by
numpy prefix doubling (the slow reference the tests compare it with). Both files sit in a folder with a
versioned index.json: `text.u8` (the bytes) and `sa.i32`/`sa.i64`, memory-mapped at query time.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.errors import PocketLMError

FORMAT_VERSION = 1
DOC_SEP = b"\n"


def normalise(text: str) -> bytes:
    """" w1 w2 ... wn " as UTF-8: the form both the index and the queries use."""
    words = text.split()
    return (" " + " ".join(words) + " ").encode("utf-8") if words else b""


# ---- suffix arrays --------------------------------------------------------------------------------------

def suffix_array_numpy(data: np.ndarray) -> np.ndarray:
    """Suffix array by prefix doubling with numpy sorts (O(n log^2 n)): the reference implementation."""
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = data.astype(np.int64)
    k = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)  # rank of the suffix k further on; -1 past the end
        if k < n:
            second[:n - k] = rank[k:]
        key = rank * (n + 1) + (second + 1)  # (rank[i], rank[i+k]) as one sortable integer
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new = np.empty(n, dtype=np.int64)
        new[order] = np.concatenate([[0], np.cumsum(sorted_key[1:] != sorted_key[:-1])])
        rank = new
        if rank.max() == n - 1 or k >= n:
            return order
        k *= 2


def suffix_array(data: np.ndarray) -> tuple[np.ndarray, str]:
    """(suffix array of a uint8 array, which builder made it)."""
    try:
        from pydivsufsort import divsufsort
    except ImportError:
        return suffix_array_numpy(data), "numpy prefix doubling"
    return divsufsort(np.ascontiguousarray(data)), "libdivsufsort"


# ---- the index ------------------------------------------------------------------------------------------

class TextIndex:
    """Open with `TextIndex.open(folder)`, or build with `TextIndex.build(documents, folder)`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta_file = self.folder / "index.json"
        try:
            self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise PocketLMError(f"{self.folder} holds no readable text index: build it again") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise PocketLMError(f"{self.folder}: text index format v{self.meta.get('format_version')} is not "
                                f"v{FORMAT_VERSION}: delete it to rebuild")
        self.n = int(self.meta["bytes"])
        self._f = open(self.folder / "text.u8", "rb")
        self.text = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if self.n else b""
        sa_file = self.folder / self.meta["sa_file"]
        width = np.dtype(self.meta["sa_dtype"]).itemsize
        if sa_file.stat().st_size != self.n * width:
            raise PocketLMError(f"{sa_file} is truncated: delete {self.folder} to rebuild the index")
        self._sa_f = open(sa_file, "rb")
        # a memoryview of the mapped file: indexing it gives Python ints ~20x faster than a numpy memmap
        self._sa_map = mmap.mmap(self._sa_f.fileno(), 0, access=mmap.ACCESS_READ) if self.n else None
        self.sa = memoryview(self._sa_map).cast("i" if width == 4 else "q") if self.n else memoryview(b"").cast("q")

    @classmethod
    def open(cls, folder: str | Path) -> TextIndex:
        return cls(Path(folder))

    @classmethod
    def build(cls, documents: Iterable[str], folder: str | Path, source: dict[str, Any] | None = None,
              verbose: bool = False) -> TextIndex:
        """Normalise the documents into text.u8, sort its suffixes, write both beside index.json (atomically)."""
        from pocketlm.progress import Progress

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            n, docs = 0, 0
            bar = Progress("index text", None, "B", enabled=verbose)
            with open(tmp / "text.u8", "wb") as f:
                for doc in documents:
                    b = normalise(doc)
                    if not b:
                        continue
                    if docs:
                        f.write(DOC_SEP)
                        n += 1
                    f.write(b)
                    n += len(b)
                    docs += 1
                    bar.update(len(b))
            bar.close()
            t1 = time.perf_counter()
            data = np.fromfile(tmp / "text.u8", dtype=np.uint8)
            sa, builder = suffix_array(data)
            del data
            sa_dtype = np.int32 if n < 2**31 else np.int64
            sa_file = f"sa.{np.dtype(sa_dtype).name}"
            sa.astype(sa_dtype, copy=False).tofile(tmp / sa_file)
            del sa
            meta = {"format_version": FORMAT_VERSION, "bytes": n, "documents": docs, "sa_file": sa_file,
                    "sa_dtype": np.dtype(sa_dtype).name, "builder": builder, "source": source or {},
                    "seconds_text": round(t1 - t0, 2), "seconds_sort": round(time.perf_counter() - t1, 2)}
            (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            from pocketlm.atomic import replace_dir

            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(folder)

    def close(self) -> None:
        self.sa.release()
        for m in (self.text, self._sa_map):
            if isinstance(m, mmap.mmap):
                m.close()
        self._f.close()
        self._sa_f.close()

    # -- queries ------------------------------------------------------------------------------------------
    def _range(self, pattern: bytes, lo: int = 0, hi: int | None = None) -> tuple[int, int]:
        """[lo, hi) of the suffixes that start with `pattern`, searching within a given range."""
        hi = self.n if hi is None else hi
        m, text, sa = len(pattern), self.text, self.sa
        a, b = lo, hi
        while a < b:  # first suffix >= pattern
            mid = (a + b) // 2
            p = sa[mid]
            if text[p:p + m] < pattern:
                a = mid + 1
            else:
                b = mid
        start, b = a, hi
        while a < b:  # first suffix whose m-byte prefix > pattern
            mid = (a + b) // 2
            p = sa[mid]
            if text[p:p + m] <= pattern:
                a = mid + 1
            else:
                b = mid
        return start, a

    def count(self, text: str) -> int:
        """Occurrences of a word sequence (normalised) in the indexed text."""
        pattern = normalise(text)
        if not pattern:
            return 0
        lo, hi = self._range(pattern)
        return hi - lo

    def longest_matches(self, words: list[str]) -> list[int]:
        """For each position i, the length of the longest run words[i:i+L] found verbatim in the text.

        Matching statistics: L(i+1) >= L(i) - 1, so the end pointer never moves back; each extension
        searches only inside the suffix range of the shorter pattern.
        """
        out = [0] * len(words)
        j = 0
        for i in range(len(words)):
            j = max(j, i)
            lo, hi = (0, self.n)
            if j > i:  # words[i:j] is known to occur; find its range to extend from
                lo, hi = self._range(normalise(" ".join(words[i:j])))
            while j < len(words):
                lo2, hi2 = self._range(normalise(" ".join(words[i:j + 1])), lo, hi)
                if lo2 == hi2:
                    break
                lo, hi, j = lo2, hi2, j + 1
            out[i] = j - i
        return out


def iter_docs_from_tokens(tokens: np.ndarray, tok: Any, batch_tokens: int = 1 << 20) -> Iterator[str]:
    """Decode a token stream document by document (documents end at end-of-text), a batch at a time."""
    n = len(tokens)
    start = 0
    while start < n:
        end = min(n, start + batch_tokens)
        chunk = np.asarray(tokens[start:end])
        if end < n and tok.eot_id is not None:  # cut after the last end-of-text so no document splits
            cuts = np.flatnonzero(chunk == tok.eot_id)
            if len(cuts):
                end = start + int(cuts[-1]) + 1
                chunk = chunk[:int(cuts[-1]) + 1]
        docs = np.split(chunk, np.flatnonzero(chunk == tok.eot_id) + 1) if tok.eot_id is not None else [chunk]
        yield from tok.tk.decode_batch([d.tolist() for d in docs if len(d)], skip_special_tokens=True)
        start = end


def index_for_dataset(data: str | Path, verbose: bool = False) -> TextIndex:
    """The index over a prepared dataset's train split: built on first use and kept in DATASET/index/
    (or in the user's cache when the dataset folder is read-only); rebuilt when train.bin changes."""
    from pocketlm.data.prepare import Dataset
    from pocketlm.progress import fmt_duration

    ds = Dataset(data)
    shard = ds.path / "train.bin"
    st = shard.stat()
    source = {"dataset": str(ds.path.resolve()), "train_bin_bytes": st.st_size, "train_bin_mtime_ns": st.st_mtime_ns}
    from pocketlm.track import cache_dir

    key = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    places = [ds.path / "index", cache_dir() / "index" / key]
    for folder in places:
        if (folder / "index.json").is_file():
            try:
                idx = TextIndex.open(folder)
                if idx.meta.get("source") == source:
                    return idx
                idx.close()
            except PocketLMError:
                pass
    tokens = ds.split("train")
    if len(tokens) == 0:
        raise PocketLMError(f"the train split of {ds.path} is empty: there is no training text to check samples against")
    tok = ds.tokenizer()
    if verbose:
        print(f"building the memorisation index over {ds.path}/train.bin ({len(tokens):,} tokens), once",
              flush=True, file=sys.stderr)
    try:
        idx = TextIndex.build(iter_docs_from_tokens(tokens, tok), places[0], source, verbose)
    except PermissionError:  # a read-only dataset: keep the index in the user's cache
        idx = TextIndex.build(iter_docs_from_tokens(tokens, tok), places[1], source, verbose)
    if verbose:
        m = idx.meta
        print(f"index: {m['bytes']:,} bytes, {m['documents']:,} documents ({m['builder']}; text "
              f"{fmt_duration(m['seconds_text'])}, suffix sort {fmt_duration(m['seconds_sort'])})", file=sys.stderr)
    return idx
