"""pocketlm review: the page driven in real headless Chromium; decisions land in SQLite; export; safety."""

import http.client
import json
import sqlite3
import struct
import threading
import time
import zlib

import pytest

from pocketlm.cli import main
from pocketlm.data.records import make, read_records, write_records
from pocketlm.data.review import Review, default_db, make_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _png(path, w=3, h=2):
    """A valid RGB PNG (red), written without an imaging library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * w for _ in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def docs(tmp_path):
    _png(tmp_path / "shot.png")
    (tmp_path / "secret.png").write_bytes(b"not referenced")
    path = tmp_path / "ocr.jsonl"
    write_records(path, [
        make("First document: keep me.", "a.txt"),
        make('<script>window.pwned = 1; alert("x")</script><b>not bold</b> <img src=x onerror="window.pwned=2">',
             "evil.html"),
        make("Teh OCR txt wiht erors.", "shot.png", image="shot.png", confidence=41.5),
        make("Fourth document.", "d.txt"),
    ])
    with open(path, "a") as f:
        f.write("{not json\n")
    return path


@pytest.fixture
def served(docs):
    review = Review(docs)
    server = make_server(review, 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield review, server.server_address[1]
    server.shutdown()
    server.server_close()
    review.close()


def _request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
    r = c.getresponse()
    return r.status, r.read()


@pytest.mark.browser
@pytest.mark.slow
def test_page_accept_reject_edit_with_keys(served, docs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    review, port = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready]")
        pos = page.locator("#position")
        assert "document 1 of 4" in pos.text_content()
        assert "1 bad lines skipped" in page.locator("#counts").text_content()
        page.keyboard.press("a")
        sync_api.expect(pos).to_contain_text("document 2 of 4")
        # the <script> document shows as text and nothing in it ran
        text = page.locator("#text").text_content()
        assert text.startswith("<script>window.pwned = 1;") and "<b>not bold</b>" in text
        assert page.locator("#text script, #text b, #text img").count() == 0
        assert page.evaluate("window.pwned") is None and dialogs == []
        page.keyboard.press("r")
        sync_api.expect(pos).to_contain_text("document 3 of 4")
        # meta with the OCR confidence, the source image loaded from the server
        assert "41.5" in page.locator("dd.confidence").text_content()
        # polled with evaluate: wait_for_function evals a string in the page, which the page's CSP forbids
        deadline = time.monotonic() + 10
        while page.evaluate("document.getElementById('image').naturalWidth") != 3:
            assert time.monotonic() < deadline, "the source image did not load"
            time.sleep(0.05)
        page.keyboard.press("e")
        editor = page.locator("#editor")
        sync_api.expect(editor).to_be_visible()
        editor.fill("The OCR text with errors.")
        page.keyboard.press("Control+Enter")
        sync_api.expect(pos).to_contain_text("document 4 of 4")
        page.keyboard.press("ArrowLeft")
        sync_api.expect(page.locator("#status")).to_have_text("accepted (edited)")
        page.keyboard.press("ArrowLeft")
        sync_api.expect(page.locator("#status")).to_have_text("rejected")
        page.keyboard.press("u")  # undo the rejection, then reject again
        sync_api.expect(page.locator("#status")).to_have_text("undecided")
        page.keyboard.press("r")
        sync_api.expect(pos).to_contain_text("document 3 of 4")
        sync_api.expect(page.locator("#counts")).to_contain_text("2 accepted (1 edited) · 1 rejected · 1 to go")
        browser.close()
    # the decisions are in SQLite already, read by another connection
    rows = sqlite3.connect(default_db(docs)).execute(
        "SELECT line, decision, text FROM decisions ORDER BY line").fetchall()
    assert rows == [(1, "accept", None), (2, "reject", None), (3, "accept", "The OCR text with errors.")]
    out = tmp_path / "reviewed.jsonl"
    assert review.export(out) == {"accepted": 1, "edited": 1}
    got = list(read_records([out]))
    assert [d["text"] for d in got] == ["First document: keep me.", "The OCR text with errors."]
    assert got[1]["meta"] == {"image": "shot.png", "confidence": 41.5, "review": "edited"}


def test_restart_resumes_and_cli_exports(docs, tmp_path, capsys):
    r = Review(docs)
    r.decide(0, "accept")
    r.decide(1, "reject")
    r.decide(3, "accept", "Fourth document, fixed.")
    r.close()  # like killing the server: each decision was committed when made
    again = Review(docs)
    s = again.summary()
    assert (s["accepted"], s["rejected"], s["edited"], s["first_undecided"]) == (2, 1, 1, 2)
    assert again.document(3)["text"] == "Fourth document, fixed." and again.document(3)["edited"]
    again.close()
    out = tmp_path / "out.jsonl"
    assert main(["review", str(docs), "--export", str(out)]) == 0
    assert "exported 2 documents (1 edited)" in capsys.readouterr().out
    assert [d["text"] for d in read_records([out])] == ["First document: keep me.", "Fourth document, fixed."]
    assert main(["review", str(docs), "--export", str(out), "--strict"]) == 2
    assert "ocr.jsonl:5: malformed JSON" in capsys.readouterr().err
    # a document changed in the file is undecided again; the others keep their decisions
    lines = docs.read_text().splitlines()
    lines[0] = json.dumps(make("First document, changed.", "a.txt"))
    docs.write_text("\n".join(lines) + "\n")
    s = Review(docs).summary()
    assert (s["accepted"], s["rejected"], s["first_undecided"]) == (1, 1, 0)


def test_server_refuses_what_it_should(served):
    review, port = served
    assert _request(port, "GET", "/api/doc?i=2")[0] == 200
    assert _request(port, "GET", "/api/image?i=2")[1][:4] == b"\x89PNG"
    assert _request(port, "GET", "/api/image?i=0")[0] == 404  # no meta.image: no file of any kind
    assert _request(port, "GET", "/static/../secret.png")[0] == 404
    assert _request(port, "GET", "/static/review.py")[0] == 404
    assert _request(port, "GET", "/api/doc?i=99")[0] == 404
    # DNS rebinding (foreign Host) and cross-site form posts (not JSON) are refused
    assert _request(port, "GET", "/api/summary", headers={"Host": "evil.example:80"})[0] == 403
    body = json.dumps({"decision": "accept"})
    assert _request(port, "POST", "/api/doc?i=0", body, {"Content-Type": "text/plain"})[0] == 415
    assert _request(port, "POST", "/api/doc?i=0", '{"decision": "maybe"}', {"Content-Type": "application/json"})[0] == 400
    assert _request(port, "POST", "/api/doc?i=0", "{}", {"Content-Type": "application/json",
                                                          "Content-Length": str(1 << 30)})[0] == 413
    assert review.summary()["undecided"] == 4
    status, raw = _request(port, "POST", "/api/doc?i=0", body, {"Content-Type": "application/json"})
    assert status == 200 and json.loads(raw)["summary"]["accepted"] == 1
    status, raw = _request(port, "GET", "/")
    assert status == 200 and b"/static/review.js" in raw
