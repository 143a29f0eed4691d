"""`pocketlm tokenizer train|compare` and `pocketlm stats` through the real CLI."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pocketlm.cli import main
from pocketlm.data.prepare import read_corpus
from pocketlm.tokenizer import load

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2_tokenizer"


@pytest.fixture
def text(tmp_path: Path) -> Path:
    src = SHARED / "tinyshakespeare.txt"
    body = src.read_text(encoding="utf-8")[:60_000] if src.is_file() else "ROMEO:\nBut soft, what light.\n\n" * 2000
    path = tmp_path / "corpus.txt"
    path.write_text(body, encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tokenizer_train_saves_a_folder_transformers_and_prepare_load(tmp_path: Path, text: Path, capsys) -> None:
    rc, out, _ = run(capsys, "tokenizer", "train", text, "--kind", "bpe", "--pre", "metaspace", "--vocab-size", 400,
                     "--special", "<|greentext|>", "--out", tmp_path / "tok")
    assert rc == 0 and "vocab 400" in out
    tok = load(tmp_path / "tok")
    assert tok.vocab_size == 400 and "<|greentext|>" in tok.specials and tok.eot_token == "<|endoftext|>"
    rc, out, _ = run(capsys, "prepare", text, "--tokenizer", tmp_path / "tok", "--start-token", "<|greentext|>",
                     "--out", tmp_path / "data", "--quiet")
    assert rc == 0 and "vocab 400" in out  # the start token was already a special token of the folder
    rc, _, err = run(capsys, "tokenizer", "train", text, "--out", tmp_path / "tok")
    assert rc == 2 and "already exists" in err


def test_compare_writes_markdown_csv_plot_and_tokenizers(tmp_path: Path, text: Path, capsys) -> None:
    kinds = "char,bpe" + (f",{GPT2_DIR}" if (GPT2_DIR / "tokenizer.json").is_file() else "")
    rc, out, _ = run(capsys, "tokenizer", "compare", text, "--kinds", kinds, "--pre", "metaspace,byte-level",
                     "--vocab-sizes", "40,300", "--out", tmp_path / "cmp", "--jobs", 1, "--quiet")
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    names = [r["tokenizer"] for r in rows]
    assert names[:5] == ["char", "bpe-metaspace-40", "bpe-metaspace-300", "bpe-byte-level-40", "bpe-byte-level-300"]
    by = {r["tokenizer"]: r for r in rows}
    assert "below the alphabet" in by["bpe-metaspace-40"]["error"]  # more distinct characters than 40
    assert int(by["char"]["tokens"]) == sum(len(d) for d in read_corpus([text]))
    assert int(by["bpe-metaspace-300"]["tokens"]) < int(by["char"]["tokens"])
    assert int(by["bpe-metaspace-300"]["vocab_size"]) == 300 and float(by["char"]["unknown_share"]) == 0
    assert float(by["bpe-byte-level-300"]["train_seconds"]) > 0
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "| bpe-metaspace-300 | 300 |" in (tmp_path / "cmp" / "compare.md").read_text() and "| char |" in out
    assert load(tmp_path / "cmp" / "tokenizers" / "bpe-metaspace-300").vocab_size == 300


def test_stats_counts_and_token_counts(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "c.jsonl"
    docs = ["The cat sat.\nThe dog ran.", "tab\there — “quoted” 😀", "the end"]
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n", encoding="utf-8")
    char = tmp_path / "char"
    assert main(["tokenizer", "train", str(corpus), "--kind", "char", "--out", str(char)]) == 0
    rc, out, _ = run(capsys, "stats", corpus, "--tokenizers", char, "--out", tmp_path / "s", "--top", 3)
    assert rc == 0
    s = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert s["documents"] == 3 and s["lines"] == 4 and s["characters"] == sum(map(len, docs))
    assert s["words"] == 11 and s["top_words"][0] == ["The", 2]
    assert s["charset"].startswith("\\t\\n ") and "😀" in s["charset"] and "\\t" in out
    assert s["tokenizers"][str(char)]["tokens"] == sum(map(len, docs))
    assert s["bytes"] == sum(len(d.encode()) for d in docs)
    assert (tmp_path / "s" / "doc_lengths.png").stat().st_size > 5_000


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "{text}", "--pre", "sentencepiece", "--out", "{tmp}/t"], "unknown pre-tokenizer"),
    (["tokenizer", "train", "{text}", "--vocab-size", "20", "--out", "{tmp}/t"], "below the alphabet"),
    (["tokenizer", "train", "{empty}", "--out", "{tmp}/t"], "no text"),
    (["tokenizer", "compare", "{empty}", "--out", "{tmp}/c"], "no text"),
    (["tokenizer", "compare", "{text}", "--pre", "nope", "--out", "{tmp}/c"], "unknown pre-tokenizer 'nope'"),
    (["tokenizer", "compare", "{text}", "--vocab-sizes", "1k", "--out", "{tmp}/c"], "comma-separated integers"),
    (["stats", "{text}", "--tokenizers", "{tmp}", "--out", "{tmp}/s"], "no tokenizer.json in"),
    (["stats", "{empty}", "--out", "{tmp}/s"], "no text"),
    (["prepare", "{text}", "--tokenizer", "{tmp}", "--out", "{tmp}/d"], "no tokenizer.json in"),
])
def test_bad_input_is_one_line(tmp_path: Path, text: Path, capsys, argv: list[str], message: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    rc, _, err = run(capsys, *[a.format(text=text, tmp=tmp_path, empty=empty) for a in argv])
    assert rc == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_issue_grid(tmp_path: Path, text: Path, capsys, monkeypatch) -> None:
    """The exact grid from the issue, with gpt2 found through tiktoken's offline cache."""
    if not (GPT2_DIR / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2 vocabulary files not found in {GPT2_DIR}")
    import tiktoken.registry

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(GPT2_DIR / name, tmp_path / hashlib.sha1((base + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    rc, out, _ = run(capsys, "tokenizer", "compare", text, "--kinds", "char,gpt2,bpe",
                     "--pre", "metaspace,metaspace-punctuation,whitespace-punctuation",
                     "--vocab-sizes", "256,512,1024,2048,4096,8192,16384,32768", "--out", tmp_path / "cmp", "--quiet")
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert rc == 0 and len(rows) == 26 and not any(r["error"] for r in rows)
    gpt2 = next(r for r in rows if r["tokenizer"] == "gpt2")
    assert int(gpt2["vocab_size"]) == 50257
