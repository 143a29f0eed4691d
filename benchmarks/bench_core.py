"""Core benchmark: pocketlm against nanoGPT's CPU Shakespeare-char configuration (issue 2).

One invocation trains the same 4-layer, 128-wide, block-64 character model with nanoGPT's `train.py`
(its README CPU command) and with `pocketlm train`, on tinyshakespeare split as nanoGPT splits it
(first 90% of characters train, last 10% val); then times greedy batch-1 generation of pocketlm's
KV-cache `Engine` against Hugging Face `generate()` on the same weights. One JSON line per figure:

    python benchmarks/bench_core.py [--nanogpt ../nanoGPT] [--data ../shared/data/tinyshakespeare.txt] [--quick]

nanoGPT is run from its own checkout (never copied): a temp dir holds symlinks to its scripts and the
prepared data, so nothing is written into the checkout. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
MODEL_ARGS = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}
PROMPT = "ROMEO:"


def emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record), flush=True)
    return record


def busy_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat (zeros where absent)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy


def wait_for_quiet(max_wait_s: float, threshold_pct: float = 20.0, sample_s: float = 5.0) -> float:
    """Busy % of all cores, sampled until under threshold or max_wait_s passed: on a shared 2-core machine a
    neighbour's job makes torch's 2 threads wait on each other and steps get 10-50x slower."""
    deadline = time.monotonic() + max_wait_s
    while True:
        (b0, t0), _, (b1, t1) = busy_ticks(), time.sleep(sample_s), busy_ticks()
        pct = 100 * (b1 - b0) / max(1, t1 - t0)
        if pct < threshold_pct or time.monotonic() >= deadline:
            return round(pct, 1)


def timed_run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run cmd with stdout+stderr to `log` (exit on failure): wall s, CPU s, peak RSS MiB, others' CPU share."""
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    rss_file = log.with_suffix(".rss")
    full = [time_bin, "-v", "-o", str(rss_file), *cmd] if time_bin else cmd
    r0, (b0, t0_ticks) = resource.getrusage(resource.RUSAGE_CHILDREN), busy_ticks()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(full, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    r1, (b1, t1_ticks) = resource.getrusage(resource.RUSAGE_CHILDREN), busy_ticks()
    if rc != 0:
        sys.exit(f"bench_core: `{' '.join(cmd)}` failed ({rc}); last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))
    # without /usr/bin/time: the max over every child so far, exact only for the largest one
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", rss_file.read_text()).group(1)) \
        if time_bin else r1.ru_maxrss
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    # CPU time the rest of the machine used meanwhile, as % of all cores: the contention we ran under
    others = max(0, b1 - b0 - cpu * os.sysconf("SC_CLK_TCK")) / max(1, t1_ticks - t0_ticks) * 100
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(kb / 1024),
            "others_cpu_pct": round(others, 1)}


def windows(ms: list[float], size: int = 10) -> list[float]:
    """Means of consecutive groups of `size` step times: pocketlm logs every 10 steps, so compare like with like."""
    return [statistics.fmean(ms[i:i + size]) for i in range(0, len(ms) - size + 1, size)]


def step_figures(mean_ms: float, window_ms: list[float]) -> dict[str, float]:
    """Mean ms/step, and the median and 10th percentile of 10-step windows (robust to bursts of load)."""
    return {"ms_per_step": round(mean_ms, 2), "ms_per_step_median10": round(statistics.median(window_ms), 2),
            "ms_per_step_p10": round(float(np.percentile(window_ms, 10)), 2),
            "tokens_per_s": round(MODEL_ARGS["batch_size"] * MODEL_ARGS["block_size"] / mean_ms * 1000)}


def full_val_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: np.ndarray,
                  block: int, batch: int = 128) -> float:
    """Mean next-token loss over every non-overlapping block of the split (the whole val set, not a sample)."""
    n = (len(tokens) - 1) // block
    x = torch.from_numpy(np.asarray(tokens[:n * block], dtype=np.int64).reshape(n, block))
    y = torch.from_numpy(np.asarray(tokens[1:n * block + 1], dtype=np.int64).reshape(n, block))
    with torch.inference_mode():
        return sum(loss_fn(x[i:i + batch], y[i:i + batch]).item() * len(x[i:i + batch])
                   for i in range(0, n, batch)) / n


