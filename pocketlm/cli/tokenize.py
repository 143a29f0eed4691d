"""Tokenizer commands: `tokenizer train`, `tokenizer compare`, and corpus `stats`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm.cli import Handler, Parser
from pocketlm.errors import PocketLMError

SEPARATOR_HELP = ("how text files split into documents: blank-line, line, file or a literal string "
                  "(JSONL records are one document each; default: blank-line)")


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    from pocketlm.tokenizer import PRE_TOKENIZERS

    tok = subs.add_parser("tokenizer", help="train or compare tokenizers on a corpus")
    tsubs = tok.add_subparsers(dest="tokenizer_command", metavar="{train,compare}", parser_class=Parser)

    t = tsubs.add_parser("train", help="train a tokenizer and save it as a Hugging Face tokenizer folder")
    t.add_argument("inputs", nargs="+", help="text files, folders or JSONL record files")
    t.add_argument("--out", required=True, help="tokenizer folder to write")
    t.add_argument("--kind", default="bpe", choices=["bpe", "char"], help="bpe (byte-level BPE) or char (default: bpe)")
    t.add_argument("--pre", default="byte-level", metavar="NAME",
                   help=f"BPE pre-tokenizer: {', '.join(PRE_TOKENIZERS)} (default: byte-level)")
    t.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included "
                                                                 "(default: 4096)")
    t.add_argument("--unknown", default="unk", choices=["unk", "bytes"],
                   help="char-level: unseen characters become <|unk|> or their bytes (default: unk)")
    t.add_argument("--eot-token", default="<|endoftext|>", help="end-of-text token (default: <|endoftext|>)")
    t.add_argument("--special", action="append", default=[], metavar="TOKEN",
                   help="another special token, e.g. a start token <|greentext|> (repeatable)")
    t.add_argument("--pad-token", help="padding token (default: the end-of-text token, as GPT-2)")
    t.add_argument("--separator", default="blank-line", help=SEPARATOR_HELP)
    t.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer folder")

    c = tsubs.add_parser("compare", help="train a grid of tokenizers and tabulate token counts on the corpus")
    c.add_argument("inputs", nargs="+", help="text files, folders or JSONL record files")
    c.add_argument("--kinds", default="char,gpt2,bpe",
                   help="comma list: char, bpe, gpt2, or tokenizer/model folders and Hugging Face ids "
                        "(default: char,gpt2,bpe)")
    c.add_argument("--pre", default="byte-level", help=f"comma list of BPE pre-tokenizers: {', '.join(PRE_TOKENIZERS)}")
    c.add_argument("--vocab-sizes", default="256,512,1024,2048,4096", help="comma list of BPE vocabulary sizes")
    c.add_argument("--out", default="tokenizer-compare", help="folder for compare.md/.csv/.png and the tokenizers "
                                                              "(default: tokenizer-compare)")
    c.add_argument("--jobs", type=int, default=0, help="rows trained at once (default: one per CPU core)")
    c.add_argument("--separator", default="blank-line", help=SEPARATOR_HELP)
    c.add_argument("--quiet", action="store_true", help="no progress output")

    s = subs.add_parser("stats", help="corpus statistics: sizes, charset, lengths, frequent words, token counts")
    s.add_argument("inputs", nargs="+", help="text files, folders or JSONL record files")
    s.add_argument("--tokenizers", default="", help="comma list of tokenizers to count with: gpt2, folders, ids")
    s.add_argument("--top", type=int, default=20, help="most frequent words to list (default: 20)")
    s.add_argument("--out", default="stats", help="folder for stats.json and doc_lengths.png (default: stats)")
    s.add_argument("--separator", default="blank-line", help=SEPARATOR_HELP)
    s.add_argument("--workers", type=int, default=0, help="processes that encode (default: one per CPU core)")
    return {"tokenizer": cmd_tokenizer, "stats": cmd_stats}


def _list(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _ints(value: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in _list(value)]
    except ValueError:
        raise PocketLMError(f"{flag} takes comma-separated integers, e.g. 256,512,1024; got {value!r}") from None


def cmd_tokenizer(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "train":
        return _train(args)
    if args.tokenizer_command == "compare":
        return _compare(args)
    raise PocketLMError("pocketlm tokenizer: give a command, train or compare (see --help)")


def _train(args: argparse.Namespace) -> int:
    import os
    import shutil
    import time

    from pocketlm import tokenizer as toklib
    from pocketlm.atomic import replace_dir
    from pocketlm.data.prepare import read_corpus

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise PocketLMError(f"{out} already exists: choose another --out or pass --overwrite")
    if out.exists() and not (out / "tokenizer.json").is_file():
        raise PocketLMError(f"{out} is not a tokenizer folder: --overwrite only replaces tokenizer folders")
    t0 = time.perf_counter()
    docs = read_corpus(args.inputs, args.separator)
    if args.kind == "char":
        tk = toklib.train_char(docs, args.eot_token, unknown=args.unknown, specials=args.special)
    else:
        tk = toklib.train_bpe(docs, args.vocab_size, args.eot_token, pre=args.pre, specials=args.special)
    seconds = time.perf_counter() - t0
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        toklib.save(tk, tmp, args.eot_token, pad_token=args.pad_token)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = f"bpe ({args.pre})" if args.kind == "bpe" else f"char (unknown: {args.unknown})"
    print(f"trained {what} tokenizer: vocab {tk.get_vocab_size(with_added_tokens=True):,} in {seconds:.1f}s -> {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pocketlm.tokcompare import compare, markdown

    rows = compare(args.inputs, _list(args.kinds), _list(args.pre), _ints(args.vocab_sizes, "--vocab-sizes"),
                   args.out, separator=args.separator, jobs=args.jobs, verbose=not args.quiet)
    print(markdown(rows), end="")
    out = Path(args.out)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'} and the tokenizers in "
          f"{out / 'tokenizers'}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from pocketlm import tokenizer as toklib
    from pocketlm.data.prepare import read_corpus
    from pocketlm.data.stats import corpus_stats, format_report, token_stats, write_report

    if args.top < 0 or args.workers < 0:
        raise PocketLMError("--top and --workers must be >= 0")
    names = _list(args.tokenizers)
    toks = {name: toklib.load(name) for name in names}  # a bad name fails before the corpus is read
    stats = corpus_stats(read_corpus(args.inputs, args.separator), top=args.top)
    workers = args.workers or (2 if stats["bytes"] >= 32 << 20 else 1)
    tokens = {name: token_stats(tok, read_corpus(args.inputs, args.separator), workers) for name, tok in toks.items()}
    out = Path(args.out)
    write_report(stats, tokens, out, title=", ".join(str(i) for i in args.inputs)[:80])
    print(format_report(stats, tokens, out))
    sys.stdout.flush()
    return 0
