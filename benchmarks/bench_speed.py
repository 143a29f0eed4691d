"""Speed benchmark (issue 9): generation against Hugging Face generate(), training steps against nanoGPT.

One invocation, one JSON line per figure, contenders interleaved in alternating order so that the load of
a shared machine hits them alike; every figure is a median over rounds and every ratio compares figures
from the same invocation.

- generate: batch-1 greedy tokens/s of pocketlm's KV-cache Engine and of HF `generate()` on the same weights
  (saved once as a HF folder, loaded by both), for the quickstart-sized model (4 x 128, char vocabulary,
  context 128) and a GPT-2-small-sized one (12 x 768, vocabulary 50,257); plus n=8 batched sampling.
- train: ms per optimizer step (forward, backward, clip, AdamW) of nanoGPT's model with its own
  `configure_optimizers` and of pocketlm's model and optimizer, on the identical model and batch, for
  nanoGPT's CPU configuration (4 x 128, context 64, batch 12) and a 6 x 384, context-256 one; MFU against
  the matmul peak measured in the same run for the dtype each runs its matmuls in (pocketlm picks bf16
  autocast on a CPU with bf16 units, see `pocketlm.device.cpu_dtype`; the micro-batch's rows split across the
  threads, see `pocketlm.parallel.pick_thread_shards`), with pocketlm's step unsharded beside it. `--levers`
  adds pocketlm variants (float32 without autocast, torch.compile, Muon for the blocks' matrices).
- on a CUDA device (`--device cuda`, the default when one is present): the same figures on the GPU, with
  pocketlm's decode step replayed from a CUDA graph (and without, as a lever), both trainers in bf16 autocast
  as nanoGPT's train.py runs on a GPU, a GPT-2-small-sized training configuration, and MFU against the GPU's
  datasheet peak. Not yet run on a GPU: no device has been lent to this project.

    python benchmarks/bench_speed.py [--nanogpt ../nanoGPT] [--rounds 5] [--only generate|train] [--levers]
                                     [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
GEN_MODELS = {  # name -> (GPTConfig kwargs, new tokens)
    "quickstart": (dict(vocab_size=66, block_size=128, n_layer=4, n_head=4, n_embd=128, bias=False), 120),
    "gpt2-small": (dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True), 60),
}
TRAIN_MODELS = {  # name -> (n_layer, n_head, n_embd, block_size, batch_size)
    "nanogpt-cpu": (4, 4, 128, 64, 12),
    "6x384-ctx256": (6, 6, 384, 256, 12),
    "gpt2-small-ctx1024": (12, 12, 768, 1024, 16),  # CUDA only: minutes per step on a 2-core CPU
}
CUDA_ONLY = {"gpt2-small-ctx1024"}
DEVICE = torch.device("cpu")  # set by main(): where every model and batch lives


def sync() -> None:
    if DEVICE.type == "cuda":  # a figure is the work done, not the work queued
        torch.cuda.synchronize(DEVICE)


def emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record), flush=True)
    return record


def race(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved and alternating the order each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()} | \
        {f"{name}_spread": (min(v), max(v)) for name, v in times.items()}


# ---- generation ---------------------------------------------------------------------------------------

def bench_generate(name: str, rounds: int, work: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from pocketlm import checkpoint as ckpt
    from pocketlm.generate import Engine, SamplingParams
    from pocketlm.model import GPT, GPTConfig

    transformers.logging.set_verbosity_error()
    kw, new = GEN_MODELS[name]
    torch.manual_seed(0)
    folder = work / name
    ckpt.save_model(GPT(GPTConfig(**kw)), folder, None, eot_id=0)  # random weights: speed, not text
    model, _ = ckpt.load_model(folder, DEVICE)
    engine = Engine(model.stream_layout(), None)  # what Engine.load does with the model it owns
    eager = Engine(model, None)  # on CUDA: the same decode step without its CUDA graph
    eager.cuda_graphs = False
    hf = AutoModelForCausalLM.from_pretrained(folder).to(DEVICE).eval()
    ids = list(range(1, 7))
    x = torch.tensor([ids], device=DEVICE)

    def ours(n: int = 1, temperature: float = 0.0, e: Engine = engine) -> Callable[[], list[int]]:
        p = SamplingParams(max_new_tokens=new, temperature=temperature, top_k=50 if temperature else 0, seed=0,
                           stop_at_eot=False)
        return lambda: [t.tolist() for t in e.steps(ids, p, n)]

    def theirs(n: int = 1, sample: bool = False) -> Callable[[], list[int]]:
        def run() -> list[int]:
            with torch.inference_mode():
                kw = dict(do_sample=True, top_k=50, temperature=1.0, num_return_sequences=n) if sample else \
                    dict(do_sample=False)
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                  pad_token_id=0, **kw)
            return out[:, len(ids):].tolist()
        return run

    same = [row[0] for row in ours()()] == theirs()()[0]
    fns = {"hf": theirs(), "pocketlm": ours(), "hf_n8": theirs(8, True), "pocketlm_n8": ours(8, 1.0)}
    if DEVICE.type == "cuda":
        fns |= {"pocketlm_nograph": ours(e=eager), "pocketlm_nograph_n8": ours(8, 1.0, eager)}
    res = race(fns, rounds)
    common = {"bench": "generate", "model": name, "device": str(DEVICE), "params_M": round(model.num_params() / 1e6, 2),
              "new_tokens": new, "threads": torch.get_num_threads(), "rounds": rounds}
    for impl in [k for k in fns if not k.endswith("_n8")]:
        emit({**common, "impl": impl, "batch": 1, "tokens_per_s": round(new / res[impl], 1),
              "spread_tokens_per_s": [round(new / s, 1) for s in res[f"{impl}_spread"][::-1]]})
        emit({**common, "impl": impl, "batch": 8, "sampling": "top_k 50",
              "tokens_per_s": round(8 * new / res[f"{impl}_n8"], 1)})
    emit({**common, "ratio_batch1": round(res["hf"] / res["pocketlm"], 2),
          "ratio_batch8": round(res["hf_n8"] / res["pocketlm_n8"], 2), "same_greedy_tokens": same})


# ---- training steps -----------------------------------------------------------------------------------

def nanogpt_step(nanogpt: Path, shape: tuple[int, ...]) -> tuple[Callable[[], None], int]:
    """What nanoGPT's train.py runs: fp32 on CPU; on a GPU bf16 autocast, fused AdamW and torch.compile."""
    L, H, C, T, B = shape
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    spec.loader.exec_module(mod := importlib.util.module_from_spec(spec))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        m = mod.GPT(mod.GPTConfig(block_size=T, vocab_size=65, n_layer=L, n_head=H, n_embd=C, dropout=0.0,
                                  bias=False)).to(DEVICE)
        opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), DEVICE.type)  # what its train.py builds
    cuda = DEVICE.type == "cuda"
    fwd = torch.compile(m) if cuda else m
    return _step(fwd, m, opt, T, B, torch.bfloat16 if cuda else torch.float32), m.get_num_params()