# ---- nanoGPT ------------------------------------------------------------------------------------------

def nanogpt_workdir(nanogpt: Path, text: Path, work: Path) -> Path:
    """A cwd for nanoGPT's train.py: symlinks to its scripts, data/shakespeare_char/ prepared from `text`."""
    cwd = work / "nanogpt"
    data = cwd / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (cwd / name).symlink_to(nanogpt / name)
    shutil.copy(nanogpt / "data" / "shakespeare_char" / "prepare.py", data / "prepare.py")
    shutil.copy(text, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    stub = work / "no_network"
    stub.mkdir()  # prepare.py imports requests at the top; this stand-in fails loudly if it is ever used
    (stub / "requests.py").write_text("def get(*a, **k):\n    raise RuntimeError('bench_core: no downloads')\n")
    env = {**os.environ, "PYTHONPATH": str(stub)}
    timed_run([sys.executable, "prepare.py"], data, work / "nanogpt_prepare.log", env)
    return cwd


def run_nanogpt(nanogpt: Path, text: Path, work: Path, steps: int, eval_interval: int,
                quiet_s: float) -> dict[str, Any]:
    cwd = nanogpt_workdir(nanogpt, text, work)
    out_dir = work / "nanogpt_out"
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           "--eval_iters=20", "--log_interval=1", *(f"--{k}={v}" for k, v in MODEL_ARGS.items()),
           f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0", f"--eval_interval={eval_interval}",
           f"--out_dir={out_dir}"]
    busy = wait_for_quiet(quiet_s)
    proc = timed_run(cmd, cwd, work / "nanogpt_train.log")
    log = (work / "nanogpt_train.log").read_text()
    iters = {int(i): float(ms) for i, ms in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", log, re.M)}
    vals = [float(v) for v in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", log, re.M)]
    # an iteration that starts with an evaluation includes it in its time: leave those (and iter 0) out
    train_ms = [ms for i, ms in sorted(iters.items()) if i % eval_interval != 0]
    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)  # best val checkpoint
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    with contextlib.redirect_stdout(sys.stderr):  # its constructor prints; keep stdout pure JSON lines
        model = module.GPT(module.GPTConfig(**ckpt["model_args"])).eval()
    model.load_state_dict(ckpt["model"])
    val = np.fromfile(cwd / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16)
    full = full_val_loss(lambda x, y: model(x, y)[1], val, MODEL_ARGS["block_size"])
    return emit({"bench": "train", "impl": "nanogpt", "steps": len(iters),
                 **step_figures(statistics.fmean(train_ms), windows(train_ms)), "final_val_loss": vals[-1],
                 "best_val_loss": min(vals), "full_val_loss_best_ckpt": round(full, 4),
                 "best_ckpt_step": ckpt["iter_num"], **proc, "busy_pct_before": busy})


# ---- pocketlm -----------------------------------------------------------------------------------------

def pocketlm_data(text: Path, work: Path) -> Path:
    """`pocketlm prepare` of `text` split as nanoGPT splits it (first 90% of characters train, the rest val)."""
    raw = text.read_text(encoding="utf-8")
    cut = int(len(raw) * 0.9)
    (work / "train.txt").write_text(raw[:cut], encoding="utf-8")
    (work / "val.txt").write_text(raw[cut:], encoding="utf-8")
    data = work / "pocketlm_data"
    timed_run([sys.executable, "-m", "pocketlm", "prepare", "train.txt", "--val", "val.txt", "--out", str(data),
               "--tokenizer", "char", "--separator", "file", "--quiet"], work, work / "pocketlm_prepare.log")
    return data


def finish(work: Path, keep: Path | None) -> None:
    """Remove the work folder, copying it to `keep` first when asked."""
    if keep:
        shutil.copytree(work, keep, dirs_exist_ok=True, symlinks=True)
    shutil.rmtree(work, ignore_errors=True)


def run_pocketlm(text: Path, work: Path, steps: int, eval_interval: int, quiet_s: float,
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from pocketlm.checkpoint import load_model
    from pocketlm.data.prepare import Dataset

    data, run = pocketlm_data(text, work), work / "pocketlm_run"
    cli = [sys.executable, "-m", "pocketlm"]
    section = {"batch_size": "train"}  # the other shape keys are model.*
    shape = [a for k, v in MODEL_ARGS.items() for a in (f"--{section.get(k, 'model')}.{k}", str(v))]
    cmd = [*cli, "train", str(data), "--out", str(run), *shape, "--max-steps", str(steps), "--lr", "1e-3",
           "--train.min_lr", "1e-4", "--train.warmup_steps", "100", "--model.dropout", "0",
           "--model.bias", "false",  # nanoGPT's train.py default: the identical model
           "--train.eval_interval", str(eval_interval), "--train.eval_steps", "20", "--no-sample", *extra]
    busy = wait_for_quiet(quiet_s)
    proc = timed_run(cmd, work, work / "pocketlm_train.log")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    logs = [r for r in records if "elapsed_s" in r]
    vals = [r for r in records if "val/loss" in r]
    last = logs[-1]
    window_ms = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) * 1000
                 for a, b in zip([{"step": 0, "elapsed_s": 0.0}] + logs, logs)]
    model, _ = load_model(run / "best", "cpu")
    model.eval()
    best_step = json.loads((run / "best" / "trainer_state.json").read_text())["step"]
    full = full_val_loss(lambda x, y: model(x, y)[1], Dataset(data).split("val"), MODEL_ARGS["block_size"])
    return emit({"bench": "train", "impl": "pocketlm", "steps": last["step"], "extra_args": " ".join(extra),
                 **step_figures(last["elapsed_s"] / last["step"] * 1000, window_ms),
                 "final_val_loss": round(vals[-1]["val/loss"], 4),
                 "best_val_loss": round(vals[-1]["val/best_loss"], 4), "full_val_loss_best_ckpt": round(full, 4),
                 "best_ckpt_step": best_step, **proc, "busy_pct_before": busy})


