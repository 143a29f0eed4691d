"""Fine-tuning from Hugging Face models (GPT-2, GPT-Neo, Llama made here), pocketlm runs and nanoGPT checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm import tokenizer as toklib
from pocketlm.config import DataConfig
from pocketlm.data.prepare import Dataset, prepare
from pocketlm.errors import PocketLMError
from pocketlm.finetune import adapt
from pocketlm.finetune import start as startlib
from pocketlm.finetune.run import Pretrained
from pocketlm.generate import Engine, SamplingParams
from pocketlm.model import GPT, GPTConfig
from pocketlm.train import LMTask, train
from tests.conftest import make_corpus, tiny_config

# ../shared/data beside the checkout (a worktree one level deeper looks one more up)
SHARED = next((p / "shared" / "data" for p in Path(__file__).resolve().parents[1:4] if (p / "shared" / "data").is_dir()),
              Path(__file__).resolve().parents[1].parent / "shared" / "data")
FAKE_GPT2 = SHARED / "models" / "fake-gpt2-tiny-random"
FT = {"train.max_steps": 6, "train.eval_interval": 3, "train.warmup_steps": 1, "train.lr": 3e-3,
      "model.block_size": 16}


@pytest.fixture
def bpe_data(tmp_path: Path, corpus: Path) -> Path:
    out = tmp_path / "bpe"
    prepare([corpus], out, DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0.2), verbose=False)
    return out


def make_hf(kind: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny transformers model of the given family, saved with the dataset's tokenizer."""
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    vocab = toklib.load(tokenizer_dir).vocab_size
    torch.manual_seed(0)
    if kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    elif kind == "gpt_neo":
        m = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=16,
                                           num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                                           window_size=8, bos_token_id=0, eos_token_id=0))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, bos_token_id=0, eos_token_id=0))
    m.save_pretrained(str(folder))
    toklib.copy_files(tokenizer_dir, folder)
    return folder


def rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo", "llama"])
def test_finetune_transformers_model_and_generate(tmp_path: Path, bpe_data: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    base = make_hf(kind, tmp_path / kind, bpe_data)
    run = tmp_path / "run"
    state = train(tiny_config(bpe_data, run, **FT, **{"finetune.init_from": str(base)}), verbose=False)
    log = rows(run)
    before = next(r["val/loss_before"] for r in log if "val/loss_before" in r)
    assert state.best_val < before  # the target data's loss fell
    best = run / "best"
    assert json.loads((best / "config.json").read_text())["model_type"] == kind
    assert "pocketlm" not in json.loads((best / "config.json").read_text())
    import yaml

    recorded = yaml.safe_load((run / "config.yaml").read_text())["model"]  # the model's real shape
    assert (recorded["n_layer"], recorded["n_head"], recorded["n_embd"]) == (2, 2, 16)
    # the engine loads the transformers folder and its KV cache agrees with transformers' greedy generate
    engine = Engine.load(run, "cpu")
    prompt = "the cat sat"
    ours = engine.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0, stop_at_eot=False))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(best)).eval()
    ids = torch.tensor([engine.tok.encode(prompt)])
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.token_ids == ref[0, ids.shape[1]:].tolist()


@pytest.mark.slow
def test_finetune_from_pocketlm_run_starts_where_it_ended(tmp_path: Path, char_data: Path) -> None:
    first = tmp_path / "pre"
    pre = train(tiny_config(char_data, first, **{"train.max_steps": 10}), verbose=False)
    run = tmp_path / "ft"
    state = train(tiny_config(char_data, run, **{"train.max_steps": 5, "finetune.init_from": str(first)}),
                  verbose=False)
    before = next(r["val/loss_before"] for r in rows(run) if "val/loss_before" in r)
    assert before == pytest.approx(pre.best_val, abs=1e-6)  # same weights, same evaluation batches
    assert state.step == 5 and (run / "best" / "model.safetensors").is_file()
    Engine.load(run, "cpu").generate("the", SamplingParams(max_new_tokens=5, temperature=0))


