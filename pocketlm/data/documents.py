"""Read UTF-8 text files and folders as a stream of documents.

A document ends at a separator: a blank line ('blank-line'), a newline ('line'), the end of the file
('file') or any literal string. Files are read line by line, so memory stays flat in the corpus size
(except with 'file', where one document is one whole file).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

from pocketlm.errors import PocketLMError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ""}
INPUT_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".ndjson"}  # JSONL: canonical records, one document each


def list_files(inputs: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, text files only, sorted) and check that every path exists."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise PocketLMError(f"folder {p} has no text files (.txt, .md, .jsonl, or no extension)")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise PocketLMError(f"input not found: {p}")
    return files


def check_text_file(path: Path) -> None:
    """Reject binary and non-UTF-8 files up front, naming the byte offset of the problem."""
    with open(path, "rb") as f:
        offset = 0
        decoder = codecs.getincrementaldecoder("utf-8")()
        while chunk := f.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise PocketLMError(f"{path} looks binary (NUL byte at offset {offset + nul}); "
                                    "pass UTF-8 text files")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise PocketLMError(f"{path} is not UTF-8 (bad byte at offset {offset + e.start}); "
                                    "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise PocketLMError(f"{path} is not UTF-8 (truncated character at the end)") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# where a file can be cut without changing its documents: after a line break that ends a blank line
# ('blank-line': nothing is pending there) or after any line break ('line')
CUTS = {"blank-line": re.compile(rb"\n[ \t]*\r?\n"), "line": re.compile(rb"\n")}


def document_ranges(path: Path, separator: str, size: int, most: int = 16) -> Iterator[tuple[int, int | None]]:
    """Byte ranges of about `size` bytes that together cover the file and each hold whole documents, so
    `read_range` over them yields exactly `iter_documents` (separators in CUTS only). Where no cut comes
    within `most` x `size` bytes (a file with lone CR line breaks, say), the last range is (start, None):
    the rest of the file, to be read as a stream (`iter_documents(path, separator, start)`) so that memory
    does not grow with it."""
    cut = CUTS[separator]
    total = Path(path).stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < total:
            end, at = total, start + size
            while at < total and at <= start + most * size:
                f.seek(at)
                window = f.read(1 << 16)
                m = cut.search(window)
                if m:
                    end = at + m.end()
                    break
                at += max(1, len(window) - 1)  # a cut may start at the window's last byte
            if end - start > most * size:
                yield start, None
                return
            yield start, end
            start = end


def read_range(path: Path, start: int, end: int, separator: str) -> list[str]:
    """The documents of bytes [start, end) of a file, cut by `document_ranges`."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(end - start).decode("utf-8")
    return list(_split(io.StringIO(text, newline=""), separator))


def iter_documents(path: Path, separator: str, start: int = 0) -> Iterator[str]:
    """Documents of one file (from byte `start`, a cut), stripped of the separator; empty ones are skipped."""
    with open(path, "rb") as raw:
        raw.seek(start)
        yield from _split(io.TextIOWrapper(raw, encoding="utf-8", newline=""), separator)


def _split(f, separator: str) -> Iterator[str]:
    """The documents of a text stream opened with newline="" (line breaks as they are in the file)."""
    if separator == "file":
        text = f.read()
        if text.strip():
            yield text
        return
    if separator in ("blank-line", "line"):
        buf: list[str] = []
        for line in f:
            if separator == "line":
                if line.strip():
                    yield line.rstrip("\r\n")
                continue
            if line.strip():
                buf.append(line)
            elif buf:
                yield "".join(buf).rstrip("\r\n")
                buf = []
        if buf:
            yield "".join(buf).rstrip("\r\n")
        return
    # a literal separator: read in chunks, keep the unfinished tail
    tail = ""
    while chunk := f.read(1 << 20):
        parts = (tail + chunk).split(separator)
        tail = parts.pop()
        yield from (p.strip("\r\n") for p in parts if p.strip())
    if tail.strip():
        yield tail.strip("\r\n")
