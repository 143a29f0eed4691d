"""Preference tuning (DPO, KTO) as a Task of the one training loop, against a frozen reference model.

DPO (Rafailov et al. 2023) learns from pairs: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
where pi_x / ref_x are the summed log-probabilities of a completion under the policy / the frozen reference.
KTO (Ethayarajh et al. 2024) learns from unpaired thumbs up/down: a desirable completion's loss is
1 - sigmoid(beta * (log-ratio - z)), an undesirable one's 1 - sigmoid(beta * (z - log-ratio)), with z the
batch's KL estimate (policy vs reference on mismatched prompt/completion pairs, clamped at 0, no gradient).

Data: the JSONL that `pocketlm feedback export` writes (TRL's field names): pairs `{"prompt", "chosen",
"rejected"}` and ratings `{"prompt", "completion", "label"}`. DPO also pairs a thumbs-up with a thumbs-down
of the same prompt; KTO also splits a pair into one desirable and one undesirable example.

The Trainer does everything else (schedule, clipping, checkpoints, metrics.jsonl); this Task supplies the
batches, the loss and the extra metrics it logs (`metrics`), and its `BaseModelSource` the starting weights,
the frozen reference and the tokenizer the checkpoints carry. The base is pocketlm's GPT for the folders
pocketlm writes, and any other transformers causal LM (a GPT-2 or Llama fine-tuned with --init-from, say)
through --init-from's loader and fine-tuning's ModelSource (`pocketlm.finetune`), which saves it with its own
save_pretrained. Metrics: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy, logps/chosen,
logps/rejected, and, when the base model's data is at hand, lm/val_loss on it.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pocketlm import checkpoint as ckpt
from pocketlm import tokenizer as toklib
from pocketlm.data.records import Problems, read_jsonl
from pocketlm.device import Runtime
from pocketlm.errors import PocketLMError
from pocketlm.train import SPLIT_CODE

METHODS = ("dpo", "kto")


def read_feedback(path: str | Path, problems: Problems | None = None) -> tuple[list[tuple[str, str, str]],
                                                                               list[tuple[str, str, bool]]]:
    """-> (pairs (prompt, chosen, rejected), ratings (prompt, completion, label)); bad lines reported and skipped."""
    problems = problems or Problems()
    path = Path(path)
    if not path.is_file():
        raise PocketLMError(f"feedback file not found: {path} (write one with `pocketlm feedback export --out FILE`)")
    pairs, ratings = [], []
    for where, obj in read_jsonl(path, problems):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt", ""), str):
            problems.report(where, "not a feedback object")
        elif isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
            if obj["chosen"] == obj["rejected"]:
                problems.report(where, "chosen and rejected are the same text")
            else:
                pairs.append((obj.get("prompt", ""), obj["chosen"], obj["rejected"]))
        elif isinstance(obj.get("completion"), str) and isinstance(obj.get("label"), bool):
            ratings.append((obj.get("prompt", ""), obj["completion"], obj["label"]))
        else:
            problems.report(where, "neither a pair nor a rating",
                            'need {"prompt", "chosen", "rejected"} or {"prompt", "completion", "label"}')
    return pairs, ratings


def examples_for(method: str, pairs: list, ratings: list) -> list[tuple]:
    """DPO: pairs, plus thumbs-up x thumbs-down of one prompt. KTO: ratings, plus each pair split in two."""
    if method == "dpo":
        by_prompt: dict[str, dict[bool, list[str]]] = defaultdict(lambda: {True: [], False: []})
        for prompt, completion, label in ratings:
            by_prompt[prompt][label].append(completion)
        derived = [(p, good, bad) for p, d in by_prompt.items() for good in d[True] for bad in d[False] if good != bad]
        return list(pairs) + derived
    return list(ratings) + [(p, c, True) for p, c, _ in pairs] + [(p, r, False) for p, _, r in pairs]


class PreferenceTask:
    """DPO or KTO on feedback examples, starting from (and regularised towards) a saved model."""

    def __init__(self, base: str | Path, feedback: str | Path, method: str = "dpo", beta: float = 0.1,
                 val_fraction: float = 0.1, lm_data: str | Path | None = None, seed: int = 0) -> None:
        if method not in METHODS:
            raise PocketLMError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        if not beta > 0:
            raise PocketLMError(f"--beta must be > 0, got {beta}")
        self.method, self.beta = method, beta
        self.folder = ckpt.resolve(base)
        self.start = None  # a transformers model folder: the model and tokenizer, as --init-from loads them
        if ckpt.is_pocketlm(self.folder):
            self.model_config = ckpt.read_config(self.folder)
            self.block_size = self.model_config.block_size
        else:
            from pocketlm.finetune import start as startlib

            self.start = startlib.load(str(self.folder))
            self.model_config = None
            self.block_size = self.start.model.config.block_size  # the context its positions allow
        self.tok = toklib.load(self.folder)
        pairs, ratings = read_feedback(feedback)
        examples = examples_for(method, pairs, ratings)
        if method == "dpo" and not examples:
            raise PocketLMError(f"{feedback} has no chosen/rejected pairs (nor a thumbs-up and a thumbs-down of one "
                                "prompt): DPO needs pairs; try --method kto for ratings")
        if method == "kto" and (not any(e[2] for e in examples) or all(e[2] for e in examples)):
            raise PocketLMError(f"{feedback} needs both thumbs-up and thumbs-down examples for KTO")
        encoded = [self._encode(e) for e in examples]
        random.Random(seed).shuffle(encoded)
        n_val = int(len(encoded) * val_fraction) if len(encoded) >= 10 else 0
        # with fewer than 10 examples nothing is held out: validation metrics then reuse the training examples
        self.splits = {"train": encoded[n_val:], "val": encoded[:n_val] or encoded[n_val:]}
        self.counts = {"examples": len(encoded), "val": n_val, "pairs": len(pairs), "ratings": len(ratings)}
        self.dataset = None  # the Trainer reads no token shards for this task
        self.lm = _LMProbe(lm_data, self.block_size) if lm_data else None
        self.ref: torch.nn.Module | None = None
        self.policy: torch.nn.Module | None = None
        self.stats: dict[str, list[dict[str, float]]] = {"train": [], "val": []}

    # ---- what the Trainer asks for besides batches and losses -----------------------------------------
    def source(self) -> "BaseModelSource":
        """The loop's ModelSource: the base model's weights, checkpoints with its tokenizer."""
        return BaseModelSource(self)

    def metrics(self, split: str) -> dict[str, float]:
        """Means of the batch statistics since the last call (and the LM loss on the base data, at evaluation)."""
        rows, self.stats[split] = self.stats[split], []
        prefix = "" if split == "train" else "val/"
        out = {f"{prefix}{k}": float(np.mean([r[k] for r in rows if k in r]))
               for k in (rows[0] if rows else {})}
        if split == "val" and self.lm is not None and self.policy is not None:
            out["lm/val_loss"] = self.lm.loss(self.policy)
        return out

    # ---- the Task protocol ---------------------------------------------------------------------------
    def batch(self, split: str, step: int, micro: int, batch_size: int, grad_accum: int, rt: Runtime,
              seed: int, device: torch.device) -> dict[str, torch.Tensor]:
        data = self.splits[split]
        per_step = batch_size * grad_accum * rt.world_size
        rng = np.random.default_rng([seed, SPLIT_CODE.get(split, 2), step])
        picks = rng.integers(0, len(data), size=per_step)
        start = (micro * rt.world_size + rt.rank) * batch_size
        chosen = [data[i] for i in picks[start:start + batch_size]]
        if self.method == "dpo":
            x, y = _pad([c[0] for c in chosen] + [c[1] for c in chosen], device)
            return {"x": x, "y": y}
        x, y = _pad([c[0] for c in chosen], device)
        # KL estimate: each prompt with the next example's completion (mismatched pairs)
        mismatched = [_join(chosen[i][2], chosen[(i + 1) % len(chosen)][3], self.block_size)
                      for i in range(len(chosen))]
        kx, ky = _pad(mismatched, device)
        label = torch.tensor([c[1] for c in chosen], dtype=torch.bool, device=device)
        return {"x": x, "y": y, "kl_x": kx, "kl_y": ky, "label": label}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref is None:
            raise PocketLMError("the preference task was not initialised from its base model")
        if next(self.ref.parameters()).device != batch["x"].device:
            self.ref.to(batch["x"].device)  # the loop moved the policy to its device after building it
        logp = _seq_logps(model(batch["x"])[0], batch["y"])
        with torch.no_grad():
            ref = _seq_logps(self.ref(batch["x"])[0], batch["y"])
        split = "train" if model.training else "val"
        if self.method == "dpo":
            B = logp.size(0) // 2
            chosen_r = self.beta * (logp[:B] - ref[:B])
            rejected_r = self.beta * (logp[B:] - ref[B:])
            margin = chosen_r - rejected_r
            loss = -F.logsigmoid(margin).mean()
            self.stats[split].append({
                "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
                "rewards/margin": margin.mean().item(), "rewards/accuracy": (margin > 0).float().mean().item(),
                "logps/chosen": logp[:B].mean().item(), "logps/rejected": logp[B:].mean().item()})
            return loss
        with torch.no_grad():
            kl = (_seq_logps(model(batch["kl_x"])[0], batch["kl_y"])
                  - _seq_logps(self.ref(batch["kl_x"])[0], batch["kl_y"])).mean().clamp(min=0)
        ratio = logp - ref
        good = batch["label"]
        losses = torch.where(good, 1 - torch.sigmoid(self.beta * (ratio - kl)),
                             1 - torch.sigmoid(self.beta * (kl - ratio)))
        rewards = self.beta * ratio.detach()
        row = {"kl": kl.item(), "rewards/accuracy": ((rewards > 0) == good).float().mean().item()}
        if good.any():
            row.update({"rewards/chosen": rewards[good].mean().item(), "logps/chosen": logp[good].mean().item()})
        if (~good).any():
            row.update({"rewards/rejected": rewards[~good].mean().item(), "logps/rejected": logp[~good].mean().item()})
        if good.any() and (~good).any():
            row["rewards/margin"] = row["rewards/chosen"] - row["rewards/rejected"]
        self.stats[split].append(row)
        return losses.mean()

    # ---- data ------------------------------------------------------------------------------------------
    def _encode(self, example: tuple) -> tuple:
        """DPO: (chosen seq, rejected seq); KTO: (seq, label, prompt ids, completion ids); seq = (ids, n_prompt)."""
        prompt = self._prompt_ids(example[0])
        if self.method == "dpo":
            return (_join(prompt, self.tok.encode(example[1]), self.block_size),
                    _join(prompt, self.tok.encode(example[2]), self.block_size))
        completion = self.tok.encode(example[1])
        return (_join(prompt, completion, self.block_size), bool(example[2]), prompt, completion)

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt)
        if not ids:  # an empty prompt starts at end-of-text, as generation does
            if self.tok.eot_id is None:
                raise PocketLMError("an example has an empty prompt and the tokenizer has no end-of-text token")
            ids = [self.tok.eot_id]
        return ids


def _join(prompt: list[int], completion: list[int], block_size: int) -> tuple[list[int], int]:
    """prompt + completion fitted to block_size + 1 tokens (completion first, the prompt's end kept) -> (ids, n_prompt)."""
    completion = completion[:block_size]  # at least one prompt token stays to predict the first completion token
    prompt = prompt[-(block_size + 1 - len(completion)):]
    return prompt + completion, len(prompt)


def _pad(seqs: list[tuple[list[int], int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> inputs x (B, L) and targets y (B, L) with -100 on prompt and padding positions."""
    L = max(len(ids) for ids, _ in seqs) - 1
    x = torch.zeros((len(seqs), L), dtype=torch.long)
    y = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids)
        x[i, :len(ids) - 1] = t[:-1]
        y[i, n_prompt - 1:len(ids) - 1] = t[n_prompt:]
    return x.to(device), y.to(device)


def _seq_logps(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the target tokens of each row (B,); -100 targets count nothing."""
    mask = y != -100
    lp = torch.gather(logits.float().log_softmax(-1), 2, y.clamp(min=0)[..., None])[..., 0]
    return (lp * mask).sum(-1)


class BaseModelSource:
    """train.ModelSource for preference tuning: builds the policy from the base model and keeps a frozen copy
    of it as the task's reference; checkpoints carry the base model's tokenizer (chat template included).
    A transformers base goes through fine-tuning's source (`finetune.run.Pretrained`): save_pretrained folders."""

    def __init__(self, task: PreferenceTask) -> None:
        self.task = task
        self.hf = None
        if task.start is not None:
            from pocketlm.finetune.run import Pretrained

            self.hf = Pretrained(task.start, None)

    def build(self) -> torch.nn.Module:
        model = _without_dropout(ckpt.load_model(self.task.folder, "cpu")[0] if self.hf is None else self.hf.build())
        self.task.ref = copy.deepcopy(model).eval().requires_grad_(False)
        self.task.policy = model.train()
        return model

    def save(self, model: torch.nn.Module, folder: Path, state: dict[str, torch.Tensor],
             generation: dict[str, Any]) -> None:
        if self.hf is not None:
            self.hf.save(model, folder, state, generation)
        else:
            ckpt.save_model(model, folder, self.task.folder, self.task.tok.eot_id, generation, state)

    def load_state(self, folder: Path) -> dict[str, torch.Tensor]:
        if self.hf is not None:
            return self.hf.load_state(folder)
        return ckpt.load_model(folder, "cpu")[0].state_dict()


def _without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in the policy (a transformers config often sets 0.1, a pocketlm run may have trained with
    it): with it on, the policy's log-ratios against the reference (always in eval mode) would carry noise
    even before the first step. The saved config keeps its values for later fine-tuning."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):  # attention that reads a float, not a module
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


class _LMProbe:
    """Next-token loss of the model on fixed windows of a prepared dataset's val split (the drift check)."""

    def __init__(self, data: str | Path, block_size: int, windows: int = 64) -> None:
        from pocketlm.data.prepare import Dataset

        split = Dataset(data).split("val")
        if len(split) < block_size + 1:
            raise PocketLMError(f"the val split of {data} is shorter than the context ({block_size} tokens)")
        offsets = np.random.default_rng(0).integers(0, len(split) - block_size, size=windows)
        rows = torch.from_numpy(split[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))
        self.x, self.y = rows[:, :-1], rows[:, 1:]

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        total = sum(model(self.x[i:i + 16].to(dev), self.y[i:i + 16].to(dev))[1].item()
                    for i in range(0, len(self.x), 16))
        model.train(was)
        return total / -(-len(self.x) // 16)


TUNE_DEFAULTS = {"train.lr": 1e-4, "train.min_lr": 1e-5, "train.warmup_steps": 10, "train.max_steps": 200,
                 "train.batch_size": 8, "train.eval_interval": 50, "train.eval_steps": 4, "train.weight_decay": 0.0,
                 "train.log_interval": 10}


def base_dataset(model: str | Path) -> Path | None:
    """The prepared dataset a run folder was trained on, when it is still there (for the drift check)."""
    run_cfg = Path(model) / "config.yaml"
    if not run_cfg.is_file():
        return None
    from pocketlm import config as configlib

    path = configlib.load_yaml(run_cfg).get("data.path")
    return Path(path) if path and (Path(path) / "manifest.json").is_file() else None


def tune(model: str | Path, feedback: str | Path, out: str | Path, method: str = "dpo", beta: float = 0.1,
         preset: str | None = None, overrides: dict[str, Any] | None = None,
         cli_overrides: dict[str, str] | None = None, lm_data: str | Path | None = None, resume: bool = False,
         overwrite: bool = False, verbose: bool = True):
    """Preference-tune a saved model on exported feedback through the shared training loop -> the final State."""
    import dataclasses
    import hashlib

    from pocketlm import atomic
    from pocketlm import config as configlib
    from pocketlm.train import Trainer

    lm_data = lm_data or base_dataset(model)
    task = PreferenceTask(model, feedback, method, beta, lm_data=lm_data)
    cfg = configlib.load(preset, overrides={**TUNE_DEFAULTS, **(overrides or {}), "train.out": str(out)},
                         cli_overrides=cli_overrides)
    if task.start is None:
        shape = {f"model.{k}": v for k, v in dataclasses.asdict(task.model_config).items()}
        configlib.apply(cfg, {**shape, "model.dropout": 0.0})  # the base model's shape, whatever the preset says
    else:
        from pocketlm.finetune.run import fit_config

        configlib.apply(cfg, {"model.block_size": task.block_size, "model.dropout": 0.0})
        fit_config(cfg, task.start.model)  # the transformers model's shape, as fine-tuning records it
    cfg.data.path = str(lm_data or "")
    trainer = Trainer(cfg, task, resume=resume, overwrite=overwrite, verbose=verbose, source=task.source())
    if trainer.rt.is_main:
        info = {"format_version": 1, "method": method, "beta": beta, "base": str(task.folder),
                "feedback": str(feedback), "feedback_sha256": hashlib.sha256(Path(feedback).read_bytes()).hexdigest(),
                "lm_data": str(lm_data) if lm_data else None, **task.counts}
        atomic.atomic_write_text(Path(out) / "tune.json", json.dumps(info, indent=2) + "\n")
        if verbose:
            print(f"pocketlm tune: {method.upper()} (beta {beta}) on {task.counts['examples']} examples "
                  f"({task.counts['pairs']} pairs, {task.counts['ratings']} ratings; {task.counts['val']} held out) "
                  f"from {task.folder}", file=sys.stderr)
    return trainer.fit()
