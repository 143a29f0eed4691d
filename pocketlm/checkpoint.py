"""Checkpoints: standard Hugging Face GPT-2 model folders, plus the trainer's state beside the weights.

A checkpoint folder holds config.json (GPT2LMHeadModel), model.safetensors, tokenizer files and
generation_config.json, so `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it with
identical logits. Training state sits in the same folder: trainer_state.json (step, tokens, best loss,
format version) and trainer_state.safetensors (optimizer moments, RNG states). No pickles anywhere.

Every write goes to a temp path first and is renamed into place; a folder is swapped in with two renames,
and `recover()` completes a swap that a crash interrupted, so a killed run never leaves a broken checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pocketlm import tokenizer as toklib
from pocketlm.atomic import old_path as _old
from pocketlm.errors import PocketLMError
from pocketlm.model import GPT, GPTConfig

FORMAT_VERSION = 1
# nn.Linear stores (out, in); HF GPT-2's Conv1D stores (in, out): these four are transposed on the way
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---- the Hugging Face layout --------------------------------------------------------------------------

def hf_config(cfg: GPTConfig, eot_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
        "pocketlm": {"format_version": FORMAT_VERSION, "bias": cfg.bias},
    }


def to_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """pocketlm's state dict (full, unsharded) -> HF GPT2LMHeadModel tensors."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight; HF re-ties it on load
        v = v.detach().to("cpu", torch.float32)
        out[k] = (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
        if not cfg.bias and k.endswith(".weight") and k.split(".")[1] not in ("wte", "wpe"):
            # HF GPT-2 always has biases: zeros compute the same function; width = output features
            out[k[: -len("weight")] + "bias"] = torch.zeros(v.shape[0])
    return out


def from_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # causal-mask buffers of old transformers versions
        if not cfg.bias and k.endswith(".bias"):
            continue
        out[k] = v.t().contiguous() if k.endswith(TRANSPOSED) else v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def save_model(model: GPT, folder: Path, tokenizer_dir: Path | None, eot_id: int | None,
               generation: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the HF model files into a folder; `state` is the full state dict when the model is sharded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, eot_id), indent=2) + "\n")
    tensors = to_hf_state(state if state is not None else model.state_dict(), model.config)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    gen = {"bos_token_id": eot_id, "eos_token_id": eot_id, "do_sample": True, **(generation or {})}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        toklib.copy_files(tokenizer_dir, folder)
        toklib.set_max_length(folder, model.config.block_size)


def read_config(folder: Path) -> GPTConfig:
    file = folder / "config.json"
    if not file.is_file():
        raise PocketLMError(f"{folder} is not a model folder (no config.json): pass a run folder or checkpoint")
    try:
        hf = json.loads(file.read_text())
        if not isinstance(hf, dict):
            raise ValueError
        _ = [int(hf[k]) for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")]
    except (ValueError, KeyError, TypeError):
        raise PocketLMError(f"{file} is corrupt or not a GPT-2 config (needs vocab_size, n_positions, "
                            "n_layer, n_head, n_embd)") from None
    if hf.get("model_type") != "gpt2":
        raise PocketLMError(f"{folder} holds a {hf.get('model_type')!r} model; pocketlm's GPT loads GPT-2 layouts")
    if hf.get("activation_function", "gelu") != "gelu" or (hf.get("n_inner") or 4 * hf["n_embd"]) != 4 * hf["n_embd"]:
        raise PocketLMError(f"{folder}: activation {hf.get('activation_function')} / n_inner {hf.get('n_inner')} "
                            "differ from pocketlm's GPT (gelu, 4 x n_embd)")
    pl = hf.get("pocketlm", {})
    if pl.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise PocketLMError(f"{folder} was written by a newer pocketlm (format v{pl['format_version']}): upgrade")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=hf.get("resid_pdrop", 0.0),
                     bias=pl.get("bias", True))


def is_pocketlm(folder: Path) -> bool:
    """Whether a model folder was written by pocketlm's GPT (else it is any transformers model)."""
    try:
        return "pocketlm" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return True  # let load_model name the problem


def resolve(path: str | Path) -> Path:
    """A run folder means its best/ (else last/); any other folder is taken as a checkpoint."""
    p = Path(path)
    if not p.exists():
        raise PocketLMError(f"no such run or checkpoint folder: {p}")
    for sub in ("best", "last"):  # read-only: a trainer may be swapping these folders right now
        for cand in (p / sub, _old(p / sub)):
            if (cand / "config.json").is_file():
                return cand
    return p


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Path]:
    folder = resolve(path)
    cfg = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise PocketLMError(f"{folder} has no model.safetensors")
    if cfg.n_head < 1 or cfg.n_embd % cfg.n_head:
        raise PocketLMError(f"{folder}/config.json: n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    model = GPT(cfg)
    try:
        model.load_state_dict(from_hf_state(load_file(str(weights)), cfg))
    except Exception as e:  # safetensors header errors, shape mismatches, missing keys
        raise PocketLMError(f"{weights} cannot be loaded into the model its config.json describes: "
                            f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval(), folder


# ---- trainer state ------------------------------------------------------------------------------------

def save_trainer_state(folder: Path, meta: dict[str, Any], optimizer_state: dict[str, Any] | None,
                       rng: dict[str, torch.Tensor]) -> None:
    """`optimizer_state` is keyed by parameter name (torch.distributed.checkpoint's full state dict), so it
    loads into any world size and into DDP, FSDP or a single process alike."""
    tensors = {f"rng.{k}": v.cpu() for k, v in rng.items()}
    groups = None
    if optimizer_state is not None:
        groups = optimizer_state["param_groups"]
        for name, st in optimizer_state["state"].items():
            for key, t in st.items():
                tensors[f"opt.{key}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    save_file(tensors, str(folder / "trainer_state.safetensors"))
    state = {"format_version": FORMAT_VERSION, **meta, "optimizer_param_groups": groups}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_trainer_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(meta, optimizer state keyed by parameter name or None, RNG states)."""
    jf, tf = folder / "trainer_state.json", folder / "trainer_state.safetensors"
    if not jf.is_file() or not tf.is_file():
        raise PocketLMError(f"{folder} has no trainer state to resume from; start a new run with --overwrite")
    try:
        meta = json.loads(jf.read_text())
        tensors = load_file(str(tf))
    except Exception:
        raise PocketLMError(f"the trainer state in {folder} is corrupt; start over with --overwrite") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise PocketLMError(f"{folder}: trainer state format v{meta.get('format_version')} is not v{FORMAT_VERSION}")
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    opt = None
    if meta.get("optimizer_param_groups") is not None:
        state: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, key, name = k.split(".", 2)
                state.setdefault(name, {})[key] = v
        opt = {"state": state, "param_groups": meta["optimizer_param_groups"]}
    return meta, opt, rng
