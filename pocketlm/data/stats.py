"""`stats`: what a corpus is made of, and what tokenizers make of it, in one streaming pass per tokenizer.

Counts characters, words (runs of letters/digits with inner apostrophes), lines, documents, UTF-8 bytes and
the exact character set; keeps a histogram of document lengths and the most frequent words; for every
tokenizer named, the token count, bytes per token and the share of unknown tokens.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pocketlm.errors import PocketLMError

WORD = re.compile(r"\w+(?:['’]\w+)*")
BATCH_BYTES = 1 << 20


def escape_charset(chars: Iterable[str]) -> str:
    """The characters, sorted, as one string a terminal can show: controls and unusual spaces escaped."""
    out = []
    for c in sorted(chars):
        out.append(c.encode("unicode_escape").decode("ascii") if not c.isprintable() or c == "\\" else c)
    return "".join(out)


def corpus_stats(docs: Iterable[str], top: int = 20) -> dict:
    """Counts over the documents; `lengths` holds every document's length in characters (for the histogram)."""
    words: Counter = Counter()
    chars: set[str] = set()
    n_chars = n_bytes = n_lines = 0
    lengths: list[int] = []
    for doc in docs:
        n_chars += len(doc)
        n_bytes += len(doc.encode("utf-8"))
        n_lines += doc.count("\n") + 1
        chars.update(doc)
        words.update(WORD.findall(doc))
        lengths.append(len(doc))
    if not lengths:
        raise PocketLMError("the corpus has no text (every file or record is empty)")
    return {
        "documents": len(lengths), "characters": n_chars, "bytes": n_bytes, "lines": n_lines,
        "words": sum(words.values()), "distinct_words": len(words), "distinct_characters": len(chars),
        "charset": escape_charset(chars),
        "document_chars": {"min": min(lengths), "median": int(np.median(lengths)), "mean": round(n_chars / len(lengths), 1),
                           "max": max(lengths)},
        "top_words": words.most_common(top),
        "lengths": lengths,
    }


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_stats(tok, docs: Iterable[str], workers: int = 1) -> dict:
    """Tokens of the corpus under `tok` (special-token strings in the text count as plain text)."""
    from pocketlm.fastbpe import encode_parallel

    n_tokens = n_unk = n_bytes = 0
    batches = _batches(docs)

    def counted() -> Iterator[list[str]]:
        nonlocal n_bytes
        for b in batches:
            n_bytes += sum(len(d.encode("utf-8")) for d in b)
            yield b
    for flat, _ in encode_parallel(tok, counted(), workers, ordinary=True):
        n_tokens += len(flat)
        if tok.unk_id is not None:
            n_unk += int((flat == tok.unk_id).sum())
    return {"vocab_size": tok.vocab_size, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / n_tokens, 3) if n_tokens else 0.0,
            "unknown_share": n_unk / n_tokens if n_tokens else 0.0}


def length_histogram(lengths: list[int], path: Path, title: str) -> None:
    """Document lengths (characters) as a PNG histogram with log-spaced bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.unique(np.geomspace(max(1, arr.min()), max(2, arr.max()), 40).round())
    ax.hist(arr, bins=bins, color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters, log scale)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(stats: dict, tokens: dict[str, dict], out: Path, title: str) -> None:
    """stats.json (everything but the per-document lengths) and doc_lengths.png in `out`."""
    from pocketlm.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in stats.items() if k != "lengths"}
    data["tokenizers"] = tokens
    atomic_write_text(out / "stats.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    length_histogram(stats["lengths"], out / "doc_lengths.png", title)


def format_report(stats: dict, tokens: dict[str, dict], out: Path | None, fmt: Callable[[int], str] = "{:,}".format
                  ) -> str:
    lines = [
        f"documents {fmt(stats['documents'])} | characters {fmt(stats['characters'])} | bytes {fmt(stats['bytes'])} "
        f"| words {fmt(stats['words'])} ({fmt(stats['distinct_words'])} distinct) | lines {fmt(stats['lines'])}",
        "document length (chars): " + ", ".join(f"{k} {fmt(int(v)) if k != 'mean' else v}"
                                               for k, v in stats["document_chars"].items()),
        f"charset ({stats['distinct_characters']}): {stats['charset']}",
        "most frequent words: " + ", ".join(f"{w} {fmt(n)}" for w, n in stats["top_words"]),
    ]
    if tokens:
        lines.append(f"{'tokenizer':<28} {'vocab':>8} {'tokens':>12} {'bytes/token':>11} {'unknown':>8}")
        for name, t in tokens.items():
            lines.append(f"{name:<28} {t['vocab_size']:>8,} {t['tokens']:>12,} {t['bytes_per_token']:>11.3f} "
                         f"{t['unknown_share']:>8.2%}")
    if out is not None:
        lines.append(f"wrote {out / 'stats.json'} and {out / 'doc_lengths.png'}")
    return "\n".join(lines)
