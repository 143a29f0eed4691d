"""Checkpoints: standard Hugging Face model folders, plus the trainer's state beside the weights.

A checkpoint folder holds config.json (GPT2LMHeadModel, or LlamaForCausalLM for the rotary/RMSNorm/SwiGLU
layout), model.safetensors, tokenizer files and
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
from pocketlm.model import NORM_EPS, ROPE_THETA, GPT, GPTConfig

FORMAT_VERSION = 1
# nn.Linear stores (out, in); HF GPT-2's Conv1D stores (in, out): these four are transposed on the way
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---- the Hugging Face layout --------------------------------------------------------------------------

def is_llama(cfg: GPTConfig) -> bool:
    """The rotary / RMSNorm / SwiGLU layout is saved as Llama; config validation allows no other mix."""
    return cfg.pos_emb == "rotary"


def hf_config(cfg: GPTConfig, eot_id: int | None) -> dict[str, Any]:
    common = {"vocab_size": cfg.vocab_size, "initializer_range": 0.02, "use_cache": True,
              "tie_word_embeddings": True, "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
              "pocketlm": {"format_version": FORMAT_VERSION, "bias": cfg.bias}}
    if is_llama(cfg):
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": NORM_EPS, "rope_theta": ROPE_THETA,  # rope_theta for transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, **common,
        }
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu", "layer_norm_epsilon": NORM_EPS,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True, **common,
    }


# pocketlm name -> Llama name(s). Fused matrices split along the output rows: c_attn = [q | k | v],
# c_fc = [gate | up]. Names are suffixes of transformer.h.{i}. / model.layers.{i}.
LLAMA_LAYER = {
    "ln_1.weight": ["input_layernorm.weight"], "ln_2.weight": ["post_attention_layernorm.weight"],
    "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.c_proj": ["self_attn.o_proj"],
    "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.c_proj": ["mlp.down_proj"],
}
LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight"}


def _llama_names(key: str) -> tuple[list[str], int]:
    """A pocketlm key -> its Llama key(s), and how many parts the tensor splits into along dim 0."""
    if key in LLAMA_TOP:
        return [LLAMA_TOP[key]], 1
    _, _, i, rest = key.split(".", 3)  # transformer.h.{i}.{rest}
    base, _, kind = rest.rpartition(".")  # kind: weight or bias
    names = LLAMA_LAYER.get(rest) or LLAMA_LAYER[base]
    suffix = "" if rest in LLAMA_LAYER else "." + kind
    return [f"model.layers.{i}.{n}{suffix}" for n in names], len(names)


def _llama_keys(cfg: GPTConfig) -> list[str]:
    """pocketlm's parameter names in the Llama layout (lm_head left out: it is tied to wte)."""
    keys = list(LLAMA_TOP)
    for i in range(cfg.n_layer):
        for rest in LLAMA_LAYER:
            kinds = [""] if rest.endswith(".weight") else [".weight", ".bias"] if cfg.bias else [".weight"]
            keys += [f"transformer.h.{i}.{rest}{kind}" for kind in kinds]
    return keys


def to_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """pocketlm's state dict (full, unsharded) -> HF GPT2LMHeadModel or LlamaForCausalLM tensors."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight; HF re-ties it on load
        v = v.detach().to("cpu", torch.float32)
        if is_llama(cfg):  # Llama's Linear layers store (out, in) as nn.Linear does: split, no transpose
            names, parts = _llama_names(k)
            out.update({n: t.contiguous() for n, t in zip(names, v.chunk(parts, dim=0))})
            continue
        out[k] = (v.t() if k.endswith(TRANSPOSED) else v).contiguous()
        if not cfg.bias and k.endswith(".weight") and k.split(".")[1] not in ("wte", "wpe"):
            # HF GPT-2 always has biases: zeros compute the same function; width = output features
            out[k[: -len("weight")] + "bias"] = torch.zeros(v.shape[0])
    return out


def from_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    if is_llama(cfg):
        out = {}
        for k in _llama_keys(cfg):
            names, _ = _llama_names(k)
            out[k] = torch.cat([state[n] for n in names], dim=0)
        out["lm_head.weight"] = out["transformer.wte.weight"]
        return out
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


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict, or a one-line error naming the problem."""
    file = folder / "config.json"
    if not file.is_file():
        raise PocketLMError(f"{folder} is not a model folder (no config.json): pass a run folder or checkpoint")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        hf = None
    if not isinstance(hf, dict):
        raise PocketLMError(f"{file} is corrupt (not a JSON object)")
    return hf


