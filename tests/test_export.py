"""pocketlm export: the hf folder + model card, the ONNX decoder against PyTorch, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm import config as configlib
from pocketlm import export as exp
from pocketlm.errors import PocketLMError
from pocketlm.generate import Engine, SamplingParams
from tests.test_checkpoint import save_tiny

pytest.importorskip("onnxruntime")


@pytest.fixture
def run(tmp_path: Path, char_data: Path) -> Path:
    """A run folder as training leaves it: config.yaml naming the dataset, metrics.jsonl, best/."""
    out = tmp_path / "run"
    save_tiny(out / "best")
    cfg = configlib.load(overrides={"data.path": str(char_data), "train.out": str(out), "model.n_layer": 2})
    configlib.save_yaml(cfg, out / "config.yaml")
    lines = [{"step": 10, "train/loss": 2.5, "lr": 1e-3}, {"step": 20, "val/loss": 2.1},
             {"step": 30, "train/loss": 1.9, "val/loss": 2.3}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4')  # torn line
    (out / "best" / "trainer_state.json").write_text(json.dumps({"step": 30, "tokens": 960, "best_val": 2.1}))
    return out


def test_hf_folder_and_model_card(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pub"
    report = exp.export(run, "hf", out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any(n.startswith("trainer_state") for n in names)  # optimizer state stays private
    card = (out / "README.md").read_text()
    manifest = json.loads((Path(configlib.load(run / "config.yaml").data.path) / "manifest.json").read_text())
    assert f"| train | {manifest['splits']['train']['tokens']:,} |" in card  # data, from the manifest
    assert "| n_layer | 2 |" in card and "| best val/loss | 2.1 |" in card and "| final val/loss | 2.3 |" in card
    assert "## Intended use" in card and "from_pretrained" in card and "corpus.txt" in card
    assert report["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    assert "trained from scratch" in card and "base_model:" not in card


def card_of(run: Path, out: Path, overrides: dict) -> str:
    cfg = configlib.apply(configlib.load(run / "config.yaml"), overrides)
    configlib.save_yaml(cfg, run / "config.yaml")
    exp.export(run, "hf", out)
    return (out / "README.md").read_text()


def test_model_card_says_how_the_run_made_the_model(run: Path, tmp_path: Path) -> None:
    """Fine-tuned (--init-from), SFT and preference-tuned runs are not called "trained from scratch"."""
    card = card_of(run, tmp_path / "ft", {"finetune.init_from": "openai-community/gpt2", "finetune.lora": True})
    assert "base_model: openai-community/gpt2\n" in card.split("---")[1]  # Hub metadata of a fine-tune
    assert "fine-tuned with LoRA adapters (rank 16, merged into these weights) with pocketlm from " \
           "[openai-community/gpt2](https://huggingface.co/openai-community/gpt2) on the text described below" in card
    assert "from scratch" not in card and "| train | " in card  # the fine-tuning data: the run's dataset
    assert "init_from: openai-community/gpt2" in card and "val/loss_before" not in card

    local = tmp_path / "runs" / "base-run"
    card = card_of(run, tmp_path / "sft", {"finetune.init_from": str(local / "best"), "finetune.lora": False,
                                           "data.path": ""})
    assert "fine-tuned with pocketlm from `base-run` by supervised fine-tuning (SFT) on conversations" in card
    assert "- sft\n" in card and "from scratch" not in card and "no instruction tuning" not in card
    assert "base_model:" not in card and str(tmp_path) not in card  # this machine's paths stay private
    assert "pocketlm chat path/to/this/folder" in card and "does not record which file" in card
    (run / "sft.json").write_text(json.dumps({"conversations": str(tmp_path / "qa.jsonl"), "train": 36, "val": 4,
                                              "conversations_sha256": "ab12", "truncated": 1, "block_size": 64}))
    card = card_of(run, tmp_path / "sft2", {"finetune.init_from": str(local / "best"), "data.path": ""})
    assert "- file: `qa.jsonl` (sha256 `ab12`)" in card and "36 for training, 4 held out" in card
    assert str(tmp_path) not in card
    (run / "sft.json").unlink()

    (run / "tune.json").write_text(json.dumps({"format_version": 1, "method": "kto", "beta": 0.5,
                                               "base": str(local / "best"), "examples": 40, "pairs": 0,
                                               "ratings": 40, "lm_data": None}))
    card = card_of(run, tmp_path / "tune", {"finetune.init_from": "", "data.path": ""})
    assert "preference-tuned with pocketlm (KTO, beta 0.5) from `base-run` on 40 ratings of user feedback" in card
    assert "KTO on 40 feedback examples (0 chosen/rejected pairs, 40 thumbs up/down ratings)" in card
    assert "- kto\n" in card and "from scratch" not in card and "val/loss is the KTO loss" in card


@pytest.mark.slow
def test_onnx_matches_pytorch_and_pocketlm_engine(tmp_path: Path) -> None:
    """fp32 through the KV path: logits within 1e-4 of PyTorch over 200 steps (the window refills 8 times),
    greedy identical to both transformers and pocketlm's own engine; int8 agreement is measured."""
    import onnx
    import onnxruntime as ort

    from pocketlm.export import onnx as ox

    save_tiny(tmp_path / "ckpt")
    report = exp.export(tmp_path / "ckpt", "onnx", tmp_path / "out", quantize="int8", verbose=False)
    out = tmp_path / "out"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "onnx/model.onnx", "onnx/model_quantized.onnx"):
        assert (out / name).is_file(), name
    fp32, q8 = report["variants"]["fp32"], report["variants"]["q8"]
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["greedy_identical"] and fp32["argmax_agree"] == 200
    assert q8["tokens"] == 200 and 0 <= q8["argmax_agree"] <= 200 and q8["max_abs_diff"] > 0  # really quantized

    for f in ("model.onnx", "model_quantized.onnx"):  # the tied embedding / head matrix is stored once
        inits = onnx.load(str(out / "onnx" / f)).graph.initializer
        vocab, width = 17, 16
        assert sum(tuple(i.dims) in ((vocab, width), (width, vocab)) for i in inits) == 1, f

    sess = ort.InferenceSession(str(out / "onnx/model.onnx"))
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["past_key_values.1.value"][0] == "batch_size" and "present.1.key" in [o.name for o in sess.get_outputs()]

    engine = Engine.load(tmp_path / "ckpt", "cpu")
    prompt = "hello ROMEO:\n"
    ours = engine.generate(prompt, SamplingParams(max_new_tokens=120, temperature=0, stop_at_eot=False))[0]
    ids = ox.decode(ox.OrtDecoder(out / "onnx/model.onnx"), engine.tok.encode(prompt), 120, engine.block_size)
    assert ids == ours.token_ids


