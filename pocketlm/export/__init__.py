"""Export a trained model: `hf` (the model folder + a model card), `onnx` (a decoder with past key values in
the layout transformers.js and ONNX Runtime load) and `web` (a static page that runs the model in the browser).

One module per format; this module holds what they share: finding the model folder, refusing architectures
the exporter cannot handle, writing the output folder atomically and measuring what was written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pocketlm import atomic
from pocketlm import checkpoint as ckpt
from pocketlm.errors import PocketLMError

FORMATS = ("hf", "onnx", "web")
QUANTIZE = ("int8", "fp16", "q4")
# architectures whose decoder the ONNX wrapper has been checked against (tests/test_export_onnx.py)
SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def model_folder(path: str | Path) -> Path:
    """A run folder (its best/) or checkpoint folder holding a supported model, config and tokenizer."""
    folder = ckpt.resolve(path)
    cfg = ckpt.read_hf_config(folder)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise PocketLMError(f"{folder} holds a {arch or cfg.get('model_type') or 'unknown'} model; pocketlm export "
                            f"supports {' and '.join(SUPPORTED)} (decoder-only models with a KV cache)")
    if not (folder / "model.safetensors").is_file():
        raise PocketLMError(f"{folder} has no model.safetensors (pocketlm exports safetensors weights only)")
    if not (folder / "tokenizer.json").is_file():
        raise PocketLMError(f"{folder} has no tokenizer.json: copy the dataset's tokenizer files into it")
    return folder


def run_folder(folder: Path) -> Path | None:
    """The training run a checkpoint came from (the folder holding config.yaml and metrics.jsonl), if any."""
    for cand in (folder, folder.parent):
        if (cand / "config.yaml").is_file() or (cand / "metrics.jsonl").is_file():
            return cand
    return None


def copy_model_files(src: Path, dst: Path, weights: bool = True) -> None:
    """config, generation config and tokenizer files (and the weights); never the trainer state."""
    from pocketlm import tokenizer as toklib

    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES if weights else MODEL_FILES[:2]:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    toklib.copy_files(src, dst)


def prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temp folder beside `out`; refuses to replace a non-empty `out` unless told to."""
    atomic.recover(out)
    if out.exists() and not out.is_dir():
        raise PocketLMError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PocketLMError(f"{out} already exists and is not empty: pass --overwrite or choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_folder(out: str | Path, overwrite: bool, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run `build(tmp)` into a temp folder and swap it in as `out` only when it completed."""
    out = Path(out)
    tmp = prepare_out(out, overwrite)
    try:
        report = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.replace_dir(tmp, out)
    return report


def folder_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def export(model: str | Path, fmt: str, out: str | Path, quantize: str | None = None, overwrite: bool = False,
           verbose: bool = True, **options: Any) -> dict[str, Any]:
    """Export a run or checkpoint folder; returns a report (files, sizes, checks) that the CLI prints."""
    if fmt not in FORMATS:
        raise PocketLMError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise PocketLMError(f"unknown --quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if fmt != "web" and set(options) - {"check_tokens"}:
        raise PocketLMError(f"{', '.join(options)}: web page options, for --format web only")
    if fmt == "hf" and quantize:
        raise PocketLMError("--format hf writes the float32 weights as trained; --quantize is for onnx and web")
    folder = model_folder(model)
    if fmt == "hf":
        from pocketlm.export import hf

        return hf.export(folder, Path(out), overwrite=overwrite)
    if fmt == "onnx":
        from pocketlm.export import onnx

        return onnx.export(folder, Path(out), quantize=quantize, overwrite=overwrite, verbose=verbose, **options)
    from pocketlm.export import web

    return web.export(folder, Path(out), quantize=quantize, overwrite=overwrite, verbose=verbose, **options)
