"""`--format hf`: the checkpoint's Hugging Face model folder, ready to publish, with a model card.

The weights, config, generation config and tokenizer are copied as they are (they already are the standard
layout); the trainer state is left behind. README.md is a model card with Hub metadata: how the model was made
(from scratch, fine-tuned from a base model, SFT on conversations or preference-tuned on feedback: read from
the run's config.yaml and tune.json), where the training data came from (the dataset manifest), the model and
training config, the metrics the run logged, intended use and limits, and how to load it.
"""

from __future__ import annotations

import json
import re
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
            "generation": _read_json(folder / "generation_config.json"),
            "tune": _read_json(run / "tune.json") if run is not None else {},
            "sft": _read_json(run / "sft.json") if run is not None else {},
            "chat_template": bool(_read_json(folder / "tokenizer_config.json").get("chat_template"))}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def origin(info: dict[str, Any]) -> dict[str, Any]:
    """How the run made this model, from its files: {"kind": "scratch" | "finetune" | "sft" | "preference",
    "base": a short name of what it started from, "hub_id": the Hub id it started from (or None), ...}.

    `pocketlm tune` writes tune.json beside its run; `train --init-from` and `sft` record finetune.init_from
    in config.yaml, and an SFT run has no prepared dataset (data.path is empty: its conversations are a JSONL
    file) while a fine-tune on text needs one."""
    rc = info["run_config"] if isinstance(info["run_config"], dict) else {}
    ft, data = rc.get("finetune") or {}, rc.get("data") or {}
    tune = info.get("tune") or {}
    if tune.get("method"):
        return {"kind": "preference", "method": str(tune["method"]).upper(), "beta": tune.get("beta"),
                "base": _short(str(tune.get("base", "?"))), "hub_id": None, "examples": tune.get("examples"),
                "pairs": tune.get("pairs"), "ratings": tune.get("ratings"), "lm_data": tune.get("lm_data")}
    source = str(ft.get("init_from") or "")
    if not source:
        return {"kind": "scratch", "base": None, "hub_id": None}
    local = source.startswith("nanogpt:") or Path(source).exists() or source.startswith((".", "/", "~"))
    hub_id = source if not local and HUB_ID.match(source) else None
    return {"kind": "finetune" if data.get("path") else "sft", "sft": info.get("sft") or {},
            "base": hub_id or _short(source.removeprefix("nanogpt:")), "hub_id": hub_id,
            "lora": bool(ft.get("lora")), "lora_rank": ft.get("lora_rank"), "freeze": ft.get("freeze_layers") or ""}


def _short(path: str) -> str:
    """A local folder by its name (a run's best/ or last/ by the run's): a card is for publishing, its paths
    are this machine's."""
    p = Path(path)
    return p.parent.name if p.name in ("best", "last") and p.parent.name else p.name or path


def _summary(o: dict[str, Any], params: float, arch: str) -> str:
    """The card's opening sentences: what the model is and how it was made."""
    size = f"A {params / 1e6:.2f}M-parameter {arch} language model"
    base = f"[{o['hub_id']}](https://huggingface.co/{o['hub_id']})" if o.get("hub_id") else f"`{o.get('base')}`"
    how = ""
    if o["kind"] in ("finetune", "sft"):
        how = f" with LoRA adapters (rank {o['lora_rank']}, merged into these weights)" if o.get("lora") else \
            (f" with layers frozen ({o['freeze']})" if o.get("freeze") else "")
    if o["kind"] == "finetune":
        return (f"{size} fine-tuned{how} with pocketlm from {base} on the text described below. It continues text "
                "in the style of that text; it has no instruction tuning and knows only what its base model and "
                "that text gave it.")
    if o["kind"] == "sft":
        return (f"{size} fine-tuned{how} with pocketlm from {base} by supervised fine-tuning (SFT) on "
                "conversations: it answers as the assistant in the chat format it was tuned on (the chat template "
                "in tokenizer_config.json). It knows only what its base model and those conversations gave it.")
    if o["kind"] == "preference":
        made = f"{o['pairs'] or 0} preference pairs" if o.get("pairs") else f"{o.get('ratings') or 0} ratings"
        return (f"{size} preference-tuned with pocketlm ({o['method']}, beta {o.get('beta')}) from {base} on "
                f"{made} of user feedback: it continues text as its base model does, nudged towards the completions "
                "the feedback preferred. It has no knowledge beyond its base model's training text.")
    return (f"{size} trained from scratch with pocketlm on the text described below. It continues text in the style "
            "of that text; it has no instruction tuning and no knowledge beyond it.")


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


