"""The feedback store: ratings and comparisons in SQLite, one row per event, each committed on its own.

The database is in WAL mode with `synchronous=FULL`: an event is on disk when `add` returns, and a crash
(or a killed server) loses nothing that was acknowledged. It lives outside model folders, because training
replaces `best/` and `last/` wholesale: by default `$XDG_DATA_HOME/pocketlm/feedback.db`
(`~/.local/share/pocketlm/feedback.db`), or `$POCKETLM_FEEDBACK_DB`, or `--db PATH`. Each row names the model
it was collected on, so one database serves every model and `export --model` selects.

Export writes JSONL in the field names preference trainers use (TRL's): a rating is
`{"prompt", "completion", "label": true|false}` (KTO's unpaired format), a comparison is
`{"prompt", "chosen", "rejected"}` (DPO's paired format); both carry `id`, `source`, `model`, `created`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pocketlm import atomic
from pocketlm.errors import PocketLMError

SCHEMA_VERSION = 1
SOURCES = ("web", "api", "terminal")
MAX_TEXT = 100_000  # characters per prompt or completion; the HTTP layer bounds requests far below this

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,            -- unix time
    source TEXT NOT NULL,             -- web, api or terminal
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'compare')),
    model TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL,
    completion TEXT,                  -- rating: the rated completion
    label INTEGER,                    -- rating: 1 = thumbs up, 0 = thumbs down
    chosen TEXT,                      -- compare: the better completion
    rejected TEXT,                    -- compare: the worse one
    meta TEXT NOT NULL DEFAULT '{}'   -- JSON: sampling parameters, anything else the client sent
);
"""


def default_path() -> Path:
    env = os.environ.get("POCKETLM_FEEDBACK_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "pocketlm" / "feedback.db"


class FeedbackStore:
    """Thread-safe: one connection, one lock; every `add` is its own committed transaction."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_path()
        if self.path.is_dir():
            raise PocketLMError(f"--db {self.path} is a folder; give a file path such as {self.path / 'feedback.db'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA busy_timeout=5000")  # several processes (server, playground) may write
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise PocketLMError(f"{self.path} was written by a newer pocketlm (schema v{version}): upgrade")
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise PocketLMError(f"{self.path} is not a usable feedback database ({e}); "
                                "pass another --db") from None
        self.lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def add(self, kind: str, prompt: str, *, source: str, model: str = "", completion: str | None = None,
            label: bool | None = None, chosen: str | None = None, rejected: str | None = None,
            meta: dict[str, Any] | None = None) -> int:
        """Record one event; returns its id once it is committed to disk."""
        if source not in SOURCES:
            raise PocketLMError(f"feedback source must be one of {', '.join(SOURCES)}, got {source!r}")
        if kind == "rating":
            if completion is None or label is None:
                raise PocketLMError("a rating needs a completion and a label (thumbs up = true, down = false)")
        elif kind == "compare":
            if chosen is None or rejected is None:
                raise PocketLMError("a comparison needs both completions: chosen and rejected")
            if chosen == rejected:
                raise PocketLMError("a comparison needs two different completions")
        else:
            raise PocketLMError(f"feedback kind must be 'rating' or 'compare', got {kind!r}")
        for name, text in (("prompt", prompt), ("completion", completion), ("chosen", chosen), ("rejected", rejected)):
            if text is not None and len(text) > MAX_TEXT:
                raise PocketLMError(f"feedback {name} is longer than {MAX_TEXT} characters")
        row = (time.time(), source, kind, model, prompt, completion, None if label is None else int(bool(label)),
               chosen, rejected, json.dumps(meta or {}))
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO events (created, source, kind, model, prompt, completion, label, chosen, rejected, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)  # autocommit: durable on return
            return int(cur.lastrowid)

    def events(self, model: str | None = None) -> Iterator[dict[str, Any]]:
        with self.lock:
            q = "SELECT * FROM events" + (" WHERE model = ?" if model is not None else "") + " ORDER BY id"
            cur = self.db.execute(q, (model,) if model is not None else ())
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        for r in rows:
            yield dict(zip(names, r))

    def count(self) -> dict[str, int]:
        with self.lock:
            rows = self.db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall()
        return {"rating": 0, "compare": 0, **dict(rows)}


def to_record(ev: dict[str, Any]) -> dict[str, Any]:
    """An event row -> one export line (TRL field names)."""
    rec: dict[str, Any] = {"id": ev["id"], "prompt": ev["prompt"]}
    if ev["kind"] == "rating":
        rec.update(completion=ev["completion"], label=bool(ev["label"]))
    else:
        rec.update(chosen=ev["chosen"], rejected=ev["rejected"])
    rec.update(source=ev["source"], model=ev["model"], created=round(ev["created"], 3),
               meta=json.loads(ev["meta"] or "{}"))
    return rec


def export(store: FeedbackStore, out: str | Path, model: str | None = None) -> dict[str, int]:
    """Write every event as JSONL (atomically); returns counts of ratings and pairs."""
    counts = {"ratings": 0, "pairs": 0}
    with atomic.atomic_open(out) as f:
        for ev in store.events(model):
            f.write(json.dumps(to_record(ev), ensure_ascii=False) + "\n")
            counts["ratings" if ev["kind"] == "rating" else "pairs"] += 1
    return counts
