"""`pocketlm ingest`: every source on fixtures made here — a real HTTP server on loopback, .zst dumps written
with zstandard, a Discord export, PNG screenshots read back by the real Tesseract — and the bad inputs."""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pocketlm.cli import main
from pocketlm.data.ingest import IngestOptions, ingest, parse_duration
from pocketlm.data.records import read_records
from pocketlm.errors import PocketLMError


def run(inputs, out, **opts):
    return ingest([str(i) for i in inputs], out, IngestOptions(quiet=True, **opts))


def texts(path):
    return [r["text"] for r in read_records([path])]


# ---- text, JSONL, JSON, CSV, Parquet -------------------------------------------------------------------

def test_text_markdown_and_folder_dispatch(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.md").write_text("# Title\nfirst para\n\nsecond para\n")
    (src / "sub" / "b.txt").write_text("only one\n")
    (src / "latin.txt").write_bytes(b"fine line\ncaf\xe9 au lait\n")
    (src / "pic.png").write_bytes(b"\x89PNG not really")
    (src / "data.bin").write_bytes(b"\0\1")
    out = tmp_path / "out.jsonl"
    s = run([src], out)
    assert texts(out) == ["# Title\nfirst para", "second para", "only one"]
    assert s.problems == {"not UTF-8": 1}
    assert s.filtered == {"image (pass --ocr to read images)": 1, "unknown file type (.bin)": 1}
    assert f"{src / 'latin.txt'}:2: not UTF-8 (bad byte 0xe9 at column 4" in capsys.readouterr().err
    run([src / "a.md"], out, separator="file")
    assert texts(out) == ["# Title\nfirst para\n\nsecond para\n"]


def test_jsonl_field_template_meta_and_malformed_lines(tmp_path, capsys):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"speaker": "BOB", "line": "hi", "episode": 1}\n'
                  b'{"speaker": "AMY", "line": "yo\\nthere", "episode": 1}\n'
                  b'{"speaker": "AMY", "episode": 2\n'           # malformed
                  b'\xff{"speaker": "X", "line": "y"}\n'          # not UTF-8
                  b'["a list"]\n'                                # not an object
                  b'{"speaker": "CAL", "episode": 3}\n'          # no line
                  b'\n{"speaker": "DEE", "line": "last", "episode": 3}\n')
    out = tmp_path / "out.jsonl"
    s = run([p], out, template="{speaker}:\\n{line}")
    recs = list(read_records([out]))
    assert [r["text"] for r in recs] == ["BOB:\nhi", "AMY:\nyo\nthere", "DEE:\nlast"]
    assert recs[0]["meta"] == {"episode": 1} and recs[0]["source"] == str(p)
    assert s.problems == {"malformed JSON": 1, "not UTF-8": 1, "not an object": 1, "missing field": 1}
    err = capsys.readouterr().err
    assert f"{p}:3: malformed JSON" in err and f"{p}:6: missing field (line;" in err
    # --strict: the first bad line stops the run and nothing is written
    out.unlink()
    with pytest.raises(PocketLMError, match=r"rows.jsonl:3: malformed JSON"):
        run([p], out, template="{speaker}: {line}", strict=True)
    assert not out.exists() and list(tmp_path.iterdir()) == [p]


def test_canonical_records_round_trip(tmp_path):
    p = tmp_path / "canon.jsonl"
    p.write_text(json.dumps({"text": "t", "source": "orig", "meta": {"a": 1}}) + "\n")
    out = tmp_path / "out.jsonl"
    run([p], out)
    assert list(read_records([out])) == [{"text": "t", "source": "orig", "meta": {"a": 1}}]
    s = run([str(tmp_path / "*.jsonl")], out)  # the glob now matches the output too: it is not read back
    assert s.documents == 1 and s.filtered == {"the output file itself": 1}