@pytest.mark.slow
def test_onnx_llama_layout(tmp_path: Path) -> None:
    """LlamaForCausalLM (grouped KV heads, rotary positions) exports through the same wrapper."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_tiny(tmp_path / "gpt")
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tmp_path / "gpt" / f).read_bytes())
    v = exp.export(folder, "onnx", tmp_path / "out", verbose=False)["variants"]["fp32"]
    assert v["max_abs_diff"] <= 1e-4 and v["greedy_identical"]


def stock_gpt2(folder: Path, tmp_path: Path) -> Path:
    """A transformers GPT-2 as `GPT2Config` makes it: dropouts 0.1 (pocketlm's own folders say 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    save_tiny(tmp_path / "tiny")  # for its tokenizer
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=17)
    assert cfg.attn_pdrop == cfg.resid_pdrop == cfg.embd_pdrop == 0.1
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tmp_path / "tiny" / f).read_bytes())
    return folder


@pytest.mark.slow
def test_onnx_check_of_a_model_with_dropout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The PyTorch reference runs in eval mode (the exporter hands the model back as it got it): a stock GPT-2
    config with dropout agrees with its export, fp32 to float rounding, int8 on every greedy step."""
    from pocketlm.cli import main
    from pocketlm.export import onnx as ox

    folder = stock_gpt2(tmp_path / "gpt2", tmp_path)
    model = ox.load_torch(folder)
    ox.export_decoder(model, tmp_path / "m.onnx")
    assert not any(m.training for m in model.modules())  # as it came in
    assert main(["export", str(folder), "--format", "onnx", "--quantize", "int8", "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fp32, q8 = report["variants"]["fp32"], report["variants"]["q8"]
    assert fp32["max_abs_diff"] <= 1e-5 and fp32["argmax_agree"] == 200 and fp32["greedy_identical"]
    assert 0 < q8["max_abs_diff"] < 0.1 and q8["argmax_agree"] >= 190


@pytest.mark.slow
def test_onnx_export_that_differs_from_pytorch_fails(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 export that does not compute the model's function is an error (exit 2, one line), and no folder."""
    from pocketlm.cli import main
    from pocketlm.export import onnx as ox

    save_tiny(tmp_path / "ckpt")
    real = ox.reference

    def shifted(model, prompt, n=ox.CHECK_TOKENS):  # noqa: ANN001, ANN202 - a reference one logit off
        ids, logits = real(model, prompt, n)
        return ids, [x + np.eye(len(x), dtype=x.dtype)[1] * 0.05 for x in logits]

    monkeypatch.setattr(ox, "reference", shifted)
    assert main(["export", str(tmp_path / "ckpt"), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("pocketlm export: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "does not compute what the model does" in errors[0]
    err = errors[0]
    assert "5.00e-02" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp16", "q4"])
def test_onnx_fp16_and_q4_run_in_onnxruntime(tmp_path: Path, kind: str) -> None:
    save_tiny(tmp_path / "ckpt")
    r = exp.export(tmp_path / "ckpt", "onnx", tmp_path / "out", quantize=kind, verbose=False, check_tokens=40)
    v = r["variants"]["fp16" if kind == "fp16" else "q4"]
    assert (tmp_path / "out" / v["file"]).is_file() and v["tokens"] == 40 and v["argmax_agree"] >= 30


def test_refusals(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(PocketLMError, match="BertForMaskedLM model; pocketlm export supports GPT2LMHeadModel"):
        exp.export(bert, "onnx", tmp_path / "o")
    save_tiny(tmp_path / "ckpt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(PocketLMError, match="not empty: pass --overwrite"):
        exp.export(tmp_path / "ckpt", "hf", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(PocketLMError, match="--quantize is for onnx and web"):
        exp.export(tmp_path / "ckpt", "hf", tmp_path / "o", quantize="int8")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pocketlm.cli import main

    save_tiny(tmp_path / "ckpt")
    for args, msg in [(["--format", "hf", "--title", "x"], "--title is a web page option"),
                      (["--format", "tflite"], "invalid choice")]:
        assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), *args]) == 2
        assert msg in capsys.readouterr().err
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "o")]) == 0
    assert "parameters" in capsys.readouterr().out and (tmp_path / "o" / "README.md").is_file()
