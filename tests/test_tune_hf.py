"""Preference tuning of transformers model folders (GPT-2, Llama fine-tuned with --init-from): the same Task and
loop as pocketlm's models, and the result is a save_pretrained folder that transformers loads as tuned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare
from pocketlm.device import Runtime
from pocketlm.generate import Engine
from pocketlm.preference import PreferenceTask, _seq_logps
from pocketlm.train import train
from tests.conftest import make_corpus, tiny_config
from tests.test_finetune import make_hf
from tests.test_tune import OTHER, WORD, kto_moves_the_preference, synthetic_feedback, word_logprob

pytestmark = pytest.mark.slow  # fine-tunes a tiny transformers model, then tunes it (~10 s per family)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_run(request, tmp_path_factory) -> Path:
    """A run folder fine-tuned from a tiny transformers model (--init-from): its best/ is a save_pretrained folder."""
    tmp = tmp_path_factory.mktemp(f"tune-{request.param}")
    prepare([make_corpus(tmp / "text")], tmp / "data", DataConfig(tokenizer="char", val_fraction=0.2), verbose=False)
    base = make_hf(request.param, tmp / "init", tmp / "data")
    train(tiny_config(tmp / "data", tmp / "run", **{"train.max_steps": 40, "train.lr": 3e-3,
                                                    "finetune.init_from": str(base)}), verbose=False)
    assert "pocketlm" not in json.loads((tmp / "run" / "best" / "config.json").read_text())
    return tmp / "run"


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def check_saved_folder(out: Path, base: Path, fb: Path, method: str, kind: str) -> None:
    """out/last is a standard transformers folder holding exactly the policy the loop evaluated last."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    last = out / "last"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in last.iterdir()}
    config = json.loads((last / "config.json").read_text())
    assert config["model_type"] == kind and "pocketlm" not in config
    hf = AutoModelForCausalLM.from_pretrained(str(last)).eval()
    assert AutoTokenizer.from_pretrained(str(last)).decode([1, 2])
    # the final evaluation's val/logps/chosen (the policy in memory) recomputed with transformers from the folder
    cfg = yaml.safe_load((out / "config.yaml").read_text())["train"]
    task = PreferenceTask(base, fb, method)  # the same examples, split and batches as the run
    rt = Runtime(torch.device("cpu"), torch.float32)
    logps = []
    with torch.no_grad():
        for i in range(cfg["eval_steps"]):
            b = task.batch("val", 10**9 + i, 0, cfg["batch_size"], 1, rt, cfg["seed"], torch.device("cpu"))
            lp = _seq_logps(hf(input_ids=b["x"]).logits, b["y"])
            logps.append((lp[:len(lp) // 2] if method == "dpo" else lp[b["label"]]).mean().item())
    logged = rows(out)[-1]["val/logps/chosen"]
    assert abs(sum(logps) / len(logps) - logged) < 1e-3 * max(1.0, abs(logged)), (logps, logged)
    # pocketlm's engine reads the folder with the same logits
    engine = Engine.load(last, "cpu")
    ids = torch.tensor([engine.tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        assert torch.allclose(engine.model(ids)[0], hf(input_ids=ids).logits, atol=1e-5)


def test_dpo_on_a_transformers_folder(hf_run: Path, tmp_path: Path, capsys) -> None:
    kind = json.loads((hf_run / "best" / "config.json").read_text())["model_type"]
    fb = tmp_path / "feedback.jsonl"
    synthetic_feedback(fb, 60)
    held_out = synthetic_feedback(tmp_path / "other.jsonl", 20, seed=1)
    before = word_logprob(hf_run, held_out, WORD), word_logprob(hf_run, held_out, OTHER)
    out = tmp_path / "dpo"
    assert main(["tune", str(hf_run), "--feedback", str(fb), "--method", "dpo", "--out", str(out), "--beta", "2",
                 "--max-steps", "30", "--lr", "5e-4", "--train.eval_interval", "15"]) == 0
    after = word_logprob(out / "last", held_out, WORD), word_logprob(out / "last", held_out, OTHER)
    assert after[0] > before[0] + 0.5, (before, after)  # the chosen word became more likely...
    assert after[0] - after[1] > before[0] - before[1] + 1.0, (before, after)  # ...relative to the rejected one
    log = rows(out)
    evals = [r for r in log if "val/rewards/margin" in r]
    assert evals[-1]["val/rewards/accuracy"] > 0.9
    assert evals[-1]["val/rewards/margin"] > evals[0]["val/rewards/margin"] > 0  # the margin grows
    assert "lm/val_loss" in evals[-1]  # the run's own data, found through its config.yaml
    check_saved_folder(out, hf_run, fb, "dpo", kind)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert "the cat" in capsys.readouterr().out


def test_kto_on_a_transformers_folder(hf_run: Path, tmp_path: Path) -> None:
    kind = json.loads((hf_run / "best" / "config.json").read_text())["model_type"]
    out, fb = kto_moves_the_preference(hf_run, tmp_path)
    log = rows(out)
    assert "kl" in log[0] and log[-1]["val/rewards/margin"] > 0
    check_saved_folder(out, hf_run, fb, "kto", kind)


def test_resume_continues_as_one_run(hf_run: Path, tmp_path: Path) -> None:
    """--resume reloads the save_pretrained checkpoint (and the optimizer): the same weights as one run."""
    from safetensors.torch import load_file

    fb = tmp_path / "feedback.jsonl"
    synthetic_feedback(fb, 20)
    args = ["tune", str(hf_run), "--feedback", str(fb), "--beta", "2", "--lr", "5e-4", "--train.eval_interval", "4"]
    assert main([*args, "--out", str(tmp_path / "one"), "--max-steps", "8"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--max-steps", "4"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--max-steps", "8", "--resume"]) == 0
    one, two = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("one", "two"))
    base = load_file(str(hf_run / "best" / "model.safetensors"))
    assert one.keys() == two.keys() == base.keys()
    assert any(not torch.equal(one[k], base[k]) for k in one)  # it trained...
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)  # ...and resumed where it stopped
