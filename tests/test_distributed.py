"""Data-parallel training through torchrun with gloo on CPU: real processes, real process groups."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--block-size", "32",
        "--batch-size", "4", "--train.grad_accum", "2", "--train.eval_interval", "10", "--train.eval_steps", "2",
        "--train.log_interval", "1", "--no-sample", "--model.dropout", "0"]


def run(data: Path, out: Path, *extra: str, nproc: int = 1) -> None:
    cmd = [sys.executable, "-m", "pocketlm", "train", str(data), "--out", str(out), *ARGS, *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def curve(run_dir: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in rows for k in ("train/loss", "val/loss") if k in r}


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoints_move_between_world_sizes(tmp_path: Path, char_data: Path) -> None:
    run(char_data, tmp_path / "one", "--max-steps", "20")
    run(char_data, tmp_path / "two", "--max-steps", "20", nproc=2)
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 22  # 20 steps + 2 evaluations
    assert max(abs(one[k] - two[k]) for k in one) <= 1e-4
    # a 1-process checkpoint continues in 2 processes, and a 2-process one in 1, on the same curve
    shutil.copytree(tmp_path / "one", tmp_path / "ref")
    run(char_data, tmp_path / "ref", "--max-steps", "30", "--resume")
    run(char_data, tmp_path / "one", "--max-steps", "30", "--resume", nproc=2)
    run(char_data, tmp_path / "two", "--max-steps", "30", "--resume")
    ref = curve(tmp_path / "ref")
    assert len(ref) == 33  # 30 steps + 3 evaluations
    for other in (curve(tmp_path / "one"), curve(tmp_path / "two")):
        assert other.keys() == ref.keys()
        assert max(abs(ref[k] - other[k]) for k in ref) <= 1e-4