def pocketlm_step(shape: tuple[int, ...], lever: str = "") -> tuple[Callable[[], None], int]:
    """What `pocketlm train` runs on this CPU: its dtype choice (bf16 autocast where bf16 matmuls measure
    1.5x fp32's and the model is wide enough), its thread shards (each micro-batch's rows split across the
    threads, see `parallel.pick_thread_shards`), its optimizer. Levers: fp32 (autocast off), unsharded (one
    batch on all threads), compile, muon."""
    from pocketlm import config, optim, parallel
    from pocketlm.device import cpu_dtype
    from pocketlm.model import GPT, GPTConfig

    L, H, C, T, B = shape
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=65, block_size=T, n_layer=L, n_head=H, n_embd=C, bias=False)).to(DEVICE)
    ours = torch.bfloat16 if DEVICE.type == "cuda" else cpu_dtype(C)[0]  # what `pocketlm train` picks
    dtype = torch.float32 if lever == "fp32" else ours
    t = config.TrainConfig(optimizer="muon" if lever == "muon" else "adamw")
    opt = optim.build(m, t, low_precision=dtype != torch.float32)
    fwd = torch.compile(m) if lever == "compile" else m
    shards = parallel.pick_thread_shards(1 if lever == "unsharded" else 0, DEVICE, False, lever == "compile", B,
                                         True, m, True)[0]
    return _step(fwd, m, opt, T, B, dtype, shards), m.num_params()


def _step(fwd: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer, T: int, B: int,
          dtype: torch.dtype = torch.float32, shards: int = 1) -> Callable[[], None]:
    from pocketlm import parallel
    from pocketlm.train import NextTokenTask

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 65, (B, T), generator=g).to(DEVICE) for _ in range(2))
    threads = parallel.ThreadShards(shards) if shards > 1 else None
    if threads and hasattr(opt, "shards"):
        opt.shards = threads  # as the training loop sets it: Muon's Newton-Schulz on the same threads
    task, params = NextTokenTask(), list(model.parameters())

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):  # per thread
            return fwd(*batch)[1]

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step() -> None:
        if threads:  # as the training loop runs it
            with threads.one_thread():
                threads.backward(task.split((x, y), threads.n), loss_of, params)
                update()
            return
        loss_of((x, y)).backward()
        update()
    return step


