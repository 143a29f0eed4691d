"""Documents/s and peak memory of `pocketlm clean` (with near-dedupe) and `pocketlm split` on a large
generated corpus, and of pocketlm's near-dedupe against datasketch's MinHash + MinHashLSH (the peer).

The corpus: TinyStories sentences (shared/data) recombined into stories of 4-10 sentences, with 10% near
copies of earlier stories (two words changed, or a sentence dropped) and 5% exact copies with other
casing/spacing; every story has meta.group (50 stories per group) for the grouped split.

Every measurement is its own child process, so its peak RSS (ru_maxrss from wait4) is its own. Rounds
alternate the order of pocketlm and the peer because this shared machine's speed drifts.

    python benchmarks/bench_clean.py --docs 200000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("POCKETLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def generate(path: Path, n: int, seed: int = 0) -> None:
    text = (SHARED / "tinystories" / "tinystories_train_head.txt").read_text(encoding="utf-8")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 3 <= len(s.split()) <= 30]
    rng = random.Random(seed)
    stories: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = rng.random()
            if stories and r < 0.10:  # near copy
                ws = rng.choice(stories).split(" ")
                if rng.random() < 0.5:
                    for j in rng.sample(range(len(ws)), 2):
                        ws[j] = rng.choice(["big", "small", "happy", "red", "blue", "old"])
                    story = " ".join(ws)
                else:
                    parts = rng.choice(stories).split(". ")
                    parts.pop(rng.randrange(len(parts)))
                    story = ". ".join(parts)
            elif stories and r < 0.15:  # exact copy up to case and spacing
                story = rng.choice(stories).upper().replace(" ", "  ")
            else:
                story = " ".join(rng.choice(sentences) for _ in range(rng.randint(4, 10)))
                stories.append(story)
                if len(stories) > 5000:
                    stories.pop(rng.randrange(len(stories)))
            f.write(json.dumps({"text": story, "source": "bench", "meta": {"group": i // 50}}) + "\n")


def peer_datasketch(corpus: Path, threshold: float, num_perm: int, shingle: int) -> dict:
    """The peer: datasketch MinHash (update_batch over the same word shingles) + MinHashLSH, keep-first."""
    from datasketch import MinHash, MinHashLSH

    from pocketlm.data.ngrams import words

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    n = dup = 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            ws = words(json.loads(line)["text"])
            k = min(shingle, len(ws))
            m = MinHash(num_perm=num_perm)
            m.update_batch([" ".join(ws[i:i + k]).encode() for i in range(len(ws) - k + 1)])
            if lsh.query(m):
                dup += 1
            else:
                lsh.insert(n, m)
            n += 1
    return {"documents": n, "near_duplicates": dup}


def ours_dedupe(corpus: Path, threshold: float, num_perm: int, shingle: int) -> dict:
    """pocketlm's NearDeduper alone, on the same words, in batches of 256 as clean runs it."""
    from pocketlm.data.dedupe import NearDeduper
    from pocketlm.data.ngrams import WordHasher, words

    near, hasher = NearDeduper(threshold, num_perm, shingle), WordHasher()
    n = dup = 0
    batch: list = []

    def flush() -> None:
        nonlocal dup
        dup += sum(d is not None for d in near.check_batch(batch))
        batch.clear()

    with open(corpus, encoding="utf-8") as f:
        for line in f:
            batch.append(hasher(words(json.loads(line)["text"])))
            n += 1
            if len(batch) == 256:
                flush()
    flush()
    return {"documents": n, "near_duplicates": dup}


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{out}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "stdout": out.strip()[-2000:]}


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/pocketlm-bench-clean")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--child", choices=["peer", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        fn = peer_datasketch if a.child == "peer" else ours_dedupe
        print(json.dumps(fn(Path(a.corpus), a.threshold, 128, 5)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{a.docs}.jsonl"
    if not corpus.exists():
        generate(corpus, a.docs)
    size = corpus.stat().st_size
    py, me = sys.executable, str(Path(__file__).resolve())
    jobs = {
        "clean (all defaults + near dedupe + blocklist)": [py, "-m", "pocketlm", "clean", str(corpus), "--out",
                                                           str(work / "clean.jsonl"), "--dedupe", "near",
                                                           "--blocklist", "default", "--quiet"],
        "near dedupe: pocketlm": [py, me, "--child", "ours", "--corpus", str(corpus), "--threshold", str(a.threshold)],
        "near dedupe: datasketch": [py, me, "--child", "peer", "--corpus", str(corpus), "--threshold", str(a.threshold)],
        "split (grouped, leak check)": [py, "-m", "pocketlm", "split", str(corpus), "--out", str(work / "splits"),
                                        "--group-by", "group", "--leak", "warn", "--overwrite", "--quiet"],
    }
    print(f"corpus: {a.docs:,} documents, {size / 2 ** 20:.1f} MiB; load before: {loadavg()}")
    results: dict[str, list] = {k: [] for k in jobs}
    for r in range(a.rounds):
        names = list(jobs)
        if r % 2:  # alternate the order of the pair we compare
            names[1], names[2] = names[2], names[1]
        for name in names:
            res = measure(jobs[name])
            res["load"] = loadavg()
            results[name].append(res)
            print(f"round {r} | {name}: {res['seconds']}s, {a.docs / res['seconds']:,.0f} docs/s, "
                  f"{res['cpu_s']} CPU-s, peak {res['peak_rss_mib']} MiB, load {res['load']}", flush=True)
            if "dedupe:" in name:
                print("   ", res["stdout"])
    print("\nmedians (wall time is at the mercy of the machine's load; CPU time is steadier):")
    med = {}
    for name, rs in results.items():
        secs, cpu = statistics.median(x["seconds"] for x in rs), statistics.median(x["cpu_s"] for x in rs)
        rss = statistics.median(x["peak_rss_mib"] for x in rs)
        med[name] = (secs, cpu, rss)
        print(f"| {name} | {a.docs / secs:,.0f} docs/s | {secs:.1f} s | {a.docs / cpu:,.0f} docs/CPU-s | {rss:,.0f} MiB |")
    ours, peer = med["near dedupe: pocketlm"], med["near dedupe: datasketch"]
    print(f"near dedupe pocketlm/datasketch: wall time {ours[0] / peer[0]:.2f}x, CPU time {ours[1] / peer[1]:.2f}x, "
          f"peak memory {ours[2] / peer[2]:.2f}x")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nclean report: {json.dumps(json.load(open(work / 'clean.report.json'))['removed'])}")
    print(f"split: {json.dumps(json.load(open(work / 'splits' / 'split.json'))['splits'])}")
    print(f"load after: {loadavg()}")


if __name__ == "__main__":
    main()
