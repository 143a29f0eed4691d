"""The web export in headless Chromium (WASM, one thread): page load time and tokens/s, fp32 against int8,
beside onnxruntime in Python and pocketlm's own engine (PyTorch); the same pages on WebGPU through
SwiftShader, Chromium's software Vulkan (this machine has no GPU: those figures show the WebGPU path works
and what it costs to start, not what a GPU would do); and the two browser runtimes the issue
names: the shipped page (onnxruntime-web + @huggingface/tokenizers + pocketlm.js's sampling loop) against
the transformers.js `text-generation` pipeline on the same ONNX files.

The model has the quickstart config (4 layers, 128 wide, context 128, no biases, a character vocabulary
from tinyshakespeare) with random weights (speed does not depend on the weights). Every contender decodes
the same prompt greedily for --tokens new tokens (prompt + tokens fit the context, so no window refill:
transformers.js cannot slide a window), one thread each, after an untimed warm-up (8 tokens; in the
browser a whole run, so WebAssembly tiers up), and tokens/s = new tokens / total time (prompt included).
Contenders alternate inside each round because this shared machine's speed drifts; medians.
A ~10M-parameter model (5 layers x 384, BPE vocabulary 4,096, context 256) is exported with int8
for the size budget.

    python benchmarks/bench_export.py --rounds 3 --tokens 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("POCKETLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
PROMPT = "ROMEO:\nWhat light"
TJS_PINS = {"@huggingface/transformers": "4.3.1"}

TJS_PAGE = """<!doctype html><meta charset="utf-8"><title>transformers.js candidate</title><div id="msg"></div>
<script type="module">
import { env, pipeline } from "./tjs/transformers.min.js";
env.allowLocalModels = true; env.allowRemoteModels = false; env.useBrowserCache = false;
env.localModelPath = "./models/";  // a path: a full URL would be taken for a remote model
env.backends.onnx.wasm.wasmPaths = new URL("./tjs/", location.href).href;
env.backends.onnx.wasm.numThreads = 1;
const t0 = performance.now();
const gen = await pipeline("text-generation", "MODEL", { dtype: "DTYPE", device: "wasm" });
window.pocketlmPage = { loadMs: performance.now() - t0 };
window.pocketlm = { lastStats: null, async generate(prompt, o) {
  const t = performance.now();
  const out = await gen(prompt, { max_new_tokens: o.max_new_tokens, do_sample: false, return_full_text: false });
  const ms = performance.now() - t, n = gen.tokenizer.encode(out[0].generated_text, { add_special_tokens: false }).length;
  window.pocketlm.lastStats = { new_tokens: n, total_ms: ms };
  return out[0].generated_text;
} };
</script>"""


def quickstart_model(folder: Path, tmp: Path) -> None:
    from pocketlm import checkpoint as ckpt
    from pocketlm import config as configlib
    from pocketlm import tokenizer as toklib
    from pocketlm.model import GPT, GPTConfig

    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tk = toklib.train_char([text], "<|endoftext|>")
    toklib.save(tk, tmp / "tok-char", "<|endoftext|>")
    m = configlib.load("quickstart").model
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tk.get_vocab_size(), block_size=m.block_size, n_layer=m.n_layer,
                          n_head=m.n_head, n_embd=m.n_embd, bias=m.bias))
    ckpt.save_model(model, folder, tmp / "tok-char", tk.token_to_id("<|endoftext|>"))


def ten_million_model(folder: Path, tmp: Path) -> int:
    from pocketlm import checkpoint as ckpt
    from pocketlm import tokenizer as toklib
    from pocketlm.model import GPT, GPTConfig

    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tk = toklib.train_bpe(iter(text.split("\n\n")), 4096, "<|endoftext|>")
    toklib.save(tk, tmp / "tok-bpe", "<|endoftext|>")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tk.get_vocab_size(), block_size=256, n_layer=5, n_head=6, n_embd=384))
    ckpt.save_model(model, folder, tmp / "tok-bpe", tk.token_to_id("<|endoftext|>"))
    return sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")


def tjs_site(onnx_dir: Path, site: Path) -> Path:
    from pocketlm.export import web

    modules = web.npm_install(TJS_PINS)
    (site / "tjs").mkdir(parents=True)
    shutil.copy2(modules / "@huggingface/transformers/dist/transformers.min.js", site / "tjs")
    ort_dist = modules / "@huggingface/transformers/node_modules/onnxruntime-web/dist"
    if not ort_dist.is_dir():
        ort_dist = modules / "onnxruntime-web/dist"
    for f in ("ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"):
        shutil.copy2(ort_dist / f, site / "tjs")
    shutil.copytree(onnx_dir, site / "models" / "qs")
    for dtype in ("fp32", "q8"):
        (site / f"{dtype}.html").write_text(TJS_PAGE.replace("MODEL", "qs").replace("DTYPE", dtype))
    return site


def browser(site: Path, page: str, n: int, backend: str | None = None) -> dict:
    from pocketlm.export.browser import Page

    with Page(site, page=page, webgpu=backend == "webgpu") as p:  # a fresh browser: nothing cached
        t0 = time.perf_counter()
        p.open()  # navigation to model ready: HTML, runtime, model download, WASM compile, session
        load_s = time.perf_counter() - t0
        if backend is not None:  # the page reports the backend it runs on
            assert p.info["backend"] == backend, p.info
        p.generate(PROMPT, max_new_tokens=n, temperature=0)  # warm-up: lets the WASM engine tier up
        text, st = p.generate(PROMPT, max_new_tokens=n, temperature=0)
        assert not p.blocked, p.blocked
    return {"load_s": load_s, "tok_s": st["new_tokens"] / (st["total_ms"] / 1000), "text": text}


def python_ort(path: Path, ids: list[int], n: int) -> dict:
    from pocketlm.export import onnx as ox

    t0 = time.perf_counter()
    dec = ox.OrtDecoder(path, threads=1)
    load_s = time.perf_counter() - t0
    ox.decode(dec, ids, 8, 128)  # warm-up
    t0 = time.perf_counter()
    out = ox.decode(dec, ids, n, 128)
    return {"load_s": load_s, "tok_s": n / (time.perf_counter() - t0), "ids": out}


def pocketlm_engine(folder: Path, n: int) -> dict:
    from pocketlm.generate import Engine, SamplingParams

    t0 = time.perf_counter()
    e = Engine.load(folder, "cpu")
    load_s = time.perf_counter() - t0
    e.generate(PROMPT, SamplingParams(max_new_tokens=8, temperature=0))  # warm-up
    t0 = time.perf_counter()
    c = e.generate(PROMPT, SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False))[0]
    return {"load_s": load_s, "tok_s": len(c.token_ids) / (time.perf_counter() - t0), "text": c.text}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pocketlm import export as exp
    from pocketlm import tokenizer as toklib

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        quickstart_model(tmp / "qs", tmp)
        ids = toklib.load(tmp / "qs").encode(PROMPT)
        onnx_rep = exp.export(tmp / "qs", "onnx", tmp / "onnx", quantize="int8")
        sites = {d: exp.export(tmp / "qs", "web", tmp / f"site-{d}", quantize=q, model_id="qs")
                 for d, q in (("fp32", None), ("int8", "int8"))}
        tjs = tjs_site(tmp / "onnx", tmp / "tjs-site")
        contenders = {
            "pocketlm engine (PyTorch)": lambda: pocketlm_engine(tmp / "qs", args.tokens),
            "onnxruntime Python fp32": lambda: python_ort(tmp / "onnx/onnx/model.onnx", ids, args.tokens),
            "onnxruntime Python int8": lambda: python_ort(tmp / "onnx/onnx/model_quantized.onnx", ids, args.tokens),
            "page fp32 (onnxruntime-web)": lambda: browser(tmp / "site-fp32", "index.html", args.tokens, "wasm"),
            "page int8 (onnxruntime-web)": lambda: browser(tmp / "site-int8", "index.html", args.tokens, "wasm"),
            "page fp32 WebGPU (SwiftShader)": lambda: browser(tmp / "site-fp32", "index.html", args.tokens, "webgpu"),
            # int8 stays on WASM by default (WebGPU has no int8 matmul); asked for, it runs mixed
            "page int8 WebGPU asked for (SwiftShader)": lambda: browser(
                tmp / "site-int8", "index.html?backend=webgpu", args.tokens, "webgpu"),
            "transformers.js fp32": lambda: browser(tjs, "fp32.html", args.tokens),
            "transformers.js q8": lambda: browser(tjs, "q8.html", args.tokens),
        }
        results: dict[str, list[dict]] = {k: [] for k in contenders}
        loads = []
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                results[name].append(contenders[name]())
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} {name}: {results[name][-1]['tok_s']:.0f} tok/s, "
                      f"load {results[name][-1]['load_s']:.2f}s", file=sys.stderr, flush=True)
        ref_text = results["pocketlm engine (PyTorch)"][0]["text"]
        base = statistics.median(x["tok_s"] for x in results["pocketlm engine (PyTorch)"])
        print("| contender | load (s) | tokens/s | vs pocketlm engine | greedy text = pocketlm's |")
        print("|---|---:|---:|---:|---|")
        for name, rs in results.items():
            tps = statistics.median(x["tok_s"] for x in rs)
            same = rs[0].get("text", None)
            if same is None:
                same = toklib.load(tmp / "qs").decode(rs[0]["ids"]) == ref_text
            else:
                same = same == ref_text
            print(f"| {name} | {statistics.median(x['load_s'] for x in rs):.2f} | {tps:,.0f} | "
                  f"{tps / base:.2f} | {'yes' if same else 'no'} |")
        print()
        for d, rep in sites.items():
            print(f"site {d}: model {rep['model_bytes'] / 1e6:.2f} MB, runtime {rep['runtime_bytes'] / 1e6:.2f} MB "
                  f"(WebGPU build {rep['webgpu_runtime_bytes'] / 1e6:.2f} MB), "
                  f"total {rep['total_bytes'] / 1e6:.2f} MB; "
                  f"transfer gzip {rep['gzip_bytes'] / 1e6:.2f} MB on WASM, {rep['webgpu_gzip_bytes'] / 1e6:.2f} MB "
                  f"on WebGPU")
        q8 = onnx_rep["variants"]["q8"]
        print(f"int8 vs PyTorch: argmax agrees {q8['argmax_agree']}/{q8['tokens']}, max |diff| {q8['max_abs_diff']:.3g}")
        tjs_rt = sum(f.stat().st_size for f in (tjs / "tjs").iterdir())
        print(f"transformers.js runtime: {tjs_rt / 1e6:.2f} MB")
        from pocketlm.export.web import gzip_bytes

        print(f"transformers.js runtime gzip: {gzip_bytes(tjs / 'tjs') / 1e6:.2f} MB")
        params = ten_million_model(tmp / "ten", tmp)
        t0 = time.perf_counter()
        big = exp.export(tmp / "ten", "web", tmp / "site-ten", quantize="int8", model_id="ten")
        v = big["variants"]["q8"]
        print(f"10M model ({params / 1e6:.2f}M parameters) web int8 export in {time.perf_counter() - t0:.0f}s: "
              f"model {big['model_bytes'] / 1e6:.2f} MB, whole folder {big['total_bytes'] / 1e6:.2f} MB, "
              f"transfer gzip {big['gzip_bytes'] / 1e6:.2f} MB on WASM, {big['webgpu_gzip_bytes'] / 1e6:.2f} MB on WebGPU; int8 argmax agrees {v['argmax_agree']}/{v['tokens']}, "
              f"greedy identical for {v['greedy_same_prefix']} tokens")
        print(f"load average during the runs: {min(loads):.1f}-{max(loads):.1f}")
        print(json.dumps({k: [{kk: vv for kk, vv in x.items() if kk in ('load_s', 'tok_s')} for x in rs]
                          for k, rs in results.items()}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