def test_json_array_streams_across_chunks_and_reports_lines(tmp_path, monkeypatch):
    from pocketlm.data.ingest import jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK", 7)  # every item crosses a chunk boundary
    rows = [{"text": f"doc {i} é ✓", "n": i * 1.5, "tags": ["x", {"y": None}]} for i in range(40)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    out = tmp_path / "out.jsonl"
    run([p], out)
    assert [(r["text"], r["meta"]) for r in read_records([out])] == [
        (r["text"], {"n": r["n"], "tags": r["tags"]}) for r in rows]
    # {"data": [...]} streams the first array; a broken item stops the file with its line
    q = tmp_path / "b.json"
    q.write_text('{"version": 2, "data": [\n {"text": "one"},\n {"text": "two"},\n {"text": tree}\n]}')
    s = run([q], out)
    assert texts(out) == ["one", "two"] and s.problems == {"malformed JSON": 1}
    with pytest.raises(PocketLMError, match=r"b.json:4: malformed JSON"):
        run([q], out, strict=True)


def test_csv_tsv_and_parquet(tmp_path):
    c = tmp_path / "s.csv"
    c.write_text('Speaker,Line,ep\nBOB,"hi, there",1\nAMY,"two\nlines",1\nBAD,row,1,extra\n')
    out = tmp_path / "out.jsonl"
    s = run([c], out, template="{Speaker}: {Line}")
    recs = list(read_records([out]))
    assert [r["text"] for r in recs] == ["BOB: hi, there", "AMY: two\nlines"] and recs[0]["meta"] == {"ep": "1"}
    assert s.problems == {"malformed CSV": 1}
    t = tmp_path / "s.tsv"
    t.write_text("text\tauthor\nhello\tme\n")
    run([t], out)
    assert list(read_records([out]))[0]["meta"] == {"author": "me"}
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    table = pa.table({"body": ["p1", "p2", None], "when": [datetime.date(2024, 1, d) for d in (1, 2, 3)],
                      "score": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    s = run([tmp_path / "t.parquet"], out, field="body")
    recs = list(read_records([out]))
    assert [r["text"] for r in recs] == ["p1", "p2"] and recs[1]["meta"] == {"when": "2024-01-02", "score": 2}
    assert s.problems == {"missing field": 1}


# ---- HTML files and URLs through a real loopback server -------------------------------------------------

def script_page(title: str, rows: list[tuple[str, str]], header=("Speaker", "Line")) -> str:
    trs = "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in rows)
    return (f"<html><head><title>{title}</title></head><body><nav>Home | Episodes</nav><h1>{title}</h1>"
            f"<table><thead><tr><th>{header[0]}</th><th>{header[1]}</th></tr></thead><tbody>{trs}"
            "<tr><td colspan='2'>[They leave]</td></tr></tbody></table></body></html>")


class Site:
    """A tiny site on 127.0.0.1 that logs every request (path, time, User-Agent)."""

    def __init__(self, pages: dict[str, tuple], flaky: dict[str, int]) -> None:
        self.pages, self.flaky, self.log = pages, dict(flaky), []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                site.log.append((self.path, time.monotonic(), self.headers.get("User-Agent", "")))
                if site.flaky.get(self.path, 0) > 0:
                    site.flaky[self.path] -= 1
                    status, body, charset = 503, "busy", "utf-8"
                else:
                    status, body, charset = (*site.pages.get(self.path, (404, "not found")), "utf-8")[:3]
                data = body.encode(charset)
                self.send_response(status)
                self.send_header("Content-Type", f"text/html; charset={charset}")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def hits(self, path: str) -> int:
        return sum(1 for p, _, _ in self.log if p == path)


@pytest.fixture
def site():
    pages = {
        "/robots.txt": (200, "User-agent: *\nDisallow: /private/\n"),
        "/ep1.html": (200, script_page("Episode 1", [("Bob", "Hello there."), ("Amy", "Hi <b>Bob</b>!")])),
        "/ep2.html": (200, script_page("Episode 2", [("AMY", "Again?")], header=("speaker", "LINE"))),
        "/flaky.html": (200, script_page("Flaky", [("Cal", "Made it.")])),
        "/latin1.html": (200, script_page("Café", [("Zoë", "Très bien.")]), "iso-8859-1"),
        "/private/ep3.html": (200, script_page("Secret", [("Eve", "Shh.")])),
        "/prose.html": (200, "<html><body><article><p>" + "Just prose, no table. " * 10 + "</p></article></body></html>"),
    }
    s = Site(pages, flaky={"/flaky.html": 1})
    s.thread.start()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_html_urls_polite_fetching(site, tmp_path, capsys):
    urls = [f"{site.url}/{p}" for p in ("ep1.html", "ep2.html", "flaky.html", "latin1.html", "private/ep3.html",
                                        "prose.html", "missing.html")]
    out, cache = tmp_path / "scripts.jsonl", tmp_path / "cache"
    opts = dict(html_table="{speaker}: {line}", cache=str(cache), rate=0.15, backoff=0.01)
    s = run(urls, out, **opts)
    recs = list(read_records([out]))
    assert [r["text"] for r in recs] == ["Bob: Hello there.\nAmy: Hi Bob!", "AMY: Again?", "Cal: Made it.",
                                         "Zoë: Très bien."]  # the header's charset, not UTF-8
    assert recs[0]["source"] == urls[0] and recs[0]["meta"] == {"url": urls[0], "title": "Episode 1", "rows": 2}
    assert s.problems == {"disallowed by robots.txt": 1, "no matching table": 1, "HTTP 404": 1}
    assert site.hits("/private/ep3.html") == 0  # robots.txt honoured: never asked for
    assert site.hits("/robots.txt") == 1 and site.hits("/flaky.html") == 2  # one 503, one retry
    assert all(ua.startswith("pocketlm/") for _, _, ua in site.log)
    times = [t for _, t, _ in site.log]
    # the per-host rate limit: 0.15 s between requests (checked over the span: one late arrival is not a miss)
    assert times[-1] - times[0] >= (len(times) - 1) * 0.15 - 0.1
    assert "prose.html: no matching table (no table with speaker, line)" in capsys.readouterr().err
    # second run: every page from the on-disk cache, not one request
    before = len(site.log)
    run(urls, tmp_path / "again.jsonl", **opts)
    assert len(site.log) == before
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    # main text (no --html-table), one document per table row
    run([f"{site.url}/prose.html"], out, cache=str(cache))
    assert texts(out)[0].startswith("Just prose, no table.")
    run([urls[0]], out, html_table="{1} ({0})", per_row=True, cache=str(cache))
    assert texts(out) == ["Hello there. (Bob)", "Hi Bob! (Amy)"]


def test_retries_give_up_after_the_limit(site, tmp_path):
    site.flaky["/ep1.html"] = 5
    s = run([f"{site.url}/ep1.html", f"{site.url}/ep2.html"], tmp_path / "o.jsonl", html_table="{speaker}: {line}",
            cache=str(tmp_path / "c"), rate=0, retries=2, backoff=0.01)
    assert s.problems == {"HTTP 503": 1} and site.hits("/ep1.html") == 3 and s.documents == 1
    # robots.txt failing with 5xx: nothing is fetched from that host (RFC 9309), and nothing is cached
    site.flaky["/robots.txt"] = 10
    with pytest.raises(PocketLMError, match="robots.txt unreachable"):
        run([f"{site.url}/ep2.html"], tmp_path / "o2.jsonl", html_table="{speaker}: {line}", cache=str(tmp_path / "c2"),
            rate=0, retries=1, backoff=0.01)
    assert site.hits("/robots.txt") == 1 + 2 and site.hits("/ep2.html") == 1


def test_html_files_and_glob(tmp_path):
    d = tmp_path / "pages"
    d.mkdir()
    (d / "a.html").write_text(script_page("A", [("X", "one")]))
    (d / "b.htm").write_text(script_page("B", [("Y", "two"), ("Z", "three")]))
    out = tmp_path / "o.jsonl"
    run([str(d / "*.htm*")], out, html_table="{speaker}: {line}")
    assert texts(out) == ["X: one", "Y: two\nZ: three"]


# ---- Discord -----------------------------------------------------------------------------------------

def discord_export(path: Path) -> Path:
    def msg(i, minute, author, content, type_="Default", ts=None):
        return {"id": str(1000 + i), "type": type_, "timestamp": ts or f"2024-03-01T{10 + minute // 60:02d}:"
                f"{minute % 60:02d}:00.000+00:00", "content": content,
                "author": {"id": str(i), "name": author.lower(), "nickname": author, "isBot": False},
                "attachments": [], "reactions": []}
    messages = [msg(1, 0, "Ann", "anyone up?"), msg(2, 5, "Ben", "yes\nwhat's up"),
                msg(3, 6, "Ann", "", ), msg(4, 7, "Ben", "pinned", type_="ChannelPinnedMessage"),
                msg(5, 8, "Ann", "cool", ts="yesterday"), msg(6, 20, "Ann", "ok bye"),
                msg(7, 140, "Cat", "morning all"), msg(8, 150, "Ben", "hi cat")]
    path.write_text(json.dumps({"guild": {"id": "1", "name": "Friends"}, "channel": {"id": "2", "name": "general"},
                                "dateRange": {"after": None, "before": None}, "messages": messages,
                                "messageCount": len(messages)}, indent=2))
    return path


def test_discord_conversations_by_gap(tmp_path, capsys, monkeypatch):
    from pocketlm.data.ingest import jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK", 64)  # messages stream across many buffer refills
    p = discord_export(tmp_path / "export.json")
    out = tmp_path / "d.jsonl"
    s = run([p], out, gap=parse_duration("30m"))
    recs = list(read_records([out]))
    assert [r["text"] for r in recs] == ["Ann: anyone up?\nBen: yes\nwhat's up\nAnn: ok bye",
                                         "Cat: morning all\nBen: hi cat"]
    assert recs[0]["source"] == "discord:Friends/general"
    assert recs[0]["meta"]["messages"] == 3 and recs[0]["meta"]["authors"] == ["Ann", "Ben"]
    assert recs[1]["meta"]["start"] == "2024-03-01T12:20:00+00:00"
    assert s.problems == {"bad timestamp": 1}
    # the message's line is the one of its "{", just before its "id" (0-based index = 1-based line of "{")
    bad_line = [ln.strip() for ln in p.read_text().splitlines()].index('"id": "1005",')
    assert f"{p}:{bad_line}: bad timestamp" in capsys.readouterr().err
    assert s.filtered == {"message without text": 1, "system message": 1}
    run([p], out, gap=parse_duration("3h"))
    assert len(texts(out)) == 1
    with pytest.raises(PocketLMError, match="cannot read duration"):
        parse_duration("30 minutes")


# ---- Reddit / Pushshift .zst -------------------------------------------------------------------------

def reddit_items(n: int = 600) -> list[dict]:
    items = []
    for i in range(n):
        day = 1_672_531_200 + (i % 60) * 86400  # Jan-Feb 2023
        sub = ["wholesomegreentexts", "AskReddit"][i % 2]
        if i % 3 == 0:
            items.append({"id": f"c{i}", "subreddit": sub, "author": f"u{i}", "score": i % 100,
                          "created_utc": day, "body": f"comment {i}" if i % 30 else "[deleted]",
                          "link_id": f"t3_s{i // 3}", "parent_id": f"t3_s{i // 3}"})
        else:
            items.append({"id": f"s{i}", "subreddit": sub, "author": f"u{i}", "score": i % 100,
                          "created_utc": str(day), "title": f"title {i}",
                          "selftext": f">be me\n>post {i}" if i % 7 else ""})
    return items


def write_zst(path: Path, items: list[dict], window_log: int = 31) -> bytes:
    import zstandard

    # Pushshift compresses with --long=31: a 2 GiB window that decoders refuse by default
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=window_log, enable_ldm=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        for it in items:
            w.write(json.dumps(it).encode() + b"\n")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_reddit_zst_filters(tmp_path):
    pytest.importorskip("zstandard")
    items = reddit_items()
    p = tmp_path / "RS_2023-01.zst"
    write_zst(p, items)
    out = tmp_path / "r.jsonl"
    s = run([p], out, subreddit=["r/WholesomeGreentexts"], min_score=50)
    recs = list(read_records([out]))
    want = [it for it in items if it["subreddit"] == "wholesomegreentexts" and it["score"] >= 50
            and (it.get("body", "x") != "[deleted]") and (it.get("selftext", "x") != "")]
    assert [r["meta"]["id"] for r in recs] == [it["id"] for it in want] and recs
    sub = next(r for r in recs if r["meta"]["kind"] == "submission")
    assert sub["text"].startswith("title ") and "\n\n>be me\n" in sub["text"]
    assert sub["source"] == "reddit:r/wholesomegreentexts" and sub["meta"]["thread"] == sub["meta"]["id"]
    assert s.filtered["subreddit"] == 300 and s.documents + sum(s.filtered.values()) == len(items)
    # dates and kinds
    from pocketlm.data.ingest import parse_date

    run([p], out, after=parse_date("2023-02-01"), before=parse_date("2023-02-04"), reddit_kind="comments")
    got = list(read_records([out]))
    assert got and all(r["meta"]["kind"] == "comment" and 1675209600 <= r["meta"]["created_utc"] < 1675468800
                       for r in got)
    assert all(r["meta"]["thread"].startswith("s") for r in got)


def test_reddit_truncated_and_corrupt_zst(tmp_path, capsys):
    pytest.importorskip("zstandard")
    items = reddit_items(3000)
    full = write_zst(tmp_path / "full.zst", items)
    cut = tmp_path / "cut.zst"
    cut.write_bytes(full[: len(full) * 2 // 3])
    out = tmp_path / "r.jsonl"
    s = run([cut], out)
    assert s.problems == {"truncated .zst": 1}
    n = s.documents + sum(s.filtered.values())
    assert 0 < n < len(items)
    assert f"lines read before the cut were kept" in capsys.readouterr().err
    assert [r["meta"]["id"] for r in read_records([out])][:3] == ["s1", "s2", "c3"]
    with pytest.raises(PocketLMError, match=r"cut.zst:\d+: truncated .zst"):
        run([cut], out, strict=True)
    # a compressed JSONL of any rows (not Reddit) goes through --field/--template
    rows = tmp_path / "rows.jsonl.zst"
    data = write_zst(rows, [{"speaker": "A", "line": f"line {i} " * (i % 7)} for i in range(6000)], window_log=20)
    s = run([rows], out, template="{speaker}: {line}")
    assert s.inputs == {"jsonl": 1} and texts(out)[1:3] == ["A: line 1 ", "A: line 2 line 2 "] and s.documents == 6000
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) * 2 // 3])
    s = run([tmp_path / "cut.jsonl.zst"], out, template="{speaker}: {line}")
    assert s.problems == {"truncated .zst": 1} and 0 < s.documents < 6000
    bad = tmp_path / "bad.zst"
    bad.write_bytes(b"this is not zstd at all\n" * 10)
    s = run([bad, tmp_path / "full.zst"], out)
    assert s.problems == {"corrupt .zst": 1} and s.documents > 0


# ---- OCR ---------------------------------------------------------------------------------------------

def screenshot(path: Path, lines: list[str]) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=32)
    img = Image.new("RGB", (760, 60 + 55 * len(lines)), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((24, 24 + 55 * i), line, fill="black", font=font)
    img.save(path)
    return path


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed (apt-get install tesseract-ocr)")
def test_ocr_screenshots_with_real_tesseract(tmp_path, capsys):
    pytest.importorskip("pytesseract")
    d = tmp_path / "shots"
    d.mkdir()
    screenshot(d / "a.png", ["The quick brown fox jumps", "over the lazy dog."])
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (d / "notes.txt").write_text("a text file beside the screenshots\n")
    out = tmp_path / "ocr.jsonl"
    s = main(["ingest", str(d), "--ocr", "--out", str(out), "--quiet"])
    assert s == 0
    recs = list(read_records([out]))
    ocr = [r for r in recs if "ocr_confidence" in r["meta"]]
    assert len(recs) == 2 and len(ocr) == 1
    assert ocr[0]["text"] == "The quick brown fox jumps\nover the lazy dog."
    assert ocr[0]["meta"]["ocr_confidence"] > 80 and ocr[0]["meta"]["words"] == 9
    assert ocr[0]["meta"]["image"] == str((d / "a.png").resolve())
    err = capsys.readouterr()
    assert "broken.png: unreadable image" in err.err
    assert "skipped 1 bad (unreadable image 1)" in err.out


def test_missing_tesseract_says_how_to_install(tmp_path, monkeypatch, capsys):
    pytesseract = pytest.importorskip("pytesseract")
    screenshot(tmp_path / "a.png", ["hello"])
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", str(tmp_path / "no-such-tesseract"))
    assert main(["ingest", str(tmp_path / "a.png"), "--out", str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the tesseract program is not installed (needed for OCR): sudo apt-get install tesseract-ocr"


# ---- Hugging Face datasets, the CLI, bad usage ---------------------------------------------------------

def test_hf_dataset_from_local_path(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional datasets library is not installed")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["a", "b"], "a": ["1", "2"], "k": [7, 8]}),
                               "test": datasets.Dataset.from_dict({"q": ["c"], "a": ["3"], "k": [9]})})
    ds.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "o.jsonl"
    s = run([tmp_path / "saved"], out, template="Q: {q}\\nA: {a}")
    assert texts(out) == ["Q: a\nA: 1", "Q: b\nA: 2"] and s.inputs == {"hf": 1}
    assert list(read_records([out]))[0]["meta"] == {"k": 7} and list(read_records([out]))[0]["source"].startswith("hf:")
    run([f"hf:{tmp_path / 'saved'}"], out, template="{q}", hf_split="test")
    assert texts(out) == ["c"]
    with pytest.raises(PocketLMError, match="has no split 'dev'"):
        run([tmp_path / "saved"], out, field="q", hf_split="dev")


def test_cli_summary_and_errors(tmp_path, capsys):
    p = tmp_path / "a.txt"
    p.write_text("one\n\ntwo\n")
    out = tmp_path / "o.jsonl"
    assert main(["ingest", str(p), "--out", str(out), "--quiet"]) == 0
    assert re.fullmatch(rf"ingested 2 documents from 1 inputs \(text 1\) -> {re.escape(str(out))} in \d+\.\ds",
                        capsys.readouterr().out.strip())
    for argv, msg in [
        ([str(tmp_path / "nope.txt")], "input not found"),
        ([str(p), "--gap", "soon"], "cannot read duration 'soon'"),
        ([str(p), "--after", "last year"], "cannot read date 'last year'"),
        ([str(p), "--field", "a", "--template", "{b}"], "give --field or --template, not both"),
        ([str(p), "--template", "{}"], "must name fields"),
        ([str(p), "--html-table", "no fields"], "must name columns"),
        ([str(p), "--format", "pdf"], "invalid choice: 'pdf'"),
    ]:
        rc = main(["ingest", *argv, "--out", str(tmp_path / "x.jsonl"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (argv, err)
    (tmp_path / "weird.xyz").write_text("?")
    assert main(["ingest", str(tmp_path / "weird.xyz"), "--out", str(out)]) == 2
    assert "pass --format" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("{bad\n")
    assert main(["ingest", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e.jsonl"), "--quiet"]) == 2
    assert "no documents found" in capsys.readouterr().err and not (tmp_path / "e.jsonl").exists()


def test_progress_line_shows_rate_and_position(tmp_path, capsys, monkeypatch):
    import pocketlm.data.ingest as ingest_mod
    from pocketlm.data.ingest import jsonstream
    from pocketlm.progress import Progress

    class EveryUpdate(Progress):  # draw on every update instead of every 5 s, so a small input shows it
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.interval = 0.0

    monkeypatch.setattr(ingest_mod, "Progress", EveryUpdate)
    monkeypatch.setattr(jsonstream, "CHUNK", 256)
    p = tmp_path / "big.jsonl"
    p.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(200)))
    ingest([str(p)], tmp_path / "o.jsonl", IngestOptions())
    err = capsys.readouterr().err
    assert re.search(r"ingest \| [\d.]+k? docs/s \| big\.jsonl \d+% ETA \d+s \| elapsed", err), err[-500:]


def test_prepare_reads_what_ingest_writes(tmp_path):
    from pocketlm.config import DataConfig
    from pocketlm.data.prepare import prepare

    out = tmp_path / "discord.jsonl"
    run([discord_export(tmp_path / "export.json")], out, gap=parse_duration("30m"))
    m = prepare([out], tmp_path / "ds", DataConfig(tokenizer="char", val_fraction=0.0), verbose=False)
    assert m["splits"]["train"]["documents"] == 2
