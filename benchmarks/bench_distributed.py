"""Training throughput for 1 and N data-parallel processes (torchrun, gloo on CPU / NCCL on GPUs).

    python benchmarks/bench_distributed.py [--data PATH] [--steps 200] [--nproc 2] [--strategy ddp]

Prepares Tiny Shakespeare char-level once, then trains the same model with the same global batch in one
process and in N, and prints one JSON line per run plus the ratio. Tokens/s comes from metrics.jsonl
(step time only; evaluation and checkpoints excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "128", "--block-size", "64",
         "--model.dropout", "0"]


def train(data: Path, out: Path, steps: int, nproc: int, strategy: str, batch: int, accum: int) -> dict:
    cmd = [sys.executable, "-m", "pocketlm", "train", str(data), "--out", str(out), *MODEL,
           "--batch-size", str(batch), "--train.grad_accum", str(accum), "--max-steps", str(steps),
           "--train.eval_interval", str(steps), "--train.eval_steps", "5", "--train.log_interval", "10",
           "--no-sample", "--strategy", strategy]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in rows if "tokens_per_s" in r][1:]  # the first window includes warm-up
    tps = sum(r["tokens_per_s"] for r in logs) / len(logs)
    return {"bench": "distributed", "nproc": nproc, "strategy": strategy, "tokens_per_s": round(tps),
            "wall_s": round(wall, 1), "final_train_loss": round(logs[-1]["train/loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--batch-size", type=int, default=12, help="micro-batch per process")
    args = ap.parse_args()
    print(json.dumps({"bench": "machine", "cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "python": platform.python_version()}))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        subprocess.run([sys.executable, "-m", "pocketlm", "prepare", args.data, "--out", str(data), "--tokenizer",
                        "char", "--separator", "file", "--data.val_fraction", "0", "--val", args.data, "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        # the same global batch: 1 process x N micro-batches == N processes x 1 micro-batch
        one = train(data, tmp / "one", args.steps, 1, args.strategy, args.batch_size, args.nproc)
        print(json.dumps(one))
        many = train(data, tmp / "many", args.steps, args.nproc, args.strategy, args.batch_size, args.nproc)
        print(json.dumps(many))
        print(json.dumps({"bench": "distributed", "ratio_tokens_per_s": round(many["tokens_per_s"] /
                                                                                 one["tokens_per_s"], 3)}))


if __name__ == "__main__":
    main()
