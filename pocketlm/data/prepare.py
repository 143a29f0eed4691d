"""`prepare`: text files and JSONL records -> tokenizer + train/val/test token shards + manifest, streaming.

Inputs are UTF-8 text files (split into documents by the separator) or canonical JSONL records
(pocketlm/data/records.py: one document per record). Pass 1 reads every file once: UTF-8 check, sha256,
document count (and the character set for char-level). Documents are then assigned to splits by a seeded
permutation, so the split is by document and reproducible. Pass 2 trains the tokenizer on the train
documents only (or loads one); pass 3 encodes in batches (in worker processes through the word-cache
encoder, pocketlm/fastbpe.py; with text files each worker reads its own byte range, cut between documents)
and appends to the shards: [start token] document <end-of-text>. Memory holds
a few batches of documents and one byte per document. The dataset folder is built under a temp name and
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketlm import tokenizer as toklib
from pocketlm.config import DataConfig
from pocketlm.data.documents import (CUTS, check_text_file, document_ranges, file_sha256, iter_documents,
                                     list_files, read_range)
from pocketlm.data.records import Problems, is_jsonl, read_records
from pocketlm.data.shards import ShardWriter, open_shard
from pocketlm.errors import PocketLMError
from pocketlm.fastbpe import encode_parallel, keep_freed_memory
from pocketlm.progress import Progress

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
BATCH_BYTES = 1 << 20  # documents per encode task, by size
PARALLEL_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


@dataclass
class Source:
    """One input file, with the split its documents go to (None = assigned by the seeded split)."""

    path: Path
    split: str | None = None


def _read(src: Source, separator: str, problems: Problems | None = None) -> Iterator[str]:
    """The documents of one input: JSONL records' texts, or a text file split at the separator."""
    if is_jsonl(src.path):
        for rec in read_records([src.path], problems or Problems(show=0)):
            if rec["text"].strip():
                yield rec["text"]
    else:
        yield from iter_documents(src.path, separator)


def read_corpus(inputs: list[str | Path], separator: str = "blank-line", problems: Problems | None = None
                ) -> Iterator[str]:
    """The documents of text files, folders and JSONL files, in order (what `prepare` reads)."""
    for path in list_files(inputs):
        if not is_jsonl(path):
            check_text_file(path)
        yield from _read(Source(path), separator, problems)


def _documents(sources: list[Source], separator: str) -> Iterator[tuple[Source, str]]:
    for src in sources:
        for doc in _read(src, separator):
            yield src, doc


def assign_splits(sources: list[Source], counts: list[int], cfg: DataConfig) -> np.ndarray:
    """Split id (0 train, 1 val, 2 test) for every document, in reading order."""
    total = sum(counts)
    split = np.zeros(total, dtype=np.uint8)
    fixed = {"val": any(s.split == "val" for s in sources), "test": any(s.split == "test" for s in sources)}
    free_idx: list[np.ndarray] = []
    index = np.int32 if total < 2**31 else np.int64  # 4 bytes per document for the permutation, not 8
    start = 0
    for src, n in zip(sources, counts):
        if src.split:
            split[start:start + n] = SPLITS.index(src.split)
        else:
            free_idx.append(np.arange(start, start + n, dtype=index))
        start += n
    free = np.concatenate(free_idx) if free_idx else np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng(cfg.split_seed).permutation(free)
    n_val = 0 if fixed["val"] else _share(len(free), cfg.val_fraction)
    n_test = 0 if fixed["test"] else _share(len(free), cfg.test_fraction)
    if n_val + n_test >= len(free) and len(free):
        raise PocketLMError(f"only {len(free)} document(s): too few to hold out val/test; add text, use a finer "
                            "--data.separator, or give --val FILE")
    split[perm[:n_val]] = 1
    split[perm[n_val:n_val + n_test]] = 2
    return split


def _share(n: int, fraction: float) -> int:
    return 0 if fraction <= 0 or n == 0 else max(1, round(n * fraction))


