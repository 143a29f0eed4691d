"""Curation commands over canonical JSONL documents: clean, split, review."""

from __future__ import annotations

import argparse
import sys

from pocketlm.cli import Handler
from pocketlm.errors import PocketLMError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    c = subs.add_parser("clean", help="normalise, filter and deduplicate JSONL documents, with a report")
    c.add_argument("inputs", nargs="+", help="JSONL files of {text, source, meta} documents")
    c.add_argument("--out", required=True, help="cleaned JSONL file to write (report beside it: NAME.report.json)")
    c.add_argument("--rejects", help="also write removed documents here, with meta.removed = the reason")
    c.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    c.add_argument("--quiet", action="store_true", help="no progress output")
    g = c.add_argument_group("characters")
    g.add_argument("--no-fix-unicode", action="store_true", help="skip ftfy (mojibake, HTML entities, NFC)")
    g.add_argument("--charset", default="ascii-printable",
                   help="ascii-printable (default: printable ASCII and newlines), latin1 or any")
    g.add_argument("--policy", default="drop-char",
                   help="a character outside the set: drop-char (default), replace or drop-document")
    g.add_argument("--replacement", default="?", help="the character --policy replace puts in (default: ?)")
    g.add_argument("--transliterate", default="latin",
                   help="first try ASCII look-alikes: none, punct (quotes, dashes), latin (default: also é->e) or all")
    g.add_argument("--keep-whitespace", action="store_true", help="leave spaces, tabs and blank lines as they are")
    g = c.add_argument_group("filters")
    g.add_argument("--min-chars", type=int, default=1, help="drop shorter documents (default: 1)")
    g.add_argument("--max-chars", type=int, help="drop longer documents")
    g.add_argument("--min-words", type=int, default=0, help="drop documents with fewer words")
    g.add_argument("--max-words", type=int, help="drop documents with more words")
    g.add_argument("--lang", type=_csv, default=[], help="keep these languages only, e.g. en or en,de")
    g.add_argument("--lang-threshold", type=float, default=0.5, help="minimum detector confidence (default: 0.5)")
    g.add_argument("--blocklist", action="append", default=[], metavar="default|FILE",
                   help="drop documents with a listed word or phrase; 'default' = the bundled slurs list")
    g.add_argument("--simple-words", action="append", default=[], metavar="FILE",
                   help="word list (one per line): keep documents whose words are in it")
    g.add_argument("--simple-words-from", action="append", default=[], metavar="CORPUS",
                   help="take the simple vocabulary from a corpus (JSONL or text)")
    g.add_argument("--simple-min-count", type=int, default=3,
                   help="with --simple-words-from: times a word must occur (default: 3)")
    g.add_argument("--simple-share", type=float, default=1.0,
                   help="share of a document's words that must be simple (default: 1.0)")
    g.add_argument("--include", action="append", default=[], metavar="REGEX", help="keep only matching documents")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="drop matching documents")
    g.add_argument("--include-keyword", action="append", default=[], metavar="WORD",
                   help="keep only documents with this word/phrase (case-insensitive)")
    g.add_argument("--exclude-keyword", action="append", default=[], metavar="WORD",
                   help="drop documents with this word/phrase (case-insensitive)")
    g = c.add_argument_group("deduplication")
    g.add_argument("--dedupe", default="none", help="none (default), exact or near (exact + MinHash LSH)")
    g.add_argument("--near-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity of word shingles that counts as duplicate (default: 0.8)")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default: 128)")
    g.add_argument("--shingle", type=int, default=5, help="words per shingle (default: 5)")
    g.add_argument("--seed", type=int, default=1, help="MinHash seed (default: 1)")

    s = subs.add_parser("split", help="JSONL documents -> train/val/test.jsonl by document or group, leak-checked")
    s.add_argument("inputs", nargs="+", help="JSONL files of {text, source, meta} documents")
    s.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl and split.json")
    s.add_argument("--val", type=float, default=0.05, help="share of documents for validation (default: 0.05)")
    s.add_argument("--test", type=float, default=0.05, help="share of documents for test (default: 0.05)")
    s.add_argument("--group-by", metavar="KEY",
                   help="meta key (episode, thread, author; or source) whose groups stay in one split")
    s.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    s.add_argument("--leak-ngram", type=int, default=13,
                   help="words in a passage shared by train and val/test that counts as a leak (default: 13)")
    s.add_argument("--leak", default="fail", help="on a leak: fail (default, exit 2, nothing written), warn or off")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    s.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    s.add_argument("--quiet", action="store_true", help="no progress output")

    r = subs.add_parser("review", help="accept, edit or reject documents in a local web page; export the kept ones")
    r.add_argument("input", help="JSONL file of {text, source, meta} documents")
    r.add_argument("--db", help="SQLite file holding the decisions (default: INPUT.review.sqlite)")
    r.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765; 0 = any free port)")
    r.add_argument("--open", action="store_true", help="open the page in the default browser")
    r.add_argument("--export", metavar="OUT", help="write the accepted (and edited) documents to OUT and exit")
    r.add_argument("--strict", action="store_true", help="stop at the first malformed input line")
    return {"clean": cmd_clean, "split": cmd_split, "review": cmd_review}


def cmd_review(args: argparse.Namespace) -> int:
    from pocketlm.data.records import Problems
    from pocketlm.data.review import Review, make_server

    review = Review(args.input, args.db, Problems(strict=args.strict))
    try:
        s = review.summary()
        if args.export:
            c = review.export(args.export)
            print(f"exported {c['accepted'] + c['edited']:,} documents ({c['edited']:,} edited) to {args.export}; "
                  f"{s['rejected']:,} rejected, {s['undecided']:,} undecided not exported")
            return 0
        server = make_server(review, args.port)
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        print(f"reviewing {args.input}: {s['total']:,} documents, {s['total'] - s['undecided']:,} decided; "
              f"decisions are saved to {review.decisions_path} as you make them")
        print(f"open {url}  (Ctrl-C to stop)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("\nstopped; run again to continue where you left off")
        finally:
            server.server_close()
    finally:
        review.close()
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from pocketlm.data.split import format_summary, split

    m = split(args.inputs, args.out, val=args.val, test=args.test, group_by=args.group_by, seed=args.seed,
              leak_ngram=args.leak_ngram, leak=args.leak, overwrite=args.overwrite, strict=args.strict,
              verbose=not args.quiet)
    print(format_summary(m, args.out))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from pocketlm.data.clean import CleanOptions, clean, format_report

    opts = CleanOptions(
        fix_unicode=not args.no_fix_unicode, charset=args.charset, policy=args.policy,
        replacement=args.replacement, transliterate=args.transliterate, whitespace=not args.keep_whitespace,
        min_chars=args.min_chars, max_chars=args.max_chars, min_words=args.min_words, max_words=args.max_words,
        languages=args.lang, lang_threshold=args.lang_threshold, blocklists=args.blocklist,
        simple_words=args.simple_words, simple_words_from=args.simple_words_from,
        simple_min_count=args.simple_min_count, simple_share=args.simple_share, include=args.include,
        exclude=args.exclude, include_keywords=args.include_keyword, exclude_keywords=args.exclude_keyword,
        dedupe=args.dedupe, near_threshold=args.near_threshold, num_perm=args.num_perm, shingle=args.shingle,
        seed=args.seed)
    report = clean(args.inputs, args.out, opts, rejects=args.rejects, strict=args.strict, verbose=not args.quiet)
    print(format_report(report))
    if report["documents_in"] == 0:
        print("warning: no documents were read", file=sys.stderr)
    return 0
