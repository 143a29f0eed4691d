"""`pocketlm review`: accept, edit or reject documents one by one in a local web page; export what was kept.

The page (review_page/, package data: no CDN) is served by the standard library's HTTP server on
127.0.0.1 only. Every decision is written to SQLite (WAL, synchronous=FULL) the moment it is made, keyed by
a hash of the document, so closing the page or killing the server loses nothing and a restart resumes;
a document that changed in the file since is simply undecided again. The JSONL file is indexed once (byte
offset per line) and read back one document at a time, so memory does not grow with its text.

Safety: all document text reaches the page as JSON and is put in with textContent (never parsed as HTML);
a strict Content-Security-Policy allows only the package's own script; requests must carry a loopback
Host header (no DNS rebinding) and writes must be application/json (no cross-site form posts); the only
images served are the ones a document's meta.image names, looked up by document number, never by a path
from the request.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from pocketlm.data.records import Problems, Record, RecordWriter
from pocketlm.errors import PocketLMError

DB_VERSION = 1
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
STATIC = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
MAX_BODY = 16 << 20  # an edited document may be long, but not unbounded
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'"


def doc_hash(rec: Record) -> str:
    canon = json.dumps([rec["text"], rec["source"], rec["meta"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


class Documents:
    """Random access to the valid records of a JSONL file by number (0-based), via a byte-offset index."""

    def __init__(self, path: str | Path, problems: Problems | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PocketLMError(f"input not found: {self.path}")
        self.problems = problems or Problems()
        self.offsets: list[int] = []
        self.lines: list[int] = []
        self.hashes: list[str] = []
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                rec = self._parse(raw, f"{self.path}:{lineno}", self.problems) if raw.strip() else None
                if rec is not None:
                    self.offsets.append(offset)
                    self.lines.append(lineno)
                    self.hashes.append(doc_hash(rec))
                offset += len(raw)

    def _parse(self, raw: bytes, where: str, problems: Problems) -> Record | None:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return problems.report(where, "not UTF-8")
        except json.JSONDecodeError as e:
            return problems.report(where, "malformed JSON", e.msg)
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            return problems.report(where, "no text field", 'each line needs {"text": "..."}')
        meta = obj.get("meta")
        return {"text": obj["text"], "source": str(obj.get("source") or self.path),
                "meta": meta if isinstance(meta, dict) else {}}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Record:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            rec = self._parse(f.readline(), f"{self.path}:{self.lines[i]}", Problems(strict=True))
        if rec is None or doc_hash(rec) != self.hashes[i]:
            raise PocketLMError(f"{self.path} changed while it was being reviewed; restart pocketlm review")
        return rec

    def image(self, i: int) -> Path | None:
        """The image file document `i`'s meta.image names (relative to the JSONL file's folder), if any."""
        name = self[i]["meta"].get("image")
        if not isinstance(name, str) or not name:
            return None
        p = Path(name).expanduser()
        p = p if p.is_absolute() else self.path.parent / p
        return p if p.suffix.lower() in IMAGE_TYPES and p.is_file() else None


class Decisions:
    """The SQLite store of decisions: one row per document hash, written as each decision is made."""

    def __init__(self, db: str | Path, source: Path) -> None:
        self.lock = threading.Lock()
        try:
            self.conn = sqlite3.connect(str(db), check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript("""
                CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS decisions (
                    doc_hash TEXT PRIMARY KEY,
                    line INTEGER NOT NULL,
                    decision TEXT NOT NULL CHECK (decision IN ('accept', 'reject')),
                    text TEXT,
                    decided_at REAL NOT NULL
                );""")
            row = self.conn.execute("SELECT value FROM info WHERE key='format_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise PocketLMError(f"{db} is not a pocketlm review database ({e}); pass another --db") from None
        if row is None:
            self.conn.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                                  [("format_version", str(DB_VERSION)), ("source", str(source))])
        elif int(row[0]) > DB_VERSION:
            raise PocketLMError(f"{db} was written by a newer pocketlm (format {row[0]}); upgrade pocketlm")

    def get(self, h: str) -> tuple[str, str | None] | None:
        with self.lock:
            row = self.conn.execute("SELECT decision, text FROM decisions WHERE doc_hash=?", (h,)).fetchone()
        return (row[0], row[1]) if row else None

    def all(self) -> dict[str, tuple[str, str | None]]:
        with self.lock:
            return {h: (d, t) for h, d, t in self.conn.execute("SELECT doc_hash, decision, text FROM decisions")}

    def set(self, h: str, line: int, decision: str | None, text: str | None = None) -> None:
        with self.lock:
            if decision is None:
                self.conn.execute("DELETE FROM decisions WHERE doc_hash=?", (h,))
            else:
                self.conn.execute("INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?)",
                                  (h, line, decision, text, time.time()))

    def close(self) -> None:
        self.conn.close()


def default_db(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".review.sqlite")


class Review:
    """The documents and their decisions; what the HTTP handler and `export` work on."""

    def __init__(self, path: str | Path, db: str | Path | None = None, problems: Problems | None = None) -> None:
        self.docs = Documents(path, problems)
        self.decisions_path = Path(db or default_db(path))
        self.decisions = Decisions(self.decisions_path, self.docs.path)

    def summary(self) -> dict[str, Any]:
        known = self.decisions.all()
        counts = {"accept": 0, "reject": 0, "edited": 0}
        first = None
        for i, h in enumerate(self.docs.hashes):
            d = known.get(h)
            if d is None:
                first = i if first is None else first
                continue
            counts[d[0]] += 1
            counts["edited"] += d[1] is not None
        return {"file": self.docs.path.name, "total": len(self.docs), "accepted": counts["accept"],
                "rejected": counts["reject"], "edited": counts["edited"],
                "undecided": len(self.docs) - counts["accept"] - counts["reject"], "first_undecided": first,
                "bad_lines": self.docs.problems.total}

    def document(self, i: int) -> dict[str, Any]:
        rec = self.docs[i]
        d = self.decisions.get(self.docs.hashes[i])
        return {"i": i, "total": len(self.docs), "line": self.docs.lines[i], "source": rec["source"],
                "meta": rec["meta"], "original": rec["text"],
                "text": d[1] if d and d[1] is not None else rec["text"],
                "decision": d[0] if d else None, "edited": bool(d and d[1] is not None),
                "image": self.docs.image(i) is not None}

    def decide(self, i: int, decision: str | None, text: str | None = None) -> None:
        if decision not in ("accept", "reject", None):
            raise ValueError(f"decision must be accept, reject or null, got {decision!r}")
        original = self.docs[i]["text"]
        edited = text if decision == "accept" and text is not None and text != original else None
        self.decisions.set(self.docs.hashes[i], self.docs.lines[i], decision, edited)

    def export(self, out: str | Path) -> dict[str, int]:
        """Accepted documents (edited text where edited) in file order, meta.review = accepted / edited."""
        known = self.decisions.all()
        counts = {"accepted": 0, "edited": 0}
        with RecordWriter(out) as w:
            for i, h in enumerate(self.docs.hashes):
                d = known.get(h)
                if d is None or d[0] != "accept":
                    continue
                rec = self.docs[i]
                status = "edited" if d[1] is not None else "accepted"
                counts[status] += 1
                w.write({"text": d[1] if d[1] is not None else rec["text"], "source": rec["source"],
                         "meta": {**rec["meta"], "review": status}})
        return counts

    def close(self) -> None:
        self.decisions.close()


class Handler(BaseHTTPRequestHandler):
    review: Review
    port: int
    server_version = "pocketlm-review"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the terminal shows the URL only
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, msg: str) -> None:
        self._json({"error": msg}, status)

    def _host_ok(self) -> bool:
        return self.headers.get("Host", "") in (f"127.0.0.1:{self.port}", f"localhost:{self.port}")

    def _index(self, query: dict[str, list[str]]) -> int | None:
        try:
            i = int(query.get("i", [""])[0])
        except ValueError:
            return None
        return i if 0 <= i < len(self.review.docs) else None

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "bad Host header")
        url = urlparse(self.path)
        q = parse_qs(url.query)
        if url.path in ("/", "/index.html") or url.path.startswith("/static/"):
            name = "index.html" if url.path in ("/", "/index.html") else url.path[len("/static/"):]
            if name not in STATIC:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            body = resources.files("pocketlm.data").joinpath("review_page", name).read_bytes()
            return self._send(HTTPStatus.OK, body, STATIC[name])
        if url.path == "/api/summary":
            return self._json(self.review.summary())
        i = self._index(q)
        if url.path == "/api/doc":
            return self._json(self.review.document(i)) if i is not None else self._error(404, "no such document")
        if url.path == "/api/image":
            img = self.review.docs.image(i) if i is not None else None
            if img is None:
                return self._error(HTTPStatus.NOT_FOUND, "this document has no image")
            return self._send(HTTPStatus.OK, img.read_bytes(), IMAGE_TYPES[img.suffix.lower()])
        self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "bad Host header")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        url = urlparse(self.path)
        i = self._index(parse_qs(url.query))
        if url.path != "/api/doc" or i is None:
            return self._error(HTTPStatus.NOT_FOUND, "no such document")
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a decision is at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(size))
            text = body.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError("text must be a string")
            self.review.decide(i, body.get("decision"), text)
        except (ValueError, AttributeError) as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        self._json({"doc": self.review.document(i), "summary": self.review.summary()})


def make_server(review: Review, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:`port` (0 = any free port) for `review`; call serve_forever()."""
    handler = type("ReviewHandler", (Handler,), {"review": review, "port": 0})
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise PocketLMError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pass another --port") from None
    server.daemon_threads = True
    handler.port = server.server_address[1]
    return server
