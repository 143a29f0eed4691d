import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pocketlm.errors import PocketLMError
from pocketlm.train import Trainer, lr_at, train
from tests.conftest import tiny_config


def metrics(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_loss_falls_and_run_folder_is_complete(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "run"
    state = train(tiny_config(char_data, run, **{"train.max_steps": 60}), verbose=False)
    losses = metrics(run, "train/loss")
    assert losses[60] < losses[5] - 0.5
    assert state.step == 60 and state.best_val == min(metrics(run, "val/loss").values())
    for name in ("config.yaml", "metrics.jsonl", "best/model.safetensors", "last/trainer_state.safetensors",
                 "best/tokenizer.json", "best/generation_config.json"):
        assert (run / name).is_file(), name
    assert "model:" in (run / "config.yaml").read_text()
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "train/loss", "lr", "grad_norm", "tokens_per_s"} <= set(row)


def test_resume_continues_exactly(tmp_path: Path, char_data: Path) -> None:
    full = tmp_path / "full"
    train(tiny_config(char_data, full, **{"model.dropout": 0.1}), verbose=False)
    part = tmp_path / "part"
    trainer = Trainer(tiny_config(char_data, part, **{"model.dropout": 0.1}), verbose=False)

    class StopAt15:  # what Ctrl-C does: finish the step, save last/, return
        def on_log(self, step: int, record: dict) -> None:
            trainer.stop_requested = step >= 15

    trainer.callbacks.append(StopAt15())
    assert trainer.fit().step == 15
    assert json.loads((part / "last" / "trainer_state.json").read_text())["step"] == 15
    train(tiny_config(char_data, part, **{"model.dropout": 0.1}), resume=True, verbose=False)
    assert metrics(part, "train/loss") == metrics(full, "train/loss")
    assert metrics(part, "val/loss") == metrics(full, "val/loss")


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path, char_data: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(char_data, run, **{"train.max_steps": 10}), verbose=False)
    before = (run / "best" / "model.safetensors").read_bytes()
    with pytest.raises(PocketLMError, match="already exists.*--resume.*--overwrite"):
        train(tiny_config(char_data, run), verbose=False)
    assert (run / "best" / "model.safetensors").read_bytes() == before
    with pytest.raises(PocketLMError, match="different model shape.*n_embd"):
        train(tiny_config(char_data, run, **{"model.n_embd": 32}), resume=True, verbose=False)
    train(tiny_config(char_data, run, **{"train.max_steps": 10}), overwrite=True, verbose=False)


def test_corpus_shorter_than_context(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(PocketLMError, match="fewer than block_size"):
        train(tiny_config(char_data, tmp_path / "r", **{"model.block_size": 100000}), verbose=False)
    assert not (tmp_path / "r").exists()


def test_lr_schedule() -> None:
    cfg = tiny_config(Path("."), Path("x"), **{"train.max_steps": 100, "train.warmup_steps": 10}).train
    assert lr_at(0, cfg) < lr_at(9, cfg) <= cfg.lr
    assert lr_at(10, cfg) == pytest.approx(cfg.lr)
    assert lr_at(100, cfg) == pytest.approx(cfg.min_lr)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_batches_are_a_function_of_step_and_split_over_ranks(char_data: Path) -> None:
    from pocketlm.data.prepare import Dataset
    from pocketlm.device import Runtime
    from pocketlm.train import LMTask

    task = LMTask(Dataset(char_data), 16)
    cpu = torch.device("cpu")
    one = Runtime(cpu, torch.float32)
    # 1 process x 2 micro-batches of 3 == 2 processes x 1 micro-batch of 3, same samples
    whole = torch.cat([task.batch("train", 5, m, 3, 2, one, 0, cpu)[0] for m in range(2)])
    ranks = [task.batch("train", 5, 0, 3, 1, Runtime(cpu, torch.float32, rank=r, world_size=2), 0, cpu)[0]
             for r in range(2)]
    assert torch.equal(whole, torch.cat(ranks))
    assert not torch.equal(whole, torch.cat([task.batch("train", 6, m, 3, 2, one, 0, cpu)[0] for m in range(2)]))


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_curve(tmp_path: Path, char_data: Path) -> None:
    """A real process killed with SIGKILL mid-run resumes to the loss curve of an uninterrupted run."""
    args = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--block-size", "32",
            "--batch-size", "8", "--max-steps", "120", "--train.eval_interval", "20", "--train.eval_steps", "2",
            "--train.log_interval", "5", "--no-sample"]
    cmd = [sys.executable, "-m", "pocketlm", "train", str(char_data), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill soon after the second checkpoint, mid-step
        state = run / "last" / "trainer_state.json"
        try:
            if state.is_file() and json.loads(state.read_text())["step"] >= 40:
                break
        except (json.JSONDecodeError, FileNotFoundError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run / "last" / "trainer_state.json").read_text())["step"]
    assert killed_at < 120
    r = subprocess.run([*cmd, "--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert metrics(run, "train/loss") == metrics(tmp_path / "full", "train/loss")
    assert metrics(run, "val/loss") == metrics(tmp_path / "full", "val/loss")
