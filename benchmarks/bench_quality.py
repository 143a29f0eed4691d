"""Quality over seeds: pocketlm against nanoGPT on nanoGPT's CPU Shakespeare-char configuration (issue 2).

Both trainers are deterministic on CPU, so one run per seed is the whole story of that seed; what differs
between two trainers of the same model is which seed each happens to be run with. This script trains both
with the same list of seeds and compares the distributions of the final validation loss (full val split,
best checkpoint, as bench_core.py measures it). nanoGPT hard-codes `torch.manual_seed(1337 + seed_offset)`
in train.py; a temp copy of its checkout with that number replaced gives it other seeds.

    python benchmarks/bench_quality.py --nanogpt /tmp/nanoGPT --seeds 1337,1,2,3

Timing is not the point here (bench_core.py measures speed); losses do not depend on machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402


def seeded_nanogpt(nanogpt: Path, seed: int, work: Path) -> Path:
    """A copy of the nanoGPT checkout whose train.py seeds torch with `seed` (its only seed)."""
    dst = work / f"nanogpt-src-{seed}"
    shutil.copytree(nanogpt, dst, ignore=shutil.ignore_patterns(".git"))
    src = (dst / "train.py").read_text()
    if "torch.manual_seed(1337 + seed_offset)" not in src:
        sys.exit("bench_quality: nanoGPT's train.py no longer seeds with 1337 + seed_offset; update the patch")
    (dst / "train.py").write_text(src.replace("torch.manual_seed(1337 + seed_offset)",
                                              f"torch.manual_seed({seed} + seed_offset)"))
    return dst


def summary(xs: list[float]) -> dict[str, float]:
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return {"mean": round(mean, 4), "sd": round(sd, 4), "sem": round(sd / math.sqrt(len(xs)), 4),
            "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, default=bench_core.REPO.parent / "nanoGPT")
    ap.add_argument("--data", type=Path, default=bench_core.REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
    ap.add_argument("--seeds", default="1337,1,2,3", help="comma-separated seeds for both (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args(argv)
    nanogpt = bench_core.find_nanogpt(args.nanogpt)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_quality-"))
    ng: list[float] = []
    pl: list[float] = []
    try:
        for i, seed in enumerate(seeds):
            w = work / f"seed{seed}"
            w.mkdir()
            src = seeded_nanogpt(nanogpt, seed, work)
            jobs = [lambda: ng.append(bench_core.run_nanogpt(src, args.data.resolve(), w, args.steps, 250, 0)
                                      ["full_val_loss_best_ckpt"]),
                    lambda: pl.append(bench_core.run_pocketlm(args.data.resolve(), w, args.steps, 250, 0,
                                                              ("--train.seed", str(seed)))
                                      ["full_val_loss_best_ckpt"])]
            for job in (jobs if i % 2 == 0 else jobs[::-1]):
                job()
        d = [b - a for a, b in zip(ng, pl)]
        bench_core.emit({"bench": "quality", "seeds": seeds, "nanogpt_full_val": ng, "pocketlm_full_val": pl,
                         "nanogpt": summary(ng), "pocketlm": summary(pl),
                         "mean_delta_pocketlm_minus_nanogpt": round(statistics.fmean(d), 4)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
