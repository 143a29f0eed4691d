"""`prepare`: text files -> tokenizer + train/val/test token shards + manifest, streaming.

Pass 1 reads every file once: UTF-8 check, sha256, document count (and the character set for char-level).
Documents are then assigned to splits by a seeded permutation, so the split is by document and
reproducible. Pass 2 trains BPE on the train documents only; pass 3 encodes in batches (parallel in Rust)
and appends to the shards. Memory holds one batch of documents and one byte per document.
The dataset folder is built under a temp name and renamed into place when complete.
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
from pocketlm.data.documents import check_text_file, file_sha256, iter_documents, list_files
from pocketlm.data.shards import ShardWriter, open_shard
from pocketlm.errors import PocketLMError
from pocketlm.progress import Progress

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
BATCH_BYTES = 4 << 20  # documents per encode_batch call, by size


@dataclass
class Source:
    """One input file, with the split its documents go to (None = assigned by the seeded split)."""

    path: Path
    split: str | None = None


def _documents(sources: list[Source], separator: str) -> Iterator[tuple[Source, str]]:
    for src in sources:
        for doc in iter_documents(src.path, separator):
            yield src, doc


def assign_splits(sources: list[Source], counts: list[int], cfg: DataConfig) -> np.ndarray:
    """Split id (0 train, 1 val, 2 test) for every document, in reading order."""
    total = sum(counts)
    split = np.zeros(total, dtype=np.uint8)
    fixed = {"val": any(s.split == "val" for s in sources), "test": any(s.split == "test" for s in sources)}
    free_idx: list[np.ndarray] = []
    start = 0
    for src, n in zip(sources, counts):
        if src.split:
            split[start:start + n] = SPLITS.index(src.split)
        else:
            free_idx.append(np.arange(start, start + n))
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
    if cfg.tokenizer not in toklib.KINDS and not Path(cfg.tokenizer).exists():
        raise PocketLMError(f"unknown tokenizer {cfg.tokenizer!r}: use 'char', 'bpe', or a folder with tokenizer.json")
    sources = [Source(p) for p in list_files(inputs)]
    sources += [Source(p, "val") for p in list_files(val or [])]
    sources += [Source(p, "test") for p in list_files(test or [])]
    for src in sources:
        if src.path.resolve().is_relative_to(out):
            raise PocketLMError(f"input {src.path} lies inside --out {out}: write the dataset somewhere else")
    t0 = time.perf_counter()

    # pass 1: validate, hash, count documents (and collect characters for char-level)
    total_bytes = sum(s.path.stat().st_size for s in sources)
    bar = Progress("scan", total_bytes, "B", enabled=verbose)
    counts, chars, inputs_meta = [], set(), []
    for src in sources:
        check_text_file(src.path)
        n = 0
        for doc in iter_documents(src.path, cfg.separator):
            n += 1
            if cfg.tokenizer == "char":
                chars.update(doc)
            if cfg.eot_token in doc:
                raise PocketLMError(f"--data.eot_token {cfg.eot_token!r} occurs in {src.path}: it would end documents "
                                    "mid-text; pick a string that never occurs in the text, or use it as "
                                    "--data.separator")
        counts.append(n)
        size = src.path.stat().st_size
        inputs_meta.append({"path": str(src.path), "bytes": size, "sha256": file_sha256(src.path),
                            "documents": n, "split": src.split or "auto"})
        bar.update(size)
    bar.close()
    if sum(counts) == 0:
        raise PocketLMError("the input has no text (every file is empty or whitespace)")
    split = assign_splits(sources, counts, cfg)

    # pass 2: the tokenizer
    if cfg.tokenizer == "char":
        tk = toklib.train_char(["".join(sorted(chars))], cfg.eot_token)
    elif cfg.tokenizer == "bpe":
        def train_docs() -> Iterator[str]:
            for i, (_, doc) in enumerate(_documents(sources, cfg.separator)):
                if split[i] == 0:
                    yield doc
        tk = toklib.train_bpe(train_docs(), cfg.vocab_size, cfg.eot_token)
    else:
        tk = toklib.load(cfg.tokenizer).tk
    specials = {t.content for t in tk.get_added_tokens_decoder().values()}
    if tk.token_to_id(cfg.eot_token) is None:
        tk.add_special_tokens([cfg.eot_token])
    elif cfg.eot_token not in specials or cfg.eot_token == toklib.UNK:
        raise PocketLMError(f"--data.eot_token {cfg.eot_token!r} is already an ordinary token of this vocabulary; "
                            "pick a string that never occurs in the text, such as <|endoftext|>")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    toklib.save(tk, tmp, cfg.eot_token)
    tok = toklib.load(tmp)

    # pass 3: encode and write shards
    writers = {name: ShardWriter(tmp / f"{name}.bin", tok.vocab_size) for name in SPLITS}
    bar = Progress("encode", total_bytes, "B", enabled=verbose)
    try:
        batch: list[tuple[int, str]] = []
        size = 0
        for i, (_, doc) in enumerate(_documents(sources, cfg.separator)):
            batch.append((i, doc))
            size += len(doc)
            if size >= BATCH_BYTES:
                _encode_batch(batch, split, tok, writers)
                bar.update(size)
                batch, size = [], 0
        _encode_batch(batch, split, tok, writers)
        bar.update(size)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()

    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {"kind": cfg.tokenizer if cfg.tokenizer in toklib.KINDS else "loaded",
                      "source": None if cfg.tokenizer in toklib.KINDS else str(cfg.tokenizer),
                      "vocab_size": tok.vocab_size, "eot_token": cfg.eot_token, "eot_id": tok.eot_id},
        "separator": cfg.separator, "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
        "splits": {name: {"tokens": w.n_tokens, "documents": w.n_docs,
                          "dtype": w.dtype.name} for name, w in writers.items()},
        "inputs": inputs_meta,
        "seconds": round(time.perf_counter() - t0, 2),
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


def _encode_batch(batch: list[tuple[int, str]], split: np.ndarray, tok: toklib.Tok,
                  writers: dict[str, ShardWriter]) -> None:
    if not batch:
        return
    ids = tok.encode_batch([doc for _, doc in batch])
    for (i, _), doc_ids in zip(batch, ids):
        w = writers[SPLITS[split[i]]]
        w.write(doc_ids, docs=1)
        w.write([tok.eot_id])  # every document ends with end-of-text, so samples learn where texts stop


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
