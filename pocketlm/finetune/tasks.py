"""Replay: a share of every training batch drawn from another prepared dataset, against forgetting.

Which rows of a step come from the replay dataset is a pure function of (seed, step), like every batch in
the loop, so resume stays exact; evaluation reads the target dataset only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm.data.prepare import Dataset
from pocketlm.device import Runtime
from pocketlm.errors import PocketLMError
from pocketlm.train import LMTask


def parse_replay(spec: str) -> tuple[Path, float]:
    path, sep, share = spec.rpartition(":")
    try:
        value = float(share)
    except ValueError:
        value = -1.0
    if not sep or not path or not 0 < value < 1:
        raise PocketLMError(f"--replay {spec!r}: expected DATA:SHARE with 0 < SHARE < 1, e.g. data/gutenberg:0.1")
    return Path(path), value


def same_tokenizer(a: Dataset, b: Dataset) -> bool:
    from tokenizers import Tokenizer

    va = Tokenizer.from_file(str(a.path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    vb = Tokenizer.from_file(str(b.path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return va == vb


class ReplayTask:
    """LMTask on the target data, with round(share x global batch) rows of each step from the replay data."""

    def __init__(self, target: LMTask, replay: LMTask, share: float) -> None:
        if not same_tokenizer(target.dataset, replay.dataset):
            raise PocketLMError(f"--replay {replay.dataset.path} was prepared with a different tokenizer than "
                                f"{target.dataset.path}: prepare both with the same --tokenizer")
        self.dataset, self.target, self.replay, self.share = target.dataset, target, replay, share

    def batch(self, split: str, step: int, micro: int, batch_size: int, grad_accum: int, rt: Runtime,
              seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.target.batch(split, step, micro, batch_size, grad_accum, rt, seed, device)
        if split != "train":
            return x, y
        per_step = batch_size * grad_accum * rt.world_size
        rng = np.random.default_rng([seed, 7, step])
        is_replay = np.zeros(per_step, dtype=bool)
        is_replay[rng.permutation(per_step)[:round(self.share * per_step)]] = True
        start = (micro * rt.world_size + rt.rank) * batch_size  # this rank's rows, as LMTask slices them
        mine = is_replay[start:start + batch_size]
        if not mine.any():
            return x, y
        rx, ry = self.replay.batch(split, step, micro, batch_size, grad_accum, rt, seed + 1, device)
        m = torch.from_numpy(mine).to(device)[:, None]
        return torch.where(m, rx, x), torch.where(m, ry, y)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.target.loss(model, batch)

    def logits(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
        return self.target.logits(model, batch)

    def split(self, batch: Any, n: int) -> list[tuple[Any, float]]:
        return self.target.split(batch, n)
