"""A fine-tuning run: the pretrained start, vocabulary checks, frozen layers or LoRA, the one training loop,
and the target data's validation loss before and after.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pocketlm import atomic
from pocketlm import checkpoint as ckpt
from pocketlm import config as configlib
from pocketlm import tokenizer as toklib
from pocketlm.config import Config
from pocketlm.data.prepare import Dataset
from pocketlm.errors import PocketLMError
from pocketlm.finetune import adapt
from pocketlm.finetune import start as startlib
from pocketlm.finetune.hf import HFModel
from pocketlm.model import GPT
from pocketlm.train import LMTask, State, Task, Trainer


LORA_STATE = "trainer_lora.safetensors"  # a LoRA run's adapter weights under the trained model's names


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP's DTensor -> the whole tensor


def save_tokenizer(tok: Any, folder: Path, max_length: int | None) -> None:
    """The tokenizer's own save_pretrained; the chat template goes into tokenizer_config.json itself."""
    tok.save_pretrained(str(folder))
    jinja = folder / "chat_template.jinja"
    jinja.unlink(missing_ok=True)
    file = folder / "tokenizer_config.json"
    cfg = json.loads(file.read_text(encoding="utf-8"))
    if getattr(tok, "chat_template", None):
        cfg["chat_template"] = tok.chat_template
    if max_length:
        cfg["model_max_length"] = max_length
    file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class Pretrained:
    """The ModelSource of a fine-tuning run: the loaded (and adapted) model; saves merge LoRA adapters."""

    def __init__(self, start: startlib.Start, dataset: Dataset | None, lora: Any = None,
                 keep_adapter: bool = False) -> None:
        self.start, self.dataset, self.lora, self.keep_adapter = start, dataset, lora, keep_adapter

    def build(self) -> torch.nn.Module:
        return self.start.model

    def save(self, model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor],
             generation: dict[str, Any]) -> None:
        tok = self.start.tokenizer
        weights = adapt.merged_state(model) if self.lora is not None else state
        if isinstance(model, GPT):
            eot = tok.eos_token_id if tok is not None else self.dataset.manifest["tokenizer"]["eot_id"]
            ckpt.save_model(model, folder, None if tok is not None else self.dataset.path, eot, generation, weights)
            if tok is not None:
                save_tokenizer(tok, folder, model.config.block_size)
                toklib.set_max_length(folder, model.config.block_size)
        else:
            model.save(folder, weights)
            gen_file = folder / "generation_config.json"
            gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
            gen.update({"do_sample": True, **generation})
            gen_file.write_text(json.dumps(gen, indent=2) + "\n")
            save_tokenizer(tok, folder, model.config.block_size)
        if self.lora is not None:
            # the merged weights cannot be split back into base and adapter exactly: --resume reads these
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items() if ".lora_" in k},
                      str(folder / LORA_STATE), metadata={"format_version": str(ckpt.FORMAT_VERSION)})
        if self.lora is not None and self.keep_adapter:
            adapt.save_adapter(model, self.lora, folder / "adapter", self.start.source)

    def load_state(self, folder: Path) -> dict[str, torch.Tensor]:
        saved = self._saved_state(folder)
        if self.lora is None:
            return saved
        # LoRA: the base weights of --init-from, as at the start of the run, and the adapters as trained
        file = folder / LORA_STATE
        if not file.is_file():
            raise PocketLMError(f"{folder} holds no LoRA weights to resume from (no {LORA_STATE}: saved by an "
                                f"older pocketlm): start a new run from it with --init-from {folder}")
        state = {k: _full(v) for k, v in self.start.model.state_dict().items()}
        lora = load_file(str(file))
        if set(lora) != {k for k in state if ".lora_" in k}:
            raise PocketLMError(f"the LoRA adapters in {folder} are not this run's (other --lora-rank, "
                                "--lora-targets or model): resume with the run's own settings")
        state.update(lora)
        # frozen weights outside the adapted layers were saved as they are: they must be --init-from's
        for k, v in saved.items():
            if k in state and not torch.equal(state[k].cpu(), v.to(state[k].dtype)):
                raise PocketLMError(f"--init-from {self.start.source} is not the model this run started from "
                                    f"({k} differs from {folder}): resume with the run's own --init-from")
        return state

    def _saved_state(self, folder: Path) -> dict[str, torch.Tensor]:
        if isinstance(self.start.model, GPT):
            return ckpt.load_model(folder, "cpu")[0].state_dict()
        from transformers import AutoModelForCausalLM

        return HFModel(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)).state_dict()


