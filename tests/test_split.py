"""pocketlm split: groups never cross splits, the seed fixes the split, a planted leak is found and fails."""

import json
import random
from collections import defaultdict

import pytest

from pocketlm.cli import main
from pocketlm.data.records import make, read_records, write_records
from pocketlm.data.split import LeakIndex, split
from pocketlm.errors import PocketLMError


def _unique_text(rng: random.Random, n: int = 30) -> str:
    return " ".join(f"w{rng.randrange(10 ** 6)}" for _ in range(n))


def _corpus(path, docs=400, groups=40, seed=0):
    rng = random.Random(seed)
    recs = [make(_unique_text(rng), "show", episode=rng.randrange(groups), i=i) for i in range(docs)]
    write_records(path, recs)
    return path


def test_groups_never_cross_and_fractions_hold(tmp_path):
    inp = _corpus(tmp_path / "c.jsonl")
    m = split([inp], tmp_path / "s", val=0.1, test=0.1, group_by="episode", seed=3, verbose=False)
    where = defaultdict(set)
    seen = []
    for s in ("train", "val", "test"):
        for r in read_records([tmp_path / "s" / f"{s}.jsonl"]):
            where[r["meta"]["episode"]].add(s)
            seen.append(r["meta"]["i"])
    assert all(len(v) == 1 for v in where.values())
    assert sorted(seen) == list(range(400))
    assert {s for v in where.values() for s in v} == {"train", "val", "test"}
    for s in ("val", "test"):  # whole groups: near, not exactly, 10 %
        assert 30 <= m["splits"][s]["documents"] <= 70
    assert m["leakage"]["train_documents"] == 0
    assert json.loads((tmp_path / "s" / "split.json").read_text())["splits"] == m["splits"]
    # the seed fixes the split; another seed gives another one
    m2 = split([inp], tmp_path / "s2", val=0.1, test=0.1, group_by="episode", seed=3, verbose=False)
    assert (tmp_path / "s" / "val.jsonl").read_bytes() == (tmp_path / "s2" / "val.jsonl").read_bytes()
    assert m2["splits"] == m["splits"]
    split([inp], tmp_path / "s3", val=0.1, test=0.1, group_by="episode", seed=4, verbose=False)
    assert (tmp_path / "s" / "val.jsonl").read_bytes() != (tmp_path / "s3" / "val.jsonl").read_bytes()


def test_by_document_exact_counts_and_missing_keys(tmp_path):
    inp = _corpus(tmp_path / "c.jsonl", docs=200)
    m = split([inp], tmp_path / "s", val=0.05, test=0.1, verbose=False)
    assert [m["splits"][s]["documents"] for s in ("train", "val", "test")] == [170, 10, 20]
    m = split([inp], tmp_path / "t", group_by="thread", verbose=False)  # no such key: every doc its own group
    assert m["missing_group_key"] == 200 and m["splits"]["val"]["documents"] == 10


def test_planted_leak_is_found_and_fails(tmp_path, capsys):
    rng = random.Random(1)
    recs = [make(_unique_text(rng), "s", i=i) for i in range(300)]
    passage = "it was the best of times it was the worst of times it was the age"
    # the same 16-word passage inside two different documents, in different case and punctuation
    recs[5]["text"] = _unique_text(rng, 10) + " " + passage + " " + _unique_text(rng, 10)
    recs[250]["text"] = "IT WAS the best of times, it was the worst of times; it was the age!? " + _unique_text(rng)
    inp = tmp_path / "c.jsonl"
    write_records(inp, recs)
    # find a seed that separates the two documents
    for seed in range(50):
        m = split([inp], tmp_path / "probe", val=0.2, test=0.2, seed=seed, leak="off", overwrite=True, verbose=False)
        sides = {r["meta"]["i"]: s for s in ("train", "val", "test")
                 for r in read_records([tmp_path / "probe" / f"{s}.jsonl"]) if r["meta"]["i"] in (5, 250)}
        if len(set(sides.values())) == 2 and "train" in sides.values():
            break
    out = tmp_path / "s"
    code = main(["split", str(inp), "--out", str(out), "--val", "0.2", "--test", "0.2", "--seed", str(seed),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "leakage: 1 train documents share a 13-word passage with 1 val/test documents" in err
    assert '"it was the best of times it was the worst of times it"' in err  # the first 13 shared words
    assert not out.exists()  # nothing written on failure
    # warn: the split is written and the leak recorded; a longer n-gram than the passage finds nothing
    assert main(["split", str(inp), "--out", str(out), "--val", "0.2", "--test", "0.2", "--seed", str(seed),
                 "--leak", "warn", "--quiet"]) == 0
    lk = json.loads((out / "split.json").read_text())["leakage"]
    assert lk["train_documents"] == 1 and lk["examples"][0]["ngram"].startswith("it was the best")
    assert "warning: leakage" in capsys.readouterr().out
    m = split([inp], out, val=0.2, test=0.2, seed=seed, leak_ngram=17, overwrite=True, verbose=False)
    assert m["leakage"]["train_documents"] == 0


def test_leak_index_agrees_with_brute_force():
    rng = random.Random(5)
    vocab = [f"v{i}" for i in range(30)]  # tiny vocabulary: many chance 3-gram overlaps
    held = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(20)]
    train = [" ".join(rng.choice(vocab) for _ in range(40)) for _ in range(60)]
    idx = LeakIndex(3)
    for j, t in enumerate(held):
        idx.add(t, "val", j + 1)
    idx.freeze()
    got = {i for i, _, _ in idx.check(train)}
    grams = lambda t: {tuple(t.split()[k:k + 3]) for k in range(len(t.split()) - 2)}  # noqa: E731
    held_grams = set().union(*(grams(t) for t in held))
    want = {i for i, t in enumerate(train) if grams(t) & held_grams}
    assert got == want and 0 < len(got) < 60
    for i, owner, gram in idx.check(train):
        assert tuple(gram.split()) in grams(held[owner]) and tuple(gram.split()) in grams(train[i])


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    inp = _corpus(tmp_path / "c.jsonl", docs=20)
    with pytest.raises(PocketLMError, match="must be fractions"):
        split([inp], tmp_path / "s", val=0.6, test=0.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["split", str(inp), "--out", str(tmp_path / "full"), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep"
