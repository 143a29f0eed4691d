"""SFT: JSONL parsing with file:line errors, the chat template, assistant-only labels, packing, chat over stdin."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pocketlm import config as configlib
from pocketlm.errors import PocketLMError
from pocketlm.finetune import sft as sftlib
from tests.test_finetune import FAKE_GPT2, SHARED

CONV = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}]


@pytest.fixture(scope="module")
def chat_tok():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FAKE_GPT2))
    tok.add_tokens(sftlib.ensure_chat_template(tok), special_tokens=True)
    return tok


def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    cases = [('{"prompt": "a"}', "qa.jsonl:2: missing field 'response'"),
             ('{"messages": [{"role": "bot", "content": "x"}]}', "qa.jsonl:2: messages\\[0\\] has role 'bot'"),
             ('{"messages": [{"role": "user"}]}', "qa.jsonl:2: messages\\[0\\] needs 'role' and 'content'"),
             ('{"messages": [{"role": "user", "content": "x"}]}', "qa.jsonl:2: no assistant message"),
             ("not json", "qa.jsonl:2: not valid JSON")]
    for line, msg in cases:
        f.write_text('{"prompt": "q", "response": "r"}\n' + line + "\n")
        with pytest.raises(PocketLMError, match=msg):
            sftlib.read_examples(f)
    f.write_text('{"prompt": "q", "response": "r", "system": "s"}\n\n{"messages": ' + json.dumps(CONV) + "}\n")
    convs = sftlib.read_examples(f)
    assert [m["role"] for m in convs[0]] == ["system", "user", "assistant"] and convs[1] == CONV


def test_loss_only_on_assistant_tokens(chat_tok) -> None:
    ids, labels = sftlib.encode(chat_tok, CONV)
    text = chat_tok.apply_chat_template(CONV, tokenize=False)
    assert ids == chat_tok(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")
    learned = chat_tok.decode([t for t in labels if t != -100])
    assert learned == "Hello! How can I help?<|im_end|>\nBlue.<|im_end|>\n"
    masked = chat_tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "Hi there" in masked and "Be kind." in masked and "Blue" not in masked
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))


def test_packing_keeps_examples_whole() -> None:
    ex = [([1, 2, 3], [-100, 2, 3]), ([4, 5, 6, 7], [-100, -100, 6, 7]), ([8] * 12, [-100] * 11 + [8]),
          ([9, 9], [-100, -100])]
    ids, labels, positions, cut = sftlib.pack(ex, 8, pad_id=0)
    assert cut == 1  # the 12-token example was cut, and then had nothing left to learn: dropped
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100, -100, 6, 7, -100]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]  # each example (and the padding) from 0
    mask = sftlib.split_examples(10, 0.2, 1)
    assert mask.sum() == 2 and np.array_equal(mask, sftlib.split_examples(10, 0.2, 1))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "hf-gpt2", "hf-llama"])
def test_a_packed_example_trains_as_if_alone(chat_tok, kind: str) -> None:
    """Two conversations packed into one row: the SFT loss and logits equal those of each conversation
    run alone (positions restart, attention stays inside the example), for pocketlm's models and for
    transformers models (which read the same position_ids)."""
    import torch
    import transformers

    from pocketlm.finetune.hf import HFModel
    from pocketlm.model import GPT, GPTConfig
    from pocketlm.train import NextTokenTask

    V = len(chat_tok)
    torch.manual_seed(0)
    llama = dict(pos_emb="rotary", norm="rmsnorm", mlp="swiglu", bias=False)
    model = {"gpt2": lambda: GPT(GPTConfig(vocab_size=V, block_size=128, n_layer=2, n_head=2, n_embd=16)),
             "llama": lambda: GPT(GPTConfig(vocab_size=V, block_size=128, n_layer=2, n_head=2, n_embd=16, **llama)),
             "hf-gpt2": lambda: HFModel(transformers.GPT2LMHeadModel(transformers.GPT2Config(
                 n_layer=2, n_head=2, n_embd=16, n_positions=128, vocab_size=V))),
             "hf-llama": lambda: HFModel(transformers.LlamaForCausalLM(transformers.LlamaConfig(
                 num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                 max_position_embeddings=128, vocab_size=V)))}[kind]().eval()
    convs = [CONV[1:3], [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    task = sftlib.SFTTask(chat_tok, convs, convs, block_size=127)
    ids, labels, positions = task.splits["train"]
    assert len(ids) == 1  # both in one row
    cpu = SimpleNamespace(world_size=1, rank=0)
    batch = task.batch("train", 0, 0, 1, 1, cpu, 0, torch.device("cpu"))
    alone = [sftlib.encode(chat_tok, c) for c in convs]
    with torch.no_grad():
        packed_logits, _ = task.logits(model, batch)
        packed_loss = task.loss(model, batch)
        n = [sum(lab != -100 for lab in labs[1:]) for _, labs in alone]
        losses, first = [], []
        for ids_, labs in alone:
            x, y = torch.tensor([ids_[:-1]]), torch.tensor([labs[1:]])
            losses.append(NextTokenTask().loss(model, (x, y)))
            first.append(NextTokenTask().logits(model, (x, y))[0][0])
    torch.testing.assert_close(packed_loss, (losses[0] * n[0] + losses[1] * n[1]) / sum(n), atol=1e-5, rtol=1e-5)
    a = len(alone[0][0])
    torch.testing.assert_close(packed_logits[0, :a - 1], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_logits[0, a:a + len(alone[1][0]) - 1], first[1], atol=1e-5, rtol=1e-5)


def alpaca_jsonl(path: Path, n: int) -> Path:
    records = json.loads((SHARED / "instruct" / "alpaca_5000.json").read_text())
    short = [r for r in records if len(r["output"]) < 80 and len(r["instruction"]) < 80][:n]
    path.write_text("".join(json.dumps({"prompt": (r["instruction"] + "\n" + r["input"]).strip(),
                                        "response": r["output"]}) + "\n" for r in short))
    return path


@pytest.mark.slow
def test_sft_run_template_roundtrip_and_chat(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from pocketlm.finetune.run import sft

    data = alpaca_jsonl(tmp_path / "qa.jsonl", 24)
    chats = json.loads((SHARED / "instruct" / "fastchat_dummy_conversation.json").read_text())[:4]
    roles = {"human": "user", "gpt": "assistant"}
    with open(data, "a") as f:  # the messages form too
        for c in chats:
            f.write(json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]}
                                             for t in c["conversations"]]}) + "\n")
    run = tmp_path / "run"
    cfg = configlib.load(overrides={"finetune.init_from": str(FAKE_GPT2), "train.out": str(run),
                                    "model.block_size": 96, "train.max_steps": 6, "train.eval_interval": 3,
                                    "train.eval_steps": 2, "train.batch_size": 4, "train.warmup_steps": 1,
                                    "train.lr": 1e-2, "data.val_fraction": 0.2})
    state = sft(cfg, data, verbose=False)
    assert state.step == 6
    info = json.loads((run / "sft.json").read_text())  # what the run learned from, for the model card
    assert info["conversations"] == str(data) and info["train"] + info["val"] == 28
    assert info["conversations_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss_before" in r for r in rows)
    best = run / "best"
    saved_cfg = json.loads((best / "tokenizer_config.json").read_text())
    assert saved_cfg["chat_template"] == sftlib.CHATML  # in tokenizer_config.json itself
    tok = AutoTokenizer.from_pretrained(str(best))
    ours_ids, _ = sftlib.encode(tok, CONV)
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert text == sftlib.render(tok, CONV)
    assert tok(text, add_special_tokens=False)["input_ids"] == ours_ids
    assert tok.convert_tokens_to_ids("<|im_end|>") == 50258
    # chat through the real CLI, driven on stdin
    lines = "Name a colour.\n/system Answer in one word.\nAnd another?\n/reset\nHello\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "pocketlm", "chat", str(run), "--temperature", "0",
                        "--max-new-tokens", "8"], input=lines, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 3
    assert "(system message set)" in r.stderr and "(conversation cleared)" in r.stderr


def test_chat_trims_history_to_the_context(chat_tok) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocketlm.finetune.chat import Chat
    from pocketlm.finetune.hf import HFModel
    from pocketlm.generate import Engine, SamplingParams
    from pocketlm.tokenizer import Tok

    torch.manual_seed(0)
    model = HFModel(GPT2LMHeadModel(GPT2Config(vocab_size=len(chat_tok), n_positions=64, n_embd=8, n_layer=1,
                                               n_head=1)))
    engine = Engine(model, Tok(chat_tok.backend_tokenizer, chat_tok.eos_token))
    chat = Chat(engine, chat_tok, SamplingParams(max_new_tokens=8, temperature=0), system="Be brief.")
    for i in range(6):
        out = "".join(chat.reply(f"question number {i} about colours"))
        assert isinstance(out, str)
        assert len(chat.prompt_ids()) <= 64 - 8
    assert chat.messages()[0]["role"] == "system"  # the system message survives trimming
    assert len(chat.history) < 12  # old turns were dropped