def data_vocab(dataset: Dataset) -> tuple[dict[str, int], list[str]]:
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(dataset.path / "tokenizer.json"))
    specials = [t.content for t in tk.get_added_tokens_decoder().values() if t.special]
    return tk.get_vocab(with_added_tokens=True), specials


def prepare_start(cfg: Config, dataset: Dataset | None, extra_tokens: list[str] = (),
                  verbose: bool = True) -> startlib.Start:
    """Load the init model, align its vocabulary with the dataset, add the special tokens asked for."""
    ft = cfg.finetune
    start = startlib.load(ft.init_from)
    if dataset is not None:
        added = startlib.align_vocab(start, *data_vocab(dataset), where=str(dataset.path))
        if added and verbose:
            print(f"pocketlm: added the dataset's special tokens {added} to the model", file=sys.stderr)
    startlib.add_tokens(start, [*(ft.add_special_tokens or []), *extra_tokens])
    return start


# transformers families built as pocketlm's Llama layout (rotary positions, RMSNorm, SwiGLU)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "smollm3")


def fit_config(cfg: Config, model: torch.nn.Module) -> None:
    """Record the model's real shape and layout in cfg.model (written to config.yaml, read by `compare` and
    the model card); the window must fit the model (the default window shrinks to a shorter context)."""
    m = model.config
    if cfg.model.block_size > m.block_size:
        if cfg.model.block_size != configlib.ModelConfig().block_size:
            raise PocketLMError(f"model.block_size {cfg.model.block_size} exceeds the pretrained model's context "
                                f"of {m.block_size} tokens: lower --block-size")
        cfg.model.block_size = m.block_size  # not asked for: the model's own window
    cfg.model.vocab_size = m.vocab_size
    if isinstance(model, GPT):
        for key in ("n_layer", "n_head", "n_embd", "bias", "pos_emb", "norm", "mlp"):
            setattr(cfg.model, key, getattr(m, key))
        return
    hc = model.hf.config
    if hc.model_type in LLAMA_LIKE:  # described by pocketlm's Llama layout; other families keep the defaults
        cfg.model.pos_emb, cfg.model.norm, cfg.model.mlp = "rotary", "rmsnorm", "swiglu"
        cfg.model.bias = bool(getattr(hc, "attention_bias", False))
    heads = getattr(hc, "num_attention_heads", None) or getattr(hc, "n_head", None)
    if m.n_layer and m.n_embd and isinstance(heads, int) and heads > 0 and m.n_embd % heads == 0:
        cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = m.n_layer, heads, m.n_embd


