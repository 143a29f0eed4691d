"""Fine-tuning benchmark: a GPT-2-small-sized model (124M, random init) on CPU, full vs LoRA (issue 5).

Two models in the loop: pocketlm's own GPT (a pocketlm checkpoint folder) and transformers' GPT2LMHeadModel
(a Hugging Face folder), each fine-tuned fully and with LoRA (r=16, attention + MLP projections) on
tinyshakespeare tokenized with the GPT-2 vocabulary. Every measurement runs in its own process, so its peak
RSS is its own, and the four contenders alternate round by round so machine load hits them alike.
tokens/s counts step time only (the loop's own figure), first step excluded as warm-up. One JSON line each:

    python benchmarks/bench_finetune.py [--rounds 2] [--steps 4] [--batch 2] [--block 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared" / "data")
GPT2_TOK = SHARED / "models" / "fake-gpt2-tiny-random"
CONTENDERS = [("hf-gpt2", "full"), ("hf-gpt2", "lora"), ("pocketlm", "full"), ("pocketlm", "lora")]


def busy_ticks() -> tuple[int, int]:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def setup(work: Path) -> None:
    """The dataset (GPT-2 vocabulary) and the two 124M models, random init, saved as folders."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocketlm import checkpoint as ckpt
    from pocketlm.config import DataConfig
    from pocketlm.data.prepare import Dataset, prepare
    from pocketlm.model import GPT, GPTConfig

    prepare([SHARED / "tinyshakespeare.txt"], work / "data", DataConfig(tokenizer=str(GPT2_TOK)), verbose=False)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    eot = Dataset(work / "data").manifest["tokenizer"]["eot_id"]
    ckpt.save_model(ours, work / "pocketlm", work / "data", eot)
    del ours
    hf = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 1024 positions
    hf.save_pretrained(str(work / "hf-gpt2"))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        shutil.copy2(GPT2_TOK / f, work / "hf-gpt2" / f)


def child(work: Path, kind: str, mode: str, steps: int, batch: int, block: int) -> None:
    from pocketlm import config as configlib
    from pocketlm.train import train

    out = work / "runs" / f"{kind}-{mode}"
    cfg = configlib.load(overrides={
        "data.path": str(work / "data"), "train.out": str(out), "finetune.init_from": str(work / kind),
        "finetune.lora": mode == "lora", "finetune.lora_rank": 16, "model.block_size": block,
        "train.batch_size": batch, "train.max_steps": steps, "train.log_interval": 1, "train.warmup_steps": 0,
        "train.eval_interval": 10**6, "train.eval_steps": 1, "train.lr": 1e-4, "train.min_lr": 1e-5,
        "train.device": "cpu"})
    t0 = time.perf_counter()
    state = train(cfg, overwrite=True, verbose=False)
    wall = time.perf_counter() - t0
    # per-step rates from the loop's cumulative step time (its tokens_per_s is rounded to whole tokens)
    logs = [r for r in state.history if "elapsed_s" in r and "train/loss" in r]
    rates = [batch * block / (b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(logs, logs[1:])]  # step 1: warm-up
    print(json.dumps({"kind": kind, "mode": mode, "tokens_per_s": round(statistics.median(rates), 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "wall_s": round(wall, 1),
                      "final_loss": [r["train/loss"] for r in state.history if "train/loss" in r][-1]}))
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--child", nargs=3, metavar=("WORK", "KIND", "MODE"))
    a = ap.parse_args()
    if a.child:
        child(Path(a.child[0]), a.child[1], a.child[2], a.steps, a.batch, a.block)
        return
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        work = Path(tmp)
        setup(work)
        results: dict[tuple[str, str], list[dict]] = {c: [] for c in CONTENDERS}
        b0, t0 = busy_ticks()
        for rnd in range(a.rounds):
            for kind, mode in CONTENDERS if rnd % 2 == 0 else CONTENDERS[::-1]:
                cmd = [sys.executable, __file__, "--child", str(work), kind, mode, "--steps", str(a.steps),
                       "--batch", str(a.batch), "--block", str(a.block)]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if r.returncode:
                    sys.exit(f"{kind}/{mode} failed:\n{r.stderr[-2000:]}")
                rec = json.loads(r.stdout.strip().splitlines()[-1])
                rec["round"] = rnd
                results[(kind, mode)].append(rec)
                print(json.dumps(rec), flush=True)
        b1, t1 = busy_ticks()
        summary = {}
        for (kind, mode), recs in results.items():
            summary[f"{kind}/{mode}"] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
                                         "peak_rss_mib": max(r["peak_rss_mib"] for r in recs)}
        for kind in ("pocketlm", "hf-gpt2"):
            f, lo = summary[f"{kind}/full"], summary[f"{kind}/lora"]
            summary[f"{kind}/lora_vs_full"] = {"speed": round(lo["tokens_per_s"] / f["tokens_per_s"], 2),
                                               "memory": round(lo["peak_rss_mib"] / f["peak_rss_mib"], 2)}
        summary["machine_busy_pct"] = round(100 * (b1 - b0) / max(1, t1 - t0), 1)
        summary["config"] = {"batch": a.batch, "block": a.block, "steps": a.steps, "rounds": a.rounds}
        print(json.dumps({"summary": summary}, indent=1), flush=True)


if __name__ == "__main__":
    main()
