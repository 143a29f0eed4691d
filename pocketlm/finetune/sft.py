"""Supervised fine-tuning on conversations: JSONL in, a chat template, loss on assistant tokens only, packing.

Input lines are `{"prompt", "response"}` (optionally `"system"`) or `{"messages": [{"role", "content"}, ...]}`
with roles system/user/assistant. Text is rendered by the tokenizer's own chat template through
`transformers`' `apply_chat_template` (a tokenizer without one gets ChatML, stored in tokenizer_config.json),
so what pocketlm trains on is exactly what `apply_chat_template` gives at inference. Labels are -100 except
on the tokens of assistant messages (their end-of-turn marker included).

Packing: examples are laid back to back into rows of block_size + 1 tokens (an example never straddles two
rows; the rest of a row is padding with label -100). Each example trains as if it were alone, as it is at
inference: its positions restart at 0, and it attends to none of the examples before it in the row (the
model takes `position_ids` and masks attention to each example, as transformers does for packed rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm.device import Runtime
from pocketlm.errors import PocketLMError
from pocketlm.train import SPLIT_CODE, NextTokenTask

ROLES = ("system", "user", "assistant")
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def read_examples(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file; the first bad line is a one-line error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise PocketLMError(f"no such SFT file: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PocketLMError(f"{where}: not valid JSON ({e.msg})") from None
            out.append(to_messages(obj, where))
    if not out:
        raise PocketLMError(f"{path} has no examples")
    return out


def to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise PocketLMError(f"{where}: expected an object with prompt/response or messages")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PocketLMError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PocketLMError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise PocketLMError(f"{where}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
            if not isinstance(m["content"], str):
                raise PocketLMError(f"{where}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise PocketLMError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise PocketLMError(f"{where}: missing field {missing[0]!r} (need prompt and response, or messages)")
    if not all(isinstance(obj[k], str) for k in ("prompt", "response")) or not isinstance(obj.get("system", ""), str):
        raise PocketLMError(f"{where}: prompt, response and system must be strings")
    msgs = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return msgs + [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]


def ensure_chat_template(tok: Any) -> list[str]:
    """Give a tokenizer without a chat template ChatML; returns the special tokens that must be added."""
    if getattr(tok, "chat_template", None):
        return []
    tok.chat_template = CHATML
    return [TURN_START, TURN_END]


def end_of_turn(tok: Any) -> list[str]:
    """Strings that end an assistant turn in this tokenizer's template (chat stops at them)."""
    if TURN_END in (tok.chat_template or ""):
        return [TURN_END]
    return [tok.eos_token] if tok.eos_token else []


def render(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, labels: the id on assistant tokens, -100 elsewhere)."""
    text = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tok, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tok, messages[:i + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            raise PocketLMError("the chat template does not render conversations prefix by prefix; pocketlm cannot "
                                "locate the assistant tokens")
        spans.append((len(head), len(upto)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    labels = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(enc["input_ids"],
                                                                                     enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


def pack(examples: list[tuple[list[int], list[int]]], length: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows of `length` tokens holding whole examples back to back; (ids, labels, positions, examples
    truncated). Positions count from 0 in each example (and in the padding after the last)."""
    rows_ids, rows_lab, rows_pos, cur_ids, cur_lab, cur_pos, cut = [], [], [], [], [], [], 0
    for ids, lab in examples:
        if len(ids) > length:
            ids, lab, cut = ids[:length], lab[:length], cut + 1
        if not any(x != -100 for x in lab[1:]):
            continue  # nothing left to learn from (the answer was cut off)
        if len(cur_ids) + len(ids) > length:
            rows_ids.append(cur_ids)
            rows_lab.append(cur_lab)
            rows_pos.append(cur_pos)
            cur_ids, cur_lab, cur_pos = [], [], []
        cur_ids, cur_lab, cur_pos = cur_ids + ids, cur_lab + lab, cur_pos + list(range(len(ids)))
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_lab.append(cur_lab)
        rows_pos.append(cur_pos)
    ids_arr = np.full((len(rows_ids), length), pad_id, dtype=np.int64)
    lab_arr = np.full((len(rows_ids), length), -100, dtype=np.int64)
    pos_arr = np.tile(np.arange(length, dtype=np.int64), (len(rows_ids), 1))
    for r, (i, lab, pos) in enumerate(zip(rows_ids, rows_lab, rows_pos)):
        ids_arr[r, :len(i)] = i
        lab_arr[r, :len(lab)] = lab
        pos_arr[r, :len(pos)] = pos
        pos_arr[r, len(pos):] -= len(pos)  # the padding counts from 0 too: a separate "example"
    return ids_arr, lab_arr, pos_arr, cut


def split_examples(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the validation examples (at least one, never all)."""
    if n < 2:
        raise PocketLMError(f"SFT needs at least 2 examples (one held out for validation), got {n}; or give --val")
    k = min(n - 1, max(1, round(n * val_fraction)))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


class SFTTask(NextTokenTask):
    """Packed conversation rows; a batch is rows drawn by (seed, split, step), so resume stays exact.
    Evaluation's per-token metrics cover the assistant tokens only (labels are -100 elsewhere)."""

    dataset = None

    def __init__(self, tok: Any, train: list[list[dict[str, str]]], val: list[list[dict[str, str]]],
                 block_size: int) -> None:
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.splits, self.truncated = {}, 0
        for name, convs in (("train", train), ("val", val)):
            ids, labels, positions, cut = pack([encode(tok, m) for m in convs], block_size + 1, pad)
            if not len(ids):
                raise PocketLMError(f"no {name} example keeps an assistant token within block_size {block_size}: "
                                    "raise --block-size")
            self.splits[name] = (ids, labels, positions)
            self.truncated += cut
        self.examples = {"train": len(train), "val": len(val)}

    def batch(self, split: str, step: int, micro: int, batch_size: int, grad_accum: int, rt: Runtime,
              seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, labels, positions = self.splits[split]
        per_step = batch_size * grad_accum * rt.world_size
        rng = np.random.default_rng([seed, SPLIT_CODE[split], step])
        pick = rng.integers(0, len(ids), size=per_step)
        start = (micro * rt.world_size + rt.rank) * batch_size
        mine = pick[start:start + batch_size]
        x = torch.from_numpy(ids[mine, :-1]).to(device)
        y = torch.from_numpy(labels[mine, 1:]).to(device)
        return x, y, torch.from_numpy(positions[mine, :-1]).to(device)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, pos = batch
        return model(x, y, position_ids=pos)[1]

    def logits(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, y, pos = batch
        return model(x, position_ids=pos)[0], y
