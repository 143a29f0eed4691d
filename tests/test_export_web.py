"""The web export in real headless Chromium: greedy text equals Python's on WASM and on WebGPU (SwiftShader's
software adapter), the page falls back to WASM where WebGPU is missing or cannot run the model, and no request
leaves the folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pocketlm import checkpoint as ckpt
from pocketlm import export as exp
from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError
from pocketlm.export import web
from pocketlm.generate import Engine, SamplingParams
from pocketlm.model import GPT, GPTConfig
from tests.conftest import make_corpus

pytest.importorskip("onnxruntime")
PROMPT = "the dog ran to"


@pytest.fixture(scope="session")
def npm_modules() -> Path:
    """The pinned runtime, installed from the npm registry once per machine (then read from the cache)."""
    return web.npm_install(web.NPM_PINS, verbose=False)


def bpe_model(folder: Path, tmp: Path) -> None:
    """A random-init GPT with a byte-level BPE tokenizer: the tokenizer the browser must reproduce exactly."""
    text = make_corpus(tmp / "text").read_text()
    tk = toklib.train_bpe(iter([text]), 300, "<|endoftext|>")
    toklib.save(tk, tmp / "tok", "<|endoftext|>")
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=tk.get_vocab_size(), block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # large random weights: a chaotic model whose greedy text depends on all its context
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.35)
    ckpt.save_model(model, folder, tmp / "tok", tk.token_to_id("<|endoftext|>"),
                    {"temperature": 0.7, "top_k": 20, "max_new_tokens": 50})


@pytest.mark.slow
@pytest.mark.browser
def test_page_generates_python_greedy_text_offline(tmp_path: Path, npm_modules: Path) -> None:
    from pocketlm.export.browser import Page

    bpe_model(tmp_path / "ckpt", tmp_path)
    site = tmp_path / "site"
    report = exp.export(tmp_path / "ckpt", "web", site, model_id="tiny-bpe", title="Tiny <test>",
                        default_prompt=PROMPT, verbose=False, check_tokens=40)
    assert report["runtime_bytes"] > report["model_bytes"] > 0 and report["gzip_bytes"] < 20e6
    # a WASM visitor transfers no WebGPU bytes: the two onnxruntime-web builds are alternatives
    assert report["webgpu_runtime_bytes"] > report["runtime_bytes"]
    webgpu_only = report["webgpu_runtime_gzip_bytes"]
    assert report["gzip_bytes"] + webgpu_only > report["webgpu_gzip_bytes"] > report["gzip_bytes"]
    info = json.loads((site / "pocketlm.json").read_text())
    assert info["model"]["file"] == "onnx/model.onnx" and info["prompt"] == PROMPT
    assert "Tiny &lt;test&gt;" in (site / "index.html").read_text()

    engine = Engine.load(tmp_path / "ckpt", "cpu")
    # 70 tokens through a 32-token window: the page must refill its cache exactly like the Python engine
    ref = engine.generate(PROMPT, SamplingParams(max_new_tokens=70, temperature=0))[0]
    expected = ref.text  # chaotic bytes, invalid UTF-8 included: the browser must decode them the same way
    with Page(site) as page:  # --disable-gpu: navigator.gpu exists but hands out no adapter
        page.open()
        assert page.info["backend"] == "wasm" and "no WebGPU adapter" in page.info["backendNote"], page.info
        text, stats = page.generate(PROMPT, max_new_tokens=70, temperature=0)
        assert text == expected and stats["new_tokens"] == len(ref.token_ids) == 70 and stats["backend"] == "wasm"
        # top-k 1 and a tiny top-p leave one candidate: sampling must reduce to greedy
        assert page.generate(PROMPT, max_new_tokens=70, temperature=1.0, top_k=1)[0] == expected
        assert page.generate(PROMPT, max_new_tokens=70, temperature=1.0, top_p=0.001, seed=1)[0] == expected
        sampled = page.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7)[0]
        assert sampled == page.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7)[0]  # seeded
        # the page's own controls: streamed output and a tokens/s line
        page.page.fill("#max_new_tokens", "20")
        page.page.click("#go")
        page.page.wait_for_function("document.getElementById('msg').textContent.includes('tokens/s after')")
        assert page.page.inner_text("#out").startswith(PROMPT) and page.page.inner_text("#backend") == "WASM"
        assert not [u for u in page.requests if "/runtime/webgpu/" in u], page.requests  # never fetched
        assert page.blocked == [], page.blocked
        assert not [c for c in page.console if c.startswith(("error", "pageerror"))], page.console


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("kind", ["int8", "q4", "fp16"])
def test_quantized_page_matches_onnxruntime_python(tmp_path: Path, npm_modules: Path, kind: str) -> None:
    """A quantized page ships only its variant; the browser's WASM kernels pick the tokens onnxruntime picks
    in Python on the same file (fp16: half-precision logits and cache decoded in the page)."""
    from pocketlm.export import onnx as ox
    from pocketlm.export.browser import Page

    bpe_model(tmp_path / "ckpt", tmp_path)
    site = tmp_path / "site"
    exp.export(tmp_path / "ckpt", "web", site, quantize=kind, verbose=False, check_tokens=20)
    file = site / "models" / "ckpt" / "onnx" / ox.VARIANT_FILES[kind]
    assert list(file.parent.iterdir()) == [file]
    tok = toklib.load(tmp_path / "ckpt")
    ids = ox.decode(ox.OrtDecoder(file), tok.encode(PROMPT), 50, 32)
    with Page(site) as page:
        page.open()
        text, stats = page.generate(PROMPT, max_new_tokens=50, temperature=0, stop_at_eot=False)
        assert page.blocked == []
    assert text == tok.decode(ids) and stats["new_tokens"] == 50


def webgpu_page(site: Path, **kw: Any) -> Any:
    """The page in Chromium with SwiftShader's WebGPU adapter; skips only where Chromium hands out no adapter."""
    from pocketlm.export.browser import Page

    page = Page(site, webgpu=True, **kw).__enter__()
    page.page.goto(page.server.url + "runtime/NOTICE.txt")  # a secure context (loopback) without the model
    adapter = page.page.evaluate("async () => !!navigator.gpu && !!(await navigator.gpu.requestAdapter())")
    if not adapter:
        page.__exit__()
        pytest.skip(f"this Chromium offers no WebGPU adapter even with {' '.join(page.args)}")
    return page


