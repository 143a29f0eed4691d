"""Data-parallel training through torchrun with gloo on CPU: real processes, real process groups."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--block-size", "32",
        "--batch-size", "4", "--train.grad_accum", "2", "--train.eval_interval", "10", "--train.eval_steps", "2",
        "--train.log_interval", "1", "--no-sample", "--model.dropout", "0"]
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
pytestmark = pytest.mark.slow


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pocketlm", "train", str(data), "--out", str(out), *ARGS, *extra]


def run(data: Path, out: Path, *extra: str) -> None:
    r = subprocess.run(train_cmd(data, out, *extra), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def curve(run_dir: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): r[k] for r in rows for k in ("train/loss", "val/loss") if k in r}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4


def test_ddp_and_fsdp_match_one_process_and_checkpoints_move_between_world_sizes(tmp_path: Path,
                                                                                   char_data: Path) -> None:
    run(char_data, tmp_path / "one", "--max-steps", "20")
    run(char_data, tmp_path / "ddp", "--max-steps", "20", "--nproc", "2")
    run(char_data, tmp_path / "fsdp", "--max-steps", "20", "--nproc", "2", "--strategy", "fsdp")
    one = curve(tmp_path / "one")
    assert len(one) == 22  # 20 steps + 2 evaluations
    assert_same(one, curve(tmp_path / "ddp"))
    assert_same(one, curve(tmp_path / "fsdp"))
    # 1 -> 2 (FSDP, sharded on load), 2 (DDP) -> 1, 2 (FSDP, gathered on save) -> 1: the same curve
    shutil.copytree(tmp_path / "one", tmp_path / "ref")
    run(char_data, tmp_path / "ref", "--max-steps", "30", "--resume")
    run(char_data, tmp_path / "one", "--max-steps", "30", "--resume", "--nproc", "2", "--strategy", "fsdp")
    run(char_data, tmp_path / "ddp", "--max-steps", "30", "--resume")
    run(char_data, tmp_path / "fsdp", "--max-steps", "30", "--resume")
    ref = curve(tmp_path / "ref")
    assert len(ref) == 33
    for name in ("one", "ddp", "fsdp"):
        assert_same(ref, curve(tmp_path / name))


def test_two_machines_on_loopback(tmp_path: Path, char_data: Path) -> None:
    """Two torchrun launchers, one process each, meeting through a c10d rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pocketlm-test",
              "-m", "pocketlm", "train", str(char_data), "--out", str(tmp_path / "multi"), *ARGS, "--max-steps", "20"]
    nodes = [subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    run(char_data, tmp_path / "one", "--max-steps", "20")
    assert_same(curve(tmp_path / "one"), curve(tmp_path / "multi"))


def _worker_pid(out: Path, rank: int) -> int | None:
    """The pid of the training worker with this RANK writing to `out` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_text() and \
                    f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def _start_and_kill_rank1(cmd: list[str], out: Path) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first checkpoint, then kill rank 1 mid-run
        if (out / "last" / "trainer_state.json").is_file() and (pid := _worker_pid(out, 1)):
            os.kill(pid, signal.SIGKILL)
            return proc, time.time()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never reached its first checkpoint")


def test_a_dead_rank_ends_the_job_quickly_with_a_clear_error(tmp_path: Path, char_data: Path) -> None:
    out = tmp_path / "run"
    proc, killed = _start_and_kill_rank1(train_cmd(char_data, out, "--max-steps", "100000", "--nproc", "2"), out)
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed < 30
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: a training process failed")
    # the last complete checkpoint survives and resumes
    step = json.loads((out / "last" / "trainer_state.json").read_text())["step"]
    run(char_data, out, "--resume", "--max-steps", str(step + 5))
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == step + 5


def test_elastic_restart_resumes_on_the_same_curve(tmp_path: Path, char_data: Path) -> None:
    out = tmp_path / "run"
    steps = ["--max-steps", "120", "--train.eval_interval", "20"]
    proc, _ = _start_and_kill_rank1(train_cmd(char_data, out, *steps, "--nproc", "2", "--max-restarts", "3"), out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    run(char_data, tmp_path / "ref", *steps)
    assert_same(curve(tmp_path / "ref"), curve(out))
