"""Load benchmark for `pocketlm serve`: N concurrent streaming clients for T seconds, continuous batching vs
sequential serving (the same server with --max-batch 1), alternating in one invocation.

    python benchmarks/bench_serve.py --model runs/quickstart --clients 16 --seconds 60 --rounds 1

Each client is the official `openai` async client streaming /v1/completions in a loop (max_tokens fixed, the
model told to ignore end-of-text so every request costs the same). Reported per mode: requests/s, generated
tokens/s, p50/p99 request latency, p50 time to first token, errors, and the machine's load average.
Without --model it trains a small char-level model on ../shared/data/tinyshakespeare.txt first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_model(work: Path) -> Path:
    """A 4-layer, 128-wide char-level GPT (context 128) trained briefly on tinyshakespeare."""
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    run = work / "run"
    py = [sys.executable, "-m", "pocketlm"]
    subprocess.run([*py, "prepare", str(corpus), "--out", str(work / "data"), "--tokenizer", "char", "--quiet",
                    "--separator", "file"], check=True)
    subprocess.run([*py, "train", str(work / "data"), "--out", str(run), "--model.n_layer", "4", "--model.n_head", "4",
                    "--model.n_embd", "128", "--block-size", "128", "--max-steps", "300", "--batch-size", "12",
                    "--train.eval_interval", "300", "--no-sample"], check=True)
    return run


def start_server(model: Path, max_batch: int, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-concurrency", "64", "--device", "cpu",
                             "--db", str(Path(tempfile.gettempdir()) / f"bench-serve-{os.getpid()}.db")],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not come up")


async def client_loop(base: str, until: float, max_tokens: int, out: dict, seed: int) -> None:
    from openai import AsyncOpenAI

    c = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    i = 0
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        first, tokens = None, 0
        try:
            stream = await c.completions.create(model=out["model"], prompt="ROMEO:", max_tokens=max_tokens,
                                                temperature=0.8, seed=seed * 100_000 + i, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter() - t0
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            if end <= until + 0.0:  # count only requests that finished inside the window
                out["latency"].append(end - t0)
                out["ttft"].append(first or end - t0)
                out["tokens"] += tokens
            else:
                out["late"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted and the first few printed
            out["errors"] += 1
            if out["errors"] <= 3:
                print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
        i += 1
    await c.close()


def run_load(port: int, clients: int, seconds: float, max_tokens: int) -> dict:
    out = {"latency": [], "ttft": [], "tokens": 0, "errors": 0, "late": 0, "model": ""}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
        out["model"] = json.load(r)["data"][0]["id"]
    until = time.perf_counter() + seconds
    load0 = os.getloadavg()[0]

    async def main() -> None:
        await asyncio.gather(*(client_loop(f"http://127.0.0.1:{port}/v1", until, max_tokens, out, k)
                               for k in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    lat = sorted(out["latency"])
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"requests": len(lat), "requests_per_s": len(lat) / seconds, "tokens_per_s": out["tokens"] / seconds,
            "p50_latency_s": statistics.median(lat) if lat else float("nan"), "p99_latency_s": q[98],
            "p50_ttft_s": statistics.median(out["ttft"]) if lat else float("nan"), "errors": out["errors"],
            "unfinished_at_end": out["late"], "wall_s": wall, "load_avg_1m": [load0, os.getloadavg()[0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="run or checkpoint folder (default: train a small one first)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of (batched, sequential)")
    ap.add_argument("--json", help="append the results here as one JSON line")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else small_model(Path(tmp))
        results: dict[str, list[dict]] = {"continuous batching (--max-batch 16)": [], "sequential (--max-batch 1)": []}
        for r in range(args.rounds):
            for name, max_batch in (("continuous batching (--max-batch 16)", 16), ("sequential (--max-batch 1)", 1)):
                port = free_port()
                proc = start_server(model, max_batch, port)
                try:
                    res = run_load(port, args.clients, args.seconds, args.max_tokens)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                results[name].append(res)
                print(f"round {r + 1} {name}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})}",
                      flush=True)
    print(f"\n{args.clients} streaming clients x {args.seconds:.0f} s, max_tokens {args.max_tokens}, "
          f"{args.rounds} round(s); medians over rounds")
    print("| mode | requests/s | tokens/s | p50 latency | p99 latency | p50 first token | errors |")
    print("|---|---|---|---|---|---|---|")
    med = {}
    for name, rs in results.items():
        m = {k: statistics.median(r[k] for r in rs) for k in ("requests_per_s", "tokens_per_s", "p50_latency_s",
                                                             "p99_latency_s", "p50_ttft_s")}
        m["errors"] = sum(r["errors"] for r in rs)
        med[name] = m
        print(f"| {name} | {m['requests_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['p50_latency_s']:.2f} s | "
              f"{m['p99_latency_s']:.2f} s | {m['p50_ttft_s']:.2f} s | {m['errors']} |")
    b, s = med.values()
    print(f"\nbatching / sequential: tokens/s x{b['tokens_per_s'] / s['tokens_per_s']:.2f}, "
          f"p50 latency x{b['p50_latency_s'] / s['p50_latency_s']:.2f}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": vars(args), "results": results}) + "\n")


if __name__ == "__main__":
    main()
