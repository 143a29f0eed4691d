"""Tracking and comparison: TensorBoard and W&B (offline) callbacks, MFU inputs, compare's tables and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pocketlm import track
from pocketlm.cli import main
from pocketlm.config import DataConfig
from pocketlm.data.prepare import prepare
from pocketlm.errors import PocketLMError
from pocketlm.train import train
from tests.conftest import make_corpus, tiny_config


def test_peak_flops_keeps_the_best_figure_measured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    flops, where = track.peak_flops(torch.device("cpu"), torch.float32)
    assert flops > 1e8 and "measured" in where
    file = tmp_path / "pocketlm" / "peak_flops.json"
    (key,) = cache = json.loads(file.read_text())
    cache[key] = 123.0  # a higher figure seen before stays: the peak is the best this machine has shown
    file.write_text(json.dumps(cache))
    assert track.peak_flops(torch.device("cpu"), torch.float32)[0] == flops  # this process measured already
    monkeypatch.setattr(track, "_measured", {})  # the next run
    assert track.peak_flops(torch.device("cpu"), torch.float32)[0] == 123.0e12
    cache[key] = 1e-9  # one taken while other processes held the cores is replaced by the next run's measurement
    file.write_text(json.dumps(cache))
    monkeypatch.setattr(track, "_measured", {})  # the next run (a run measures each peak once)
    assert track.peak_flops(torch.device("cpu"), torch.float32)[0] > 1e8
    assert json.loads(file.read_text())[key] > 1e-4
    assert track.peak_flops(torch.device("cpu"), torch.float32, configured_tflops=2.5) == (2.5e12, "train.peak_tflops")
    assert track.peak_memory_mb(torch.device("cpu")) > 10


def test_unknown_logger_is_refused_before_the_run_starts(tmp_path: Path, char_data: Path) -> None:
    with pytest.raises(PocketLMError, match="unknown --log 'tensorbord'"):
        train(tiny_config(char_data, tmp_path / "r", **{"train.log": "tensorbord"}), verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_tensorboard_and_wandb_offline(tmp_path: Path, char_data: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(tiny_config(char_data, run, **{"train.max_steps": 10, "train.log": "tensorboard,wandb",
                                         "train.wandb_project": "pocketlm-test"}), verbose=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mb", "val/loss", "val/bpb"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    files = list(offline[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0
    assert (run / "wandb_id").read_text().strip() in files[0].name


# ---- compare ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A BPE run and a char-level run on the same text (shared by the tests below; they only read them)."""
    tmp_path = tmp_path_factory.mktemp("two_runs")
    corpus = make_corpus(tmp_path / "text")
    bpe = tmp_path / "bpe"
    prepare([corpus], bpe, DataConfig(tokenizer="bpe", vocab_size=300, val_fraction=0.2), verbose=False)
    char = tmp_path / "char"
    prepare([corpus], char, DataConfig(tokenizer="char", val_fraction=0.2), verbose=False)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    train(tiny_config(bpe, a, **{"train.max_steps": 10}), verbose=False)
    train(tiny_config(char, b, **{"train.max_steps": 20, "train.lr": 5e-3}), verbose=False)
    return a, b


def test_compare_tables_and_plot(two_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = two_runs
    png = tmp_path / "curves.png"
    assert main(["compare", str(a), str(b), "--metric", "val/bpb", "--plot", str(png),
                 "--out", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "c.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ")}
    assert str(a) in rows and str(b) in rows
    best_b = min(json.loads(ln)["val/bpb"] for ln in (b / "metrics.jsonl").read_text().splitlines()
                 if "val/bpb" in ln)
    assert f"{best_b:.4f} (step" in rows[str(b)]
    for key in ("train.lr", "train.max_steps", "data.path", "model.vocab_size"):
        assert key in rows, key
    assert "train.out" not in rows and "train.batch_size" not in rows
    assert "tokenizer.kind" in rows and "bpe" in rows["tokenizer.kind"] and "char" in rows["tokenizer.kind"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05  # drawn, not blank


def test_compare_bad_runs(tmp_path: Path, two_runs: tuple[Path, Path], capsys) -> None:
    a, _ = two_runs
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, msg in [([str(empty)], "has no metrics.jsonl"), ([str(tmp_path / "nope")], "no such run folder"),
                      ([str(a), "--metric", "val/nope"], "no run logged 'val/nope'")]:
        assert main(["compare", *argv, "--plot", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err


# ---- the eval command -------------------------------------------------------------------------------------

def test_eval_cli_table_json_samples(two_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = two_runs
    assert main(["eval", str(a), "--split", "val", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| bits per byte |" in table and "| top-10 accuracy |" in table
    assert main(["eval", str(a), "--split", "val", "--json", "--quiet", "--top-k-acc", "3",
                 "--out", str(tmp_path / "r.json")]) == 0
    res = json.loads(capsys.readouterr().out.split("\n(")[0])
    assert set(res["metrics"]) == {"loss", "ppl", "acc", "top3_acc", "bpb"} and not res["notes"]
    assert json.loads((tmp_path / "r.json").read_text()) == res
    # run a's BPE model on run b's char-level data: re-encoded, bits per byte only, with a note
    data_b = json.loads((b / "best" / "trainer_state.json").read_text())["config"]["data"]["path"]
    assert main(["eval", str(a), "--data", data_b, "--split", "val", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| bits per byte |" in out and "cross-entropy" not in out and "note: the dataset's tokenizer differs" in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n\nthe dog\n", encoding="utf-8")
    report = tmp_path / "samples.md"
    assert main(["eval", str(a / "best"), "--samples", "3", "--prompt-file", str(prompts), "--max-new-tokens", "20",
                 "--report", str(report), "--quiet"]) == 0
    md = report.read_text()
    assert md.count("## Sample ") == 3 and "| memorised word 8-grams |" in md and "| distinct-2 |" in md
    assert "prompt: `'the dog'`" in md
    assert main(["eval", str(a), "--split", "test", "--quiet"]) == 2
    assert "test split" in capsys.readouterr().err


def test_log_flags_are_in_train_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--log", "--wandb-project", "--train.peak_tflops", "--train.eval_top_k"):
        assert flag in text
