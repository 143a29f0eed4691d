"""Evaluation benchmark (issue 6): eval tokens/s, and the memorisation index's build and query times.

    python benchmarks/bench_eval.py [--mb 120] [--rounds 5] [--work /tmp/bench_eval]

1. Eval throughput: `evaluate.evaluate_stream` (loss, ppl, acc, top-10 acc and bytes, over every window
   of the split) on a pocketlm GPT of the small-cpu shape, against the usual Hugging Face perplexity loop
   (`GPT2LMHeadModel(input_ids, labels=...).loss`, loss only) on the same weights and the same windows.
   The two alternate for --rounds rounds so load hits them alike; medians are reported.
2. Suffix index: a corpus of --mb MB made from the real texts in ../shared/data (runs of 1-40 consecutive
   words taken from random places, so it reads like text and repeats like a web crawl), indexed with
   `TextIndex.build` (libdivsufsort); then 1,000 word 8-gram lookups (half present, half not) and the
   matching-statistics sweep over 50 samples of 200 words. The numpy prefix-doubling builder (the slow
   reference) is timed against libdivsufsort on a 10 MB slice.
One JSON line per figure; results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def emit(record: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(record), flush=True)
    return record


def load_avg() -> float:
    return os.getloadavg()[0]


# ---- 1. eval throughput -------------------------------------------------------------------------------------

def bench_eval(work: Path, rounds: int) -> None:
    from transformers import AutoModelForCausalLM

    from pocketlm import evaluate as ev
    from pocketlm.checkpoint import save_model
    from pocketlm.config import DataConfig
    from pocketlm.data.prepare import Dataset, prepare
    from pocketlm.model import GPT, GPTConfig

    data = work / "shakespeare-bpe"
    if not (data / "manifest.json").is_file():
        prepare([SHARED / "tinyshakespeare.txt"], data, DataConfig(tokenizer="bpe", vocab_size=2048,
                                                                   separator="blank-line"), verbose=False)
    ds = Dataset(data)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ds.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128)).eval()
    folder = work / "model"
    save_model(model, folder, data, ds.manifest["tokenizer"]["eot_id"])
    lm = ev.load_lm(folder, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    stream = ev.stream_of(ds.split("val"), lm.tok.eot_id)
    n = len(stream) - 1
    T, B = 256, 8

    def ours() -> float:
        return ev.evaluate_stream(lm, stream, 10, B).metrics()["loss"]

    @torch.inference_mode()
    def peer() -> float:
        total, count = 0.0, 0
        starts = list(range(0, n, T))
        for s in range(0, len(starts), B):
            rows = starts[s:s + B]
            for group in ([p for p in rows if p + T <= n], [p for p in rows if p + T > n]):
                if not group:
                    continue
                w = min(T, n - group[0])
                x = torch.from_numpy(stream[np.array(group)[:, None] + np.arange(w + 1)])
                out = hf(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels inside
                # HF's loss covers w-1 targets per row (the last window token has no label in its own shift);
                # add the final column by hand so both cover the same tokens
                last = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), x[:, -1], reduction="sum")
                total += out.loss.item() * len(group) * (w - 1) + last.item()
                count += len(group) * w
        return total / count

    ours(), peer()  # warm-up
    times: dict[str, list[float]] = {"pocketlm": [], "hf": []}
    losses = {}
    for _ in range(rounds):
        for name, fn in (("pocketlm", ours), ("hf", peer)):
            t0 = time.perf_counter()
            losses[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit({"bench": "eval_tokens_per_s", "tokens": n, "block_size": T, "batch": B,
          "params_M": round(model.num_params() / 1e6, 2), "pocketlm_tok_s": round(n / med["pocketlm"]),
          "hf_loss_only_tok_s": round(n / med["hf"]), "ratio": round(med["hf"] / med["pocketlm"], 3),
          "loss_pocketlm": round(losses["pocketlm"], 6), "loss_hf": round(losses["hf"], 6), "load": load_avg()})


# ---- 2. the suffix index ------------------------------------------------------------------------------------

def synth_corpus(mb: int, seed: int = 0) -> list[str]:
    """Documents of ~mb MB: runs of consecutive words from the shared corpora, joined at random."""
    texts = [(SHARED / "shakespeare_complete.txt").read_text(encoding="utf-8"),
             (SHARED / "tinystories" / "tinystories_train_head.txt").read_text(encoding="utf-8"),
             *[json.loads(ln)["text"] for ln in (SHARED / "fortunes.jsonl").read_text(encoding="utf-8").splitlines()]]
    words = np.array(" ".join(texts).split(), dtype=object)
    rng = np.random.default_rng(seed)
    target = mb * 1_000_000
    docs, size = [], 0
    while size < target:
        n_runs = int(rng.integers(5, 60))
        starts = rng.integers(0, len(words) - 40, size=n_runs)
        lens = rng.integers(1, 41, size=n_runs)
        doc = " ".join(" ".join(words[s:s + L]) for s, L in zip(starts, lens))
        docs.append(doc)
        size += len(doc) + 1
    return docs


def bench_index(work: Path, mb: int, skip_reference: bool = False) -> None:
    from pocketlm.textindex import TextIndex, normalise, suffix_array_numpy

    t0 = time.perf_counter()
    docs = synth_corpus(mb)
    emit({"bench": "synth_corpus", "documents": len(docs), "mb": round(sum(len(d) for d in docs) / 1e6, 1),
          "seconds": round(time.perf_counter() - t0, 1)})
    folder = work / "index"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    idx = TextIndex.build(docs, folder)
    build = time.perf_counter() - t0
    m = idx.meta
    emit({"bench": "index_build", "bytes": m["bytes"], "builder": m["builder"], "seconds_total": round(build, 1),
          "seconds_text": m["seconds_text"], "seconds_sort": m["seconds_sort"],
          "disk_mb": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20), "load": load_avg()})

    rng = np.random.default_rng(1)
    present, absent = [], []
    while len(present) < 500:
        ws = docs[int(rng.integers(len(docs)))].split()
        if len(ws) >= 8:
            s = int(rng.integers(0, len(ws) - 7))
            present.append(" ".join(ws[s:s + 8]))
    vocab = " ".join(docs[:2000]).split()
    for _ in range(500):
        absent.append(" ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), size=8)))
    t0 = time.perf_counter()
    hits = sum(idx.count(q) > 0 for q in present + absent)
    q = time.perf_counter() - t0
    emit({"bench": "index_query_8gram", "queries": 1000, "found": hits, "us_per_query": round(q / 1000 * 1e6, 1),
          "load": load_avg()})
    samples = []
    for i in range(50):  # 200-word "samples": half copied runs, half shuffled words
        ws = docs[int(rng.integers(len(docs)))].split()[:100]
        samples.append(ws + [vocab[int(j)] for j in rng.integers(0, len(vocab), size=200 - len(ws))])
    t0 = time.perf_counter()
    longest = max(max(idx.longest_matches(ws)) for ws in samples)
    sweep = time.perf_counter() - t0
    emit({"bench": "index_longest_matches", "samples": 50, "words": sum(map(len, samples)),
          "seconds": round(sweep, 2), "ms_per_sample": round(sweep / 50 * 1000, 1), "longest": longest,
          "load": load_avg()})
    idx.close()
    if skip_reference:
        shutil.rmtree(folder, ignore_errors=True)
        return

    # the reference builder against libdivsufsort on a 10 MB slice
    data = np.frombuffer(b"\n".join(normalise(d) for d in docs[:len(docs) * 10 // mb]), dtype=np.uint8)[:10_000_000]
    from pydivsufsort import divsufsort

    t0 = time.perf_counter()
    fast = divsufsort(data.copy())
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = suffix_array_numpy(data)
    t_slow = time.perf_counter() - t0
    emit({"bench": "suffix_sort_10mb", "bytes": len(data), "libdivsufsort_s": round(t_fast, 2),
          "numpy_prefix_doubling_s": round(t_slow, 2), "ratio": round(t_slow / t_fast, 1),
          "identical": bool(np.array_equal(fast, slow)), "load": load_avg()})
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=120, help="size of the synthetic corpus for the index (MB)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the eval comparison")
    ap.add_argument("--work", default="/tmp/bench_eval", help="scratch folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="skip the numpy suffix sort (minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    emit({"bench": "machine", "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": load_avg()})
    if not args.skip_eval:
        bench_eval(work, args.rounds)
    if not args.skip_index:
        bench_index(work, args.mb, args.skip_reference)


if __name__ == "__main__":
    main()