@pytest.mark.slow
@pytest.mark.browser
def test_page_on_webgpu_generates_python_greedy_text(tmp_path: Path, npm_modules: Path) -> None:
    """fp32 on WebGPU: the KV cache stays on the GPU between steps (70 tokens through a 32-token window, so
    the refill too) and the text equals PyTorch's greedy text. SwiftShader runs the same WGSL shaders a GPU
    would, in software; a float difference could in principle flip a near-tie, but this model's text matches."""
    from pocketlm.export.browser import Page

    bpe_model(tmp_path / "ckpt", tmp_path)
    site = tmp_path / "site"
    exp.export(tmp_path / "ckpt", "web", site, verbose=False, check_tokens=20)
    engine = Engine.load(tmp_path / "ckpt", "cpu")
    expected = engine.generate(PROMPT, SamplingParams(max_new_tokens=70, temperature=0))[0]
    page = webgpu_page(site)
    try:
        page.open()
        assert page.info["backend"] == "webgpu", page.info
        text, stats = page.generate(PROMPT, max_new_tokens=70, temperature=0)
        assert stats["backend"] == "webgpu" and stats["new_tokens"] == 70 and text == expected.text
        page.page.fill("#max_new_tokens", "10")
        page.page.click("#go")
        page.page.wait_for_function("document.getElementById('msg').textContent.includes('tokens/s after')")
        assert page.page.inner_text("#backend") == "WebGPU"
        assert [u for u in page.requests if "/runtime/webgpu/ort-wasm-simd-threaded.asyncify.wasm" in u]
        assert not [u for u in page.requests if "/runtime/wasm/" in u], page.requests  # the WASM build: not fetched
        assert page.blocked == [], page.blocked
        assert not [c for c in page.console if c.startswith(("error", "pageerror"))], page.console
        # with an adapter, ?backend=wasm still picks WASM; a browser without navigator.gpu falls back by itself
        page.page_name = "index.html?backend=wasm"
        page.open()
        assert page.info["backendNote"] == "WASM (asked for)"
        page.page_name = "index.html"
        page.context.add_init_script("Object.defineProperty(Navigator.prototype, 'gpu', {get: () => undefined})")
        page.open()
        assert page.info["backendNote"] == "WASM: this browser has no WebGPU"
        assert page.generate(PROMPT, max_new_tokens=20, temperature=0)[1]["token_ids"] == expected.token_ids[:20]
    finally:
        page.__exit__()
    # --no-webgpu: no WebGPU runtime in the folder, and the page stays on WASM even where an adapter exists
    lean = tmp_path / "lean"
    report = exp.export(tmp_path / "ckpt", "web", lean, verbose=False, check_tokens=20, webgpu=False)
    assert not (lean / "runtime" / "webgpu").exists() and report["webgpu_runtime_bytes"] == 0
    assert "left out (--no-webgpu)" in "\n".join(web.summary(report))
    page = webgpu_page(lean)
    try:
        page.open()
        assert page.info["backend"] == "wasm", page.info
        assert page.info["backendNote"] == "WASM: exported without WebGPU (--no-webgpu)"
        assert page.generate(PROMPT, max_new_tokens=20, temperature=0)[1]["token_ids"] == expected.token_ids[:20]
        assert not [u for u in page.requests if "/runtime/webgpu/" in u], page.requests
    finally:
        page.__exit__()