def test_nanogpt_checkpoint(tmp_path: Path, char_data: Path) -> None:
    vocab = Dataset(char_data).vocab_size
    torch.manual_seed(1)
    ref = GPT(GPTConfig(vocab_size=vocab + 3, block_size=32, n_layer=2, n_head=2, n_embd=16, bias=False))
    state = {f"_orig_mod.{k}": v for k, v in ref.state_dict().items()}
    for i in range(2):  # nanoGPT's non-flash attention saves its causal mask as a buffer
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    args = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 32, "bias": False, "vocab_size": vocab + 3,
            "dropout": 0.0}
    path = tmp_path / "out" / "ckpt.pt"
    path.parent.mkdir()
    torch.save({"model": state, "model_args": args, "iter_num": 100, "best_val_loss": torch.tensor(2.0)}, path)
    model = startlib.load_nanogpt(path)
    x = torch.randint(0, vocab, (2, 10))
    assert torch.equal(model(x)[0], ref.eval()(x)[0])
    run = tmp_path / "run"
    cfg = tiny_config(char_data, run, **{"train.max_steps": 4, "finetune.init_from": f"nanogpt:{path}"})
    train(cfg, verbose=False)
    assert (run / "best" / "tokenizer.json").is_file()  # the dataset's tokenizer (nanoGPT keeps none)
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(PocketLMError, match="not a nanoGPT checkpoint"):
        startlib.load_nanogpt(tmp_path / "bad.pt")


