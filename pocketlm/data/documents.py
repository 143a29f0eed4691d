"""Read UTF-8 text files and folders as a stream of documents.

A document ends at a separator: a blank line ('blank-line'), a newline ('line'), the end of the file
('file') or any literal string. Files are read line by line, so memory stays flat in the corpus size
(except with 'file', where one document is one whole file).
"""

from __future__ import annotations

import codecs
import hashlib
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


def iter_documents(path: Path, separator: str) -> Iterator[str]:
    """Documents of one file, stripped of the separator; empty documents are skipped."""
    with open(path, encoding="utf-8", newline="") as f:
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
