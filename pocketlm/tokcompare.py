"""`tokenizer compare`: train a grid of tokenizers on one corpus and measure each on it, the same way.

One row per tokenizer: char-level, GPT-2 (or any tokenizer to load), and BPE for every pre-tokenizer x
vocabulary size, named `bpe-{pre}-{size}`. Every row's tokenizer is trained from scratch on the whole
corpus (timed on its own), saved under `tokenizers/<name>/` so the winner can be used directly, and counted
on the same documents with the same code: tokens, bytes per token, share of unknown tokens. Rows run in
worker processes (one per core): BPE training is mostly single-threaded. Results go to compare.md,
compare.csv and compare.png (token count against vocabulary size).
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pocketlm import tokenizer as toklib
from pocketlm.errors import PocketLMError
from pocketlm.progress import Progress

COLUMNS = ["tokenizer", "kind", "pre_tokenizer", "vocab_size", "tokens", "bytes_per_token", "unknown_share",
           "train_seconds", "error"]


@dataclass
class Spec:
    name: str
    kind: str  # char | bpe | load
    pre: str | None = None
    vocab_size: int | None = None
    source: str | None = None


def grid(kinds: list[str], pres: list[str], vocab_sizes: list[int]) -> list[Spec]:
    """The rows to run, in table order; names are checked before anything is trained."""
    for pre in pres:
        toklib.bpe_pre_tokenizer(pre)  # an unknown name fails here, listing the valid ones
    for v in vocab_sizes:
        if v < 2:
            raise PocketLMError(f"vocab size {v} is too small: give sizes such as 256,512,1024")
    specs: list[Spec] = []
    for kind in kinds:
        if kind == "char":
            specs.append(Spec("char", "char"))
        elif kind == "bpe":
            if not pres or not vocab_sizes:
                raise PocketLMError("--kinds bpe needs --pre and --vocab-sizes")
            specs += [Spec(f"bpe-{pre}-{v}", "bpe", pre, v) for pre in pres for v in vocab_sizes]
        else:  # gpt2, a Hugging Face id, or a tokenizer / model folder
            specs.append(Spec(Path(kind).name if Path(kind).exists() else kind, "load", source=kind))
    if not specs:
        raise PocketLMError("nothing to compare: give --kinds, e.g. char,gpt2,bpe")
    return specs


def run_one(spec: Spec, inputs: list[str], separator: str, eot: str, out: Path) -> dict:
    """Build (or load) one tokenizer and count the corpus with it; a failure becomes the row's `error`."""
    from pocketlm.data.prepare import read_corpus
    from pocketlm.data.stats import token_stats

    row = {**asdict(spec), "tokenizer": spec.name, "pre_tokenizer": spec.pre, "train_seconds": None, "error": ""}
    try:
        t0 = time.perf_counter()
        if spec.kind == "char":
            tk = toklib.train_char(read_corpus(inputs, separator), eot)
        elif spec.kind == "bpe":
            tk = toklib.train_bpe(read_corpus(inputs, separator), spec.vocab_size, eot, pre=spec.pre)
        else:
            tok = toklib.load(spec.source)
        if spec.kind != "load":
            row["train_seconds"] = round(time.perf_counter() - t0, 2)
            toklib.save(tk, out / "tokenizers" / spec.name, eot)
            tok = toklib.Tok(tk, eot)
        row.update(token_stats(tok, read_corpus(inputs, separator)))
    except PocketLMError as e:
        row["error"] = str(e)
    return row


def _run_in_worker(args: tuple) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    return run_one(*args)


def compare(inputs: list[str], kinds: list[str], pres: list[str], vocab_sizes: list[int], out: str | Path,
            separator: str = "blank-line", eot: str = toklib.EOT, jobs: int = 0, verbose: bool = True) -> list[dict]:
    from pocketlm.data.prepare import read_corpus

    out = Path(out)
    specs = grid(kinds, pres, vocab_sizes)
    if not any(d.strip() for d in read_corpus(inputs, separator)):
        raise PocketLMError("the corpus has no text (every file or record is empty)")
    jobs = min(jobs or len(os.sched_getaffinity(0)), len(specs))
    out.mkdir(parents=True, exist_ok=True)
    bar = Progress("compare", len(specs), " rows", enabled=verbose)
    tasks = [(s, [str(i) for i in inputs], separator, eot, out) for s in specs]
    rows: dict[str, dict] = {}
    if jobs <= 1:
        for t in tasks:
            rows[t[0].name] = run_one(*t)
            bar.update(1, force=True)
    else:
        import multiprocessing as mp

        # the biggest vocabularies train longest: start them first so the pool ends evenly
        order = sorted(tasks, key=lambda t: -(t[0].vocab_size or 0))
        with mp.get_context("spawn").Pool(jobs) as pool:
            for row in pool.imap_unordered(_run_in_worker, order):
                rows[row["tokenizer"]] = row
                bar.update(1, extra=row["tokenizer"], force=True)
    bar.close()
    result = [rows[s.name] for s in specs]
    write_outputs(result, out)
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| tokenizer | vocab size | tokens | bytes/token | unknown | training time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['tokenizer']} | {r['vocab_size'] or ''} | error: {r['error']} | | | |")
            continue
        t = f"{r['train_seconds']:.1f}s" if r["train_seconds"] is not None else "-"
        lines.append(f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} | "
                     f"{r['unknown_share']:.2%} | {t} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out: Path) -> None:
    from pocketlm.atomic import atomic_write_text

    atomic_write_text(out / "compare.md", markdown(rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "compare.csv", buf.getvalue())
    plot(rows, out / "compare.png")


def plot(rows: list[dict], path: Path) -> None:
    """Token count against vocabulary size: one line per BPE pre-tokenizer, one marker per other tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"]]
    fig, ax = plt.subplots(figsize=(8, 5))
    for pre in dict.fromkeys(r["pre_tokenizer"] for r in ok if r["kind"] == "bpe"):
        pts = sorted((r["vocab_size"], r["tokens"]) for r in ok if r["kind"] == "bpe" and r["pre_tokenizer"] == pre)
        ax.plot(*zip(*pts), marker="o", label=f"bpe {pre}")
    for r in ok:
        if r["kind"] != "bpe":
            ax.scatter([r["vocab_size"]], [r["tokens"]], marker="s", s=60, zorder=3)
            ax.annotate(r["tokenizer"], (r["vocab_size"], r["tokens"]), textcoords="offset points", xytext=(6, 6))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size (log scale)")
    ax.set_ylabel("tokens in the corpus")
    ax.set_title("Token count against vocabulary size")
    ax.grid(True, alpha=0.3)
    if any(r["kind"] == "bpe" for r in ok):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