def prepare(inputs: list[str | Path], out: str | Path, cfg: DataConfig, val: list[str | Path] | None = None,
            test: list[str | Path] | None = None, overwrite: bool = False, verbose: bool = True) -> dict:
    """Build a dataset folder; returns its manifest."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise PocketLMError(f"{out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not (out / "manifest.json").is_file():
        raise PocketLMError(f"{out} is not a pocketlm dataset folder: --overwrite only replaces datasets; "
                            "choose another --out")
    sources = [Source(p) for p in list_files(inputs)]
    sources += [Source(p, "val") for p in list_files(val or [])]
    sources += [Source(p, "test") for p in list_files(test or [])]
    for src in sources:
        if src.path.resolve().is_relative_to(out):
            raise PocketLMError(f"input {src.path} lies inside --out {out}: write the dataset somewhere else")
    specials = toklib.check_specials([cfg.eot_token] + ([cfg.start_token] if cfg.start_token else []))
    loaded = None
    if cfg.tokenizer == "bpe":
        toklib.bpe_pre_tokenizer(cfg.pre_tokenizer)  # a bad name fails before the corpus is read
    elif cfg.tokenizer == "char" and cfg.unknown not in toklib.UNKNOWN_POLICIES:
        raise PocketLMError(f"--data.unknown {cfg.unknown!r}: use one of {', '.join(toklib.UNKNOWN_POLICIES)}")
    elif cfg.tokenizer not in toklib.KINDS:  # fail on a bad tokenizer before reading the corpus
        try:
            loaded = toklib.load(cfg.tokenizer)
        except PocketLMError as e:
            raise PocketLMError(f"unknown tokenizer {cfg.tokenizer!r}: use 'char', 'bpe', a folder with tokenizer "
                                f"files, 'gpt2' or a Hugging Face id ({e})") from None
    t0 = time.perf_counter()
    keep_freed_memory()

    # pass 1: validate, hash, count documents (and collect characters for char-level)
    total_bytes = sum(s.path.stat().st_size for s in sources)
    bar = Progress("scan", total_bytes, "B", enabled=verbose)
    counts, chars, inputs_meta = [], set(), []
    problems = Problems(show=5 if verbose else 0)  # malformed JSONL lines: warned about, counted, skipped
    for src in sources:
        check_text_file(src.path)
        n = 0
        for doc in _read(src, cfg.separator, problems):
            n += 1
            if cfg.tokenizer == "char":
                chars.update(doc)
            for sp in specials:
                if sp in doc:
                    raise PocketLMError(f"special token {sp!r} occurs in {src.path}: it would end or start documents "
                                        "mid-text; pick a string that never occurs in the text"
                                        + (", or use it as --data.separator" if sp == cfg.eot_token else ""))
        counts.append(n)
        size = src.path.stat().st_size
        inputs_meta.append({"path": str(src.path), "bytes": size, "sha256": file_sha256(src.path),
                            "documents": n, "split": src.split or "auto"})
        bar.update(size)
    bar.close()
    if sum(counts) == 0:
        raise PocketLMError("the input has no text (every file is empty or whitespace)")
    split = assign_splits(sources, counts, cfg)
    t_scan = time.perf_counter()

    # pass 2: the tokenizer
    if cfg.tokenizer == "char":
        tk = toklib.train_char(["".join(sorted(chars))], cfg.eot_token, unknown=cfg.unknown, specials=specials[1:])
    elif cfg.tokenizer == "bpe":
        def train_docs() -> Iterator[str]:
            for i, (_, doc) in enumerate(_documents(sources, cfg.separator)):
                if split[i] == 0:
                    yield doc
        tk = toklib.train_bpe(train_docs(), cfg.vocab_size, cfg.eot_token, pre=cfg.pre_tokenizer,
                              specials=specials[1:])
    else:
        tk = loaded.tk
    _add_specials(tk, specials)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    toklib.save(tk, tmp, cfg.eot_token, pad_token=loaded.pad_token if loaded else None)
    tok = toklib.load(tmp)

    t_tok = time.perf_counter()

    # pass 3: encode and write shards
    writers = {name: ShardWriter(tmp / f"{name}.bin", tok.vocab_size) for name in SPLITS}
    start_id = tok.tk.token_to_id(cfg.start_token) if cfg.start_token else None
    bar = Progress("encode", total_bytes, "B", enabled=verbose)
    sizes: list[int] = []
    workers = cfg.workers or len(os.sched_getaffinity(0))
    workers = workers if total_bytes >= PARALLEL_BYTES else 1

    def batches() -> Iterator:
        if workers > 1 and cfg.separator in CUTS and not any(is_jsonl(s.path) for s in sources):
            # each worker reads and splits its own part of the file: no text through the pipes
            for src in sources:
                for start, end in document_ranges(src.path, cfg.separator, BATCH_BYTES):
                    if end is None:  # no cut in sight: send the rest of this file's documents in batches
                        yield from in_batches(iter_documents(src.path, cfg.separator, start))
                        break
                    sizes.append(end - start)
                    yield read_range, (src.path, start, end, cfg.separator)
            return
        yield from in_batches(doc for _, doc in _documents(sources, cfg.separator))

    def in_batches(docs: Iterator[str]) -> Iterator[list[str]]:
        batch: list[str] = []
        size = 0
        for doc in docs:
            batch.append(doc)
            size += len(doc)
            if size >= BATCH_BYTES:
                sizes.append(size)
                yield batch
                batch, size = [], 0
        if batch:
            sizes.append(size)
            yield batch

    try:
        first = 0
        # documents are plain text: a special token's string in them was refused above
        for flat, lengths in encode_parallel(tok, batches(), workers, ordinary=True):
            _write_batch(flat, lengths, split[first:first + len(lengths)], writers, start_id, tok.eot_id)
            first += len(lengths)
            bar.update(sizes.pop(0))
        if first != len(split):
            raise PocketLMError(f"internal error: {first} documents encoded, {len(split)} counted; "
                                "please report it, and run again with --workers 1")
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()

    kind = cfg.tokenizer if cfg.tokenizer in toklib.KINDS else "loaded"
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"kind": kind, "source": None if kind != "loaded" else str(cfg.tokenizer),
                      "pre_tokenizer": cfg.pre_tokenizer if kind == "bpe" else None,
                      "vocab_size": tok.vocab_size, "eot_token": cfg.eot_token, "eot_id": tok.eot_id,
                      "start_token": cfg.start_token or None, "start_id": start_id},
        "separator": cfg.separator, "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
        "splits": {name: {"tokens": w.n_tokens, "documents": w.n_docs,
                          "dtype": w.dtype.name} for name, w in writers.items()},
        "inputs": inputs_meta,
        "skipped": dict(problems.counts),
        "seconds": round(time.perf_counter() - t0, 2),
        "timings": {"scan": round(t_scan - t0, 2), "tokenizer": round(t_tok - t_scan, 2),
                    "encode": round(time.perf_counter() - t_tok, 2), "workers": workers},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if out.exists():  # --overwrite: swap only once the new dataset is complete
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    return manifest


def _add_specials(tk, specials: list[str]) -> None:
    """Register the special tokens a tokenizer lacks; refuse one that is already an ordinary token."""
    have = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    for sp in specials:
        if tk.token_to_id(sp) is None:
            tk.add_special_tokens([sp])
        elif sp not in have or sp == toklib.UNK:
            raise PocketLMError(f"special token {sp!r} is already an ordinary token of this vocabulary; "
                                "pick a string that never occurs in the text, such as <|endoftext|>")


def _write_batch(flat: np.ndarray, lengths: np.ndarray, split: np.ndarray, writers: dict[str, ShardWriter],
                 start_id: int | None, eot_id: int) -> None:
    """Append each document as [start] ids <eot> to its split's shard (vectorised: one write per split)."""
    if not len(lengths):
        return
    extra = 1 + (start_id is not None)
    seg = lengths + extra
    ends = np.cumsum(seg)
    out = np.empty(int(ends[-1]), dtype=np.uint32)
    is_token = np.ones(len(out), dtype=bool)
    out[ends - 1] = eot_id  # every document ends with end-of-text, so samples learn where texts stop
    is_token[ends - 1] = False
    if start_id is not None:
        out[ends - seg] = start_id
        is_token[ends - seg] = False
    out[is_token] = flat
    owner = np.repeat(split, seg)
    for k, name in enumerate(SPLITS):
        docs = int((split == k).sum())
        if docs:
            writers[name].write(out[owner == k] if docs < len(split) else out, docs=docs)


class Dataset:
    """A prepared dataset folder: memory-mapped splits, the tokenizer and the manifest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise PocketLMError(f"{self.path} is not a prepared dataset (no manifest.json): "
                                f"run `pocketlm prepare TEXT_FILES --out {self.path}` first")
        try:
            self.manifest = json.loads(mf.read_text(encoding="utf-8"))
            self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        except (ValueError, KeyError, TypeError):
            raise PocketLMError(f"{mf} is corrupt: run `pocketlm prepare` again") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise PocketLMError(f"{self.path} has dataset format v{self.manifest.get('format_version')}; this "
                                f"pocketlm reads v{FORMAT_VERSION}: run `pocketlm prepare` again")

    def split(self, name: str) -> np.ndarray:
        return open_shard(self.path / f"{name}.bin")

    def tokenizer(self) -> toklib.Tok:
        return toklib.load(self.path)
