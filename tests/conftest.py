"""Shared fixtures: tiny corpora and datasets made in tmp_path, tiny configs (CPU, seconds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pocketlm import config as configlib
from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare

WORDS = "the cat sat on a mat and the dog ran to the red ball while birds sang in old green trees".split()
TINY_MODEL = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 32}


def make_corpus(folder: Path, docs: int = 60, seed: int = 0) -> Path:
    """Documents of short sentences separated by blank lines: enough structure for the loss to fall."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paras = []
    for _ in range(docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(rng.randint(2, 4))]
        paras.append("\n".join(lines))
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "text")


@pytest.fixture
def char_data(tmp_path: Path, corpus: Path) -> Path:
    out = tmp_path / "data"
    prepare([corpus], out, DataConfig(tokenizer="char", val_fraction=0.2), verbose=False)
    return out


def tiny_config(data: Path, out: Path, **overrides) -> configlib.Config:
    base = {**TINY_MODEL, "data.path": str(data), "train.out": str(out), "train.max_steps": 30,
            "train.batch_size": 4, "train.eval_interval": 10, "train.eval_steps": 2, "train.log_interval": 5,
            "train.warmup_steps": 5, "train.lr": 1e-2, "train.min_lr": 1e-3}
    return configlib.load(overrides={**base, **overrides})
