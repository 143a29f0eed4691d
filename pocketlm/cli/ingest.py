"""`pocketlm ingest`: files, folders, URLs, chat exports, Reddit dumps, images, HF datasets -> one JSONL file."""

from __future__ import annotations

import argparse

from pocketlm.cli import Handler
from pocketlm.errors import PocketLMError


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    from pocketlm.data.ingest import FORMATS

    p = subs.add_parser(
        "ingest", help="text, tables, HTML/URLs, Discord, Reddit .zst, images (OCR), HF datasets -> JSONL records",
        description="Read every input into one JSONL file of {text, source, meta} records. The source is "
                    "picked from the input (URL, hf:NAME, suffix, folder) or --format.")
    p.add_argument("inputs", nargs="+", help="files, folders, globs, http(s) URLs or hf:NAME")
    p.add_argument("--out", required=True, help="JSONL file to write (replaced atomically when complete)")
    p.add_argument("--format", choices=list(FORMATS), help="read every input as this source")
    p.add_argument("--strict", action="store_true", help="stop at the first bad item instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    g = p.add_argument_group("text files and rows (JSONL, JSON, CSV, Parquet, HF datasets)")
    g.add_argument("--separator", default="blank-line",
                   help="text files: 'blank-line', 'line', 'file' or a literal string (default: blank-line)")
    g.add_argument("--field", help="the row field holding the text (default: text)")
    g.add_argument("--template", help='render several fields: "{speaker}: {line}" (others go to meta)')
    g.add_argument("--hf-split", default="train", help="Hugging Face dataset split (default: train)")

    h = p.add_argument_group("HTML files and URLs")
    h.add_argument("--html-table", metavar="TEMPLATE",
                   help='rows of tables instead of the main text: "{speaker}: {line}" (header names, any case) '
                        'or "{0}: {1}" (column positions)')
    h.add_argument("--per-row", action="store_true", help="one document per table row (default: one per page)")
    h.add_argument("--cache", help="HTTP cache folder (default: ~/.cache/pocketlm/http)")
    h.add_argument("--rate", type=float, default=1.0, help="seconds between requests to one host (default: 1)")
    h.add_argument("--retries", type=int, default=3, help="retries after a timeout, 429 or 5xx (default: 3)")
    h.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubling (default: 1)")
    h.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")

    d = p.add_argument_group("Discord exports (DiscordChatExporter JSON)")
    d.add_argument("--gap", default="30m", help="silence that starts a new conversation (default: 30m)")

    r = p.add_argument_group("Reddit / Pushshift .zst dumps")
    r.add_argument("--subreddit", action="append", default=[], help="keep only this subreddit (repeatable)")
    r.add_argument("--min-score", type=int, help="keep items with at least this score")
    r.add_argument("--after", help="keep items created at or after this date (YYYY-MM-DD, UTC)")
    r.add_argument("--before", help="keep items created before this date (YYYY-MM-DD, UTC)")
    r.add_argument("--reddit-kind", choices=["submissions", "comments", "both"], default="both",
                   help="submissions' self-text, comments, or both (default: both)")

    o = p.add_argument_group("images (OCR with Tesseract)")
    o.add_argument("--ocr", action="store_true", help="read images (in folders too) with Tesseract")
    o.add_argument("--lang", default="eng", help="Tesseract language(s), e.g. eng+deu (default: eng)")
    return {"ingest": cmd_ingest}


def cmd_ingest(args: argparse.Namespace) -> int:
    from pocketlm.data.ingest import IngestOptions, ingest, parse_date, parse_duration

    if args.rate < 0 or args.retries < 0 or args.backoff < 0 or args.timeout <= 0:
        raise PocketLMError("--rate, --retries and --backoff must be >= 0 and --timeout > 0")
    opts = IngestOptions(
        format=args.format, field=args.field, template=args.template, separator=args.separator,
        html_table=args.html_table, per_row=args.per_row, gap=parse_duration(args.gap),
        subreddit=args.subreddit, min_score=args.min_score,
        after=parse_date(args.after) if args.after else None, before=parse_date(args.before) if args.before else None,
        reddit_kind=args.reddit_kind, ocr=args.ocr, lang=args.lang, hf_split=args.hf_split, cache=args.cache,
        rate=args.rate, retries=args.retries, backoff=args.backoff, timeout=args.timeout, strict=args.strict,
        quiet=args.quiet)
    summary = ingest(args.inputs, args.out, opts)
    print(summary.line(args.out))
    return 0