@pytest.mark.slow
@pytest.mark.browser
def test_webgpu_skips_models_it_cannot_run(tmp_path: Path, npm_modules: Path) -> None:
    """int8 (MatMulInteger: no WebGPU kernel) stays on WASM unless WebGPU is asked for; fp16 needs shader-f16,
    which SwiftShader's adapter lacks, so it falls back to WASM even when asked for. Asked for, int8 runs on
    WebGPU (its matmuls on the CPU) and picks the tokens onnxruntime picks in Python, up to a first near-tie."""
    from pocketlm.export import onnx as ox

    bpe_model(tmp_path / "ckpt", tmp_path)
    tok = toklib.load(tmp_path / "ckpt")
    for kind in ["int8", "fp16"]:
        site = tmp_path / kind
        exp.export(tmp_path / "ckpt", "web", site, quantize=kind, verbose=False, check_tokens=10)
        ref = ox.decode(ox.OrtDecoder(site / "models/ckpt/onnx" / ox.VARIANT_FILES[kind]), tok.encode(PROMPT), 20, 32)
        page = webgpu_page(site, page="index.html?backend=webgpu" if kind == "int8" else "index.html")
        try:
            page.open()
            text, stats = page.generate(PROMPT, max_new_tokens=20, temperature=0, stop_at_eot=False)
            if kind == "fp16":
                assert page.info["backendNote"] == "WASM: this GPU lacks shader-f16, which the fp16 model needs"
                assert stats["token_ids"] == ref and text == tok.decode(ref)
            else:
                assert page.info["backend"] == stats["backend"] == "webgpu" and len(stats["token_ids"]) == 20
                # the float ops around the int8 matmuls run on the GPU: a near-tie may flip later on
                assert stats["token_ids"][:5] == ref[:5], (stats["token_ids"], ref)
                auto = page.page.evaluate(
                    "async () => (await window.pocketlm.chooseBackend('auto', {dtype: 'q8'})).note")
                assert "no kernels for this int8" in auto
        finally:
            page.__exit__()


def test_missing_npm_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web.shutil, "which", lambda name: None)
    with pytest.raises(PocketLMError, match="needs Node.js and npm.*install Node"):
        web.npm_install({"onnxruntime-web": "1.30.0"}, tmp_path / "empty-cache", verbose=False)
    with pytest.raises(PocketLMError, match="--model-id"):
        bpe_model(tmp_path / "ckpt", tmp_path)
        exp.export(tmp_path / "ckpt", "web", tmp_path / "site", model_id="../up", verbose=False)
    assert not (tmp_path / "site").exists()
