"""Evaluation metrics: hand-computed values, bits per byte across tokenizations, training and HF models."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pocketlm import evaluate as ev
from pocketlm import tokenizer as toklib
from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare
from pocketlm.errors import PocketLMError
from pocketlm.train import train
from tests.conftest import make_corpus, tiny_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A BPE dataset with a test split and a tiny run trained on it (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = make_corpus(root / "text", docs=80)
    data = root / "data"
    prepare([corpus], data, DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0.15, test_fraction=0.15),
            verbose=False)
    run = root / "run"
    train(tiny_config(data, run, **{"train.max_steps": 20}), verbose=False)
    return data, run


def test_metrics_match_hand_computation() -> None:
    rows = [[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0], [1.0, 0.2, 5.0, 0.0], [0.3, 0.1, 0.2, 0.9]]
    targets = [0, 3, ev.IGNORE, 1]
    table = [1, 2, 3, 0]  # bytes per token id
    meter = ev.Meter(k=2, token_bytes=torch.tensor(table))
    meter.add(torch.tensor([rows]), torch.tensor([targets]))
    m = meter.metrics()
    nll = [math.log(sum(math.exp(v) for v in r)) - r[t] for r, t in zip(rows, targets) if t != ev.IGNORE]
    loss = sum(nll) / 3
    assert m["loss"] == pytest.approx(loss, rel=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert m["acc"] == pytest.approx(1 / 3)  # only row 0's target has the largest logit
    assert m["top2_acc"] == pytest.approx(2 / 3)  # row 1's target is second; row 3's is last
    bytes_ = table[0] + table[3] + table[1]
    assert meter.bytes == bytes_ and meter.tokens == 3
    assert m["bpb"] == pytest.approx(sum(nll) / math.log(2) / bytes_, rel=1e-6)


def test_ties_in_bf16_logits_count_as_a_random_tie_break() -> None:
    """bf16 rounds near values together: a target tied with two others is a third of a hit, not a whole one;
    in the top 2 with one logit above it and one tied, half of one. fp32 logits keep the strict count."""
    rows = [[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]]
    targets = [0, 2, 2]
    meter = ev.Meter(k=2)
    meter.add(torch.tensor([rows], dtype=torch.bfloat16), torch.tensor([targets]))
    m = meter.metrics()
    assert m["acc"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert m["top2_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    strict = ev.Meter(k=2)
    strict.add(torch.tensor([rows]), torch.tensor([targets]))
    assert strict.metrics()["acc"] == pytest.approx(2 / 3) and strict.metrics()["top2_acc"] == pytest.approx(1.0)


def test_empty_meter_is_an_error() -> None:
    with pytest.raises(PocketLMError, match="nothing was evaluated"):
        ev.Meter().metrics()


# ---- bits per byte under an oracle ------------------------------------------------------------------------

EOT = "<|endoftext|>"
P_CHAR = {"a": 0.7, "é": 0.3}  # the oracle: i.i.d. characters, each document ends with probability Q
Q = 0.2


class Oracle(torch.nn.Module):
    """A model with fixed next-token probabilities (its logits are their logs)."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logp = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log().float())
        self.config = SimpleNamespace(vocab_size=len(probs))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.logp.expand(*x.shape, -1), None


