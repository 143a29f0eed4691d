"""Tokenization speed (issues 4 and 9): pocketlm's encoders against the `tokenizers` library and tiktoken.

One invocation, on generated text (documents drawn from the shared corpora, shuffled, until the size asked):
1. where the library's time goes (pre-tokenizer alone, encode_batch with and without TOKENIZERS_PARALLELISM);
2. encode MB/s on an in-memory sample, alternating rounds: the library's encode_batch, pocketlm's word-cache
   encoder in 1 and 2 processes (a byte-level BPE trained here, and GPT-2's vocabulary), tiktoken's GPT-2
   encode_ordinary_batch with 1 and 2 threads; pocketlm's GPT-2 ids are checked equal to tiktoken's;
3. `pocketlm prepare` on the whole generated file (default 1 GB) and on a quarter of it: wall time, MB/s,
   peak RSS of the process tree (sampled from /proc), CPU-seconds of the whole tree (prepare and its worker
   processes) and MB per CPU-second, with the exact command; and tiktoken's GPT-2 over the quarter file.
One JSON line per figure (the first names this invocation's exact command):

    python benchmarks/bench_tokenize.py [--gb 1] [--sample-mb 32] [--rounds 3] [--work /tmp/pocketlm-bench-tok]
        [--skip-prepare | --prepare-only]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
SOURCES = ["tinystories/tinystories_train_head_lowercase_4M.txt", "tinystories/tinystories_train_head.txt",
           "tinystories/tinystories_valid_head.txt", "shakespeare_complete.txt"]
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def load_avg() -> float:
    return os.getloadavg()[0]


def make_corpus(path: Path, n_bytes: int, seed: int = 0) -> None:
    """Paragraphs of the shared corpora in random order, blank-line separated, until `n_bytes`."""
    paras = []
    for name in SOURCES:
        text = (SHARED / name).read_text(encoding="utf-8")
        paras += [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            rng.shuffle(paras)
            chunk = "\n\n".join(paras) + "\n\n"
            chunk = chunk[: n_bytes - written] if len(chunk) > n_bytes - written else chunk
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def docs_of(path: Path, limit_bytes: int) -> list[str]:
    from pocketlm.data.documents import iter_documents

    out, size = [], 0
    for d in iter_documents(path, "blank-line"):
        out.append(d)
        size += len(d.encode("utf-8"))
        if size >= limit_bytes:
            break
    return out


def batches(docs: list[str], batch_bytes: int = 1 << 20) -> list[list[str]]:
    out, cur, size = [], [], 0
    for d in docs:
        cur.append(d)
        size += len(d)
        if size >= batch_bytes:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def tiktoken_gpt2():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(SHARED / "gpt2_tokenizer" / "vocab.bpe"),
                                            str(SHARED / "gpt2_tokenizer" / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def rate(fn, n_bytes: int) -> float:
    t = time.perf_counter()
    fn()
    return n_bytes / (time.perf_counter() - t) / 1e6


def cpu_rate(fn, n_bytes: int) -> float:
    """MB per CPU-second of this process (threads included): what a loaded machine cannot hide."""
    t = time.process_time()
    fn()
    return n_bytes / (time.process_time() - t) / 1e6


def where_time_goes(tok, docs: list[str]) -> None:
    """The library's own stages on a 4 MB slice."""
    n = sum(len(d.encode()) for d in docs)
    pre = tok.tk.pre_tokenizer
    emit({"figure": "library_pre_tokenizer_only", "mb_per_s": round(rate(lambda: [pre.pre_tokenize_str(d) for d in docs], n), 2),
          "load": load_avg()})
    for par in ("true", "false"):
        os.environ["TOKENIZERS_PARALLELISM"] = par
        r = rate(lambda: tok.tk.encode_batch(docs, add_special_tokens=False), n)
        emit({"figure": "library_encode_batch", "TOKENIZERS_PARALLELISM": par, "mb_per_s": round(r, 2), "load": load_avg()})
    os.environ.pop("TOKENIZERS_PARALLELISM")
    words = tok.words
    pattern = words.pattern
    emit({"figure": "python_re_split_only", "mb_per_s": round(rate(lambda: [pattern.findall(d) for d in docs], n), 2),
          "load": load_avg()})


