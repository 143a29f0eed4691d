"""pocketlm clean: every step removes what it should, counted by reason; the CLI writes output and report."""

import json
import random
from pathlib import Path

import pytest

from pocketlm.cli import main
from pocketlm.data.clean import Charset, CleanOptions, clean, normalise_whitespace, report_path, simple_share
from pocketlm.data.ngrams import words
from pocketlm.data.records import make, read_records, write_records
from pocketlm.errors import PocketLMError

import os

# shared/ sits beside the repository (CI, /work/main); a git worktree elsewhere can point at it
SHARED = Path(os.environ.get("POCKETLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WORDLISTS = SHARED / "wordlists"
STORY = ("Once upon a time there was a little girl named {name}. She liked to play in the park with her "
         "big red ball. One day she saw a small {animal} under a tree and gave it some of her bread.")


def _docs(path: Path, texts: list[str]) -> Path:
    write_records(path, [make(t, "test", i=i) for i, t in enumerate(texts)])
    return path


def test_report_counts_every_reason(tmp_path, capsys):
    texts = [
        STORY.format(name="Lily", animal="dog"),                          # kept
        "tiny",                                                            # too short
        STORY.format(name="Lily", animal="dog").upper(),                   # exact duplicate (case ignored)
        STORY.format(name="Lily", animal="dog").replace("bread", "cake"),  # near duplicate
        "Le chat est assis sur le tapis et regarde les oiseaux dans le jardin, puis il dort longtemps.",  # language
        "They shouted heil hitler at the rally and everyone in the crowd went quiet for a long while.",    # blocklist
        "The quarterly earnings exceeded expectations despite macroeconomic headwinds in several regions.",  # not simple
        "The weather report says rain tomorrow, so bring an umbrella when you go to the shop in town.",   # exclude
        "   \n\t  ",                                                       # empty
        STORY.format(name="Ben", animal="cat").replace("bread", "jam") + " " + STORY.format(name="Tom", animal="bird"),
    ]
    inp = _docs(tmp_path / "in.jsonl", texts)
    with open(inp, "a") as f:
        f.write("{broken json\n")
    out = tmp_path / "clean" / "out.jsonl"
    opts = CleanOptions(min_chars=20, dedupe="near", near_threshold=0.6, shingle=3, languages=["en"],
                        blocklists=["default"], simple_words=[str(WORDLISTS / "scowl_level20_common.txt")],
                        simple_share=0.9, exclude_keywords=["weather report"])
    r = clean([inp], out, opts, rejects=tmp_path / "rej.jsonl", verbose=False)
    assert r["removed"] == {"too short": 1, "exact duplicate": 1, "near duplicate": 1, "language": 1,
                            "blocklist": 1, "not simple words": 1, "exclude: matched": 1, "empty": 1}
    assert r["bad_input"] == {"malformed JSON": 1}
    assert r["documents_in"] == 10 and r["documents_out"] == 2
    kept = [d["meta"]["i"] for d in read_records([out])]
    assert kept == [0, 9]
    assert json.loads(report_path(out).read_text()) == r
    assert r["blocklist_terms"] == {"heil hitler": 1}
    rejected = {d["meta"]["i"]: d["meta"]["removed"] for d in read_records([tmp_path / "rej.jsonl"])}
    assert rejected[3] == "near duplicate" and rejected[4] == "language" and len(rejected) == 8
    assert f"{inp}:11: malformed JSON" in capsys.readouterr().err


def test_strict_stops_on_bad_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(PocketLMError, match=r"in.jsonl:2: no text field"):
        clean([inp], tmp_path / "o.jsonl", CleanOptions(), strict=True, verbose=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_charset_policies_and_transliteration():
    text = "“Smart” quotes — dashes… café naïve 中文 ok"
    ascii_drop = Charset(CleanOptions())
    assert ascii_drop.apply(text) == '"Smart" quotes -- dashes... cafe naive  ok'
    assert ascii_drop.stats == {"chars transliterated": 6, "chars dropped": 2}
    assert Charset(CleanOptions(policy="replace")).apply(text).endswith("naive ?? ok")
    assert Charset(CleanOptions(policy="drop-document")).apply(text) is None
    assert Charset(CleanOptions(transliterate="none")).apply("café") == "caf"
    assert Charset(CleanOptions(charset="latin1")).apply(text) == '"Smart" quotes -- dashes... café naïve  ok'
    assert Charset(CleanOptions(charset="any")).apply("中文\x07 ok\x00") == "中文 ok"
    with pytest.raises(PocketLMError, match="--charset 'utf9' is not one of"):
        CleanOptions(charset="utf9").validate()


def test_unicode_repair_and_whitespace(tmp_path):
    inp = _docs(tmp_path / "in.jsonl", ["The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows &amp; that&#39;s fine.\r\n\r\n\r\n"
                                        "  Second   paragraph\t here.  "])
    r = clean([inp], tmp_path / "o.jsonl", CleanOptions(), verbose=False)
    [doc] = read_records([tmp_path / "o.jsonl"])
    assert doc["text"] == "The Mona Lisa doesn't have eyebrows & that's fine.\n\nSecond paragraph here."
    assert r["changed"]["unicode fixed"] == 1 and r["changed"]["whitespace normalised"] == 1
    assert normalise_whitespace(" a \n\n\n\n b\u00a0\u2003c ") == "a\n\nb c"


def test_ascii_fast_path_matches_ftfy():
    import ftfy

    from pocketlm.data.clean import FTFY_ASCII

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "&", "&amp;", "&#39;", "\r", "\x1b[31m", "<b>"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if not FTFY_ASCII.search(s):  # the texts clean passes through untouched
            assert ftfy.fix_text(s, ftfy.TextFixerConfig(uncurl_quotes=True)) == s, repr(s)


def test_simple_words_with_real_word_lists(tmp_path):
    vocab = {w for line in (WORDLISTS / "scowl_level10_simple.txt").read_text().splitlines() for w in words(line)}
    assert simple_share(words("The dog didn't want to eat his food."), vocab) == 1.0
    hard = words("The epistemological ramifications were considerable.")
    assert simple_share(hard, vocab) < 0.7
    # vocabulary taken from another corpus: words used at least twice in it
    corpus = _docs(tmp_path / "kids.jsonl", ["the dog ran to the ball", "the dog ran to the ball again", "a zebra"])
    inp = _docs(tmp_path / "in.jsonl", ["The dog ran.", "The zebra ran.", "The ball ran to the dog."])
    r = clean([inp], tmp_path / "o.jsonl", CleanOptions(simple_words_from=[str(corpus)], simple_min_count=2),
              verbose=False)
    assert r["removed"] == {"not simple words": 1}
    r = clean([inp], tmp_path / "o.jsonl", CleanOptions(simple_words_from=[str(corpus)], simple_min_count=2,
                                                        simple_share=0.5), verbose=False)
    assert r["removed"] == {}
    tsv = clean([inp], tmp_path / "o.jsonl", CleanOptions(simple_words=[str(WORDLISTS / "tinystories_vocab_min3.tsv")]),
                verbose=False)
    assert tsv["documents_out"] == 3


def test_near_dupes_found_among_many(tmp_path):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    originals = [" ".join(rng.choice(vocab) for _ in range(80)) for _ in range(200)]
    texts = list(originals)
    for i in range(0, 200, 4):  # 50 near copies: 2 of 80 words changed (Jaccard of 3-word shingles ~0.86)
        ws = originals[i].split()
        for j in rng.sample(range(80), 2):
            ws[j] = rng.choice(vocab)
        texts.append(" ".join(ws))
    rng.shuffle(texts)
    inp = _docs(tmp_path / "in.jsonl", texts)
    r = clean([inp], tmp_path / "o.jsonl", CleanOptions(dedupe="near", near_threshold=0.6, shingle=3), verbose=False)
    assert r["removed"] == {"near duplicate": 50}
    assert r["documents_out"] == 200


def test_include_exclude_regex_and_length(tmp_path):
    inp = _docs(tmp_path / "in.jsonl", [">be me\n>go outside", "Dear diary.", ">be cat\n>sleep all day and dream"])
    r = clean([inp], tmp_path / "o.jsonl", CleanOptions(include=[r"(?m)^>be "], max_chars=20), verbose=False)
    assert r["removed"] == {"include: no match": 1, "too long": 1}
    with pytest.raises(PocketLMError, match="not a valid regular expression"):
        clean([inp], tmp_path / "o.jsonl", CleanOptions(exclude=["(unclosed"]), verbose=False)


def test_cli_clean_prints_table_and_writes_report(tmp_path, capsys):
    inp = _docs(tmp_path / "in.jsonl", [STORY.format(name="Lily", animal="dog"), "x", STORY.format(name="Lily", animal="dog")])
    out = tmp_path / "c.jsonl"
    assert main(["clean", str(inp), "--out", str(out), "--min-chars", "5", "--dedupe", "exact", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "3 documents in, 1 kept" in text and "exact duplicate" in text and "too short" in text
    assert json.loads(report_path(out).read_text())["documents_out"] == 1
    assert main(["clean", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["clean", str(inp), "--out", str(out), "--blocklist", str(tmp_path / "nope.txt")]) == 2
    assert "blocklist file not found" in capsys.readouterr().err