def _pair_tokenizer(folder: Path) -> None:
    """Two characters per token: another tokenization of the same texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {a + b: i for i, (a, b) in enumerate(itertools.product("aé", repeat=2))}
    vocab[toklib.UNK] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=toklib.UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]{2}"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([EOT])
    toklib.save(tk, folder, EOT)


def _oracle_lm(data: Path, pair: bool) -> ev.LM:
    tok = toklib.load(data)
    vocab = {tok.tk.id_to_token(i): i for i in range(tok.vocab_size)}
    probs = [0.0] * tok.vocab_size
    probs[vocab[EOT]] = Q
    if pair:  # P(xy) = P(x) P(y) with no end between them; the leftover mass sits on <|unk|>
        for x, y in itertools.product(P_CHAR, repeat=2):
            probs[vocab[x + y]] = (1 - Q) ** 2 * P_CHAR[x] * P_CHAR[y]
        probs[vocab[toklib.UNK]] = Q * (1 - Q)
    else:
        for c, p in P_CHAR.items():
            probs[vocab[c]] = (1 - Q) * p
    assert sum(probs) == pytest.approx(1.0)
    return ev.LM(Oracle(probs), tok, 7, data, "pocketlm")


def test_bits_per_byte_equal_for_two_tokenizations_under_an_oracle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list(P_CHAR), size=2 * rng.integers(1, 12))) for _ in range(40)]
    (tmp_path / "train.txt").write_text("aé\néa\n", encoding="utf-8")
    (tmp_path / "val.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    _pair_tokenizer(tmp_path / "pairs")
    results = {}
    for name, kind in (("char", "char"), ("pair", str(tmp_path / "pairs"))):
        prepare([tmp_path / "train.txt"], tmp_path / name, DataConfig(tokenizer=kind, separator="line"),
                val=[tmp_path / "val.txt"], verbose=False)
        results[name] = ev.evaluate_split(_oracle_lm(tmp_path / name, name == "pair"), tmp_path / name, "val")
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    bits = sum(-math.log2((1 - Q) * P_CHAR[c]) for d in docs for c in d) - len(docs) * math.log2(Q)
    for r in results.values():
        assert r["bytes"] == text_bytes
        assert r["metrics"]["bpb"] == pytest.approx(bits / text_bytes, rel=1e-5)
    # the two tokenizations differ in tokens, so loss per token differs; bits per byte does not
    assert results["pair"]["tokens"] < results["char"]["tokens"]
    assert results["pair"]["metrics"]["loss"] > results["char"]["metrics"]["loss"] * 1.5
    # a dataset in another tokenizer is re-encoded with the model's; only bpb is reported, with a note
    cross = ev.evaluate_split(_oracle_lm(tmp_path / "pair", True), tmp_path / "char", "val")
    assert set(cross["metrics"]) == {"bpb"} and "differs" in cross["notes"][0]
    assert cross["metrics"]["bpb"] == pytest.approx(bits / text_bytes, rel=1e-5)


@pytest.mark.parametrize("kind, extra", [("char", {}), ("char", {"unknown": "bytes"}), ("bpe", {}),
                                         ("bpe", {"pre_tokenizer": "metaspace"}), ("gpt2", {})])
def test_token_bytes_add_up_to_the_text(tmp_path: Path, kind: str, extra: dict) -> None:
    text = "Ünïcödé — naïve café 😀 x\n\ttabs and  spaces 日本語 ok"
    if kind == "gpt2":
        if not (SHARED / "gpt2_tokenizer" / "tokenizer.json").is_file():
            pytest.skip("shared GPT-2 tokenizer not present")
        tok = toklib.load(SHARED / "gpt2_tokenizer")
    else:
        src = tmp_path / "t.txt"
        src.write_text(text + "\n\nmore text here\n", encoding="utf-8")
        prepare([src], tmp_path / "d", DataConfig(tokenizer=kind, vocab_size=300, val_fraction=0.0, **extra),
                verbose=False)
        tok = toklib.load(tmp_path / "d")
        if extra.get("unknown") == "bytes":  # characters the corpus never had fall back to byte tokens
            text += " ∑≈"
    table = ev.token_byte_lengths(tok)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    if tok.eot_id is not None:
        assert table[tok.eot_id] == 0


# ---- training, the CLI's evaluation and Hugging Face models -----------------------------------------------

def test_training_logs_val_metrics_and_tests_once_at_the_end(trained: tuple[Path, Path]) -> None:
    data, run = trained
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val/loss" in r]
    assert len(vals) == 2
    for r in vals:
        assert {"val/ppl", "val/acc", "val/top10_acc", "val/bpb"} <= set(r)
        assert r["val/ppl"] == pytest.approx(math.exp(r["val/loss"]))
        assert 0 <= r["val/acc"] <= r["val/top10_acc"] <= 1 and r["val/bpb"] > 0
    logs = [r for r in rows if "train/loss" in r]
    assert all(r["mfu"] > 0 and r["peak_mem_mb"] > 10 for r in logs)
    tests = [r for r in rows if "test/loss" in r]
    assert len(tests) == 1 and tests[0]["step"] == 20
    # the same numbers as `pocketlm eval` on the best checkpoint: one code path
    again = ev.evaluate_split(ev.load_lm(run, "cpu"), data, "test", batch_size=4)
    for k, v in again["metrics"].items():
        assert tests[0][f"test/{k}"] == pytest.approx(v, rel=1e-6)


def test_hf_folders_evaluate_like_pocketlm(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    data, run = trained
    ours = ev.evaluate_split(ev.load_lm(run, "cpu"), data, "val")
    # the same weights read by transformers (GPT2LMHeadModel), as any foreign GPT-2 folder would be
    foreign = tmp_path / "gpt2"
    shutil.copytree(run / "best", foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    del cfg["pocketlm"]
    (foreign / "config.json").write_text(json.dumps(cfg))
    lm = ev.load_lm(foreign, "cpu")
    assert lm.kind == "transformers"
    theirs = ev.evaluate_split(lm, data, "val")
    for k, v in ours["metrics"].items():
        assert theirs["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6)
    # another architecture entirely: a tiny random Llama with the dataset's tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = toklib.load(data).vocab_size
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    llama.save_pretrained(tmp_path / "llama")
    toklib.copy_files(data, tmp_path / "llama")
    lm = ev.load_lm(tmp_path / "llama", "cpu")
    res = ev.evaluate_split(lm, data, "val")
    assert lm.kind == "transformers" and lm.block_size == 64
    assert abs(res["metrics"]["loss"] - math.log(vocab)) < 0.5  # untrained: close to uniform
    from pocketlm.generate import SamplingParams

    samples = ev.generate_samples(lm, ["the cat", "a dog"], 3, SamplingParams(max_new_tokens=5, seed=1))
    assert [s["prompt"] for s in samples] == ["the cat", "the cat", "a dog"]
    assert all(0 < s["tokens"] <= 5 for s in samples)


def test_bad_inputs_give_one_line_errors(trained: tuple[Path, Path], tmp_path: Path, corpus: Path) -> None:
    data, run = trained
    no_test = tmp_path / "no_test"
    prepare([corpus], no_test, DataConfig(tokenizer="bpe", vocab_size=300), verbose=False)
    lm = ev.load_lm(run, "cpu")
    with pytest.raises(PocketLMError, match=r"test split of .* is empty \(0 tokens\).*--split val"):
        ev.evaluate_split(lm, no_test, "test")
    with pytest.raises(PocketLMError, match="not a prepared dataset"):
        ev.evaluate_split(lm, tmp_path, "val")
    with pytest.raises(PocketLMError, match="not a model folder"):
        ev.load_lm(tmp_path, "cpu")


# ---- samples: every model kind through the engine ---------------------------------------------------------

def transformers_folder(kind: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A stock transformers model (context 64) with a pocketlm tokenizer: what `pocketlm eval` gets from elsewhere."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = toklib.load(tokenizer_dir).vocab_size
    torch.manual_seed(0)
    if kind == "gpt2":  # learned positions: nothing past position 63 exists
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab))
    else:  # rotary positions: runs past the window, into positions it was never meant for
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64))
    model.save_pretrained(str(folder))
    toklib.copy_files(tokenizer_dir, folder)
    return folder


@pytest.mark.parametrize("kind", ["pocketlm", "gpt2", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_samples_past_the_context_equal_the_engine(trained: tuple[Path, Path], tmp_path: Path, kind: str,
                                                   temperature: float) -> None:
    """eval's samples are `pocketlm generate`'s (the Engine: window refills past the context), token for token."""
    from pocketlm.generate import Engine, SamplingParams

    data, run = trained
    folder = run if kind == "pocketlm" else transformers_folder(kind, tmp_path / kind, data)
    lm = ev.load_lm(folder, "cpu")
    assert lm.kind == ("pocketlm" if kind == "pocketlm" else "transformers")
    p = SamplingParams(max_new_tokens=150, temperature=temperature, top_k=20, seed=5, stop_at_eot=False)
    assert p.max_new_tokens > 2 * lm.block_size  # the window fills and is refilled
    samples = ev.generate_samples(lm, ["the cat", "a dog"], 3, p)
    engine = Engine.load(folder, "cpu")
    want = [("the cat", c) for c in engine.generate("the cat", SamplingParams(**{**vars(p), "seed": 5}), 2)] + \
           [("a dog", c) for c in engine.generate("a dog", SamplingParams(**{**vars(p), "seed": 6}), 1)]
    assert [(s["prompt"], s["text"], s["tokens"]) for s in samples] == \
           [(prompt, c.text, len(c.token_ids)) for prompt, c in want]
    assert all(s["tokens"] == 150 for s in samples)


def test_eval_takes_generates_sampling_flags(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`pocketlm eval --samples` takes `generate`'s flags (--seed too) and gives `generate`'s samples."""
    from pocketlm.cli import main
    from pocketlm.generate import Engine, SamplingParams

    data, _ = trained
    folder = transformers_folder("gpt2", tmp_path / "gpt2", data)
    report = tmp_path / "r.md"
    assert main(["eval", str(folder), "--samples", "2", "--seed", "7", "--temperature", "1.5", "--top-k", "0",
                 "--max-new-tokens", "100", "--prompt", "the", "--report", str(report), "--quiet"]) == 0
    md = report.read_text()
    assert "seed 7" in md and "temperature 1.5" in md
    want = Engine.load(folder, "cpu").generate("the", SamplingParams(max_new_tokens=100, temperature=1.5, seed=7), 2)
    for c in want:
        assert f"```text\nthe{c.text}\n```" in md
    assert len({c.text for c in want}) == 2  # two different samples, both in the report