@pytest.mark.slow
def test_special_tokens_on_a_full_gpt2_vocabulary(tmp_path: Path) -> None:
    """fake-gpt2-tiny-random: the real 50257-token GPT-2 tokenizer, a start token prepended to documents."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = startlib.load(str(FAKE_GPT2))
    old = start.model.hf.get_input_embeddings().weight.detach().clone()
    new = startlib.add_tokens(start, ["<|gtx|>"])
    emb = start.model.hf.get_input_embeddings().weight
    assert new == [50257] and emb.shape[0] == 50258
    assert torch.allclose(emb[50257], old.mean(0)) and torch.equal(emb[:50257], old)
    # prepare writes the start token before every document (and into the dataset's tokenizer)
    text = tmp_path / "gtx.txt"
    text.write_text("\n\n".join(f">be me\n>doc {i} of the cat" for i in range(40)) + "\n")
    data = tmp_path / "data"
    prepare([text], data, DataConfig(tokenizer=str(FAKE_GPT2), start_token="<|gtx|>", val_fraction=0.2),
            verbose=False)
    assert 50257 in Dataset(data).split("train")[:20].tolist()
    run = tmp_path / "run"
    train(tiny_config(data, run, **{**FT, "train.max_steps": 2, "finetune.init_from": str(FAKE_GPT2),
                                    "finetune.add_special_tokens": ["<|gtx|>"]}), verbose=False)
    saved = AutoModelForCausalLM.from_pretrained(str(run / "best"))
    assert saved.get_input_embeddings().weight.shape[0] == 50258
    assert AutoTokenizer.from_pretrained(str(run / "best")).convert_tokens_to_ids("<|gtx|>") == 50257


def test_dataset_with_another_tokenizer_is_refused(tmp_path: Path, char_data: Path, bpe_data: Path) -> None:
    base = make_hf("gpt2", tmp_path / "gpt2", bpe_data)
    with pytest.raises(PocketLMError, match="different tokenizer.*--tokenizer"):
        train(tiny_config(char_data, tmp_path / "run", **FT, **{"finetune.init_from": str(base)}), verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_hub_id_offline_is_one_line(tmp_path: Path, char_data: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "pocketlm", "train", str(char_data), "--out", str(tmp_path / "r"),
                        "--init-from", "nobody-here/no-such-model"], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "offline" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["gpt2", "pocketlm"])
def test_lora_merges_into_a_plain_folder_and_keeps_the_adapter(tmp_path: Path, bpe_data: Path, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if kind == "gpt2":
        start = startlib.load(str(make_hf("gpt2", tmp_path / "gpt2", bpe_data)))
    else:
        pre = tmp_path / "pre"
        train(tiny_config(bpe_data, pre, **{"train.max_steps": 2}), verbose=False)
        start = startlib.load(str(pre))
    cfg = adapt.apply_lora(start.model, start.arch, rank=4, alpha=8, dropout=0.0, targets="")
    trainable = [n for n, p in start.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in start.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    start.model.eval()
    x = torch.randint(0, 300, (2, 12))
    want = start.model(x)[0]
    folder = tmp_path / "saved"
    Pretrained(start, Dataset(bpe_data), cfg, keep_adapter=True).save(start.model, folder, {}, {"temperature": 0.8})
    merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert (merged(x).logits - want).abs().max() < 1e-5
    if kind == "gpt2":  # the adapter alone, on the original base, through peft's own loader
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2")).eval()
        peft_model = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
        assert (peft_model(x).logits - want).abs().max() < 1e-5


LLAMA_LAYOUT = {"model.pos_emb": "rotary", "model.norm": "rmsnorm", "model.mlp": "swiglu"}


@pytest.mark.parametrize("layout,new_token", [({}, False), (LLAMA_LAYOUT, False), (LLAMA_LAYOUT, True)],
                         ids=["gpt2", "llama", "llama-new-token"])
def test_lora_run_of_a_pocketlm_model_keeps_loadable_adapters(tmp_path: Path, bpe_data: Path, layout: dict,
                                                              new_token: bool) -> None:
    """Every checkpoint of the run (best/ and last/: two saves at least) holds an adapter that peft loads on
    the saved base model, under the base's own module names, giving the merged model's logits (with a token
    added, the adapter carries the grown embeddings, for a base resized to the new vocabulary)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pre = tmp_path / "pre"
    train(tiny_config(bpe_data, pre, **{"train.max_steps": 2}, **layout), verbose=False)
    run = tmp_path / "run"
    saves = []

    class Saves:
        def on_checkpoint(self, step: int, folder: Path) -> None:
            saves.append(folder.name)

    train(tiny_config(bpe_data, run, **FT, **{"finetune.init_from": str(pre), "finetune.lora": True,
                                              "finetune.lora_rank": 4, "finetune.lora_keep_adapter": True,
                                              "finetune.lora_dropout": 0.0,
                                              "finetune.add_special_tokens": ["<|x|>"] if new_token else []}),
          callbacks=[Saves()], verbose=False)
    assert len(saves) >= 2 and {"best", "last"} <= set(saves)
    x = torch.randint(0, 300, (2, 12))
    x[0, 3] = 300 if new_token else 0
    base_logits = AutoModelForCausalLM.from_pretrained(str(pre / "best")).eval()(x[1:]).logits
    for name in ("best", "last"):
        merged = AutoModelForCausalLM.from_pretrained(str(run / name)).eval()
        assert type(merged).__name__ == ("LlamaForCausalLM" if layout else "GPT2LMHeadModel")
        assert merged.config.vocab_size == 300 + new_token
        want = merged(x).logits
        assert (want[1:, :, :300] - base_logits).abs().max() > 1e-4  # the adapter learned something
        adapter = run / name / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(pre / "best")
        if layout:  # named as the saved Llama model names its layers
            assert sorted(config["target_modules"]) == sorted(
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        base = AutoModelForCausalLM.from_pretrained(str(pre / "best"))
        base.resize_token_embeddings(merged.config.vocab_size, mean_resizing=False)  # the rows come from the adapter
        got = PeftModel.from_pretrained(base, str(adapter)).eval()(x).logits
        assert (got - want).abs().max() < 1e-5


def test_lora_errors(tmp_path: Path, bpe_data: Path) -> None:
    start = startlib.load(str(make_hf("gpt2", tmp_path / "gpt2", bpe_data)))
    with pytest.raises(PocketLMError, match="peft cannot add LoRA"):
        adapt.apply_lora(start.model, start.arch, 4, 8, 0.0, targets="ln_f")
    with pytest.raises(PocketLMError, match="no default LoRA target modules.*--lora-targets"):
        adapt.lora_targets("some_new_arch", "")
    llama = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, pos_emb="rotary",
                          norm="rmsnorm", mlp="swiglu"))
    with pytest.raises(PocketLMError, match="LoRA on lm_head: pocketlm's GPT ties lm_head to transformer.wte"):
        adapt.apply_lora(llama, "pocketlm", 4, 8, 0.0, targets="c_attn,lm_head")  # its delta would be lost
    with pytest.raises(PocketLMError, match="LoRA on transformer.wte"):
        adapt.apply_lora(GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)),
                         "pocketlm", 4, 8, 0.0, targets="wte")


@pytest.mark.slow
def test_lora_run_end_to_end(tmp_path: Path, bpe_data: Path) -> None:
    base = make_hf("llama", tmp_path / "llama", bpe_data)
    run = tmp_path / "run"
    train(tiny_config(bpe_data, run, **FT, **{"finetune.init_from": str(base), "finetune.lora": True,
                                              "finetune.lora_rank": 4, "finetune.lora_keep_adapter": True}),
          verbose=False)
    assert (run / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "best" / "config.json").read_text())["model_type"] == "llama"


