"""Time to quality and a fixed wall-clock budget: pocketlm's recipe against nanoGPT (issues 2 and 9).

One invocation, on tinyshakespeare split as nanoGPT splits it (first 90% of characters train, the rest val):

1. nanoGPT's README CPU command (4 layers, 128 wide, context 64, batch 12, 2000 steps, lr 1e-3) from its
   own checkout: wall time W and the full-split val loss L of its best checkpoint.
2. Time to quality: `pocketlm train --config RECIPE --time-budget` sized so that the whole command (start-up,
   evaluations and saving included) takes at most W / 2; met when its full-split val loss is <= L.
3. Fixed budget (default 10 minutes): nanoGPT with max_iters scaled to the budget from its own speed in
   step 1 (its cosine schedule needs the length up front), killed at 1.1x the budget if it overruns; pocketlm
   with `--time-budget`. Best full-split val loss each reaches.

    python benchmarks/bench_budget.py [--nanogpt ../nanoGPT] [--recipe configs/fast-char-cpu.yaml] [--budget 600]

Full split = mean cross-entropy over every non-overlapping 64-token window of the val split (bench_core's
`full_val_loss`), the same measure for both. One JSON line per figure; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core as core  # noqa: E402

REPO = core.REPO
ALLOWANCE_S = 10.0  # start-up (imports, data), the last evaluation and checkpoint, the test pass


def pocketlm_budget(text: Path, work: Path, recipe: Path, budget_s: float, quiet_s: float) -> dict[str, Any]:
    """`pocketlm train --config recipe --time-budget budget_s` on nanoGPT's split; full-split val of best/."""
    from pocketlm.checkpoint import load_model
    from pocketlm.data.prepare import Dataset

    work.mkdir(parents=True, exist_ok=True)
    data, run = core.pocketlm_data(text, work), work / "run"
    cmd = [sys.executable, "-m", "pocketlm", "train", str(data), "--out", str(run), "--config", str(recipe),
           "--time-budget", f"{max(1, int(budget_s))}s", "--no-sample"]
    busy = core.wait_for_quiet(quiet_s)
    proc = core.timed_run(cmd, work, work / "train.log")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    logs = [r for r in records if "elapsed_s" in r]
    vals = [r for r in records if "val/loss" in r]
    model, _ = load_model(run / "best", "cpu")
    model.eval()
    full = core.full_val_loss(lambda x, y: model(x, y)[1], Dataset(data).split("val"), 64)
    return {"impl": "pocketlm", "recipe": str(recipe.relative_to(REPO) if recipe.is_relative_to(REPO) else recipe),
            "time_budget_s": int(budget_s), "steps": logs[-1]["step"],
            "tokens_per_s": round(logs[-1]["tokens"] / logs[-1]["elapsed_s"]),
            "best_val_loss": round(vals[-1]["val/best_loss"], 4), "full_val_loss_best_ckpt": round(full, 4),
            **proc, "busy_pct_before": busy}


def nanogpt_budget(nanogpt: Path, text: Path, work: Path, iters: int, kill_s: float, quiet_s: float
                   ) -> dict[str, Any]:
    """nanoGPT's README CPU command with max_iters = lr_decay_iters = iters, killed after kill_s seconds."""
    import numpy as np
    import torch

    cwd = core.nanogpt_workdir(nanogpt, text, work)
    out_dir = work / "nanogpt_out"
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=10", *(f"--{k}={v}" for k, v in core.MODEL_ARGS.items()),
           f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0", "--eval_interval=250",
           f"--out_dir={out_dir}"]
    busy = core.wait_for_quiet(quiet_s)
    t0 = time.perf_counter()
    with open(work / "nanogpt_train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=kill_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    wall = time.perf_counter() - t0
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)  # its best val checkpoint
    spec = core.importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    spec.loader.exec_module(module := core.importlib.util.module_from_spec(spec))
    with core.contextlib.redirect_stdout(sys.stderr):
        model = module.GPT(module.GPTConfig(**ckpt["model_args"])).eval()
    model.load_state_dict(ckpt["model"])
    val = np.fromfile(cwd / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
    full = core.full_val_loss(lambda x, y: model(x, y)[1], val, 64)
    return {"impl": "nanogpt", "max_iters": iters, "killed": rc != 0, "best_ckpt_iter": int(ckpt["iter_num"]),
            "best_val_loss": round(float(ckpt["best_val_loss"]), 4), "full_val_loss_best_ckpt": round(full, 4),
            "wall_s": round(wall, 1), "busy_pct_before": busy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, default=REPO.parent / "nanoGPT", help="nanoGPT checkout")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                    help="tinyshakespeare input.txt (default: %(default)s)")
    ap.add_argument("--recipe", type=Path, default=REPO / "configs" / "fast-char-cpu.yaml",
                    help="pocketlm config for both parts (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=600, help="fixed budget in seconds (default: %(default)s)")
    ap.add_argument("--skip-budget", action="store_true", help="time to quality only")
    ap.add_argument("--steps", type=int, default=2000, help="nanoGPT's reference run (default: %(default)s; "
                    "fewer for a smoke run)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each run, wait up to S seconds for the machine to be under 20%% busy")
    ap.add_argument("--keep", type=Path, help="keep the work files (data, logs, runs) in this folder")
    args = ap.parse_args(argv)
    nanogpt, text, recipe = core.find_nanogpt(args.nanogpt), args.data.resolve(), args.recipe.resolve()
    if not recipe.is_file():
        sys.exit(f"bench_budget: no recipe at {recipe}: pass --recipe CONFIG.yaml")
    work = Path(tempfile.mkdtemp(prefix="bench_budget-"))
    try:
        core.emit({"bench": "machine", "torch": core.torch.__version__, "cpus": os.cpu_count(),
                   "load_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        (work / "ref").mkdir()
        ref = core.run_nanogpt(nanogpt, text, work / "ref", args.steps, min(250, args.steps // 2), args.wait_quiet)
        half = ref["wall_s"] / 2
        ours = pocketlm_budget(text, work / "ttq", recipe, half - ALLOWANCE_S, args.wait_quiet)
        core.emit({"bench": "time_to_quality", **ours})
        core.emit({"bench": "time_to_quality", "nanogpt_wall_s": ref["wall_s"],
                   "nanogpt_full_val_loss": ref["full_val_loss_best_ckpt"], "pocketlm_wall_s": ours["wall_s"],
                   "pocketlm_full_val_loss": ours["full_val_loss_best_ckpt"],
                   "wall_ratio": round(ours["wall_s"] / ref["wall_s"], 3),
                   "met": ours["wall_s"] <= half and ours["full_val_loss_best_ckpt"] <= ref["full_val_loss_best_ckpt"]})
        if not args.skip_budget:
            # nanoGPT's 2000 steps took ref wall; scale its step count so the whole command fits the budget
            startup = 5.0
            iters = int(args.steps * (args.budget - startup) / max(1.0, ref["wall_s"] - startup) * 0.97)
            (work / "budget").mkdir()
            ng = core.emit({"bench": "budget", "budget_s": args.budget,
                            **nanogpt_budget(nanogpt, text, work / "budget", iters, 1.1 * args.budget, args.wait_quiet)})
            pl = core.emit({"bench": "budget", "budget_s": args.budget,
                            **pocketlm_budget(text, work / "budget_pl", recipe, args.budget - ALLOWANCE_S,
                                              args.wait_quiet)})
            core.emit({"bench": "budget", "budget_s": args.budget,
                       "delta_full_val_loss": round(pl["full_val_loss_best_ckpt"] - ng["full_val_loss_best_ckpt"], 4)})
    finally:
        core.finish(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
