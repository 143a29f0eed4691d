"""`--format hf`: the checkpoint's Hugging Face model folder, ready to publish, with a model card.

The weights, config, generation config and tokenizer are copied as they are (they already are the standard
layout); the trainer state is left behind. README.md is a model card with Hub metadata: where the training
data came from (the dataset manifest), the model and training config, the metrics the run logged, intended
use and limits, and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pocketlm import export as common


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _metrics(run: Path | None) -> dict[str, Any]:
    """Final and best values from metrics.jsonl (torn or foreign lines are skipped)."""
    out: dict[str, Any] = {}
    if run is None or not (run / "metrics.jsonl").is_file():
        return out
    best = None
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        for k, v in rec.items():  # losses and quality metrics; lr, grad norms and timings are noise here
            if isinstance(v, (int, float)) and any(w in k for w in ("loss", "ppl", "perplexity", "acc")) \
                    and "best" not in k:
                out[f"final {k}"] = v
        if isinstance(rec.get("val/loss"), (int, float)) and (best is None or rec["val/loss"] < best[1]):
            best = (rec.get("step"), rec["val/loss"])
    if best:
        out["best val/loss"], out["best val/loss step"] = best[1], best[0]
    return out


def gather(folder: Path) -> dict[str, Any]:
    """Everything the card says, from the files beside the checkpoint."""
    from safetensors import safe_open

    config = _read_json(folder / "config.json")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # a tied head is stored once
    run = common.run_folder(folder)
    run_cfg: dict[str, Any] = {}
    if run is not None and (run / "config.yaml").is_file():
        try:
            run_cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            run_cfg = {}
    manifest: dict[str, Any] = {}
    data_path = (run_cfg.get("data") or {}).get("path") if isinstance(run_cfg, dict) else None
    if data_path:
        for cand in (Path(data_path), (run / data_path) if run else None):
            if cand is not None and (cand / "manifest.json").is_file():
                manifest = _read_json(cand / "manifest.json")
                break
    return {"config": config, "parameters": params, "run": run, "run_config": run_cfg, "manifest": manifest,
            "trainer": _read_json(folder / "trainer_state.json"), "metrics": _metrics(run),
            "generation": _read_json(folder / "generation_config.json")}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def model_card(info: dict[str, Any], name: str) -> str:
    cfg, m, tr = info["config"], info["manifest"], info["trainer"]
    arch = (cfg.get("architectures") or ["?"])[0]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- pocketlm",
             f"- {cfg.get('model_type', 'causal-lm')}", "---", "", f"# {name}", "",
             f"A {info['parameters'] / 1e6:.2f}M-parameter {arch} language model trained from scratch with "
             "pocketlm on the text described below. It continues text in the style of "
             "that text; it has no instruction tuning and no knowledge beyond it.", ""]
    lines += ["## Training data", ""]
    if m:
        tok = m.get("tokenizer", {})
        lines.append(f"Tokenizer: {tok.get('kind', '?')}, vocabulary {_fmt(tok.get('vocab_size', '?'))}, "
                     f"end-of-text `{tok.get('eot_token', '?')}`. Documents separated by `{m.get('separator')}`; "
                     f"split seed {m.get('split_seed')}.")
        lines += ["", "| split | tokens | documents |", "| --- | ---: | ---: |"]
        for split, s in (m.get("splits") or {}).items():
            lines.append(f"| {split} | {_fmt(s.get('tokens', 0))} | {_fmt(s.get('documents', 0))} |")
        inputs = m.get("inputs") or []
        if inputs:
            lines += ["", "Inputs:", ""]
            for inp in inputs[:20]:
                if isinstance(inp, dict):
                    desc = ", ".join(f"{k} {_fmt(v)}" for k, v in inp.items() if k != "path")
                    lines.append(f"- `{Path(str(inp.get('path', '?'))).name}` ({desc})")
            if len(inputs) > 20:
                lines.append(f"- ... and {len(inputs) - 20} more")
    else:
        lines.append("No dataset manifest was found beside this checkpoint; describe the training data here "
                     "before publishing.")
    lines += ["", "## Model", "", "| field | value |", "| --- | --- |"]
    for k in ("model_type", "vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "max_position_embeddings",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size"):
        if k in cfg:
            lines.append(f"| {k} | {_fmt(cfg[k])} |")
    lines.append(f"| parameters | {_fmt(info['parameters'])} |")
    rc = info["run_config"]
    if isinstance(rc, dict) and rc.get("train"):
        local = ("out", "device", "threads", "compile")  # this machine's settings, not the recipe
        recipe = {"model": rc.get("model", {}),
                  "train": {k: v for k, v in (rc.get("train") or {}).items() if k not in local}}
        lines += ["", "## Training", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    lines += ["", "## Results", ""]
    res = {**({"step": tr["step"], "tokens seen": tr.get("tokens"), "best val loss (trainer)": tr.get("best_val"),
               "training time (s)": tr.get("elapsed")} if "step" in tr else {}), **info["metrics"]}
    res = {k: v for k, v in res.items() if v is not None}
    if res:
        lines += ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {_fmt(v)} |" for k, v in res.items()]
        lines += ["", "Losses are mean cross-entropy per token (nats) on the held-out split."]
    else:
        lines.append("No metrics were logged with this checkpoint.")
    lines += ["", "## Intended use and limits", "",
              "Text generation in the style of the training data: drafts, games, demos, teaching how language "
              "models work. It is a small model trained on a small corpus: it invents facts, repeats itself and "
              "reproduces the biases and any personal data of its training text. Do not use it for decisions "
              "about people or as a source of facts.", "", "## How to load", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'ids = tok("ROMEO:", return_tensors="pt").input_ids',
              "print(tok.decode(model.generate(ids, max_new_tokens=100, do_sample=True)[0]))", "```", "",
              "or with pocketlm: `pocketlm generate path/to/this/folder --prompt 'ROMEO:'`.", ""]
    gen = {k: v for k, v in info["generation"].items() if k in ("temperature", "top_k", "top_p", "max_new_tokens")}
    if gen:
        lines += [f"Sampling defaults (generation_config.json): {', '.join(f'{k} {v}' for k, v in gen.items())}.", ""]
    return "\n".join(lines)


def export(folder: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    def build(tmp: Path) -> dict[str, Any]:
        common.copy_model_files(folder, tmp)
        info = gather(folder)
        (tmp / "README.md").write_text(model_card(info, out.resolve().name), encoding="utf-8")
        return {"format": "hf", "out": str(out), "parameters": info["parameters"],
                "model_bytes": common.folder_bytes(tmp), "files": sorted(p.name for p in tmp.iterdir())}

    return common.write_folder(out, overwrite, build)
