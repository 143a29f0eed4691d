"""`--format web`: a self-contained static folder that runs the model in the browser.

  index.html          prompt, sampling controls, streamed output, load progress, tokens/s
  pocketlm.js         the ES module (load, generate, sample); importing it sets window.pocketlm
  pocketlm.json       model id, title, default prompt, sampling defaults, the model file to load
  models/<id>/        config, generation config, tokenizer files, onnx/<one variant>.onnx
  runtime/            @huggingface/tokenizers and NOTICE.txt (the licences)
  runtime/wasm/       onnxruntime-web's WebAssembly build: what a browser without WebGPU loads
  runtime/webgpu/     onnxruntime-web's WebGPU build (its own, larger WASM with the WebGPU execution provider):
                      loaded instead of runtime/wasm/, only when the browser offers a WebGPU adapter

The runtime comes from the npm registry at export time: pinned versions are installed once into a cache
(~/.cache/pocketlm/npm/<pins>) and copied from there, so nothing is committed and the page loads nothing
from any other host. onnxruntime-web + tokenizers + a short sampling loop beat the transformers.js pipeline
on this machine (2.3-2.8x the tokens/s, 3.7 against 6.9 MB of gzipped runtime, two thirds of the load time; see
docs/benchmarks.md), so that is what ships. The page imports one of the two onnxruntime-web builds on demand,
so a WASM visitor transfers no WebGPU bytes; the report gives each path's transfer separately.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from pocketlm import export as common
from pocketlm.errors import PocketLMError

FORMAT_VERSION = 1
# what the page ships: pinned, so every export of the same model is byte-identical
NPM_PINS = {"onnxruntime-web": "1.30.0", "@huggingface/tokenizers": "0.2.0"}
RUNTIME_FILES = {  # npm package -> {folder under runtime/: files copied there}
    # ort.webgpu.* is the WebGPU execution provider compiled into the asyncify WASM (it also runs the CPU
    # kernels); ort.min.mjs's jsep build is the older JavaScript WebGPU provider, ort.jspi.* needs JSPI
    # (Chromium only), so the asyncify build is the one every WebGPU browser runs
    "onnxruntime-web": {
        "wasm": ["dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm"],
        "webgpu": ["dist/ort.webgpu.min.mjs", "dist/ort-wasm-simd-threaded.asyncify.mjs",
                   "dist/ort-wasm-simd-threaded.asyncify.wasm"],
    },
    "@huggingface/tokenizers": {"": ["dist/tokenizers.min.mjs"]},
}
DEFAULT_CACHE = Path.home() / ".cache" / "pocketlm" / "npm"


# ---- the npm cache ------------------------------------------------------------------------------------------

def npm_install(pins: dict[str, str], cache: str | Path | None = None, verbose: bool = True) -> Path:
    """node_modules holding exactly `pins`, installed once per set of pins (the registry is needed only then)."""
    cache = Path(cache) if cache else Path(os.environ.get("POCKETLM_NPM_CACHE", DEFAULT_CACHE))
    key = hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()[:12]
    dest = cache / key
    if (dest / "node_modules" / ".pocketlm-complete").is_file():
        return dest / "node_modules"
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise PocketLMError("the web export fetches its browser runtime from the npm registry once and needs Node.js "
                            "and npm for that: install Node 18+ (https://nodejs.org, or `apt-get install nodejs npm`) "
                            "and run the export again")
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "package.json").write_text(json.dumps({"private": True, "dependencies": pins}, indent=2))
    if verbose:
        print(f"pocketlm export: installing {', '.join(f'{k}@{v}' for k, v in pins.items())} into {dest} (once)",
              flush=True, file=sys.stderr)
    # --ignore-scripts: nothing runs at install time (transformers.js's node runtime would try to download)
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}
    try:
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        r = None
    if r is None or r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = "timed out after 10 minutes" if r is None else \
            (r.stderr.strip().splitlines() or ["exit code " + str(r.returncode)])[-1][:200]
        raise PocketLMError(f"npm install of the browser runtime failed ({detail}): check that "
                            f"https://registry.npmjs.org is reachable (or set npm's registry/proxy) and try again")
    (tmp / "node_modules" / ".pocketlm-complete").write_text(json.dumps(pins))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest / "node_modules"


def copy_runtime(modules: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The runtime files (but the folders in `skip`), and NOTICE.txt naming each package, its version and
    licence (+ its LICENSE file)."""
    notice = []
    for pkg, folders in RUNTIME_FILES.items():
        copied = []
        for sub, files in folders.items():
            if sub in skip:
                continue
            (dst / sub).mkdir(parents=True, exist_ok=True)
            for f in files:
                src = modules / pkg / f
                if not src.is_file():
                    raise PocketLMError(f"{src} is missing from the npm cache: delete {modules.parent} and "
                                        "export again")
                shutil.copy2(src, dst / sub / Path(f).name)
                copied.append(f"{sub}/{Path(f).name}".lstrip("/"))
        meta = json.loads((modules / pkg / "package.json").read_text(encoding="utf-8"))
        notice.append(f"{pkg} {meta.get('version')} (npm), licence: {meta.get('license')}, files: {', '.join(copied)}")
        if (modules / pkg / "LICENSE").is_file():
            notice.append((modules / pkg / "LICENSE").read_text(encoding="utf-8", errors="replace"))
    (dst / "NOTICE.txt").write_text("\n\n".join(notice) + "\n", encoding="utf-8")


