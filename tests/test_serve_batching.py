"""Continuous batching for every kind of model the server loads: greedy tokens from the batcher = the Engine's.

tests/test_serve.py checks a trained GPT-2-layout model and the HTTP API; here the other two kinds get the
same check on tiny random models built in tmp_path: pocketlm's GPT in the Llama layout (rotary positions,
applied per row) and a transformers model folder (one cache per row, copied for n > 1, moved by compaction).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from pocketlm import checkpoint as ckpt
from pocketlm import tokenizer as toklib
from pocketlm.finetune.hf import HFModel
from pocketlm.generate import Engine, SamplingParams
from pocketlm.model import GPT, GPTConfig
from pocketlm.serve.batching import Batcher, OwnRows, Request, SharedRows
from tests.serve_util import running_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
PROMPTS = ["the cat", "hello", "a dog ran to the red ball", "birds sang"]


def char_tokenizer(folder: Path) -> toklib.Tok:
    tk = toklib.train_char([ALPHABET])
    toklib.save(tk, folder, toklib.EOT, model_max_length=32)
    return toklib.load(folder)


def llama_folder(root: Path) -> Path:
    """A random pocketlm GPT in the Llama layout, saved as pocketlm saves it."""
    folder = root / "llama"
    tok = char_tokenizer(folder)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32,
                          pos_emb="rotary", norm="rmsnorm", mlp="swiglu", bias=False))
    with torch.no_grad():  # wide weights: varied greedy text (at GPT-2's 0.02 it repeats one character)
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0.0, 0.3)
    ckpt.save_model(model, folder, None, tok.eot_id)
    return folder


def hf_folder(root: Path) -> Path:
    """A random transformers GPT-2 folder (save_pretrained), as fine-tuning a pretrained GPT-2 writes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = root / "hf"
    tok = char_tokenizer(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=tok.vocab_size,
                     initializer_range=0.5, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    return folder


def batched_texts(engine: Engine, p: SamplingParams, n_of: dict[int, int]) -> dict[int, list[str]]:
    """Each prompt's samples through one Batcher; the first request is mid-generation when the others join."""
    batcher = Batcher(engine, max_rows=4).start()
    events: dict[int, list] = {k: [] for k in range(len(PROMPTS))}
    done = threading.Semaphore(0)

    def emitter(k: int):
        def emit(ev) -> None:
            events[k].append(ev)
            if ev.kind in ("done", "error"):  # an error ends every sample of the request
                done.release(1 if ev.kind == "done" else n_of.get(k, 1))
        return emit

    try:
        for k, prompt in enumerate(PROMPTS):
            batcher.submit(Request(engine.encode_prompt(prompt), p, n_of.get(k, 1), emitter(k), engine.tok))
            deadline = time.time() + 30
            while k == 0 and len(events[0]) < 3 and time.time() < deadline:
                time.sleep(0.002)
        for _ in range(len(PROMPTS) + sum(n - 1 for n in n_of.values())):
            assert done.acquire(timeout=60)
        assert batcher.stats()["mean_batch"] > 2  # the sequences really shared steps
    finally:
        batcher.close()
    assert not [e.text for evs in events.values() for e in evs if e.kind == "error"]
    return {k: ["".join(e.text for e in events[k] if e.kind == "delta" and e.index == i)
                for i in range(n_of.get(k, 1))] for k in events}


@pytest.mark.parametrize("kind", ["llama", "hf"])
def test_batched_greedy_tokens_are_the_engines(kind: str, tmp_path: Path) -> None:
    """Requests joining mid-generation, n > 1 (one cache copied per sample), rows moved when earlier ones
    finish, and windows that fill and refill twice over: every sample is the Engine's greedy text."""
    engine = Engine.load(llama_folder(tmp_path) if kind == "llama" else hf_folder(tmp_path), "cpu")
    assert isinstance(engine.model, GPT if kind == "llama" else HFModel)
    p = SamplingParams(max_new_tokens=2 * engine.block_size + 5, temperature=0, stop_at_eot=False)
    got = batched_texts(engine, p, {1: 2})
    store = Batcher(engine).store
    assert isinstance(store, SharedRows if kind == "llama" else OwnRows)
    for k, prompt in enumerate(PROMPTS):
        want = engine.generate(prompt, p)[0]
        assert len(want.token_ids) == p.max_new_tokens and len(set(want.token_ids)) > 5  # varied, not one token
        assert got[k] == [want.text] * len(got[k]), prompt


def test_transformers_samples_diverge_from_one_prompt(tmp_path: Path) -> None:
    """n sampled continuations of one prompt start from copies of one prefilled cache and then go their own
    ways: with the same seed they are the Engine's n samples (one batched cache of n rows there)."""
    engine = Engine.load(hf_folder(tmp_path), "cpu")
    p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, stop_at_eot=False)
    texts = batched_texts(engine, p, {0: 3})[0]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in engine.generate(PROMPTS[0], p, n=3)]


def test_openai_client_against_a_served_transformers_model(tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    folder = hf_folder(tmp_path)
    want = Engine.load(folder, "cpu").generate("the cat", SamplingParams(max_new_tokens=40, temperature=0))[0]
    with running_server(folder, tmp_path / "f.db", max_batch=4) as (url, _):
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model="tiny", prompt="the cat", max_tokens=40, temperature=0, n=2)
    assert [x.text for x in r.choices] == [want.text] * 2 and r.usage.completion_tokens == 2 * len(want.token_ids)
