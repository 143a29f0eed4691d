"""The HTTP server for real: uvicorn on a free loopback port, driven by the official `openai` client and httpx."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pocketlm.generate import Engine, SamplingParams
from pocketlm.serve.batching import Batcher, Request
from tests.serve_util import MARKUP, markup_model, running_server, with_chat_template

pytestmark = pytest.mark.slow  # one tiny model trained per session (~10 s), then a second or two a test
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package itself uses


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return markup_model(tmp_path_factory)


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "feedback.db"
    with running_server(model, db, max_concurrency=4, max_batch=8, max_tokens_cap=200) as (url, app):
        yield url, app, db


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_batched_decode_gives_the_engines_tokens(model: Path) -> None:
    """Requests joining at different steps, n > 1, windows that fill and refill: greedy output = the Engine's."""
    engine = Engine.load(model, "cpu")
    batcher = Batcher(engine, max_rows=6).start()
    prompts = ["the cat", "hello", "a dog ran to the red ball", "birds sang"]
    p = SamplingParams(max_new_tokens=2 * engine.block_size, temperature=0, stop_at_eot=False)
    events: dict[int, list] = {k: [] for k in range(len(prompts))}
    done = threading.Semaphore(0)

    def emitter(k: int):
        def emit(ev) -> None:
            events[k].append(ev)
            if ev.kind == "done":
                done.release()
        return emit

    try:
        for k, prompt in enumerate(prompts):  # the others join while the first is mid-generation
            batcher.submit(Request(engine.encode_prompt(prompt), p, 2 if k == 1 else 1, emitter(k), engine.tok))
            deadline = time.time() + 60
            while k == 0 and len(events[0]) < 3 and time.time() < deadline:
                time.sleep(0.005)
        for _ in range(5):
            assert done.acquire(timeout=120)
        assert batcher.stats()["mean_batch"] > 2  # the sequences really shared steps
    finally:
        batcher.close()
    for k, prompt in enumerate(prompts):
        want = engine.generate(prompt, p)[0].text
        for i in range(2 if k == 1 else 1):
            assert "".join(e.text for e in events[k] if e.kind == "delta" and e.index == i) == want, prompt


def test_openai_client_completions_chat_and_streaming(model: Path, server, tmp_path: Path) -> None:
    url, _, _ = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0)
    assert r.choices[0].text == MARKUP[len("hello"):][:30] and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 30, 35)
    # stop strings, n, seed
    r = c.completions.create(model="tiny", prompt="hello", max_tokens=40, temperature=0, stop=["<script>"])
    assert r.choices[0].text == " <img src=x onerror=alert(1)>" and r.choices[0].finish_reason == "stop"
    a = c.completions.create(model="tiny", prompt="the", max_tokens=20, temperature=1.0, n=3, seed=7)
    b = c.completions.create(model="tiny", prompt="the", max_tokens=20, temperature=1.0, n=3, seed=7)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 3
    assert len({x.text for x in a.choices}) > 1
    # streaming: chunks join to the non-streamed text; usage at the end when asked for
    stream = c.completions.create(model="tiny", prompt="hello", max_tokens=30, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == MARKUP[len("hello"):][:30]
    assert chunks[-1].usage.completion_tokens == 30 and len(chunks) > 5
    # chat needs a template: none here -> a clear 400
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with running_server(with_chat_template(model, tmp_path / "chat"), tmp_path / "f.db") as (curl, _):
        cc = client(curl)
        r = cc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=12, temperature=0)
        assert r.choices[0].message.role == "assistant" and len(r.choices[0].message.content) > 0
        # the template rendered "user: hello\nassistant:" and the model continued it
        engine = Engine.load(model, "cpu")
        want = engine.generate("user: hello\nassistant:", SamplingParams(max_new_tokens=12, temperature=0))[0]
        assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == 22
        parts = list(cc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=12, temperature=0, stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == want.text
        assert parts[-1].choices[0].finish_reason in ("length", "stop")


def _stream_times(url: str, prompt: str, max_tokens: int, out: list) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                               "stream": True, "ignore_eos": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append((time.perf_counter(), json.loads(line[6:])["choices"][0]["text"]))


def test_two_streams_interleave(server) -> None:
    url = server[0]
    a, b = [], []
    ta = threading.Thread(target=_stream_times, args=(url, "hello", 150, a))
    tb = threading.Thread(target=_stream_times, args=(url, "the cat", 150, b))
    ta.start()
    time.sleep(0.05)
    tb.start()
    ta.join()
    tb.join()
    assert len(a) > 100 and len(b) > 100
    # b's tokens arrive while a is still streaming, and a keeps streaming while b does: neither waits
    during = [t for t, _ in b if a[0][0] < t < a[-1][0]]
    assert len(during) > 50


def test_client_disconnect_stops_generation(server) -> None:
    url, app, _ = server
    batcher = app.state.batcher
    before = batcher.tokens
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "the", "max_tokens": 200, "stream": True,
                                                             "ignore_eos": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 10
    while batcher.stats()["active_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert batcher.stats()["active_rows"] == 0
    time.sleep(0.3)
    generated = batcher.tokens - before
    assert generated < 150, generated  # it stopped well before max_tokens
    assert httpx.get(url + "/health").json()["inflight"] == 0


def test_api_key_on_every_api_route(model: Path, tmp_path: Path) -> None:
    with running_server(model, tmp_path / "f.db", api_key="s3cret") as (url, _):
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "a"}),
                                   ("POST", "/v1/chat/completions", {"messages": []}),
                                   ("POST", "/v1/feedback", {"kind": "rating"})]:
            r = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.request(method, url + path, json=body).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").completions.create(model="tiny", prompt="hi", max_tokens=3).choices
        assert httpx.get(url + "/health").status_code == 200  # no secrets there: liveness for load balancers
        assert httpx.get(url + "/").status_code == 200  # the page asks for the key itself