def encode_rounds(tok, gpt2, enc, docs: list[str], rounds: int) -> None:
    from pocketlm.fastbpe import encode_parallel

    n = sum(len(d.encode()) for d in docs)
    bs = batches(docs)
    runs = {
        "pocketlm_bpe4k_1proc": lambda: list(encode_parallel(tok, iter(bs), 1, ordinary=True)),
        "pocketlm_bpe4k_2proc": lambda: list(encode_parallel(tok, iter(bs), 2, ordinary=True)),
        "pocketlm_gpt2_1proc": lambda: list(encode_parallel(gpt2, iter(bs), 1, ordinary=True)),
        "pocketlm_gpt2_2proc": lambda: list(encode_parallel(gpt2, iter(bs), 2, ordinary=True)),
        "tiktoken_gpt2_1thread": lambda: [enc.encode_ordinary_batch(b, num_threads=1) for b in bs],
        "tiktoken_gpt2_2threads": lambda: [enc.encode_ordinary_batch(b, num_threads=2) for b in bs],
    }
    got = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():  # alternate: every round runs everything once
            got[name].append(rate(fn, n))
    for name in ("pocketlm_bpe4k_1proc", "pocketlm_gpt2_1proc", "tiktoken_gpt2_1thread"):
        emit({"figure": "encode_per_cpu_second", "run": name, "mb_per_cpu_s": round(cpu_rate(runs[name], n), 2),
              "load": load_avg()})
    med = {k: statistics.median(v) for k, v in got.items()}
    for k, v in got.items():
        emit({"figure": "encode", "run": k, "mb_per_s_median": round(med[k], 2), "rounds": [round(x, 2) for x in v],
              "sample_mb": round(n / 1e6, 1), "vs_tiktoken_2threads": round(med[k] / med["tiktoken_gpt2_2threads"], 2),
              "load": load_avg()})
    same = [list(map(int, x)) for x in gpt2.encode_batch(docs[:2000], ordinary=True)] == \
        enc.encode_ordinary_batch(docs[:2000])
    emit({"figure": "gpt2_ids_equal_tiktoken", "docs": 2000, "equal": same})


def tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_prepare(corpus: Path, tok_dir: Path, out: Path) -> dict:
    import resource

    cmd = ["python", "-m", "pocketlm", "prepare", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out),
           "--overwrite", "--quiet"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - t
    out_text, err = proc.communicate()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if proc.returncode:
        raise SystemExit(f"prepare failed: {err.strip()}")
    m = json.loads((out / "manifest.json").read_text())
    size = corpus.stat().st_size
    return {"figure": "prepare", "input_mb": round(size / 1e6), "wall_s": round(wall, 1),
            "mb_per_s": round(size / wall / 1e6, 2), "encode_mb_per_s": round(size / m["timings"]["encode"] / 1e6, 2),
            "timings": m["timings"], "tokens": sum(s["tokens"] for s in m["splits"].values()),
            "cpu_s": round(cpu, 1), "mb_per_cpu_s": round(size / cpu / 1e6, 2),
            "peak_rss_mib": round(peak / 1024), "load": load_avg(), "command": " ".join(cmd)}


def tiktoken_file(enc, corpus: Path) -> dict:
    """tiktoken's GPT-2 over the same file, documents read the same way, 2 threads, counting tokens."""
    from pocketlm.data.documents import iter_documents

    t = time.perf_counter()
    n_tokens, cur, size = 0, [], 0
    for d in iter_documents(corpus, "blank-line"):
        cur.append(d)
        size += len(d)
        if size >= 1 << 20:
            n_tokens += sum(map(len, enc.encode_ordinary_batch(cur, num_threads=2)))
            cur, size = [], 0
    n_tokens += sum(map(len, enc.encode_ordinary_batch(cur, num_threads=2)))
    wall = time.perf_counter() - t
    return {"figure": "tiktoken_gpt2_file", "input_mb": round(corpus.stat().st_size / 1e6), "wall_s": round(wall, 1),
            "mb_per_s": round(corpus.stat().st_size / wall / 1e6, 2), "tokens": n_tokens, "load": load_avg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the generated corpus for prepare (default 1)")
    ap.add_argument("--sample-mb", type=float, default=32, help="in-memory sample for the encode rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/pocketlm-bench-tok")
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--prepare-only", action="store_true", help="only the two prepare runs (no rounds, no tiktoken)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pocketlm import tokenizer as toklib

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    emit({"figure": "command", "command": "python benchmarks/bench_tokenize.py " + " ".join(sys.argv[1:]),
          "commit": commit, "date": time.strftime("%a %b %d %H:%M UTC %Y", time.gmtime())})

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    n_bytes = int(args.gb * 1e9)
    if not corpus.is_file() or corpus.stat().st_size < n_bytes:
        t = time.perf_counter()
        make_corpus(corpus, n_bytes)
        emit({"figure": "generated", "mb": round(n_bytes / 1e6), "s": round(time.perf_counter() - t, 1)})
    tok_dir = work / "bpe4k"
    if not (tok_dir / "tokenizer.json").is_file():
        tk = toklib.train_bpe(iter(docs_of(corpus, 16 << 20)), 4096, toklib.EOT)
        toklib.save(tk, tok_dir, toklib.EOT)
    tok = toklib.load(tok_dir)
    gpt2 = toklib.load(SHARED / "gpt2_tokenizer")
    enc = tiktoken_gpt2()
    emit({"figure": "machine", "cpus": os.cpu_count(), "load": load_avg(), "python": sys.version.split()[0]})
    if not args.prepare_only:
        where_time_goes(tok, docs_of(corpus, 4 << 20))
        encode_rounds(tok, gpt2, enc, docs_of(corpus, int(args.sample_mb * (1 << 20))), args.rounds)
    if args.skip_prepare:
        return
    quarter = work / "corpus_quarter.txt"
    if not quarter.is_file() or quarter.stat().st_size < n_bytes // 4:
        make_corpus(quarter, n_bytes // 4, seed=1)
    emit(run_prepare(quarter, tok_dir, work / "ds_quarter"))
    if not args.prepare_only:
        emit(tiktoken_file(enc, quarter))
    emit(run_prepare(corpus, tok_dir, work / "ds"))


if __name__ == "__main__":
    main()
