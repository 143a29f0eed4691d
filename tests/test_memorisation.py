"""The suffix-array text index and the sample report: planted copies are found, counts match brute force."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pocketlm import evaluate as ev
from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare
from pocketlm.textindex import TextIndex, index_for_dataset, normalise, suffix_array, suffix_array_numpy

PLANTED = "the quick brown fox jumps over the lazy dog while seven purple owls watch silently"


def test_suffix_arrays_agree_with_sorting() -> None:
    rng = np.random.default_rng(0)
    for n, alphabet in [(1, 1), (2, 1), (50, 2), (300, 4), (1000, 256)]:
        data = rng.integers(0, alphabet, size=n).astype(np.uint8)
        ref = sorted(range(n), key=lambda i: data[i:].tobytes())
        assert suffix_array_numpy(data).tolist() == ref
        assert suffix_array(data)[0].tolist() == ref  # libdivsufsort when installed: the fast path


def test_counts_match_brute_force(tmp_path: Path) -> None:
    rng = random.Random(1)
    words = "a b c ab ba é ü".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(40)]
    idx = TextIndex.build(docs, tmp_path / "idx")
    norm = [normalise(d) for d in docs]
    for _ in range(200):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        pat = normalise(q)
        brute = sum(sum(1 for i in range(len(d)) if d.startswith(pat, i)) for d in norm)
        assert idx.count(q) == brute, q
    assert idx.count("") == 0
    for _ in range(20):  # longest matches: every reported run occurs, one word more does not
        ws = [rng.choice(words) for _ in range(12)]
        for i, L in enumerate(idx.longest_matches(ws)):
            assert L == 0 or idx.count(" ".join(ws[i:i + L])) > 0
            assert i + L == len(ws) or idx.count(" ".join(ws[i:i + L + 1])) == 0


def test_a_planted_copy_is_found(tmp_path: Path) -> None:
    rng = random.Random(2)
    vocab = "cat sat mat hat bat rat ran fan pan can man van".split()
    docs = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(200)]
    docs[137] = " ".join(docs[137].split()[:20]) + " " + PLANTED + "\n" + " ".join(docs[137].split()[20:])
    src = tmp_path / "train.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    data = tmp_path / "data"
    prepare([src], data, DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0.0), verbose=False)
    idx = index_for_dataset(data)  # built from the dataset's tokens, decoded
    assert (data / "index" / "index.json").is_file()
    novel = "zork quux blorp"
    samples = [{"prompt": "", "text": f"{novel} {PLANTED} {novel}", "tokens": 30},
               {"prompt": "", "text": "zork " * 12, "tokens": 12}]
    summary = ev.score_samples(samples, idx, n=8)
    span = len(PLANTED.split())
    assert summary["longest"] == {"words": span, "sample": 1, "text": PLANTED}
    assert samples[0]["memorised"] == span - 8 + 1
    assert summary["memorised"] == span - 8 + 1
    assert summary["ngrams"] == (2 * 3 + span - 7) + (12 - 7)
    assert samples[1]["repetition"] == pytest.approx(8 / 9)  # 9 word 4-grams, all the same
    assert summary["distinct1"] == pytest.approx(len(set(f"{novel} {PLANTED}".split())) / (2 * 3 + span + 12))
    assert index_for_dataset(data).meta == idx.meta  # reused, not rebuilt
    report = ev.samples_markdown("t", samples, summary, ["about"])
    assert f"longest copied span: “{PLANTED}”" in report and "| memorised word 8-grams | " in report