def finetune(cfg: Config, resume: bool = False, overwrite: bool = False, task: Task | None = None,
             callbacks: list[Any] | None = None, verbose: bool = True,
             start: startlib.Start | None = None) -> State:
    """Train from cfg.finetune.init_from (or a prepared `start`) with the one loop; report before/after loss."""
    ft = cfg.finetune
    dataset = getattr(task, "dataset", None) if task is not None else Dataset(cfg.data.path)
    if start is None:
        start = prepare_start(cfg, dataset, verbose=verbose)
    fit_config(cfg, start.model)
    if cfg.train.strategy == "fsdp" and not isinstance(start.model, GPT) and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise PocketLMError("train.strategy fsdp shards pocketlm's GPT only; fine-tune a transformers model with "
                            "--strategy ddp")
    if task is None:
        target = LMTask(dataset, cfg.model.block_size)
        task = target
        if ft.replay:
            from pocketlm.finetune.tasks import ReplayTask, parse_replay

            path, share = parse_replay(ft.replay)
            task = ReplayTask(target, LMTask(Dataset(path), cfg.model.block_size), share)
    torch.manual_seed(cfg.train.seed)  # LoRA's initialisation is part of the run's seed
    if ft.freeze_layers and not ft.lora:
        adapt.freeze(start.model, ft.freeze_layers)
    lora = None
    if ft.lora:
        lora = adapt.apply_lora(start.model, start.arch, ft.lora_rank, ft.lora_alpha, ft.lora_dropout,
                                ft.lora_targets)
        if ft.lora_keep_adapter:
            adapt.hf_module_names(start.model)  # every adapter must have a place in the saved model's names
    trainable = sum(p.numel() for p in start.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in start.model.parameters())
    if verbose:
        how = f"LoRA r={ft.lora_rank}" if lora else ("frozen: " + ft.freeze_layers if ft.freeze_layers else "full")
        print(f"pocketlm: fine-tuning {start.source} ({start.arch}, {start.kind}); {how}; "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train", file=sys.stderr)
    source = Pretrained(start, dataset, lora, ft.lora_keep_adapter)
    trainer = Trainer(cfg, task, resume, overwrite, callbacks, verbose, source=source)
    before = None
    if not resume:
        before = trainer.evaluate("val")["loss"]
        trainer._emit("on_eval", {"step": 0, "val/loss_before": before})
    state = trainer.fit()
    if verbose and trainer.rt.is_main:
        if before is None:
            before = next((r["val/loss_before"] for r in _metrics(trainer.out) if "val/loss_before" in r), None)
        shown = f"{before:.4f}" if before is not None else "?"
        if math.isfinite(state.best_val):
            print(f"fine-tuning: val loss on the target data {shown} before -> {state.best_val:.4f} after "
                  f"(best checkpoint)", file=sys.stderr)
        else:  # stopped before its first evaluation
            print(f"fine-tuning: val loss on the target data {shown} before; no evaluation since",
                  file=sys.stderr)
    return state


def _metrics(out: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    except (OSError, ValueError):
        return []


def sft(cfg: Config, data: str | Path, val: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, callbacks: list[Any] | None = None, verbose: bool = True) -> State:
    """Supervised fine-tuning on a JSONL of conversations, from cfg.finetune.init_from."""
    from pocketlm.finetune import sft as sftlib

    if not cfg.finetune.init_from:
        raise PocketLMError("sft needs a model to start from: pass --init-from MODEL (hub id, folder, run)")
    convs = sftlib.read_examples(data)
    if val:
        train_convs, val_convs = convs, sftlib.read_examples(val)
    else:
        mask = sftlib.split_examples(len(convs), cfg.data.val_fraction, cfg.data.split_seed)
        train_convs = [c for c, v in zip(convs, mask) if not v]
        val_convs = [c for c, v in zip(convs, mask) if v]
    start = startlib.load(cfg.finetune.init_from)
    if start.tokenizer is None:
        raise PocketLMError("a nanoGPT checkpoint carries no tokenizer: fine-tune it on a prepared dataset first "
                            "(pocketlm train --init-from nanogpt:...), then run sft from that run")
    chat_tokens = sftlib.ensure_chat_template(start.tokenizer)
    startlib.add_tokens(start, [*(cfg.finetune.add_special_tokens or []), *chat_tokens])
    fit_config(cfg, start.model)
    task = sftlib.SFTTask(start.tokenizer, train_convs, val_convs, cfg.model.block_size)
    if verbose:
        rows = {k: len(v[0]) for k, v in task.splits.items()}
        print(f"pocketlm: SFT on {len(train_convs)} train / {len(val_convs)} val conversations packed into "
              f"{rows['train']} / {rows['val']} rows of {cfg.model.block_size} tokens"
              + (f"; {task.truncated} cut to fit" if task.truncated else ""), file=sys.stderr)
    state = finetune(cfg, resume, overwrite, task=task, callbacks=callbacks, verbose=verbose, start=start)
    if int(os.environ.get("RANK", 0)) == 0:  # what the run learned from (the model card reads it)
        files = {"conversations": Path(data), **({"val_conversations": Path(val)} if val else {})}
        info = {"format_version": 1, **{k: str(f) for k, f in files.items()},
                **{f"{k}_sha256": hashlib.sha256(f.read_bytes()).hexdigest() for k, f in files.items()},
                "train": len(train_convs), "val": len(val_convs), "truncated": task.truncated,
                "rows": {k: len(v[0]) for k, v in task.splits.items()}, "block_size": cfg.model.block_size}
        atomic.atomic_write_text(Path(cfg.train.out) / "sft.json", json.dumps(info, indent=2) + "\n")
    return state
