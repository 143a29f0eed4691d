"""Which parameters train: frozen layers, and LoRA adapters through `peft` merged back on save.

LoRA is injected in place (`peft.inject_adapter_in_model`), so the model keeps its class and interface;
`merged_state` folds every adapter into its base weight (W + B A * alpha / r) under the plain parameter
names, which is what a checkpoint saves: a normal model folder, no peft needed to load it.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pocketlm import checkpoint as ckpt
from pocketlm.errors import PocketLMError
from pocketlm.model import GPT

# attention and MLP projections per architecture (peft's own table only names the attention ones)
LORA_TARGETS = {
    "pocketlm": ["c_attn", "c_proj", "c_fc"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    **{k: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for k in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3")},
}
ADAPTER = "default"


def inner(model: nn.Module) -> nn.Module:
    """The module whose parameter names users see (a transformers model's own names, without "hf.")."""
    return model if isinstance(model, GPT) else model.hf


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList (transformer.h, model.layers, gpt_neox.layers, ...)."""
    lists = [(n, m) for n, m in inner(model).named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise PocketLMError("cannot find the model's transformer blocks to freeze; name parameters with patterns")
    return max(lists, key=lambda nm: len(nm[1]))


def freeze(model: nn.Module, spec: str) -> int:
    """`N`: freeze the embeddings and the first N blocks; else comma-separated glob patterns of parameter names.

    Returns the number of frozen parameters."""
    spec = spec.strip()
    params = dict(inner(model).named_parameters())
    if spec.isdigit():
        n = int(spec)
        name, layers = blocks(model)
        if n > len(layers):
            raise PocketLMError(f"--freeze-layers {n}: the model has only {len(layers)} blocks")
        first = {f"{name}.{i}." for i in range(n)}
        emb = {id(p) for p in inner(model).get_input_embeddings().parameters()} if hasattr(
            inner(model), "get_input_embeddings") else {id(model.transformer.wte.weight)}
        if isinstance(model, GPT):
            if "wpe" in model.transformer:  # learned positions (the Llama layout has rotary ones, no table)
                emb |= {id(model.transformer.wpe.weight)}
        else:
            emb |= {id(p) for k, p in params.items() if k.endswith(("wpe.weight",))}
        chosen = [k for k, p in params.items() if id(p) in emb or any(k.startswith(f) for f in first)] if n else []
    else:
        patterns = [p.strip() for p in spec.split(",") if p.strip()]
        chosen = []
        for pat in patterns:
            hits = [k for k in params if fnmatch.fnmatchcase(k, pat)]
            if not hits:
                example = next(iter(params))
                raise PocketLMError(f"--freeze-layers pattern {pat!r} matches no parameter (names look like "
                                    f"{example!r}); give a block count or glob patterns")
            chosen += hits
    for k in chosen:
        params[k].requires_grad_(False)
    return sum(params[k].numel() for k in set(chosen))


def lora_targets(arch: str, given: str) -> list[str]:
    if given.strip():
        return [t.strip() for t in given.split(",") if t.strip()]
    if arch in LORA_TARGETS:
        return LORA_TARGETS[arch]
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    except ImportError:
        peft_table = {}
    if arch in peft_table:
        return list(peft_table[arch])
    raise PocketLMError(f"no default LoRA target modules for model type {arch!r}: name the Linear layers with "
                        "--lora-targets (e.g. q_proj,v_proj)")


def apply_lora(model: nn.Module, arch: str, rank: int, alpha: float, dropout: float, targets: str) -> Any:
    """Inject LoRA adapters; everything else freezes. Returns the peft LoraConfig."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PocketLMError("LoRA needs peft: pip install 'pocketlm[finetune]'") from None
    if rank < 1:
        raise PocketLMError(f"--lora-rank must be at least 1, got {rank}")
    names = lora_targets(arch, targets)
    is_conv1d = arch == "gpt2"  # transformers' GPT-2 stores (in, out) weights in Conv1D
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                        fan_in_fan_out=is_conv1d)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(config, inner(model), adapter_name=ADAPTER)
    except (ValueError, TypeError, RuntimeError) as e:
        raise PocketLMError(f"peft cannot add LoRA to this {arch} model (targets {','.join(names)}): "
                            f"{str(e).splitlines()[0][:200]}") from None
    tied = [n for n in lora_layers(model) if n in ("lm_head", "transformer.wte")] if isinstance(model, GPT) else []
    if tied:  # the saved folder holds one matrix for both: an adapter on either one cannot be merged into it
        raise PocketLMError(f"LoRA on {tied[0]}: pocketlm's GPT ties lm_head to transformer.wte (one saved "
                            "matrix); leave them out of --lora-targets")
    if not any(p.requires_grad for p in model.parameters()):
        raise PocketLMError(f"LoRA targets {','.join(names)} matched no layer of this {arch} model: set --lora-targets")
    return config


def lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in inner(model).named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under plain names with every adapter folded into its base weight (the model is untouched)."""
    layers = lora_layers(model)
    prefix = "" if isinstance(model, GPT) else "hf."
    state: dict[str, torch.Tensor] = {}
    for k, v in inner(model).state_dict().items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            mod, _, leaf = k.partition(".base_layer.")
            if leaf == "weight":
                v = v + layers[mod].get_delta_weight(ADAPTER).to(v.dtype)
            k = f"{mod}.{leaf}"
        state[prefix + k] = v
    return state


# pocketlm's Llama layout -> the HF Llama modules it is saved as (checkpoint.LLAMA_LAYER): fused layers split
LLAMA_MODULES = {"attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "attn.c_proj": ["self_attn.o_proj"], "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"],
                 "mlp.c_proj": ["mlp.down_proj"]}


def hf_module_names(model: nn.Module) -> dict[str, list[str]]:
    """Each adapted module -> the module(s) it is saved as in the model folder (a transformers model: itself).

    pocketlm's Llama layout is saved under HF Llama names with fused layers split by rows; a LoRA on a layer
    whose rows split into k parts is k LoRAs sharing A, with B split the same way."""
    names = list(lora_layers(model))
    if not (isinstance(model, GPT) and ckpt.is_llama(model.config)):
        return {n: [n] for n in names}
    out = {}
    for n in names:
        head, h, i, rest = (n.split(".", 3) + ["", "", ""])[:4]  # transformer.h.{i}.{rest}
        if (head, h) != ("transformer", "h") or rest not in LLAMA_MODULES:
            raise PocketLMError(f"--lora-keep-adapter: LoRA on {n} has no counterpart in the saved Llama model "
                                f"(adaptable: {', '.join(LLAMA_MODULES)}); drop it from --lora-targets")
        out[n] = [f"model.layers.{i}.{m}" for m in LLAMA_MODULES[rest]]
    return out


def _target_names(modules: list[str], everything: list[str]) -> list[str]:
    """peft target_modules for exactly `modules`: their last names when those adapt every such layer of the
    saved model (the usual case), else the full module names."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    same_leaf = {m for m in everything if m.rsplit(".", 1)[-1] in leaves}
    return leaves if same_leaf == set(modules) else sorted(modules)


def save_adapter(model: nn.Module, config: Any, folder: Path, base: str) -> None:
    """A standard peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` loads.

    The run's LoraConfig is never changed: peft reads `base_model_name_or_path` from it on the next save and
    then loads the base's config through the model's config class, which pocketlm's GPTConfig is not."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # embeddings are frozen under LoRA; a transformers model's go into the adapter only when tokens were added
    # to the base vocabulary (peft's own "auto" rule, decided here the same way on every save)
    base_vocab = _base_vocab(base)
    resized = not isinstance(model, GPT) and base_vocab not in (None, model.hf.config.vocab_size)
    state = get_peft_model_state_dict(inner(model), adapter_name=ADAPTER, save_embedding_layers=resized)
    mapping = hf_module_names(model)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        mod, sep, leaf = k.partition(".lora_")
        names = mapping.get(mod, [mod]) if sep else [k]
        # lora_A (r, in) is shared by the parts; lora_B (out, r) splits along its rows like the base weight
        parts = v.chunk(len(names), dim=0) if leaf.startswith("B.") else [v] * len(names)
        for n, t in zip(names, parts):
            out[f"base_model.model.{n}{sep}{leaf}" if sep else f"base_model.model.{n}"] = \
                t.detach().cpu().clone()  # shared A: a copy per module (safetensors stores no aliases)
    if isinstance(model, GPT) and base_vocab not in (None, model.config.vocab_size):
        # tokens were added (peft saves a resized transformers model's embeddings the same way): the rows go
        # with the adapter, under the saved model's names, for a base resized to the new vocabulary
        wte = model.transformer.wte.weight.detach().cpu()
        emb = "model.embed_tokens" if ckpt.is_llama(model.config) else "transformer.wte"
        out |= {f"base_model.model.{n}.weight": wte.clone() for n in (emb, "lm_head")}  # lm_head is tied
    save_file(out, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    saved = copy.deepcopy(config)
    saved.base_model_name_or_path = base
    if isinstance(model, GPT) and ckpt.is_llama(model.config):
        every = [f"model.layers.{i}.{m}" for i in range(model.config.n_layer) for ms in LLAMA_MODULES.values()
                 for m in ms]
        saved.target_modules = _target_names([m for ms in mapping.values() for m in ms], every)
    elif isinstance(model, GPT):
        saved.fan_in_fan_out = True  # saved as transformers' GPT-2, whose Conv1D stores (in, out)
    saved.save_pretrained(str(folder))


def _base_vocab(base: str) -> int | None:
    """The base model's vocabulary size from its config (a local folder or a Hub model in the local cache)."""
    try:
        if (Path(base) / "config.json").is_file():
            return int(json.loads((Path(base) / "config.json").read_text())["vocab_size"])
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(base, local_files_only=True).vocab_size)
    except Exception:  # unreadable or not cached: as peft does, assume the vocabulary was kept
        return None
