"""The feedback store on its own: SQLite in WAL mode, one committed row per event, export in TRL's field names."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.serve.feedback import FeedbackStore, default_path, export


def test_events_are_committed_one_by_one_and_exported(tmp_path: Path) -> None:
    db = tmp_path / "f.db"
    store = FeedbackStore(db)
    a = store.add("rating", "p1", source="web", model="m", completion="c1", label=True, meta={"params": {"t": 1}})
    b = store.add("compare", "p2", source="terminal", model="m", chosen="x", rejected="y")
    # a killed writer loses nothing it acknowledged: a separate process sees both rows before any close()
    seen = subprocess.run([sys.executable, "-c", f"import sqlite3; print(sqlite3.connect({str(db)!r}).execute("
                           "'SELECT COUNT(*) FROM events').fetchone()[0])"], capture_output=True, text=True)
    assert seen.stdout.strip() == "2" and (a, b) == (1, 2)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    counts = export(store, tmp_path / "out.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts == {"ratings": 1, "pairs": 1}
    assert lines[0]["completion"] == "c1" and lines[0]["label"] is True and lines[0]["meta"] == {"params": {"t": 1}}
    assert lines[1]["chosen"] == "x" and lines[1]["rejected"] == "y" and lines[1]["source"] == "terminal"
    assert export(store, tmp_path / "none.jsonl", model="other") == {"ratings": 0, "pairs": 0}
    store.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "rating", "completion": "c"}, "needs a completion and a label"),
    ({"kind": "compare", "chosen": "x", "rejected": "x"}, "two different completions"),
    ({"kind": "vote", "completion": "c"}, "must be 'rating' or 'compare'"),
    ({"kind": "rating", "completion": "c", "label": True, "source": "email"}, "source must be one of"),
])
def test_bad_events_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    store = FeedbackStore(tmp_path / "f.db")
    kind = kwargs.pop("kind")
    kwargs.setdefault("source", "api")
    with pytest.raises(PocketLMError, match=message):
        store.add(kind, "p", **kwargs)
    assert store.count() == {"rating": 0, "compare": 0}


def test_database_location_and_bad_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("POCKETLM_FEEDBACK_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_path() == tmp_path / "xdg" / "pocketlm" / "feedback.db"
    monkeypatch.setenv("POCKETLM_FEEDBACK_DB", str(tmp_path / "env.db"))
    assert default_path() == tmp_path / "env.db"
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PocketLMError, match="not a usable feedback database"):
        FeedbackStore(tmp_path / "junk.db")
    monkeypatch.setenv("POCKETLM_FEEDBACK_DB", str(tmp_path / "missing.db"))
    assert main(["feedback", "export", "--out", str(tmp_path / "o.jsonl")]) == 2  # nothing collected yet
    assert not (tmp_path / "o.jsonl").exists()


def test_serve_options_are_checked() -> None:
    pytest.importorskip("fastapi")
    from pocketlm.serve.app import ServeOptions

    with pytest.raises(PocketLMError, match="--max-batch must be at least 1"):
        ServeOptions(max_batch=0).validate()
    with pytest.raises(PocketLMError, match="--api-key is empty"):
        ServeOptions(api_key=" ").validate()