def read_config(folder: Path) -> GPTConfig:
    """pocketlm's GPTConfig from a model folder pocketlm wrote (GPT-2 or Llama layout)."""
    hf = read_hf_config(folder)
    pl = hf.get("pocketlm", {})
    if pl.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise PocketLMError(f"{folder} was written by a newer pocketlm (format v{pl['format_version']}): upgrade")
    if hf.get("model_type") == "llama":
        return _read_llama(folder, hf, pl)
    try:
        _ = [int(hf[k]) for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")]
    except (ValueError, KeyError, TypeError):
        raise PocketLMError(f"{folder / 'config.json'} is corrupt or not a GPT-2 config (needs vocab_size, "
                            "n_positions, n_layer, n_head, n_embd)") from None
    if hf.get("model_type") != "gpt2":
        raise PocketLMError(f"{folder} holds a {hf.get('model_type')!r} model; pocketlm's GPT loads GPT-2 and "
                            "Llama layouts")
    if hf.get("activation_function", "gelu") != "gelu" or (hf.get("n_inner") or 4 * hf["n_embd"]) != 4 * hf["n_embd"]:
        raise PocketLMError(f"{folder}: activation {hf.get('activation_function')} / n_inner {hf.get('n_inner')} "
                            "differ from pocketlm's GPT (gelu, 4 x n_embd)")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=hf.get("resid_pdrop", 0.0),
                     bias=pl.get("bias", True))


def is_pocketlm(folder: Path) -> bool:
    """Whether a model folder was written by pocketlm's GPT (else it is any transformers model)."""
    try:
        return "pocketlm" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return True  # let load_model name the problem


def _read_llama(folder: Path, hf: dict[str, Any], pl: dict[str, Any]) -> GPTConfig:
    try:
        n = {k: int(hf[k]) for k in ("vocab_size", "max_position_embeddings", "num_hidden_layers",
                                     "num_attention_heads", "hidden_size", "intermediate_size")}
    except (ValueError, KeyError, TypeError):
        raise PocketLMError(f"{folder}/config.json is corrupt or not a Llama config (needs vocab_size, "
                            "max_position_embeddings, num_hidden_layers, num_attention_heads, hidden_size, "
                            "intermediate_size)") from None
    cfg = GPTConfig(vocab_size=n["vocab_size"], block_size=n["max_position_embeddings"],
                    n_layer=n["num_hidden_layers"], n_head=n["num_attention_heads"], n_embd=n["hidden_size"],
                    dropout=hf.get("attention_dropout", 0.0), bias=bool(hf.get("attention_bias", False)),
                    pos_emb="rotary", norm="rmsnorm", mlp="swiglu")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", ROPE_THETA)}
    differs = {
        "num_key_value_heads": (hf.get("num_key_value_heads") or cfg.n_head, cfg.n_head),
        "head_dim": (hf.get("head_dim") or cfg.n_embd // max(1, cfg.n_head), cfg.n_embd // max(1, cfg.n_head)),
        "hidden_act": (hf.get("hidden_act"), "silu"), "tie_word_embeddings": (hf.get("tie_word_embeddings"), True),
        "intermediate_size": (n["intermediate_size"], cfg.ffn_hidden), "rms_norm_eps": (hf.get("rms_norm_eps"), NORM_EPS),
        "rope": ((rope.get("rope_type"), rope.get("rope_theta")), ("default", ROPE_THETA)),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), cfg.bias),
    }
    bad = [f"{k} {got}" for k, (got, want) in differs.items() if got != want]
    if bad:
        raise PocketLMError(f"{folder}: this Llama differs from pocketlm's GPT ({', '.join(bad)}): pocketlm loads "
                            "the Llama models it saves")
    return cfg


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