# ---- generation ---------------------------------------------------------------------------------------

def race(fns: dict[str, tuple[Callable[[], list[int]], int]], repeats: int) -> dict[str, tuple[float, list[int]]]:
    """Median tokens/s of each fn (name -> (fn, new tokens)), interleaved so that load hits all alike."""
    for fn, _ in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, (fn, n) in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            assert len(outs[name]) == n, f"{name}: expected {n} new tokens, got {len(outs[name])}"
    return {name: (fns[name][1] / statistics.median(times[name]), outs[name]) for name in fns}


def bench_generation(run: Path, repeats: int, quiet_s: float) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from pocketlm.generate import Engine, SamplingParams

    transformers.logging.set_verbosity_error()  # sampling fields in generation_config.json warn under greedy
    engine = Engine.load(run, "cpu")
    ids = engine.encode_prompt(PROMPT)
    short = engine.block_size - len(ids)  # HF GPT-2 cannot go past n_positions
    hf = AutoModelForCausalLM.from_pretrained(run / "best").eval()
    x = torch.tensor([ids])

    def ours(n: int) -> Callable[[], list[int]]:
        p = SamplingParams(temperature=0, max_new_tokens=n, stop_at_eot=False)
        return lambda: engine.generate(ids, p)[0].token_ids

    def theirs() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=short,
                              min_new_tokens=short, pad_token_id=engine.tok.eot_id)
        return out[0, len(ids):].tolist()

    busy = wait_for_quiet(quiet_s)
    res = race({"hf": (theirs, short), "ours": (ours(short), short), "ours_500": (ours(500), 500)}, repeats)
    (hf_tps, hf_out), (our_tps, our_out), (long_tps, _) = res["hf"], res["ours"], res["ours_500"]
    common = {"bench": "generate", "batch": 1, "greedy": True, "prompt_tokens": len(ids), "repeats": repeats,
              "threads": torch.get_num_threads(), "busy_pct_before": busy}
    emit({**common, "impl": "hf_generate", "new_tokens": short, "tokens_per_s": round(hf_tps, 1)})
    emit({**common, "impl": "pocketlm", "new_tokens": short, "tokens_per_s": round(our_tps, 1),
          "same_tokens_as_hf": our_out == hf_out})
    emit({**common, "impl": "pocketlm", "new_tokens": 500, "tokens_per_s": round(long_tps, 1)})
    emit({"bench": "generate", "ratio_tokens_per_s": round(our_tps / hf_tps, 2),
          "note": f"pocketlm / HF generate, {short} new tokens"})


