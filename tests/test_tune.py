"""Preference tuning through the shared loop: synthetic feedback that prefers a word makes the word likelier."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.generate import Engine
from pocketlm.preference import PreferenceTask, _LMProbe, examples_for, read_feedback
from pocketlm.train import train
from tests.conftest import WORDS, tiny_config

pytestmark = pytest.mark.slow  # trains a tiny base model, then tunes it (~20 s on an idle 2-core machine)
WORD, OTHER = "cat", "dog"
LM_DRIFT_BOUND = 0.2  # nats: the LM val loss on the original data may rise at most this much


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from pocketlm.config import DataConfig
    from pocketlm.data.prepare import prepare
    from tests.conftest import make_corpus

    tmp = tmp_path_factory.mktemp("tune")
    prepare([make_corpus(tmp / "text")], tmp / "data", DataConfig(tokenizer="char", val_fraction=0.2), verbose=False)
    train(tiny_config(tmp / "data", tmp / "run", **{"train.max_steps": 60, "model.n_embd": 32}), verbose=False)
    return tmp / "run"


def synthetic_feedback(path: Path, n: int, seed: int = 0) -> list[str]:
    """Pairs whose chosen completion says WORD where the rejected one says another word; returns the prompts."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w not in (WORD, OTHER, "the", "a")]
    prompts, lines = [], []
    for _ in range(n):
        prompt = " ".join(rng.choice(others) for _ in range(rng.randint(2, 4))) + " the"
        tail = " " + " ".join(rng.choice(others) for _ in range(2)) + "."
        lines.append({"prompt": prompt, "chosen": f" {WORD}{tail}", "rejected": f" {OTHER}{tail}"})
        prompts.append(prompt)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return prompts


@torch.no_grad()
def word_logprob(model_dir: Path, prompts: list[str], word: str) -> float:
    """Mean log P(' word' | prompt) under the model: the summed log-probabilities of its characters."""
    engine = Engine.load(model_dir, "cpu")
    total = 0.0
    for prompt in prompts:
        p, w = engine.tok.encode(prompt), engine.tok.encode(" " + word)
        x = torch.tensor([p + w[:-1]])
        logp = engine.model(x)[0][0].log_softmax(-1)
        total += sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(w))
    return total / len(prompts)


def test_dpo_raises_the_preferred_word_and_keeps_the_lm(base: Path, tmp_path: Path) -> None:
    fb = tmp_path / "feedback.jsonl"
    synthetic_feedback(fb, 60)
    held_out = synthetic_feedback(tmp_path / "other.jsonl", 20, seed=1)  # prompts the tuning never saw
    data = Path(json.loads(json.dumps(str(base.parent / "data"))))
    probe = _LMProbe(data, 32)
    lm_before = probe.loss(Engine.load(base, "cpu").model)
    before = word_logprob(base, held_out, WORD), word_logprob(base, held_out, OTHER)
    out = tmp_path / "dpo"
    assert main(["tune", str(base), "--feedback", str(fb), "--method", "dpo", "--out", str(out), "--beta", "2",
                 "--max-steps", "30", "--lr", "5e-4", "--train.eval_interval", "15"]) == 0
    after = word_logprob(out / "last", held_out, WORD), word_logprob(out / "last", held_out, OTHER)
    lm_after = probe.loss(Engine.load(out / "last", "cpu").model)
    assert after[0] > before[0] + 0.5, (before, after)  # the chosen word became more likely...
    assert after[0] - after[1] > before[0] - before[1] + 1.0  # ...relative to the rejected one
    assert lm_after < lm_before + LM_DRIFT_BOUND, (lm_before, lm_after)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/rewards/margin" in r]
    assert evals[-1]["val/rewards/accuracy"] > 0.9 and evals[-1]["val/rewards/margin"] > 0
    assert all(k in rows[0] for k in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"))
    assert "lm/val_loss" in evals[-1]  # the drift on the base run's own data is logged at each evaluation
    info = json.loads((out / "tune.json").read_text())
    assert info["method"] == "dpo" and info["pairs"] == 60
    from transformers import AutoModelForCausalLM, AutoTokenizer  # a standard HF folder, tokenizer included
    AutoModelForCausalLM.from_pretrained(out / "best")
    assert AutoTokenizer.from_pretrained(out / "best").decode([1, 2])


def ratings_from_pairs(pairs: Path, out: Path) -> Path:
    """The same preference as unpaired thumbs up / thumbs down (KTO's input)."""
    with open(out, "w") as f:
        for line in pairs.read_text().splitlines():
            x = json.loads(line)
            f.write(json.dumps({"prompt": x["prompt"], "completion": x["chosen"], "label": True}) + "\n")
            f.write(json.dumps({"prompt": x["prompt"], "completion": x["rejected"], "label": False}) + "\n")
    return out


def kto_moves_the_preference(model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """KTO on the synthetic preference given as ratings raises the preferred word; -> (run, ratings file)."""
    pairs = tmp_path / "pairs.jsonl"
    prompts = synthetic_feedback(pairs, 40)
    fb = ratings_from_pairs(pairs, tmp_path / "ratings.jsonl")
    before = word_logprob(model, prompts[:10], WORD)
    out = tmp_path / "kto"
    assert main(["tune", str(model), "--feedback", str(fb), "--method", "kto", "--out", str(out),
                 "--beta", "1", "--max-steps", "30", "--lr", "1e-3", "--train.eval_interval", "30"]) == 0
    assert word_logprob(out / "last", prompts[:10], WORD) > before + 0.5
    return out, fb


def test_kto_from_ratings_moves_the_same_way(base: Path, tmp_path: Path) -> None:
    out, _ = kto_moves_the_preference(base, tmp_path)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in rows[0] and "val/rewards/margin" in rows[-1]


def test_feedback_formats_and_errors(base: Path, tmp_path: Path) -> None:
    fb = tmp_path / "fb.jsonl"
    fb.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\nnot json\n'
                  '{"prompt": "b", "completion": "good", "label": true}\n'
                  '{"prompt": "b", "completion": "bad", "label": false}\n{"prompt": "c"}\n')
    pairs, ratings = read_feedback(fb)
    assert len(pairs) == 1 and len(ratings) == 2
    assert examples_for("dpo", pairs, ratings) == [("a", "x", "y"), ("b", "good", "bad")]
    assert sorted(e[2] for e in examples_for("kto", pairs, ratings)) == [False, False, True, True]
    only_ratings = tmp_path / "r.jsonl"
    only_ratings.write_text('{"prompt": "b", "completion": "good", "label": true}\n')
    with pytest.raises(PocketLMError, match="DPO needs pairs"):
        PreferenceTask(base, only_ratings, "dpo")
    with pytest.raises(PocketLMError, match="both thumbs-up and thumbs-down"):
        PreferenceTask(base, only_ratings, "kto")
    assert main(["tune", str(base), "--feedback", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2


def test_the_policy_runs_without_dropout() -> None:
    """A base model trained with dropout: the policy must not drop (its reference never does), else the
    log-ratios are noise before the first step. pocketlm's attention reads a float, not a module."""
    import torch

    from pocketlm.model import GPT, GPTConfig
    from pocketlm.preference import _without_dropout

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.3)).train()
    x = torch.randint(0, 30, (2, 16))
    assert not torch.equal(m(x)[0], m(x)[0])
    _without_dropout(m)
    assert torch.equal(m(x)[0], m(x)[0]) and m.config.dropout == 0.3  # the saved config keeps its value
