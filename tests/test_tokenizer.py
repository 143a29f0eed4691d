from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError

EOT = "<|endoftext|>"
SAMPLE = "ROMEO:\nBut soft, what light through yonder window breaks?\n\tIt is the east — and Juliet is the sun! 🌞\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> toklib.Tok:
    folder = tmp_path_factory.mktemp("bpe")
    tk = toklib.train_bpe(iter([SAMPLE * 20, "the cat sat on the mat. " * 50]), 300, EOT)
    toklib.save(tk, folder, EOT)
    return toklib.load(folder)


@pytest.fixture(scope="module")
def char(tmp_path_factory) -> toklib.Tok:
    folder = tmp_path_factory.mktemp("char")
    toklib.save(toklib.train_char([SAMPLE], EOT), folder, EOT)
    return toklib.load(folder)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe: toklib.Tok, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200)
@given(st.text(alphabet=sorted(set(SAMPLE))))
def test_char_round_trips_its_alphabet(char: toklib.Tok, text: str) -> None:
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert char.decode(ids) == text


def test_char_unknown_characters_map_to_unk(char: toklib.Tok) -> None:
    ids = char.encode("aZb")
    assert char.tk.id_to_token(ids[1]) == toklib.UNK


def test_eot_is_special_and_known(bpe: toklib.Tok, char: toklib.Tok) -> None:
    for tok in (bpe, char):
        assert tok.eot_id is not None and tok.decode([tok.eot_id]) == EOT
        assert tok.decode([tok.eot_id], skip_special_tokens=True) == ""


def test_bpe_vocab_size_is_respected(bpe: toklib.Tok) -> None:
    assert bpe.vocab_size <= 300


def test_bpe_vocab_below_alphabet_is_refused() -> None:
    # a vocabulary too small for all 256 bytes takes the text's bytes; below even those it is refused
    with pytest.raises(PocketLMError, match="below the alphabet: the text has 10 distinct bytes"):
        toklib.train_bpe(iter(["abcdefghij"]), 8, EOT)


def test_load_reports_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(PocketLMError, match="no tokenizer.json"):
        toklib.load(tmp_path)


@settings(max_examples=200)
@given(st.lists(st.text(alphabet=sorted(set(SAMPLE)) + ["Z", "é", "\U0001F600"]), max_size=4))
def test_char_fast_path_equals_the_library(char: toklib.Tok, texts: list[str]) -> None:
    assert char.lut is not None
    fast = [list(map(int, ids)) for ids in char.encode_batch(texts)]
    assert fast == [e.ids for e in char.tk.encode_batch(texts, add_special_tokens=False)]


def test_char_fast_path_steps_aside_for_special_tokens(char: toklib.Tok, bpe: toklib.Tok) -> None:
    text = "ROMEO:<|endoftext|>"
    assert list(map(int, char.encode_batch([text])[0])) == char.encode(text)
    assert char.encode(text)[-1] == char.eot_id
    assert bpe.lut is None
