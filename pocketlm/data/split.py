"""`pocketlm split`: canonical JSONL -> train/val/test.jsonl, by document or by group, then a leakage check.

Grouping: with `group_by` (a meta key such as episode, thread or author; `source` falls back to the
record's source) every document of a group lands in the same split, so a model is never validated on
the rest of an episode it trained on. Groups (or documents) are shuffled with the seed and dealt to test,
then val, until each holds its fraction of the documents; the rest is train.

Leakage: a long word n-gram (default 13 words, case and punctuation ignored) that occurs in both train and
val/test means near-copied text crossed the split. The val/test n-gram hashes are kept in one sorted
uint64 array (8 bytes each, plus 4 for the owner) and train documents are streamed against it with a binary
search per batch, so the check stays fast and its memory is a function of val/test size only.

Three streaming passes: count groups; write the splits into a temp folder while hashing val/test; read
train back for the check. The folder replaces `out` only when the check passes (or only warns).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pocketlm.atomic import atomic_write_text, replace_dir
from pocketlm.data.ngrams import WordHasher, ngram_hashes, words
from pocketlm.data.records import Problems, Record, RecordWriter, read_records
from pocketlm.errors import PocketLMError
from pocketlm.progress import Progress

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
LEAK_MODES = ("fail", "warn", "off")
_CHECK_BATCH = 512  # train documents per binary-search batch


def group_key(rec: Record, key: str) -> str | None:
    if key in rec["meta"]:
        return json.dumps(rec["meta"][key], sort_keys=True, ensure_ascii=False)
    if key == "source":
        return rec["source"]
    return None


def assign(inputs: list[Path], val: float, test: float, group_by: str | None, seed: int,
           problems: Problems) -> tuple[dict[str, int] | np.ndarray, int, int]:
    """Pass 1. Returns (split index per group key, or per document when not grouping), documents, documents
    without the group key (each then forms its own group)."""
    rng = np.random.default_rng(seed)
    if group_by is None:
        n = sum(1 for _ in read_records(inputs, problems))
        order = rng.permutation(n)
        n_test, n_val = round(test * n), round(val * n)
        which = np.zeros(n, dtype=np.uint8)
        which[order[:n_test]] = 2
        which[order[n_test:n_test + n_val]] = 1
        return which, n, 0
    sizes: Counter = Counter()
    n = missing = 0
    for rec in read_records(inputs, problems):
        k = group_key(rec, group_by)
        if k is None:
            missing += 1
            k = f"\x00doc{n}"  # its own group
        sizes[k] += 1
        n += 1
    keys = list(sizes)  # first-appearance order, then shuffled: reproducible from the seed
    groups: dict[str, int] = {}
    targets = [(2, round(test * n)), (1, round(val * n))]
    filled = {1: 0, 2: 0}
    for i in rng.permutation(len(keys)):
        k = keys[i]
        split = 0
        for s, target in targets:
            if filled[s] < target:
                split = s
                filled[s] += sizes[k]
                break
        groups[k] = split
    return groups, n, missing


class LeakIndex:
    """Sorted hashes of every n-gram of the held-out documents, with the (split, document) each came from."""

    def __init__(self, n: int) -> None:
        self.n, self.hasher = n, WordHasher()
        self.parts: list[np.ndarray] = []
        self.owners: list[np.ndarray] = []
        self.docs: list[tuple[str, int]] = []  # owner id -> (split, line in its file)

    def add(self, text: str, split: str, line: int) -> None:
        h = ngram_hashes(self.hasher(words(text)), self.n)
        if len(h):
            self.parts.append(np.unique(h))
            self.owners.append(np.full(len(self.parts[-1]), len(self.docs), dtype=np.uint32))
        self.docs.append((split, line))

    def freeze(self) -> None:
        h = np.concatenate(self.parts) if self.parts else np.empty(0, np.uint64)
        o = np.concatenate(self.owners) if self.owners else np.empty(0, np.uint32)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owner = h[order], o[order]
        self.parts, self.owners = [], []

    def nbytes(self) -> int:
        return self.hashes.nbytes + self.owner.nbytes

    def check(self, texts: list[str]) -> Iterator[tuple[int, int, str]]:
        """(index into texts, held-out owner id, the shared n-gram) for every train document that shares an
        n-gram with the held-out set (its first shared n-gram)."""
        per_doc = [self.hasher(words(t)) for t in texts]
        grams = [ngram_hashes(w, self.n) for w in per_doc]
        if not len(self.hashes) or not any(len(g) for g in grams):
            return
        flat = np.concatenate(grams)
        pos = np.searchsorted(self.hashes, flat).clip(max=len(self.hashes) - 1)
        hit = self.hashes[pos] == flat
        if not hit.any():
            return
        bounds = np.cumsum([0] + [len(g) for g in grams])
        for i in np.unique(np.searchsorted(bounds, np.flatnonzero(hit), side="right") - 1):
            first = int(np.flatnonzero(hit[bounds[i]:bounds[i + 1]])[0])
            ws = words(texts[i])[first:first + self.n]
            yield int(i), int(self.owner[pos[bounds[i] + first]]), " ".join(ws)


def split(inputs: list[str | Path], out: str | Path, val: float = 0.05, test: float = 0.05,
          group_by: str | None = None, seed: int = 0, leak_ngram: int = 13, leak: str = "fail",
          overwrite: bool = False, strict: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Write out/{train,val,test}.jsonl and out/split.json; returns the manifest. Raises PocketLMError (exit
    2) when train shares a `leak_ngram`-word passage with val/test and `leak` is 'fail'."""
    paths, out = [Path(p) for p in inputs], Path(out)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PocketLMError(f"--val {val} and --test {test} must be fractions in [0, 1) that sum below 1")
    if leak not in LEAK_MODES:
        raise PocketLMError(f"--leak {leak!r} is not one of {', '.join(LEAK_MODES)}")
    if leak_ngram < 1:
        raise PocketLMError(f"--leak-ngram must be at least 1, got {leak_ngram}")
    for p in paths:
        if not p.is_file():
            raise PocketLMError(f"input not found: {p}")
    if out.exists() and not out.is_dir():
        raise PocketLMError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PocketLMError(f"{out} already exists and is not empty: pass --overwrite to replace it")
    start = time.perf_counter()
    problems = Problems(strict=strict)
    which, n, missing = assign(paths, val, test, group_by, seed, problems)
    if n == 0:
        raise PocketLMError("no documents in the input")
    quiet = Problems(strict=strict, show=0)  # pass 2 meets the same bad lines again: count them once
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_and_check(paths, tmp, which, group_by, n, leak_ngram, leak, quiet, verbose)
        manifest.update({"format_version": MANIFEST_VERSION, "inputs": [str(p) for p in paths], "seed": seed,
                         "val": val, "test": test, "group_by": group_by, "missing_group_key": missing,
                         "bad_input": dict(problems.counts), "seconds": round(time.perf_counter() - start, 3)})
        atomic_write_text(tmp / "split.json", json.dumps(manifest, indent=2) + "\n")
        if manifest["leakage"].get("train_documents", 0) and leak == "fail":
            raise PocketLMError(leak_message(manifest["leakage"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_and_check(paths: list[Path], tmp: Path, which: Any, group_by: str | None, n: int, leak_ngram: int,
                     leak: str, problems: Problems, verbose: bool) -> dict[str, Any]:
    index = LeakIndex(leak_ngram) if leak != "off" else None
    counts = {s: {"documents": 0, "chars": 0, "groups": set()} for s in SPLITS}
    progress = Progress("split", total=n, unit=" docs", enabled=verbose)
    writers = {s: RecordWriter(tmp / f"{s}.jsonl") for s in SPLITS}
    for w in writers.values():
        w.__enter__()
    try:
        for i, rec in enumerate(read_records(paths, problems)):
            if group_by is None:
                s = SPLITS[which[i]]
            else:
                k = group_key(rec, group_by)
                s = SPLITS[which[k if k is not None else f"\x00doc{i}"]]
                counts[s]["groups"].add(k if k is not None else i)
            writers[s].write(rec)
            c = counts[s]
            c["documents"] += 1
            c["chars"] += len(rec["text"])
            if index is not None and s != "train":
                index.add(rec["text"], s, c["documents"])
            progress.update(1)
    finally:
        for w in writers.values():
            w.__exit__(None, None, None)
    progress.close()
    summary = {s: {"documents": c["documents"], "chars": c["chars"],
                   **({"groups": len(c["groups"])} if group_by else {})} for s, c in counts.items()}
    leakage = {"mode": leak}
    if index is not None:
        leakage.update(_check(index, tmp / "train.jsonl", counts["train"]["documents"], verbose))
    return {"splits": summary, "leakage": leakage}


def _check(index: LeakIndex, train: Path, n_train: int, verbose: bool) -> dict[str, Any]:
    """Pass 3: stream train against the held-out index."""
    index.freeze()
    progress = Progress("leak check", total=n_train, unit=" docs", enabled=verbose)
    leaking, heldout, examples = 0, set(), []
    batch: list[str] = []
    line = 0

    def flush() -> None:
        nonlocal leaking
        for i, owner, gram in index.check(batch):
            leaking += 1
            heldout.add(owner)
            if len(examples) < 10:
                split, held_line = index.docs[owner]
                examples.append({"train_line": line - len(batch) + i + 1, "split": split, "line": held_line,
                                 "ngram": gram})
        progress.update(len(batch))
        batch.clear()

    for rec in read_records([train]):
        batch.append(rec["text"])
        line += 1
        if len(batch) >= _CHECK_BATCH:
            flush()
    flush()
    progress.close()
    return {"ngram": index.n, "train_documents": leaking, "heldout_documents": len(heldout),
            "index_mib": round(index.nbytes() / 2 ** 20, 2), "examples": examples}


def leak_message(lk: dict[str, Any], fix: bool = True) -> str:
    ex = lk["examples"][0]
    msg = (f"leakage: {lk['train_documents']:,} train documents share a {lk['ngram']}-word passage with "
           f"{lk['heldout_documents']:,} val/test documents, e.g. train.jsonl line {ex['train_line']} and "
           f"{ex['split']}.jsonl line {ex['line']}: \"{ex['ngram']}\"")
    return msg + ("; remove near-duplicates first (pocketlm clean --dedupe near), split by a group "
                  "(--group-by), or pass --leak warn" if fix else "")


def format_summary(m: dict[str, Any], out: str | Path) -> str:
    total = sum(s["documents"] for s in m["splits"].values()) or 1
    lines = [f"split {total:,} documents into {Path(out)}/ (seed {m['seed']}"
             + (f", grouped by {m['group_by']}" if m["group_by"] else "") + ")"]
    for name, s in m["splits"].items():
        groups = f"  {s['groups']:>8,} groups" if "groups" in s else ""
        lines.append(f"  {name:<5} {s['documents']:>10,} documents  {s['documents'] / total:6.1%}"
                     f"  {s['chars']:>12,} chars{groups}")
    if m["missing_group_key"]:
        lines.append(f"  {m['missing_group_key']:,} documents had no meta.{m['group_by']}: each is its own group")
    lk = m["leakage"]
    if lk["mode"] == "off":
        lines.append("  leakage check: off")
    elif lk["train_documents"]:
        lines.append(f"  warning: {leak_message(lk, fix=False)} (up to 10 examples in split.json)")
    else:
        lines.append(f"  leakage check: no {lk['ngram']}-word passage is shared between train and val/test")
    return "\n".join(lines)
