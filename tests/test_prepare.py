import json
from pathlib import Path

import numpy as np
import pytest

from pocketlm.config import DataConfig
from pocketlm.data.prepare import Dataset, prepare
from pocketlm.data.shards import HEADER_BYTES, open_shard
from pocketlm.errors import PocketLMError


def test_prepare_writes_shards_tokenizer_and_manifest(tmp_path: Path, corpus: Path) -> None:
    m = prepare([corpus], tmp_path / "d", DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0.2), verbose=False)
    ds = Dataset(tmp_path / "d")
    tok = ds.tokenizer()
    train, val = ds.split("train"), ds.split("val")
    assert m["splits"]["train"]["tokens"] == len(train) and m["splits"]["val"]["tokens"] == len(val)
    assert m["splits"]["val"]["documents"] == 12 and m["splits"]["train"]["documents"] == 48
    assert m["inputs"][0]["sha256"] and m["format_version"] == 1
    # every document ends with end-of-text, and the shards decode back to the corpus documents
    text = corpus.read_text()
    docs = set(d.strip() for d in text.split("\n\n"))
    decoded = tok.decode([int(i) for i in val]).split("<|endoftext|>")
    assert decoded[-1] == "" and all(d in docs for d in decoded[:-1])
    assert int(train[-1]) == tok.eot_id


def test_split_is_by_document_and_reproducible(tmp_path: Path, corpus: Path) -> None:
    cfg = DataConfig(tokenizer="char", val_fraction=0.25, test_fraction=0.1)
    a = prepare([corpus], tmp_path / "a", cfg, verbose=False)
    b = prepare([corpus], tmp_path / "b", cfg, verbose=False)
    for split in ("train", "val", "test"):
        assert np.array_equal(open_shard(tmp_path / "a" / f"{split}.bin"), open_shard(tmp_path / "b" / f"{split}.bin"))
    assert a["splits"]["test"]["documents"] == 6
    other = prepare([corpus], tmp_path / "c", DataConfig(tokenizer="char", val_fraction=0.25, split_seed=7), verbose=False)
    assert not np.array_equal(open_shard(tmp_path / "a" / "val.bin"), open_shard(tmp_path / "c" / "val.bin"))
    assert other["splits"]["val"]["documents"] == 15


def test_explicit_val_file_and_folder_input(tmp_path: Path, corpus: Path) -> None:
    val = tmp_path / "val.txt"
    val.write_text("held out text.\n")
    m = prepare([corpus.parent], tmp_path / "d", DataConfig(tokenizer="char"), val=[val], verbose=False)
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 60


@pytest.mark.parametrize("separator, docs", [("line", 4), ("file", 1), ("===", 2), ("blank-line", 2)])
def test_separators(tmp_path: Path, separator: str, docs: int) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a b\nc d\n\ne f\n===\ng h\n===\n" if separator == "===" else "a b\nc d\n\ne f\ng h\n")
    m = prepare([f], tmp_path / "d", DataConfig(tokenizer="char", separator=separator, val_fraction=0), verbose=False)
    assert m["splits"]["train"]["documents"] == docs


@pytest.mark.parametrize("content, message", [
    (b"", "has no text"),
    (b"  \n\n \n", "has no text"),
    (b"hello\x00world", "looks binary"),
    (b"caf\xe9 au lait", "not UTF-8 .*offset 3"),
])
def test_bad_input_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(PocketLMError, match=message):
        prepare([f], tmp_path / "d", DataConfig(tokenizer="char"), verbose=False)
    assert not (tmp_path / "d").exists()


def test_missing_input_and_unknown_tokenizer(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # 'wordpiece' could be a Hugging Face id: look in the cache only
    with pytest.raises(PocketLMError, match="input not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d", DataConfig(), verbose=False)
    with pytest.raises(PocketLMError, match="unknown tokenizer 'wordpiece'"):
        prepare([corpus], tmp_path / "d", DataConfig(tokenizer="wordpiece"), verbose=False)


def test_existing_dataset_is_kept_without_overwrite(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "d"
    prepare([corpus], out, DataConfig(tokenizer="char"), verbose=False)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(PocketLMError, match="already exists.*--overwrite"):
        prepare([corpus], out, DataConfig(tokenizer="char"), verbose=False)
    # a failing overwrite leaves the old dataset intact
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(PocketLMError):
        prepare([bad], out, DataConfig(tokenizer="char"), overwrite=True, verbose=False)
    assert (out / "train.bin").read_bytes() == before
    prepare([corpus], out, DataConfig(tokenizer="bpe", vocab_size=280), overwrite=True, verbose=False)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["kind"] == "bpe"


def test_reuses_a_tokenizer_folder(tmp_path: Path, corpus: Path, char_data: Path) -> None:
    m = prepare([corpus], tmp_path / "d2", DataConfig(tokenizer=str(char_data)), verbose=False)
    assert (tmp_path / "d2" / "tokenizer.json").read_text() == (char_data / "tokenizer.json").read_text()
    assert m["tokenizer"]["kind"] == "loaded"


def test_shard_header_is_checked(tmp_path: Path, char_data: Path) -> None:
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"\0" * HEADER_BYTES)
    with pytest.raises(PocketLMError, match="not a pocketlm token shard"):
        open_shard(bad)
    truncated = tmp_path / "t.bin"
    truncated.write_bytes((char_data / "train.bin").read_bytes()[:-3])
    with pytest.raises(PocketLMError, match="truncated"):
        open_shard(truncated)


def test_overwrite_only_replaces_datasets_and_never_the_inputs(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(PocketLMError, match="not a pocketlm dataset folder"):
        prepare([corpus], corpus.parent, DataConfig(tokenizer="char"), overwrite=True, verbose=False)
    with pytest.raises(PocketLMError, match="already exists"):
        prepare([corpus], corpus, DataConfig(tokenizer="char"), verbose=False)
    assert corpus.is_file()
    (corpus.parent / "manifest.json").write_text("{}")  # even a dataset-looking folder may not hold the inputs
    with pytest.raises(PocketLMError, match="lies inside --out"):
        prepare([corpus], corpus.parent, DataConfig(tokenizer="char"), overwrite=True, verbose=False)
    assert corpus.is_file()


def test_eot_token_must_not_be_an_ordinary_character(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(PocketLMError, match="occurs in"):
        prepare([corpus], tmp_path / "d", DataConfig(tokenizer="char", eot_token="a"), verbose=False)
