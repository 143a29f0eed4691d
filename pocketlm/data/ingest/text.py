"""Text and Markdown files: documents split by the separator `prepare` uses (documents.iter_documents).

A file that is not UTF-8 (or is binary) is reported with the line of its first bad byte and skipped whole:
half a file is worse than none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pocketlm.data.documents import iter_documents
from pocketlm.data.records import Record, make


def first_bad_line(path: Path) -> tuple[int, str, str] | None:
    """(line number, reason, detail) of the first NUL byte or invalid UTF-8, or None for a clean file.

    UTF-8 never uses the byte 0x0A inside a multi-byte character, so each line decodes on its own.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if b"\0" in raw:
                return lineno, "binary file", "NUL byte"
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, "not UTF-8", (f"bad byte {raw[e.start]:#04x} at column {e.start + 1}; convert it, "
                                             "e.g. iconv -f latin1 -t utf-8")
    return None


def read(item: str, ctx, fmt: str = "text") -> Iterator[Record]:
    path = Path(item)
    bad = first_bad_line(path)
    if bad:
        ctx.problems.report(f"{path}:{bad[0]}", bad[1], bad[2])
        return
    for doc in iter_documents(path, ctx.opts.separator):
        yield make(doc, str(path))