# ---- the site ---------------------------------------------------------------------------------------------

def gzip_bytes(folder: Path, skip: tuple[Path, ...] = ()) -> int:
    """What the folder transfers from a server that gzips every response (level 6, the common default),
    leaving out the folders in `skip` (those a visitor's browser does not fetch)."""
    return sum(len(gzip.compress(p.read_bytes(), 6)) for p in folder.rglob("*")
               if p.is_file() and not any(p.is_relative_to(s) for s in skip))


def _asset(name: str) -> str:
    return resources.files("pocketlm.export").joinpath("web_assets", name).read_text(encoding="utf-8")


def _default_prompt(folder: Path) -> str:
    run = common.run_folder(folder)
    if run is not None and (run / "config.yaml").is_file():
        from pocketlm import config as configlib

        try:
            return configlib.load(run / "config.yaml").sample.prompt.replace("\\n", "\n")
        except PocketLMError:
            pass
    return ""


def build(folder: Path, out: Path, quantize: str | None, model_id: str | None = None, title: str | None = None,
          default_prompt: str | None = None, npm_cache: str | None = None, verbose: bool = True,
          check_tokens: int = 200, webgpu: bool = True) -> dict[str, Any]:
    from pocketlm.export import onnx as ox

    model_id = model_id or (folder.parent.name if folder.name in ("best", "last") else folder.name)
    if not model_id or "/" in model_id or model_id.startswith(".") or "\\" in model_id:
        raise PocketLMError(f"--model-id {model_id!r} must be a plain folder name (no slashes, not starting with '.')")
    modules = npm_install(NPM_PINS, npm_cache, verbose)  # first: a missing npm fails before any slow work
    model_dir = out / "models" / model_id
    report = ox.build(folder, model_dir, quantize, verbose, keep_fp32=False, check_tokens=check_tokens)
    # without WebGPU the folder is 27 MB smaller and no file exceeds 25 MiB (Cloudflare Pages' per-file limit)
    copy_runtime(modules, out / "runtime", skip=() if webgpu else ("webgpu",))
    dtype = ox.JS_DTYPES[quantize]
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    gen = json.loads((folder / "generation_config.json").read_text(encoding="utf-8")) \
        if (folder / "generation_config.json").is_file() else {}
    session = ox.OrtDecoder(model_dir / "onnx" / ox.VARIANT_FILES[quantize])
    past = session.past_inputs[0]
    info = {
        "format_version": FORMAT_VERSION, "title": title or model_id,
        "prompt": default_prompt if default_prompt is not None else _default_prompt(folder),
        "model": {
            "id": model_id, "path": f"models/{model_id}/", "dtype": dtype, "file": f"onnx/{ox.VARIANT_FILES[quantize]}",
            "files": {dtype: f"onnx/{ox.VARIANT_FILES[quantize]}"}, "parameters": report["parameters"],
            "context_length": int(cfg.get("n_positions") or cfg.get("max_position_embeddings")),
            "eos_token_id": gen.get("eos_token_id", cfg.get("eos_token_id")),
            "kv_heads": past.shape[1], "head_dim": past.shape[3],
            "kv_dtype": "float16" if session.dtype.__name__ == "float16" else "float32", "webgpu": webgpu,
            "sampling": {"temperature": gen.get("temperature", 0.8), "top_k": gen.get("top_k", 0) or 0,
                         "top_p": gen.get("top_p", 1.0), "max_new_tokens": gen.get("max_new_tokens", 200)},
        },
    }
    (out / "pocketlm.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "pocketlm.js").write_text(_asset("pocketlm.js"), encoding="utf-8")
    page = _asset("index.html")
    for key, value in {"__TITLE__": info["title"], "__MODEL_ID__": model_id, "__DTYPE__": dtype,
                       "__PARAMS__": f"{report['parameters'] / 1e6:.2f}M"}.items():
        page = page.replace(key, html.escape(value))
    (out / "index.html").write_text(page, encoding="utf-8")
    return {"format": "web", "dtype": dtype, "parameters": report["parameters"], "variants": report["variants"],
            **sizes(out), "npm": NPM_PINS}


def sizes(out: Path) -> dict[str, int]:
    """Bytes on disk and gzip-transferred. A visitor fetches the page, the model and runtime/ with ONE of
    runtime/wasm/ (no WebGPU: `gzip_bytes`) or runtime/webgpu/ (`webgpu_gzip_bytes`), never both."""
    rt, wasm, webgpu = out / "runtime", out / "runtime" / "wasm", out / "runtime" / "webgpu"
    model_bytes, total = common.folder_bytes(out / "models"), common.folder_bytes(out)
    runtime_bytes, webgpu_bytes = common.folder_bytes(rt) - common.folder_bytes(webgpu), common.folder_bytes(webgpu)
    return {"model_bytes": model_bytes, "runtime_bytes": runtime_bytes, "webgpu_runtime_bytes": webgpu_bytes,
            "page_bytes": total - model_bytes - runtime_bytes - webgpu_bytes, "total_bytes": total,
            "gzip_bytes": gzip_bytes(out, skip=(webgpu,)), "webgpu_gzip_bytes": gzip_bytes(out, skip=(wasm,)),
            "model_gzip_bytes": gzip_bytes(out / "models"), "runtime_gzip_bytes": gzip_bytes(rt, skip=(webgpu,)),
            "webgpu_runtime_gzip_bytes": gzip_bytes(webgpu)}


def export(folder: Path, out: Path, quantize: str | None = None, overwrite: bool = False, verbose: bool = True,
           **options: Any) -> dict[str, Any]:
    return common.write_folder(out, overwrite, lambda tmp: {**build(folder, tmp, quantize, verbose=verbose, **options),
                                                            "out": str(out)})


def summary(report: dict[str, Any]) -> list[str]:
    from pocketlm.export import onnx as ox

    m = common.mb
    webgpu = report["webgpu_runtime_bytes"] > 0
    return ox.summary(report) + [
        f"  model    {m(report['model_bytes']):>10}  ({m(report['model_gzip_bytes'])} gzipped)",
        f"  runtime  {m(report['runtime_bytes']):>10}  ({m(report['runtime_gzip_bytes'])} gzipped): "
        + ", ".join(f"{k} {v}" for k, v in report["npm"].items()),
        f"  webgpu   {m(report['webgpu_runtime_bytes']):>10}  ({m(report['webgpu_runtime_gzip_bytes'])} gzipped): "
        "fetched instead of runtime/wasm/ only when the page runs on WebGPU" if webgpu else
        "  webgpu   left out (--no-webgpu): the page runs on WASM",
        f"  page     {m(report['page_bytes']):>10}",
        f"  total    {m(report['total_bytes']):>10}  on disk; a visitor transfers {m(report['gzip_bytes'])} gzipped "
        + (f"(WASM) or {m(report['webgpu_gzip_bytes'])} (WebGPU)" if webgpu else "(WASM)"),
        f"serve it from any static host, e.g.  python -m http.server -d {report['out']} 8080",
    ]
