"""The one document format every data step reads and writes: JSONL, one object per line.

    {"text": "...", "source": "where it came from (file, URL, channel, subreddit)", "meta": {...free...}}

`text` is required; `source` defaults to the file it was read from, `meta` to {}. Readers stream line by
line (memory flat in file size), report a malformed line with its file and line number, skip and count it,
or stop on it with `strict`. Writers write a temp file and rename it into place on success only.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypedDict

from pocketlm.atomic import atomic_open
from pocketlm.errors import PocketLMError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


class Record(TypedDict):
    text: str
    source: str
    meta: dict[str, Any]


def make(text: str, source: str, **meta: Any) -> Record:
    return {"text": text, "source": source, "meta": meta}


class Problems:
    """Counts bad input by reason and prints the first few with file:line; `strict` turns them into errors."""

    def __init__(self, strict: bool = False, show: int = 5, stream=None) -> None:
        self.strict, self.show, self.counts = strict, show, Counter()
        self.stream = stream if stream is not None else sys.stderr

    def report(self, where: str, reason: str, detail: str = "") -> None:
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise PocketLMError(f"{msg}; fix the input or drop --strict to skip such items")
        self.counts[reason] += 1
        if sum(self.counts.values()) <= self.show:
            print(f"warning: {msg}; skipped", file=self.stream)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed object) for each non-blank line of one JSONL file; undecodable lines are reported."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.report(where, "not UTF-8")
            except json.JSONDecodeError as e:
                problems.report(where, "malformed JSON", e.msg)


def read_records(paths: Iterable[str | Path], problems: Problems | None = None) -> Iterator[Record]:
    """Stream records from JSONL files; malformed lines are reported and skipped (or raise when strict)."""
    problems = problems or Problems()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise PocketLMError(f"input not found: {path}")
        for where, obj in read_jsonl(path, problems):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                problems.report(where, "no text field", 'each line needs {"text": "..."}')
                continue
            meta = obj.get("meta")
            yield {"text": obj["text"], "source": str(obj.get("source") or path),
                   "meta": meta if isinstance(meta, dict) else {}}


class RecordWriter:
    """Write records to `path` atomically: the file appears, complete, only when the block exits cleanly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0

    def __enter__(self) -> RecordWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ctx = atomic_open(self.path, "w")
        self._f = self._ctx.__enter__()
        return self

    def write(self, record: Record) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._ctx.__exit__(*exc))


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    with RecordWriter(path) as w:
        for r in records:
            w.write(r)
    return w.count
