"""Tokenizer kinds (char policies, BPE pre-tokenizers, GPT-2 sources), special tokens, and the word-cache
encoder against the `tokenizers` library."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketlm import fastbpe
from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError

EOT = "<|endoftext|>"
START = "<|greentext|>"
GPT2_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2_tokenizer"
MODEL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "fake-gpt2-tiny-random"
needs_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "tokenizer.json").is_file(),
                                reason=f"GPT-2 vocabulary files not found in {GPT2_DIR}")
TEXT = ("> be me\n> greentext about a cat's 3 naps, 12:30 o'clock!\n  Indented   spaces\t\ttabs\n"
        "Über café — “quotes” ½ ² 𝔘 😀 ▁already▁metaspace 你好世界 \r\n")
HYPO = settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@pytest.fixture(scope="module")
def bpes(tmp_path_factory) -> dict[str, toklib.Tok]:
    out = {}
    for pre in toklib.PRE_TOKENIZERS:
        folder = tmp_path_factory.mktemp(pre)
        tk = toklib.train_bpe(iter([TEXT * 10, "the cat sat on the mat. " * 40]), 320, EOT, pre=pre, specials=[START])
        toklib.save(tk, folder, EOT)
        out[pre] = toklib.load(folder)
    return out


@pytest.fixture(scope="module")
def gpt2() -> toklib.Tok:
    if not (GPT2_DIR / "tokenizer.json").is_file():
        pytest.skip(f"GPT-2 vocabulary files not found in {GPT2_DIR}")
    return toklib.load(GPT2_DIR)


def library_ids(tok: toklib.Tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok._library(ordinary=True).encode_batch(texts, add_special_tokens=False)]


@HYPO
@given(text=st.text())
@pytest.mark.parametrize("pre", toklib.PRE_TOKENIZERS)
def test_bpe_round_trips_any_unicode_and_the_fast_path_equals_the_library(bpes, pre: str, text: str) -> None:
    tok = bpes[pre]
    assert tok.words is not None  # every pre-tokenizer kind takes the word-cache path
    fast = tok.encode_batch([text, TEXT + text], ordinary=True)
    assert fast == library_ids(tok, [text, TEXT + text])
    assert tok.decode(fast[0]) == text
    # by default special-token strings become their ids, as in the library (hypothesis finds "<|endoftext|>")
    assert tok.encode_batch([text]) == [e.ids for e in tok.tk.encode_batch([text], add_special_tokens=False)]


@pytest.mark.parametrize("text", [EOT, f"a {EOT} b", START])
@pytest.mark.parametrize("pre", toklib.PRE_TOKENIZERS)
def test_special_strings_are_plain_text_only_when_ordinary(bpes, pre: str, text: str) -> None:
    tok = bpes[pre]
    special = {tok.tk.token_to_id(EOT), tok.tk.token_to_id(START)}
    assert special & set(tok.encode_batch([text])[0])
    assert not special & set(tok.encode_batch([text], ordinary=True)[0])
    assert tok.decode(tok.encode_batch([text], ordinary=True)[0]) == text


@pytest.mark.parametrize("pre", toklib.PRE_TOKENIZERS)
def test_bpe_on_a_corpus_equals_the_library(bpes, pre: str) -> None:
    docs = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt")
    texts = docs.read_text(encoding="utf-8")[:200_000].split("\n\n") if docs.is_file() else [TEXT] * 50
    tok = bpes[pre]
    assert tok.encode_batch(texts) == library_ids(tok, texts)
    assert tok.encode_batch(texts) == tok.encode_batch(texts)  # the second pass is all cache hits


def test_every_known_code_point_splits_as_in_the_library(bpes) -> None:
    """Fast check on the ranges corpora use most; the slow test below covers every code point."""
    cps = [*range(0x20, 0x250), *range(0x2000, 0x2070), *range(0x3000, 0x3040), *range(0x1F300, 0x1F320)]
    _compare_code_points(bpes, cps)


@pytest.mark.slow
def test_all_code_points_split_as_in_the_library(bpes) -> None:
    _compare_code_points(bpes, [cp for lo, hi in fastbpe.KNOWN for cp in range(lo, hi) if not 0xD800 <= cp < 0xE000])


def _compare_code_points(bpes, cps: list[int]) -> None:
    for pre, tok in bpes.items():
        if pre == "metaspace":
            continue  # its pattern has no character classes
        probes = [f"a{c}1{c} {c}{c}\n{c}." for c in map(chr, cps)]
        known = [p for p in probes if tok.words.known(p)]
        assert len(known) > 0.9 * len(probes)
        fast = tok.encode_batch(known)
        lib = library_ids(tok, known)
        bad = [hex(ord(p[1])) for p, a, b in zip(known, fast, lib) if a != b]
        assert not bad, f"{pre}: the Python split differs from the library's for {bad[:20]}"


def test_pre_tokenizers_split_where_they_say(bpes) -> None:
    words = {pre: fastbpe.python_pattern(pre).findall("Hi, you  there") for pre in toklib.PRE_TOKENIZERS}
    assert words["byte-level"] == ["Hi", ",", " you", " ", " there"]
    assert words["metaspace"] == ["Hi,", " you", " ", " there"]
    assert words["metaspace-punctuation"] == ["Hi", ",", " you", " ", " there"]
    assert words["whitespace-punctuation"] == ["Hi", ",", " ", "you", "  ", "there"]


def test_small_vocabulary_uses_the_corpus_bytes_and_marks_unknown_bytes() -> None:
    tk = toklib.train_bpe(iter(["the cat sat on the mat. " * 40]), 64, EOT, pre="metaspace")
    tok = toklib.Tok(tk, EOT)
    assert tok.vocab_size <= 64 and tok.unk_id is not None
    assert tok.decode(tok.encode("the mat")) == "the mat"
    assert tok.encode_batch(["the zebra"])[0].count(tok.unk_id) == 3  # z, b, r never occur in the training text
    assert tok.encode_batch(["the zebra"]) == library_ids(tok, ["the zebra"])


@HYPO
@given(text=st.text())
def test_char_bytes_policy_round_trips_any_unicode(tmp_path_factory, text: str) -> None:
    tok = _char_bytes(tmp_path_factory)
    ids = tok.encode_batch([text], ordinary=True)[0]
    assert list(map(int, ids)) == library_ids(tok, [text])[0]
    assert tok.decode(ids) == text
    # by default special-token strings become their ids, as in the library (hypothesis finds "<|endoftext|>")
    default = [e.ids for e in tok.tk.encode_batch([text], add_special_tokens=False)]
    assert [list(map(int, x)) for x in tok.encode_batch([text])] == default


@pytest.fixture(scope="module")
def _char_bytes_tok(tmp_path_factory) -> toklib.Tok:
    return _char_bytes(tmp_path_factory)


_CACHE: dict = {}


def _char_bytes(factory) -> toklib.Tok:
    if "tok" not in _CACHE:
        folder = factory.mktemp("charbytes")
        toklib.save(toklib.train_char([TEXT], EOT, unknown="bytes"), folder, EOT)
        _CACHE["tok"] = toklib.load(folder)
    return _CACHE["tok"]


def test_char_bytes_policy_uses_the_lookup_table_for_known_text(_char_bytes_tok: toklib.Tok) -> None:
    tok = _char_bytes_tok
    assert tok.lut is not None
    ids = tok.encode_batch(["> be me"])[0]
    assert len(ids) == 7 and list(map(int, ids)) == library_ids(tok, ["> be me"])[0]
    assert len(tok.encode("Z")) == 1 and tok.decode(tok.encode("ℤ")) == "ℤ"  # 3 byte tokens, decoded back


@pytest.mark.slow
def test_special_tokens_whole_never_from_ordinary_text_and_kept_through_transformers(bpes, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = bpes["metaspace"]
    start = tok.tk.token_to_id(START)
    assert tok.encode(START + "hello")[0] == start  # never split
    ordinary = tok.encode_batch([START + "hello" + EOT], ordinary=True)[0]
    assert start not in ordinary and tok.eot_id not in ordinary  # never produced from ordinary text
    assert tok.decode(ordinary) == START + "hello" + EOT
    toklib.save(tok.tk, tmp_path, EOT)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = hf(START + "hi there" + EOT)
    assert list(enc.keys()) == ["input_ids", "attention_mask"]
    assert enc["input_ids"][0] == start and enc["input_ids"][-1] == tok.eot_id
    assert START in hf.all_special_tokens and hf.pad_token == EOT and hf.eos_token == EOT
    assert hf.decode(enc["input_ids"]) == START + "hi there" + EOT
    again = toklib.load(tmp_path)
    assert again.specials == tok.specials and again.encode(START + "x") == tok.encode(START + "x")


@HYPO
@given(parts=st.lists(st.sampled_from(list("<|>greentxdof \n") + [START, EOT])))
def test_ordinary_encoding_never_yields_a_special_id(bpes, parts: list[str]) -> None:
    text = "".join(parts)
    tok = bpes["byte-level"]
    ids = tok.encode_batch([text], ordinary=True)[0]
    assert not {tok.eot_id, tok.tk.token_to_id(START)} & set(ids)
    assert tok.decode(ids) == text


@pytest.mark.slow
@needs_gpt2
def test_gpt2_from_every_source_gives_the_same_ids(gpt2: toklib.Tok, tmp_path: Path, monkeypatch) -> None:
    import tiktoken

    ref = tiktoken.Encoding("gpt2", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                                str(GPT2_DIR / "vocab.bpe"), str(GPT2_DIR / "encoder.json")),
                            special_tokens={EOT: 50256}) if hasattr(tiktoken, "load") else None
    hf_files = tmp_path / "hf"
    hf_files.mkdir()
    shutil.copy(GPT2_DIR / "vocab.json", hf_files)
    shutil.copy(GPT2_DIR / "merges.txt", hf_files)
    openai_files = tmp_path / "openai"
    openai_files.mkdir()
    shutil.copy(GPT2_DIR / "encoder.json", openai_files)
    shutil.copy(GPT2_DIR / "vocab.bpe", openai_files)
    sources = [toklib.load(hf_files), toklib.load(openai_files), toklib.load(MODEL_DIR)]
    texts = [TEXT, "Hello world", "  leading spaces and 1234567 digits!!"]
    want = gpt2.encode_batch(texts)
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.eot_id == 50256
    for tok in sources:
        assert tok.encode_batch(texts) == want and tok.eot_id == 50256
    if ref is not None:
        assert [ref.encode_ordinary(t) for t in texts] == want


@pytest.mark.slow
@needs_gpt2
def test_gpt2_through_tiktoken_cached_files(gpt2: toklib.Tok, tmp_path: Path, monkeypatch) -> None:
    import tiktoken.registry

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):  # tiktoken's offline cache: files named by the URL's sha1
        shutil.copy(GPT2_DIR / name, tmp_path / hashlib.sha1((base + name).encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget an encoding loaded earlier
    tok = toklib.load("gpt2")
    assert json.loads(tok.tk.to_str())["model"]["merges"] == json.loads(gpt2.tk.to_str())["model"]["merges"]
    assert tok.encode_batch([TEXT]) == gpt2.encode_batch([TEXT])


def test_bad_input_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(PocketLMError, match="unknown pre-tokenizer 'sentencepiece'.*byte-level, metaspace"):
        toklib.train_bpe(iter(["abc"]), 300, EOT, pre="sentencepiece")
    with pytest.raises(PocketLMError, match="no tokenizer.json in .*nor vocab.json"):
        toklib.load(tmp_path)
    with pytest.raises(PocketLMError, match="no text to train"):
        toklib.train_bpe(iter(["", ""]), 300, EOT)
    with pytest.raises(PocketLMError, match="no text to build a character vocabulary"):
        toklib.train_char([""], EOT)
    with pytest.raises(PocketLMError, match="unknown-character policy 'drop'"):
        toklib.train_char(["abc"], EOT, unknown="drop")
    with pytest.raises(PocketLMError, match="is a kind to train"):
        toklib.load("bpe")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PocketLMError, match="could not load a tokenizer from 'no-such-tokenizer'"):
        toklib.load("no-such-tokenizer")


# ---- the vectorised ASCII split of the byte-level pre-tokenizer (fastbpe.AsciiWords) --------------------

ASCII_EDGES = " \n\t\r\x0b\x0c'sdtmlrevA1.,!-"  # whitespace runs, contractions, letters, digits, marks


def _ascii_words(text: str) -> list[str]:
    data = ("\0" + text + "\0").encode("ascii")
    starts, lengths, k0, _ = fastbpe.AsciiWords().split(data)
    return [data[a:a + n].decode() for a, n, k in zip(starts, lengths, k0) if k != 0]


@HYPO
@given(text=st.text(alphabet=ASCII_EDGES, max_size=40))
def test_vectorised_ascii_split_equals_the_regex(text: str) -> None:
    assert _ascii_words(text) == fastbpe.python_pattern("byte-level", ascii=True).findall(text)


def test_vectorised_ascii_split_on_the_hard_cases() -> None:
    for text in ["it's 'tis x''s x.'s 5's \n's  's 'rex 'lll 'S", "a  b\n\n  c \t\n d  ", "\n\n\nx", " ", "  ",
                 "'", "''s", "a\x01b\x1fc\x7f", "don't stop-believin'  ", "x" * 40 + " " + "9" * 20 + "\n" * 20]:
        assert _ascii_words(text) == fastbpe.python_pattern("byte-level", ascii=True).findall(text), text


@HYPO
@given(texts=st.lists(st.text(alphabet=ASCII_EDGES + "é\x00😀", max_size=30), max_size=6))
def test_batches_mixing_ascii_and_other_texts_equal_the_library(bpes, texts: list[str]) -> None:
    """ASCII texts take the numpy path, the others (and any with a NUL) the regex path; the order holds."""
    tok = bpes["byte-level"]
    assert tok.encode_batch(texts, ordinary=True) == library_ids(tok, texts)


def test_long_words_and_cache_resets_equal_the_library(bpes, monkeypatch) -> None:
    tok = bpes["byte-level"]
    texts = ["a" * n + " " + "b" * n + "\n" * n for n in (1, 7, 8, 9, 15, 16, 17, 40)] + [TEXT * 3, "", "x"]
    assert tok.encode_batch(texts, ordinary=True) == library_ids(tok, texts)
    flat, per_text = tok.words.encode_flat([])
    assert len(flat) == 0 and len(per_text) == 0
    monkeypatch.setattr(fastbpe, "MAX_WORDS", 12)  # the cache starts over in the middle of every batch
    fresh = fastbpe.WordCacheEncoder.for_tokenizer(tok.tk)
    words = [f"w{i} {'z' * (i % 20)} it's" for i in range(200)]
    for batch in (words[:30], words, words[::-1]):
        flat, per_text = fresh.encode_flat(batch)
        assert flat.tolist() == sum(library_ids(tok, batch), []) and per_text.tolist() == [
            len(x) for x in library_ids(tok, batch)]


@needs_gpt2
def test_gpt2_ascii_path_equals_the_library_on_a_corpus(gpt2: toklib.Tok) -> None:
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
    texts = shared.read_text(encoding="utf-8")[:300_000].split("\n\n") if shared.is_file() else [TEXT] * 50
    assert gpt2.words.ascii_words is not None
    assert gpt2.encode_batch(texts, ordinary=True) == library_ids(gpt2, texts)
