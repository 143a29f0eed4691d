"""A `transformers` causal LM behind the interface of pocketlm's GPT, so the loop and the engine take either.

`HFModel(idx, targets) -> (logits, loss)` with loss = mean cross-entropy ignoring -100 (the targets are
already shifted, as pocketlm's batches are); `cache=` takes an `HFCache` (transformers' own DynamicCache
plus the position counter the engine reads). Checkpoints are the model's own `save_pretrained` folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import PocketLMError

HF_PREFIX = "hf."  # parameter names inside the wrapper: "hf." + the transformers model's own names


@dataclass
class HFShape:
    """The few facts the loop and the engine read from `model.config` (GPTConfig's names)."""

    vocab_size: int
    block_size: int  # the context the model's positions allow
    n_layer: int
    n_embd: int


class HFCache:
    """transformers' DynamicCache and how many positions it holds (the engine's KVCache contract)."""

    def __init__(self) -> None:
        self.past: Any = None
        self.pos = 0

    def reset(self) -> None:
        self.past, self.pos = None, 0


def context_of(hf_config: Any) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class HFModel(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        c = hf.config
        self.model_type = c.model_type
        head = hf.get_output_embeddings()  # the logits' width (a model may pad its head past the input rows)
        vocab = (head if head is not None else hf.get_input_embeddings()).weight.shape[0]
        self.config = HFShape(vocab_size=vocab, block_size=context_of(c),
                              n_layer=getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0),
                              n_embd=getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: HFCache | None = None,
                last_only: bool = False, position_ids: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`position_ids` restarting at each example of a packed row: transformers then masks attention to
        each example (its packed-sequence detection, with no attention_mask and no cache)."""
        if cache is not None:
            out = self.hf(input_ids=idx, past_key_values=cache.past, use_cache=True,
                          logits_to_keep=1 if last_only else 0)
            cache.past = out.past_key_values
            cache.pos += idx.shape[1]
            return out.logits, None
        extra = {} if position_ids is None else {"position_ids": position_ids}
        out = self.hf(input_ids=idx, use_cache=False, logits_to_keep=1 if last_only and targets is None else 0,
                      **extra)
        logits = out.logits
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def new_cache(self) -> HFCache:
        return HFCache()

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            pos = getattr(getattr(self.hf, "transformer", None), "wpe", None)
            n -= pos.weight.numel() if pos is not None else 0
        return n

    def flops_per_token(self) -> float:
        """6N (forward + backward); the attention term needs the window, which the model does not know."""
        return 6 * self.num_params()

    def save(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """The model's own save_pretrained (config.json, model.safetensors, generation_config.json)."""
        hf_state = None
        if state is not None:
            hf_state = {k.removeprefix(HF_PREFIX): v for k, v in state.items()}
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per checkpoint would break pocketlm's own progress line
        self.hf.save_pretrained(str(folder), state_dict=hf_state)


def _hub_error(spec: str, e: BaseException) -> PocketLMError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if Path(spec).exists():
        return PocketLMError(f"transformers cannot load {spec}: {first}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return PocketLMError(f"{spec!r} is not a local folder and the Hugging Face Hub is offline (HF_HUB_OFFLINE): "
                             "download it while online once, or pass a local model folder")
    return PocketLMError(f"cannot resolve {spec!r} as a local folder or Hugging Face Hub model ({first}): check "
                         "the id and the connection, or pass a local model folder")


def load(spec: str, device: str | torch.device = "cpu") -> tuple[HFModel, Any]:
    """A hub id or local folder -> (HFModel in float32, its tokenizer); one-line errors when offline or wrong."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # pocketlm prints its own progress; a bar per load is noise
    try:
        hf = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # OSError, ValueError, hub errors, connection errors: one line naming the fix
        raise _hub_error(spec, e) from None
    if not getattr(tok, "is_fast", False):
        raise PocketLMError(f"{spec} has no fast (tokenizer.json) tokenizer; pocketlm reads tokenizer.json")
    return HFModel(hf).to(device), tok


def load_folder(folder: Path, device: str | torch.device = "cpu") -> HFModel:
    """A saved transformers model folder -> HFModel in eval mode (for generation)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as e:
        raise _hub_error(str(folder), e) from None
    return HFModel(hf).to(device).eval()