def find_nanogpt(path: Path) -> Path:
    if not (path / "train.py").is_file() or not (path / "data" / "shakespeare_char" / "prepare.py").is_file():
        sys.exit(f"bench_core: no nanoGPT checkout at {path}: get one with\n"
                 f"  git clone https://github.com/karpathy/nanoGPT {path}\n"
                 "or pass --nanogpt PATH to an existing checkout")
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, default=REPO.parent / "nanoGPT",
                    help="nanoGPT checkout (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                    help="tinyshakespeare input.txt (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2000, help="training steps for both (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 steps, 3 generation repeats")
    ap.add_argument("--repeats", type=int, default=7, help="timed generation runs per figure, median (default: 7)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each part, wait up to S seconds for the machine to be under 20%% busy")
    ap.add_argument("--rounds", type=int, default=1, help="train each this often, alternating the order; "
                    "ratios use the medians (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="keep the work files (data, logs, runs) in this folder")
    ap.add_argument("--pocketlm-steps", type=int, help="pocketlm's steps (default: the same as nanoGPT's)")
    ap.add_argument("--pocketlm-args", default="", help="extra `pocketlm train` flags, e.g. "
                    "\"--train.optimizer muon\" with --pocketlm-steps 1000: same model and batch, another recipe")
    args = ap.parse_args(argv)
    nanogpt = find_nanogpt(args.nanogpt)
    if not args.data.is_file():
        sys.exit(f"bench_core: {args.data} not found: pass --data PATH to tinyshakespeare's input.txt")
    steps, repeats = (200, 3) if args.quick else (args.steps, args.repeats)
    eval_interval = min(250, steps // 2)  # nanoGPT's config value; a quick run still evaluates twice

    work = Path(tempfile.mkdtemp(prefix="bench_core-"))
    try:
        emit({"bench": "machine", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "steps": steps, "load_1m": round(os.getloadavg()[0], 2)})
        # alternate the order each round, so that a drift in machine speed does not favour one side
        ngs, pls = [], []
        for r in range(args.rounds):
            rwork = work / f"round{r}"
            rwork.mkdir()
            jobs = [lambda: ngs.append(run_nanogpt(nanogpt, args.data.resolve(), rwork, steps, eval_interval,
                                                   args.wait_quiet)),
                    lambda: pls.append(run_pocketlm(args.data.resolve(), rwork, args.pocketlm_steps or steps,
                                                    eval_interval, args.wait_quiet,
                                                    tuple(args.pocketlm_args.split())))]
            for job in (jobs if r % 2 == 0 else jobs[::-1]):
                job()
        keys = ("wall_s", "cpu_s", "ms_per_step", "ms_per_step_median10", "ms_per_step_p10", "tokens_per_s",
                "peak_rss_mb")  # pocketlm / nanoGPT, medians over the rounds
        ng = {k: statistics.median(x[k] for x in ngs) for k in ngs[0] if isinstance(ngs[0][k], (int, float))}
        pl = {k: statistics.median(x[k] for x in pls) for k in pls[0] if isinstance(pls[0][k], (int, float))}
        emit({"bench": "train", "rounds": args.rounds, **{f"ratio_{k}": round(pl[k] / ng[k], 3) for k in keys},
              "delta_final_val_loss": round(pl["final_val_loss"] - ng["final_val_loss"], 4),
              "delta_full_val_loss": round(pl["full_val_loss_best_ckpt"] - ng["full_val_loss_best_ckpt"], 4)})
        bench_generation(work / f"round{args.rounds - 1}" / "pocketlm_run", repeats, args.wait_quiet)
    finally:
        finish(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
