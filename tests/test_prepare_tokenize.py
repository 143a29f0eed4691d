"""prepare with JSONL records, a start token, a reused tokenizer, and parallel encoding."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from pocketlm.config import DataConfig
from pocketlm.data import prepare as preplib
from pocketlm.data.documents import document_ranges, iter_documents, read_range
from pocketlm.data.prepare import Dataset, prepare
from pocketlm.errors import PocketLMError

GPT2_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2_tokenizer"
DOCS = ["> be me\n> write a greentext", "> cat sits on keyboard\n> mfw", "plain text, no arrows 😀", "> tfw\n> 42"]


def write_jsonl(path: Path, docs: list[str], bad_line: bool = False) -> Path:
    lines = [json.dumps({"text": d, "source": "test", "meta": {"i": i}}, ensure_ascii=False) for i, d in enumerate(docs)]
    if bad_line:
        lines.insert(1, '{"text": "unterminated')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def decoded_docs(folder: Path, split: str = "train") -> list[str]:
    ds = Dataset(folder)
    tok = ds.tokenizer()
    return tok.decode([int(i) for i in ds.split(split)]).split("<|endoftext|>")[:-1]


def test_jsonl_records_with_a_start_token(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 5, bad_line=True)
    cfg = DataConfig(tokenizer="bpe", vocab_size=300, pre_tokenizer="metaspace", start_token="<|greentext|>",
                     val_fraction=0)
    m = prepare([src], tmp_path / "d", cfg, verbose=False)
    assert m["splits"]["train"]["documents"] == 20 and m["skipped"] == {"malformed JSON": 1}
    docs = decoded_docs(tmp_path / "d")
    assert docs == ["<|greentext|>" + d for d in DOCS * 5]  # order kept: val_fraction 0
    tok = Dataset(tmp_path / "d").tokenizer()
    start = tok.tk.token_to_id("<|greentext|>")
    assert "<|greentext|>" in tok.specials and m["tokenizer"]["start_id"] == start
    train = Dataset(tmp_path / "d").split("train")
    assert int(train[0]) == start and int((train == start).sum()) == 20


def test_reuses_a_trained_tokenizer_folder_and_adds_the_start_token(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS * 5)
    prepare([src], tmp_path / "a", DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0), verbose=False)
    m = prepare([src], tmp_path / "b", DataConfig(tokenizer=str(tmp_path / "a"), start_token="<|s|>", val_fraction=0),
                verbose=False)
    assert m["tokenizer"]["kind"] == "loaded" and m["tokenizer"]["vocab_size"] == 301
    assert decoded_docs(tmp_path / "b") == ["<|s|>" + d for d in DOCS * 5]


@pytest.mark.skipif(not (GPT2_DIR / "tokenizer.json").is_file(), reason=f"no GPT-2 files in {GPT2_DIR}")
def test_prepare_with_gpt2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    m = prepare([src], tmp_path / "d", DataConfig(tokenizer=str(GPT2_DIR), val_fraction=0), verbose=False)
    assert m["tokenizer"]["vocab_size"] == 50257 and m["tokenizer"]["eot_id"] == 50256
    assert decoded_docs(tmp_path / "d") == DOCS


def test_special_token_in_the_text_is_refused(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", ["hello <|greentext|> world"])
    with pytest.raises(PocketLMError, match="special token '<|greentext|>' occurs in"):
        prepare([src], tmp_path / "d", DataConfig(tokenizer="char", start_token="<|greentext|>"), verbose=False)
    with pytest.raises(PocketLMError, match="unknown pre-tokenizer 'bytes'"):
        prepare([src], tmp_path / "d", DataConfig(tokenizer="bpe", pre_tokenizer="bytes"), verbose=False)
    with pytest.raises(PocketLMError, match="has no text"):
        prepare([write_jsonl(tmp_path / "e.jsonl", ["", "  "])], tmp_path / "d", DataConfig(), verbose=False)


TRICKY = "a\n\nb\r\n\r\nc\n  \t\n\nd\re\n\r\n\n\n \nf\u3000\n\u3000\n\ng h\n\n\n"  # blank lines of every kind


@pytest.mark.parametrize("separator", ["blank-line", "line"])
def test_file_ranges_hold_whole_documents(tmp_path: Path, separator: str) -> None:
    """Workers read byte ranges of the file: cut anywhere allowed, the documents are those of the whole file."""
    path = tmp_path / "t.txt"
    path.write_bytes((TRICKY * 7 + "tail without newline").encode("utf-8"))
    whole = list(iter_documents(path, separator))
    for size in range(1, 40):
        ranges = list(document_ranges(path, separator, size))
        assert ranges[0][0] == 0 and ranges[-1][1] in (path.stat().st_size, None)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert _documents_of(path, separator, ranges) == whole
    # lone CR line breaks: no cut anywhere, so past the first range the rest is read as a stream
    path.write_bytes((TRICKY + TRICKY.replace("\n", "\r") * 7 + "\n\n" + TRICKY).encode("utf-8"))
    ranges = list(document_ranges(path, separator, 8, most=2))
    assert len(ranges) > 1 and ranges[-1][1] is None
    assert _documents_of(path, separator, ranges) == list(iter_documents(path, separator))


def _documents_of(path: Path, separator: str, ranges: list[tuple[int, int | None]]) -> list[str]:
    return [d for a, b in ranges for d in (read_range(path, a, b, separator) if b is not None
                                             else iter_documents(path, separator, a))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "txt", "cr"])
def test_parallel_encoding_writes_the_same_shards(tmp_path: Path, monkeypatch, kind: str) -> None:
    docs = [f"{d} number {i}" for i in range(400) for d in DOCS]
    if kind == "jsonl":  # the parent reads the documents and sends them to the workers
        src = write_jsonl(tmp_path / "c.jsonl", docs)
    else:  # each worker reads its own byte range of the file ("cr": until no cut is in sight)
        src = tmp_path / "c.txt"
        text = "\n\n".join(docs) + TRICKY
        if kind == "cr":
            text = text[:len(text) // 2] + text[len(text) // 2:].replace("\n", "\r")
        src.write_text(text, encoding="utf-8", newline="")
        monkeypatch.setattr(preplib, "document_ranges", functools.partial(document_ranges, most=2))
    cfg = dict(tokenizer="bpe", vocab_size=320, start_token="<|s|>", val_fraction=0.2)
    prepare([src], tmp_path / "one", DataConfig(**cfg, workers=1), verbose=False)
    monkeypatch.setattr(preplib, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(preplib, "BATCH_BYTES", 4096)  # many batches in flight
    prepare([src], tmp_path / "two", DataConfig(**cfg, workers=2), verbose=False)
    for split in ("train", "val"):
        a, b = Dataset(tmp_path / "one").split(split), Dataset(tmp_path / "two").split(split)
        assert len(a) > 1000 and np.array_equal(a, b)
