"""Ingest benchmark (issue 3): documents/s and peak memory of `pocketlm ingest` on a generated corpus.

Two inputs are generated once (seeded) in --work: a JSONL file of rows {"speaker", "line", "episode",
"score"} rendered through a template, and a Pushshift-style `.zst` NDJSON dump of comments and submissions
(compressed with a 2 GiB window, as Pushshift's are) read with a subreddit + score filter. Each contender
runs in its own Python process, so its peak RSS (getrusage) is its own:

  - pocketlm: `pocketlm ingest ... --out out.jsonl` through the CLI entry point;
  - peer (JSONL): the hand-written loop a user would otherwise write: json.loads each line, format the
    template, json.dumps the record. No error reporting, no atomic write: the floor for pure Python;
  - peer (.zst): the widely copied Pushshift reader (zstandard stream_reader with a 2 GiB window,
    chunked decode, split lines, json.loads, filter), writing the same records.

Contenders alternate for --rounds rounds, so machine load hits them alike; medians are reported. The
pocketlm runs are repeated on a --small input to show that peak memory does not grow with the input.

    python benchmarks/bench_ingest.py [--mb 200] [--small-mb 20] [--rounds 2] [--work /tmp/pocketlm-bench-ingest]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the cat sat on a mat and the dog ran to the red ball while birds sang in old green trees "
         "what do you mean we never said that about the ship captain I cannot do this anymore").split()
SUBS = ["greentext", "AskReddit", "wholesomegreentexts", "books"]


def sentence(rng: random.Random, lo: int = 6, hi: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_jsonl(path: Path, mb: int, seed: int = 0) -> int:
    rng, n, size = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb << 20:
            line = json.dumps({"speaker": rng.choice(["BOB", "AMY", "CAL"]), "line": sentence(rng),
                               "episode": n // 500, "score": rng.randint(0, 100)}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def make_zst(path: Path, mb: int, seed: int = 1) -> int:
    import zstandard

    rng, n, size = random.Random(seed), 0, 0
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    with open(path, "wb") as raw, zstandard.ZstdCompressor(compression_params=params).stream_writer(raw) as w:
        buf = io.BytesIO()
        while size < mb << 20:
            if n % 4:
                obj = {"id": f"c{n}", "subreddit": rng.choice(SUBS), "author": f"u{rng.randint(0, 9999)}",
                       "score": rng.randint(-5, 200), "created_utc": 1672531200 + n, "body": sentence(rng, 4, 80),
                       "link_id": f"t3_s{n // 50}", "parent_id": f"t3_s{n // 50}"}
            else:
                obj = {"id": f"s{n}", "subreddit": rng.choice(SUBS), "author": f"u{rng.randint(0, 9999)}",
                       "score": rng.randint(-5, 200), "created_utc": 1672531200 + n, "title": sentence(rng, 3, 12),
                       "selftext": ">be me\n>" + sentence(rng, 10, 120)}
            line = json.dumps(obj).encode() + b"\n"
            buf.write(line)
            size += len(line)
            n += 1
            if buf.tell() > 1 << 20:
                w.write(buf.getvalue())
                buf = io.BytesIO()
        w.write(buf.getvalue())
    return n


# ---- contenders (each runs in a child process: `--child NAME INPUT OUT`) --------------------------------

def peer_jsonl(inp: str, out: str) -> int:
    n = 0
    with open(inp, "rb") as f, open(out, "w", encoding="utf-8") as o:
        for line in f:
            row = json.loads(line)
            text = "{speaker}: {line}".format_map(row)
            meta = {k: v for k, v in row.items() if k not in ("speaker", "line")}
            o.write(json.dumps({"text": text, "source": inp, "meta": meta}, ensure_ascii=False) + "\n")
            n += 1
    return n


def peer_zst(inp: str, out: str) -> int:
    """Pushshift's reference reader (read_lines_zst), with the filter and record writing added."""
    import zstandard

    n = 0
    with open(inp, "rb") as fh, open(out, "w", encoding="utf-8") as o:
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh)
        buffer = ""
        while True:
            chunk = reader.read(2**27).decode()  # the reference decodes whole chunks (utf-8 split risk)
            if not chunk:
                break
            lines = (buffer + chunk).split("\n")
            for line in lines[:-1]:
                obj = json.loads(line)
                if obj["subreddit"].lower() != "greentext" or obj["score"] < 50:
                    continue
                text = obj["body"] if "body" in obj else f"{obj['title']}\n\n{obj['selftext']}"
                o.write(json.dumps({"text": text, "source": f"reddit:r/{obj['subreddit']}",
                                    "meta": {"id": obj["id"], "score": obj["score"]}}, ensure_ascii=False) + "\n")
                n += 1
            buffer = lines[-1]
        reader.close()
    return n