def test_the_run_config_describes_the_model_it_starts_from() -> None:
    """config.yaml (read by compare and the model card) records the source's layout and shape; the default
    window shrinks to a shorter pretrained context, an asked-for longer one is refused."""
    import transformers

    from pocketlm import config as configlib
    from pocketlm.finetune.hf import HFModel
    from pocketlm.finetune.run import fit_config
    from pocketlm.model import GPT, GPTConfig

    llama = dict(pos_emb="rotary", norm="rmsnorm", mlp="swiglu", bias=False)
    cfg = configlib.load()
    fit_config(cfg, GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=16, **llama)))
    m = cfg.model
    assert (m.pos_emb, m.norm, m.mlp, m.bias, m.n_layer, m.n_embd, m.block_size) == \
        ("rotary", "rmsnorm", "swiglu", False, 2, 16, 64)
    cfg = configlib.load()
    fit_config(cfg, HFModel(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=3, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        max_position_embeddings=512, vocab_size=40))))
    assert (cfg.model.pos_emb, cfg.model.n_layer, cfg.model.block_size) == ("rotary", 3, 256)
    cfg = configlib.load(overrides={"model.block_size": 128})
    with pytest.raises(PocketLMError, match="exceeds the pretrained model's context of 64"):
        fit_config(cfg, GPT(GPTConfig(vocab_size=40, block_size=64, n_layer=2, n_head=2, n_embd=16)))


@pytest.mark.parametrize("layout", [{}, {"pos_emb": "rotary", "norm": "rmsnorm", "mlp": "swiglu"}],
                         ids=["gpt2", "llama"])
def test_freeze_layers_of_pocketlm_models(layout: dict) -> None:
    from pocketlm.model import GPT, GPTConfig

    m = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, **layout))
    adapt.freeze(m, "1")
    frozen = {k for k, p in m.named_parameters() if not p.requires_grad}
    assert "transformer.wte.weight" in frozen and "transformer.h.0.attn.c_attn.weight" in frozen
    assert ("transformer.wpe.weight" in frozen) == (not layout)
    assert not any(k.startswith("transformer.h.1.") for k in frozen)


