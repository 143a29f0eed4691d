"""`ingest`: messy sources -> canonical JSONL records ({"text", "source", "meta"}), one module per source.

The dispatcher picks a source for every input: an explicit `format`, else a URL (HTML), an `hf:` name or a
saved Hugging Face dataset folder, else the file suffix (a folder is walked and each file picked by its
suffix). Every source is a generator `read(item, ctx)` that streams records, so memory stays flat in the
input size; bad items go to `ctx.problems` (file:line, skipped and counted, or an error with `strict`) and
items removed by a filter (score, date, subreddit...) are counted in `ctx.filtered`. The output is written
through RecordWriter: it appears, complete, only when every input was read.
"""

from __future__ import annotations

import glob
import importlib
import re
import time
from collections import Counter
from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketlm.data.records import Problems, Record, RecordWriter
from pocketlm.errors import PocketLMError
from pocketlm.progress import Progress, fmt_duration

# format -> module under pocketlm.data.ingest that reads it
FORMATS = {"text": "text", "jsonl": "tabular", "json": "tabular", "csv": "tabular", "parquet": "tabular",
           "html": "html", "discord": "discord", "reddit": "reddit", "ocr": "ocr", "hf": "hf"}
SUFFIXES = {
    **dict.fromkeys([".txt", ".md", ".markdown", ".text", ".rst"], "text"),
    **dict.fromkeys([".jsonl", ".ndjson"], "jsonl"), ".json": "json", ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".html": "html", ".htm": "html", ".zst": "reddit",
    **dict.fromkeys([".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"], "ocr"),
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class IngestOptions:
    """Everything the sources read; the CLI flags map onto these one to one."""

    format: str | None = None  # force one source for every input
    field: str | None = None  # the text field of JSONL/JSON/CSV/Parquet/HF rows (default "text")
    template: str | None = None  # or a template over several fields, "{speaker}: {line}"
    separator: str = "blank-line"  # how text files split into documents (as in `prepare`)
    html_table: str | None = None  # render table rows through this template instead of the main text
    per_row: bool = False  # one document per table row instead of one per page
    gap: float = 1800.0  # seconds of silence that end a Discord conversation
    subreddit: list[str] = dataclasses.field(default_factory=list)
    min_score: int | None = None
    after: float | None = None  # unix seconds, inclusive
    before: float | None = None  # unix seconds, exclusive
    reddit_kind: str = "both"  # submissions, comments or both
    ocr: bool = False  # OCR the images found in folders
    lang: str = "eng"  # Tesseract language(s)
    hf_split: str = "train"
    cache: str | None = None  # on-disk HTTP cache folder
    rate: float = 1.0  # seconds between two requests to one host
    retries: int = 3
    backoff: float = 1.0  # first retry delay in seconds; doubles each time
    timeout: float = 30.0
    strict: bool = False
    quiet: bool = False


@dataclass
class Context:
    """What a source gets besides its input: the options, the problem and filter counters, progress."""

    opts: IngestOptions
    problems: Problems
    progress: Progress
    filtered: Counter = dataclasses.field(default_factory=Counter)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-run objects (the HTTP client...)
    extra: str = ""  # shown on the progress line: the current input and how far into it

    def skip(self, reason: str) -> None:
        self.filtered[reason] += 1

    def position(self, name: str, done: int, total: int) -> None:
        """Show how far into the current input the read is (bytes), with an ETA for that input."""
        now = time.perf_counter()
        if self.state.get("position_of") != name:
            self.state["position_of"], self.state["position_t0"] = name, now
        frac = done / total if total else 0.0
        eta = ""
        if frac > 0.01:
            eta = f" ETA {fmt_duration((now - self.state['position_t0']) * (1 - frac) / frac)}"
        self.extra = f"{name} {frac:.0%}{eta}"
        self.progress.update(0, self.extra)


@dataclass
class Summary:
    documents: int = 0
    inputs: Counter = dataclasses.field(default_factory=Counter)  # format -> inputs read
    problems: Counter = dataclasses.field(default_factory=Counter)
    filtered: Counter = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    def line(self, out: str | Path) -> str:
        ins = ", ".join(f"{k} {v:,}" for k, v in sorted(self.inputs.items()))
        s = f"ingested {self.documents:,} documents from {sum(self.inputs.values()):,} inputs ({ins}) -> {out}"
        if self.problems:
            s += f"; skipped {sum(self.problems.values()):,} bad ({_counts(self.problems)})"
        if self.filtered:
            s += f"; filtered {sum(self.filtered.values()):,} ({_counts(self.filtered)})"
        return s + f" in {self.seconds:.1f}s"


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in c.most_common())