def _data_section(o: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """What the model was trained on: the feedback or conversations of a tuning run, the dataset's manifest."""
    lines: list[str] = []
    if o["kind"] == "preference":
        lines += [f"Preference tuning: {o['method']} on {_fmt(o.get('examples') or 0)} feedback examples "
                  f"({_fmt(o.get('pairs') or 0)} chosen/rejected pairs, {_fmt(o.get('ratings') or 0)} thumbs "
                  "up/down ratings) collected from users of the model; describe who gave them before publishing.", ""]
        if not (m and o.get("lm_data")):
            return lines
        lines += ["The language-modelling loss was watched on the base model's dataset:", ""]
    if o["kind"] == "sft":
        what = ("Supervised fine-tuning on a JSONL file of conversations (prompt/response or messages; the loss "
                "is on the assistant's tokens only).")
        sft = o.get("sft") or {}
        if not sft.get("conversations"):
            return [what + " The run does not record which file: describe the conversations here before publishing."]
        return [what, "", f"- file: `{Path(sft['conversations']).name}` (sha256 `{sft.get('conversations_sha256', '?')}`)",
                f"- conversations: {_fmt(sft.get('train') or 0)} for training, {_fmt(sft.get('val') or 0)} held out"
                + (f" (`{Path(sft['val_conversations']).name}`)" if sft.get("val_conversations") else ""),
                f"- packed into rows of {sft.get('block_size')} tokens; {_fmt(sft.get('truncated') or 0)} cut to fit",
                "", "Describe where the conversations came from before publishing."]
    if not m:
        return ["No dataset manifest was found beside this checkpoint; describe the training data here "
                "before publishing."]
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
    return lines


def model_card(info: dict[str, Any], name: str) -> str:
    cfg, m, tr = info["config"], info["manifest"], info["trainer"]
    arch = (cfg.get("architectures") or ["?"])[0]
    o = origin(info)
    tags = ["pocketlm", cfg.get("model_type", "causal-lm")] + \
        {"sft": ["sft"], "preference": [o.get("method", "").lower()]}.get(o["kind"], [])
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             *([f"base_model: {o['hub_id']}"] if o.get("hub_id") else []), "tags:", *[f"- {t}" for t in tags],
             "---", "", f"# {name}", "", _summary(o, info["parameters"], arch), ""]
    lines += ["## Training data", "", *_data_section(o, m)]
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
        if o["kind"] in ("finetune", "sft"):  # init_from by the name the card gives it, not this machine's path
            recipe["finetune"] = {**(rc.get("finetune") or {}), "init_from": o["hub_id"] or o["base"]}
        if o["kind"] == "preference":
            recipe["preference"] = {"method": o["method"].lower(), "beta": o.get("beta"), "base": o["base"]}
        lines += ["", "## Training", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```"]
    lines += ["", "## Results", ""]
    res = {**({"step": tr["step"], "tokens seen": tr.get("tokens"), "best val loss (trainer)": tr.get("best_val"),
               "training time (s)": tr.get("elapsed")} if "step" in tr else {}), **info["metrics"]}
    res = {k: v for k, v in res.items() if v is not None}
    if res:
        lines += ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {_fmt(v)} |" for k, v in res.items()]
        dpo = " (ln 2 = 0.693 before tuning)" if o.get("method") == "DPO" else ""
        lines += ["", {"preference": f"val/loss is the {o.get('method')} loss on held-out feedback{dpo}; lm/ losses "
                                     "are mean cross-entropy per token (nats) on the base model's data.",
                       "sft": "Losses are mean cross-entropy per token (nats) over the assistant's tokens of the "
                              "held-out conversations."}.get(
            o["kind"], "Losses are mean cross-entropy per token (nats) on the held-out split.")]
        if "final val/loss_before" in res:
            lines[-1] += " val/loss_before is the base model's, before fine-tuning."
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
              "or with pocketlm: `pocketlm generate path/to/this/folder --prompt 'ROMEO:'`"
              + (", or as a chat: `pocketlm chat path/to/this/folder` (transformers: `tok.apply_chat_template`)."
                 if o["kind"] == "sft" or info.get("chat_template") else "."), ""]
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