def test_limits_are_clear_4xx_errors(server) -> None:
    url, app, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="context is 32 tokens") as e:
        c.completions.create(model="tiny", prompt="the cat " * 10, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="above this server's cap of 200"):
        c.completions.create(model="tiny", prompt="the", max_tokens=201)
    with pytest.raises(openai.BadRequestError, match="n=9"):
        c.completions.create(model="tiny", prompt="the", n=9)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.completions.create(model="gpt-4", prompt="the")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny", prompt="the", temperature=-1)
    r = httpx.post(url + "/v1/completions", content=b"{" + b" " * 70_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/models", headers={"host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    # too many at once: 4 long streams hold every slot, the 5th gets 429 at once
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "the", "max_tokens": 200,
                                                                 "stream": True, "ignore_eos": True}, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["inflight"] < 4 and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError, match="busy"):
        c.completions.create(model="tiny", prompt="the", max_tokens=3)
    stop.set()
    for t in threads:
        t.join()


def test_feedback_api_lands_in_sqlite_and_exports(server, tmp_path: Path) -> None:
    from pocketlm.cli import main

    url, _, db = server
    r = httpx.post(url + "/v1/feedback", json={"kind": "rating", "prompt": "p", "completion": "good text",
                                              "label": True})
    assert r.status_code == 200 and r.json()["stored"]
    r = httpx.post(url + "/v1/feedback", json={"kind": "compare", "prompt": "p", "chosen": "x", "rejected": "y",
                                              "meta": {"params": {"temperature": 0.8}}})
    assert r.status_code == 200
    bad = httpx.post(url + "/v1/feedback", json={"kind": "compare", "prompt": "p", "chosen": "x"})
    assert bad.status_code == 400 and "both completions" in bad.json()["error"]["message"]
    with sqlite3.connect(db) as con:  # another process's view: committed, in WAL mode
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = con.execute("SELECT kind, source, model, label, chosen FROM events WHERE prompt = 'p'").fetchall()
    assert ("rating", "api", "tiny", 1, None) in rows and ("compare", "api", "tiny", None, "x") in rows
    out = tmp_path / "fb.jsonl"
    assert main(["feedback", "export", "--db", str(db), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {"prompt": "p", "completion": "good text", "label": True}.items() <= lines[0].items()
    assert any(x.get("chosen") == "x" and x["rejected"] == "y" and x["meta"]["params"]["temperature"] == 0.8
               for x in lines)


def test_terminal_playground_rates_and_compares(model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    db = tmp_path / "t.db"
    script = "the cat\ng\nhello\nb\nthe dog\nc\nb\n:set temperature 2\n:quit\n"
    r = subprocess.run([sys.executable, "-m", "pocketlm", "playground", str(model), "--db", str(db),
                        "--max-new-tokens", "15", "--temperature", "1.0", "--device", "cpu"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "saved rating #1" in r.stdout and "saved rating #2" in r.stdout and "saved comparison #3" in r.stdout
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT kind, source, prompt, label, chosen, rejected FROM events ORDER BY id").fetchall()
    assert [(k, s, p, lab) for k, s, p, lab, _, _ in rows] == [
        ("rating", "terminal", "the cat", 1), ("rating", "terminal", "hello", 0), ("compare", "terminal", "the dog", None)]
    assert rows[2][4] != rows[2][5]  # B (the second sample) was chosen over the first