def parse_duration(text: str) -> float:
    """'30m' -> 1800.0; units s, m, h, d."""
    m = _DURATION.match(str(text))
    if not m:
        raise PocketLMError(f"cannot read duration {text!r}: use a number and a unit, e.g. 90s, 30m, 2h, 1d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_date(text: str) -> float:
    """'2023-01-31' or an ISO date-time (UTC unless it says otherwise) -> unix seconds."""
    from datetime import datetime, timezone

    try:
        d = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PocketLMError(f"cannot read date {text!r}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS") from None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


def unescape(text: str) -> str:
    """Let a shell user type \\n and \\t in templates."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def is_url(item: str) -> bool:
    return item.startswith(("http://", "https://"))


def is_hf_folder(p: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def plan(inputs: list[str], opts: IngestOptions, skipped: Counter) -> list[tuple[str, str]]:
    """(format, item) for every input, folders expanded in sorted order; unknown suffixes in folders are
    counted in `skipped`, an unknown file named explicitly is an error."""
    if opts.format and opts.format not in FORMATS:
        raise PocketLMError(f"unknown --format {opts.format!r}; choose from {', '.join(FORMATS)}")
    out: list[tuple[str, str]] = []
    for raw in inputs:
        if is_url(raw) or raw.startswith("hf:"):
            out.append((opts.format or ("hf" if raw.startswith("hf:") else "html"), raw))
            continue
        p = Path(raw)
        if not p.exists() and any(c in raw for c in "*?["):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise PocketLMError(f"no file matches {raw}")
            out.extend(plan(matches, opts, skipped))
            continue
        if p.is_dir():
            if opts.format == "hf" or is_hf_folder(p):
                out.append(("hf", raw))
                continue
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            for f in files:
                fmt = opts.format or _sniff(f)
                if fmt == "ocr" and not (opts.ocr or opts.format == "ocr"):
                    skipped["image (pass --ocr to read images)"] += 1
                elif fmt is None:
                    skipped[f"unknown file type ({f.suffix or 'no suffix'})"] += 1
                else:
                    out.append((fmt, str(f)))
            continue
        if not p.is_file():
            if opts.format == "hf":
                out.append(("hf", raw))  # a Hub name like "user/dataset"
                continue
            raise PocketLMError(f"input not found: {raw} (a Hugging Face dataset name takes hf:NAME)")
        fmt = opts.format or ("ocr" if opts.ocr else None) or _sniff(p)
        if fmt is None:
            raise PocketLMError(f"cannot tell the format of {raw} from its suffix; pass --format "
                                f"({', '.join(FORMATS)})")
        out.append((fmt, raw))
    return out


def _sniff(p: Path) -> str | None:
    suffix = p.suffix.lower()
    if suffix == ".zst" and Path(p.stem).suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"  # rows.jsonl.zst: rows, not a Reddit dump
    fmt = SUFFIXES.get(suffix)
    if fmt == "json":  # a DiscordChatExporter file starts with its "guild"
        with open(p, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if re.match(rb'\{\s*"guild"\s*:', head):
            return "discord"
    return fmt


def _check_templates(opts: IngestOptions) -> None:
    """Bad templates fail before any input is read."""
    from pocketlm.data.ingest.tabular import RowTemplate

    if opts.field or opts.template:
        RowTemplate(opts.field, opts.template)
    if opts.html_table:
        from pocketlm.data.ingest.html import TableTemplate

        TableTemplate(opts.html_table)


def read_all(items: list[tuple[str, str]], ctx: Context) -> Iterator[tuple[str, Record]]:
    for fmt, item in items:
        module = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
        ctx.extra = item if is_url(item) or fmt == "hf" else Path(item).name
        for rec in module.read(item, ctx, fmt):
            yield fmt, rec


def ingest(inputs: list[str], out: str | Path, opts: IngestOptions | None = None) -> Summary:
    """Read every input into one JSONL file at `out`; returns the counts."""
    opts = opts or IngestOptions()
    t0 = time.perf_counter()
    if not inputs:
        raise PocketLMError("no inputs given: pocketlm ingest FILE_OR_FOLDER_OR_URL... --out OUT.jsonl")
    _check_templates(opts)
    summary = Summary()
    items = plan(list(inputs), opts, summary.filtered)
    target = Path(out).resolve()
    if any(fmt not in ("hf",) and not is_url(i) and Path(i).resolve() == target for fmt, i in items):
        items = [(fmt, i) for fmt, i in items if is_url(i) or fmt == "hf" or Path(i).resolve() != target]
        summary.filtered["the output file itself"] += 1  # `ingest raw/*.jsonl --out raw/all.jsonl`, run twice
    if not items:
        raise PocketLMError(f"nothing to read in {', '.join(inputs)} ({_counts(summary.filtered)})")
    problems = Problems(strict=opts.strict)
    bar = Progress("ingest", None, " docs", enabled=not opts.quiet)
    ctx = Context(opts, problems, bar, filtered=summary.filtered)
    try:
        with RecordWriter(out) as w:
            for fmt, rec in read_all(items, ctx):
                w.write(rec)
                bar.update(1, ctx.extra)
            if w.count == 0:
                bad = f"; skipped {problems.total:,} bad ({_counts(problems.counts)})" if problems.total else ""
                flt = f"; filtered {sum(ctx.filtered.values()):,} ({_counts(ctx.filtered)})" if ctx.filtered else ""
                raise PocketLMError(f"no documents found in {', '.join(inputs)}{bad}{flt}; nothing written")
    finally:
        client = ctx.state.get("fetcher")
        if client is not None:
            client.close()
    if bar.last_draw > bar.start:  # a progress line was shown: finish it; short runs print only the summary
        bar.close()
    summary.documents = w.count
    summary.inputs.update(fmt for fmt, _ in items)
    summary.problems = problems.counts
    summary.seconds = time.perf_counter() - t0
    return summary