def pocketlm_cli(argv: list[str]) -> int:
    from pocketlm.cli import main

    rc = main(argv + ["--quiet"])
    if rc:
        raise SystemExit(rc)
    with open(argv[argv.index("--out") + 1], "rb") as f:
        return sum(1 for _ in f)


def child(name: str, inp: str, out: str) -> None:
    t0 = time.perf_counter()
    if name == "peer-jsonl":
        n = peer_jsonl(inp, out)
    elif name == "peer-zst":
        n = peer_zst(inp, out)
    elif name == "pocketlm-jsonl":
        n = pocketlm_cli(["ingest", inp, "--template", "{speaker}: {line}", "--out", out])
    elif name == "pocketlm-zst":
        n = pocketlm_cli(["ingest", inp, "--subreddit", "greentext", "--min-score", "50", "--out", out])
    else:
        raise SystemExit(f"unknown contender {name}")
    seconds = time.perf_counter() - t0
    # VmHWM, not getrusage: ru_maxrss survives fork+exec and would report the parent's peak
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(json.dumps({"docs": n, "seconds": seconds, "peak_rss_mb": hwm / 1024}))


def measure(name: str, inp: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", name, str(inp), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name} failed: {r.stderr.strip()[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    out.unlink()
    return res


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="size of each large input, MB uncompressed")
    ap.add_argument("--small-mb", type=int, default=20, help="size of the small inputs (memory flatness)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/pocketlm-bench-ingest")
    ap.add_argument("--child", nargs=3, metavar=("NAME", "INPUT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs, counts_file = {}, work / "counts.json"
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    for tag, mb in (("large", a.mb), ("small", a.small_mb)):
        j, z = work / f"rows-{mb}mb.jsonl", work / f"RC-{mb}mb.zst"
        for path, make in ((j, make_jsonl), (z, make_zst)):
            if not path.exists() or path.name not in counts:
                counts[path.name] = make(path, mb)
                counts_file.write_text(json.dumps(counts))
        inputs[tag] = (j, z)
    print(json.dumps({"load_before": loadavg(), "jsonl_mb": round(inputs['large'][0].stat().st_size / 2**20),
                      "zst_mb_compressed": round(inputs['large'][1].stat().st_size / 2**20)}), flush=True)
    out = work / "out.jsonl"
    runs: dict[str, list[dict]] = {}
    plan = [("peer-jsonl", "large", 0), ("pocketlm-jsonl", "large", 0), ("peer-zst", "large", 1),
            ("pocketlm-zst", "large", 1), ("pocketlm-jsonl", "small", 0), ("pocketlm-zst", "small", 1)]
    for rnd in range(a.rounds):
        for name, tag, k in plan:
            res = measure(name, inputs[tag][k], out)
            items = counts[inputs[tag][k].name]
            res.update(contender=name, input=tag, round=rnd, load=loadavg(), input_items=items,
                       items_per_s=round(items / res["seconds"]))
            print(json.dumps(res), flush=True)
            runs.setdefault(f"{name}/{tag}", []).append(res)
    summary = {}
    for key, rs in runs.items():
        med = statistics.median(r["seconds"] for r in rs)
        summary[key] = {"input_items": rs[0]["input_items"], "docs_out": rs[0]["docs"], "median_s": round(med, 2),
                        "items_per_s": round(rs[0]["input_items"] / med),
                        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs))}
    for kind in ("jsonl", "zst"):
        p, q = summary[f"pocketlm-{kind}/large"], summary[f"peer-{kind}/large"]
        summary[f"ratio_{kind}_time_pocketlm_over_peer"] = round(p["median_s"] / q["median_s"], 2)
    summary["load_after"] = loadavg()
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
