"""Shared pieces of the serving tests: a tiny model that writes markup, and a real uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare
from pocketlm.train import train
from tests.conftest import WORDS, tiny_config

MARKUP = "hello <img src=x onerror=alert(1)><script>alert(2)</script>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def markup_model(tmp_path_factory) -> Path:
    """A char-level model trained on word sentences and on a line of markup: greedy 'hello' -> the markup.

    Built once per test session (whichever test module asks first) and reused; set POCKETLM_TEST_CACHE=DIR to
    keep it between sessions while working on the server."""
    cache = os.environ.get("POCKETLM_TEST_CACHE")
    root = (Path(cache) if cache else tmp_path_factory.getbasetemp()) / "markup-model"
    run = root / "run"
    if (run / "best" / "model.safetensors").is_file():
        return run
    rng = random.Random(0)
    docs = []
    for i in range(120):
        if i % 2:
            docs.append(MARKUP)
        else:
            docs.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + "."
                                  for _ in range(2)))
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "text" / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    prepare([root / "text"], root / "data", DataConfig(tokenizer="char", val_fraction=0.1), verbose=False)
    train(tiny_config(root / "data", run, **{"train.max_steps": 150, "model.n_embd": 32,
                                              "train.eval_interval": 150, "train.batch_size": 8}), verbose=False)
    return run


def with_chat_template(run: Path, dst: Path) -> Path:
    """A copy of the model's checkpoint whose tokenizer_config.json has a chat template (the standard HF field)."""
    shutil.copytree(run / "best", dst)
    cfg_file = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    return dst


@contextlib.contextmanager
def running_server(model: Path, db: Path, **options) -> Iterator[tuple[str, object]]:
    """A real uvicorn server on a free loopback port, in a thread -> (base URL, app)."""
    from pocketlm.serve.app import ServeOptions, build, make_server

    opts = ServeOptions(model_name="tiny", **options)
    app, _, store = build(model, opts, db, device="cpu")
    server, sock = make_server(app, "127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        store.close()