def test_freeze_layers(tmp_path: Path, bpe_data: Path) -> None:
    start = startlib.load(str(make_hf("gpt2", tmp_path / "gpt2", bpe_data)))
    n = adapt.freeze(start.model, "1")
    frozen = {k for k, p in start.model.hf.named_parameters() if not p.requires_grad}
    assert "transformer.wte.weight" in frozen and "transformer.h.0.attn.c_attn.weight" in frozen
    assert "transformer.h.1.attn.c_attn.weight" not in frozen and n > 0
    with pytest.raises(PocketLMError, match="matches no parameter"):
        adapt.freeze(start.model, "decoder.*")
    with pytest.raises(PocketLMError, match="only 2 blocks"):
        adapt.freeze(start.model, "3")
    # end to end: a frozen block keeps its weights
    run = tmp_path / "run"
    train(tiny_config(bpe_data, run, **FT, **{"finetune.init_from": str(tmp_path / "gpt2"),
                                              "finetune.freeze_layers": "transformer.h.0.*"}), verbose=False)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "gpt2" / "model.safetensors")), load_file(str(run / "last" / "model.safetensors"))
    assert torch.equal(a["transformer.h.0.mlp.c_fc.weight"], b["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(a["transformer.h.1.mlp.c_fc.weight"], b["transformer.h.1.mlp.c_fc.weight"])


def test_replay_mixes_the_asked_share(tmp_path: Path, bpe_data: Path) -> None:
    from pocketlm.device import Runtime
    from pocketlm.finetune.tasks import ReplayTask, parse_replay

    other = make_corpus(tmp_path / "other", seed=5)
    rdata = tmp_path / "replay"
    prepare([other], rdata, DataConfig(tokenizer=str(bpe_data), val_fraction=0.2), verbose=False)
    target, replay = LMTask(Dataset(bpe_data), 16), LMTask(Dataset(rdata), 16)
    task = ReplayTask(target, replay, 0.5)
    rt = Runtime(torch.device("cpu"), torch.float32)
    x, _ = task.batch("train", 3, 0, 8, 1, rt, 1, torch.device("cpu"))
    tx, _ = target.batch("train", 3, 0, 8, 1, rt, 1, torch.device("cpu"))
    rx, _ = replay.batch("train", 3, 0, 8, 1, rt, 2, torch.device("cpu"))
    from_replay = [bool(torch.equal(x[i], rx[i])) and not torch.equal(x[i], tx[i]) for i in range(8)]
    assert sum(from_replay) == 4
    assert torch.equal(task.batch("val", 3, 0, 8, 1, rt, 1, torch.device("cpu"))[0],
                       target.batch("val", 3, 0, 8, 1, rt, 1, torch.device("cpu"))[0])
    assert parse_replay("data/g:0.1") == (Path("data/g"), 0.1)
    with pytest.raises(PocketLMError, match="DATA:SHARE"):
        parse_replay("data/g")
    char = tmp_path / "char"
    prepare([other], char, DataConfig(tokenizer="char", val_fraction=0.2), verbose=False)
    with pytest.raises(PocketLMError, match="different tokenizer"):
        ReplayTask(target, LMTask(Dataset(char), 16), 0.1)


@pytest.mark.slow
def test_resume_a_transformers_finetune_exactly(tmp_path: Path, bpe_data: Path) -> None:
    from pocketlm.train import Trainer
    from pocketlm.finetune.run import Pretrained, prepare_start

    base = make_hf("gpt2", tmp_path / "gpt2", bpe_data)  # dropout 0.1: the RNG state must resume too
    over = {**FT, "finetune.init_from": str(base), "train.log_interval": 1}
    full = tmp_path / "full"
    train(tiny_config(bpe_data, full, **over), verbose=False)
    part = tmp_path / "part"
    cfg = tiny_config(bpe_data, part, **over)
    trainer = Trainer(cfg, verbose=False, source=Pretrained(prepare_start(cfg, Dataset(bpe_data), verbose=False),
                                                            Dataset(bpe_data)))

    class StopAt3:
        def on_log(self, step: int, record: dict) -> None:
            trainer.stop_requested = step >= 3

    trainer.callbacks.append(StopAt3())
    assert trainer.fit().step == 3
    train(tiny_config(bpe_data, part, **over), resume=True, verbose=False)
    losses = [{r["step"]: r["train/loss"] for r in rows(run) if "train/loss" in r} for run in (full, part)]
    assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pocketlm", "gpt2"])
def test_resume_an_interrupted_lora_run_exactly(tmp_path: Path, bpe_data: Path, capsys, kind: str) -> None:
    """Ctrl-C says "continue with --resume": a LoRA run then goes on as if never stopped (adapter dropout on,
    so the RNG state must round-trip too), and refuses a different --init-from."""
    import signal

    from safetensors.torch import load_file

    pre = tmp_path / "pre"
    if kind == "gpt2":  # a transformers model
        make_hf("gpt2", pre, bpe_data)
    else:  # pocketlm's Llama layout (its adapter is saved split into the Llama names)
        train(tiny_config(bpe_data, pre, **{"train.max_steps": 2}, **LLAMA_LAYOUT), verbose=False)
    over = {**FT, "finetune.init_from": str(pre), "finetune.lora": True, "finetune.lora_rank": 4,
            "finetune.lora_dropout": 0.1, "finetune.lora_keep_adapter": True, "train.log_interval": 1}
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config(bpe_data, full, **over), verbose=False)

    class CtrlCAt4:  # between the evaluations at 3 and 6, so last/ holds a state best/ does not
        def on_log(self, step: int, record: dict) -> None:
            if step == 4:
                os.kill(os.getpid(), signal.SIGINT)

    assert train(tiny_config(bpe_data, part, **over), callbacks=[CtrlCAt4()]).step == 4
    assert "continue with --resume" in capsys.readouterr().err
    if kind == "pocketlm":
        other = tmp_path / "other"  # the same shape, other weights
        train(tiny_config(bpe_data, other, **{"train.max_steps": 2, "train.seed": 7}, **LLAMA_LAYOUT),
              verbose=False)
        with pytest.raises(PocketLMError, match="not the model this run started from"):
            train(tiny_config(bpe_data, part, **{**over, "finetune.init_from": str(other)}), resume=True,
                  verbose=False)
    else:  # a checkpoint without the adapter weights (an older pocketlm's) says what to do instead
        lora = part / "last" / "trainer_lora.safetensors"
        lora.rename(tmp_path / "aside")
        with pytest.raises(PocketLMError, match="holds no LoRA weights to resume from.*--init-from"):
            train(tiny_config(bpe_data, part, **over), resume=True, verbose=False)
        (tmp_path / "aside").rename(lora)
    train(tiny_config(bpe_data, part, **over), resume=True, verbose=False)
    losses = [{r["step"]: r["train/loss"] for r in rows(run) if "train/loss" in r} for run in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    for f in ("trainer_lora.safetensors", "model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(full / "last" / f)), load_file(str(part / "last" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