def bench_train(name: str, nanogpt: Path, rounds: int, levers: bool) -> None:
    from pocketlm.device import cpu_dtype
    from pocketlm.track import measure_matmul_tflops, peak_flops

    shape = TRAIN_MODELS[name]
    L, H, C, T, B = shape
    steps_per_call = 10 if C <= 128 else 2
    fns, n_params = {}, 0
    ng, n_params = nanogpt_step(nanogpt, shape)
    fns["nanogpt"] = ng
    fns["pocketlm"], _ = pocketlm_step(shape)
    if DEVICE.type == "cpu":  # the same step with the batch on all threads at once: what thread shards add
        fns["pocketlm_unsharded"], _ = pocketlm_step(shape, "unsharded")
    if levers:
        fns["pocketlm_fp32"], _ = pocketlm_step(shape, "fp32")
        fns["pocketlm_compile"], _ = pocketlm_step(shape, "compile")
        fns["pocketlm_muon"], _ = pocketlm_step(shape, "muon")
    calls = {k: (lambda f=f: [f() for _ in range(steps_per_call)]) for k, f in fns.items()}
    t0 = time.perf_counter()
    res = race(calls, rounds, warmup=2)
    if DEVICE.type == "cuda":  # the datasheet's dense peaks (tf32 for fp32), as the training log uses
        peaks = {dt: peak_flops(DEVICE, dt)[0] for dt in (torch.float32, torch.bfloat16)}
        ours = torch.bfloat16
    else:  # the peaks in this run, best of 2048^2 products over 2 s (a short figure under load would inflate MFU)
        cpu = torch.device("cpu")
        peaks = {dt: max(measure_matmul_tflops(cpu, dt, n=2048, seconds=2.0), peak_flops(cpu, dt, 0.0)[0] / 1e12)
                 * 1e12 for dt in (torch.float32, torch.bfloat16)}
        ours = cpu_dtype(C)[0]
    flops_per_token = 6 * n_params + 12 * L * T * C  # PaLM's estimate, as the training log uses
    common = {"bench": "train", "model": name, "device": str(DEVICE), "shape": dict(
              n_layer=L, n_head=H, n_embd=C, block_size=T, batch_size=B), "threads": torch.get_num_threads(),
              "rounds": rounds,
              "matmul_peak_gflops": round(peaks[torch.float32] / 1e9, 1),
              "bf16_matmul_peak_gflops": round(peaks[torch.bfloat16] / 1e9, 1),
              "wall_s": round(time.perf_counter() - t0, 1)}
    for impl in fns:
        ms = res[impl] / steps_per_call * 1000
        tps = B * T / ms * 1000
        dtype = torch.float32 if impl == "pocketlm_fp32" or (impl == "nanogpt" and DEVICE.type == "cpu") else ours
        emit({**common, "impl": impl, "ms_per_step": round(ms, 2), "tokens_per_s": round(tps),
              "matmul_dtype": str(dtype).removeprefix("torch."),
              "mfu": round(tps * flops_per_token / peaks[dtype], 3),  # against the peak of its own dtype
              "mfu_vs_fp32_peak": round(tps * flops_per_token / peaks[torch.float32], 3),
              "spread_ms": [round(s / steps_per_call * 1000, 2) for s in res[f"{impl}_spread"]]})
    emit({**common, **{f"ratio_tokens_per_s_{impl}": round(res["nanogpt"] / res[impl], 3)
                       for impl in fns if impl != "nanogpt"}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, default=REPO.parent / "nanoGPT", help="nanoGPT checkout")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per figure (default: 5)")
    ap.add_argument("--only", choices=["generate", "train"], help="one half only")
    ap.add_argument("--models", help="comma-separated subset of " + ", ".join([*GEN_MODELS, *TRAIN_MODELS]))
    ap.add_argument("--levers", action="store_true",
                    help="also time pocketlm in float32, with torch.compile and with Muon")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where to run (default: cuda when present, else cpu)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    chosen = set(args.models.split(",")) if args.models else None
    emit({"bench": "machine", "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
          "load_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as tmp:
        if args.only != "train":
            for name in GEN_MODELS:
                if chosen is None or name in chosen:
                    bench_generate(name, args.rounds, Path(tmp))
        if args.only != "generate":
            if not (args.nanogpt / "model.py").is_file():
                sys.exit(f"bench_speed: no nanoGPT checkout at {args.nanogpt}: pass --nanogpt PATH")
            for name in TRAIN_MODELS:
                if (chosen is None and (name not in CUDA_ONLY or DEVICE.type == "cuda")) or name in (chosen or ()):
                    bench_train(name, args.nanogpt.resolve(), args.rounds, args.levers)
    emit({"bench": "machine", "load_1m_after": round(os.getloadavg()[0], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
