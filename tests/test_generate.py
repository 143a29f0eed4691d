from pathlib import Path

import pytest
import torch

from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError
from pocketlm.generate import Engine, SamplingParams, naive_generate, next_token
from pocketlm.train import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    from pocketlm.config import DataConfig
    from pocketlm.data.prepare import prepare
    from tests.conftest import make_corpus

    tmp = tmp_path_factory.mktemp("gen")
    data = tmp / "data"
    prepare([make_corpus(tmp / "text")], data, DataConfig(tokenizer="bpe", vocab_size=300), verbose=False)
    train(tiny_config(data, tmp / "run", **{"train.max_steps": 40}), verbose=False)
    return Engine.load(tmp / "run", device="cpu")


def test_greedy_kv_cache_equals_naive_recompute(engine: Engine) -> None:
    ids = engine.encode_prompt("the cat")
    n = engine.block_size - len(ids)  # stays inside one window, where both compute the same thing
    p = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eot=False)
    assert engine.generate(ids, p)[0].token_ids == naive_generate(engine.model, ids, n)


def test_long_generation_rewindows(engine: Engine) -> None:
    p = SamplingParams(max_new_tokens=3 * engine.block_size, temperature=1.0, seed=0, stop_at_eot=False)
    c = engine.generate("the", p)[0]
    assert len(c.token_ids) == 3 * engine.block_size and c.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batched(engine: Engine) -> None:
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=3, stop_at_eot=False)
    a = engine.generate("the dog", p, n=3)
    b = engine.generate("the dog", p, n=3)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # the samples in a batch differ


def test_stream_pieces_join_to_the_generated_text(engine: Engine) -> None:
    p = SamplingParams(max_new_tokens=30, temperature=0.9, seed=1, stop=["dog"])
    whole = engine.generate("the", p)[0]
    pieces = list(engine.stream("the", p))
    assert "".join(pieces) == whole.text
    assert "dog" not in whole.text


def test_stop_string_ends_a_sample(engine: Engine) -> None:
    free = engine.generate("the", SamplingParams(max_new_tokens=40, temperature=0, stop_at_eot=False))[0].text
    assert len(free) > 20
    stop = free[12:15]  # a string the greedy continuation is known to produce
    c = engine.generate("the", SamplingParams(max_new_tokens=40, temperature=0, stop=[stop], stop_at_eot=False))[0]
    assert c.finish_reason == "stop" and c.text == free[:free.index(stop)]


def test_end_of_text_ends_a_sample(engine: Engine) -> None:
    eot = engine.tok.eot_id
    p = SamplingParams(max_new_tokens=200, temperature=1.0, seed=0)
    for c in engine.generate("the cat sat.", p, n=8):
        assert eot not in c.token_ids
        assert c.finish_reason == ("stop" if len(c.token_ids) < 200 else "length")
    assert any(c.finish_reason == "stop" for c in engine.generate("the cat sat.", p, n=8))


def test_sampling_filters() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, SamplingParams(temperature=1, top_k=2), None, g)) for _ in range(200)}
    assert draws == {0, 1}
    # top_p 0.5: token 0 alone holds 63% of the mass
    assert {int(next_token(logits, SamplingParams(temperature=1, top_p=0.5), None, g)) for _ in range(50)} == {0}
    assert int(next_token(logits, SamplingParams(temperature=0), None, None)) == 0
    seen = torch.tensor([[True, False, False, False, False]])
    assert int(next_token(logits, SamplingParams(temperature=0, repetition_penalty=4.0), seen, None)) == 1


def test_bad_sampling_params() -> None:
    with pytest.raises(PocketLMError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(PocketLMError, match="temperature"):
        SamplingParams(temperature=-1).validate()


def test_empty_prompt_starts_at_end_of_text(engine: Engine) -> None:
    assert engine.encode_prompt("") == [engine.tok.eot_id]
    assert isinstance(engine.generate("", SamplingParams(max_new_tokens=5, seed=0))[0].text, str)


def test_engine_loads_a_checkpoint_folder_directly(engine: Engine, tmp_path: Path) -> None:
    assert isinstance(engine.tok, toklib.Tok)
    with pytest.raises(PocketLMError, match="no such run"):
        Engine.load(tmp_path / "missing")


def test_stream_never_prints_the_stop_string(engine: Engine) -> None:
    free = engine.generate("the", SamplingParams(max_new_tokens=40, temperature=0, stop_at_eot=False))[0].text
    stop = free[5]  # a single character the continuation produces
    p = SamplingParams(max_new_tokens=40, temperature=0, stop=[stop], stop_at_eot=False)
    streamed = "".join(engine.stream("the", p))
    assert streamed == engine.generate("the", p)[0].text == free[:free.index(stop)]
    with pytest.raises(PocketLMError, match="at least 1"):
        engine.generate("the", p, n=0)
