"""Stream the items of a big JSON array (a top-level list, or a list under a key such as Discord's
"messages") without loading the file: the stdlib decoder's `raw_decode` reads one item at a time from a
sliding buffer, so memory is bounded by the largest item. Line numbers are tracked for error reports.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

CHUNK = 1 << 20
MAX_ITEM = 64 << 20  # an item larger than this is treated as malformed rather than read into memory
_WS = " \t\r\n"


class JSONStreamError(ValueError):
    def __init__(self, line: int, reason: str, detail: str = "") -> None:
        super().__init__(f"line {line}: {reason}" + (f" ({detail})" if detail else ""))
        self.line, self.reason, self.detail = line, reason, detail


class JSONStream:
    """A cursor over a UTF-8 JSON byte stream with just enough grammar to walk objects and arrays."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.json = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in the text dropped from the front of buf

    # ---- buffer ----
    def line(self, pos: int | None = None) -> int:
        return self.lines_before + self.buf.count("\n", 0, self.pos if pos is None else pos) + 1

    def _more(self) -> bool:
        if self.eof:
            return False
        if self.pos > CHUNK:  # drop what was consumed
            self.lines_before += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos:], 0
        raw = self.f.read(CHUNK)
        try:
            self.buf += self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            raise JSONStreamError(self.line(len(self.buf)), "not UTF-8", f"bad byte {raw[e.start]:#04x}") from None
        self.eof = not raw
        return True

    def peek(self) -> str:
        """The next non-space character ('' at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise JSONStreamError(self.line(), "malformed JSON",
                                  f"expected {' or '.join(repr(x) for x in chars)}, found {c or 'end of file'!r}")
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value, reading more input while it is incomplete."""
        self.peek()
        while True:
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self.eof and len(self.buf) - self.pos < MAX_ITEM and self._more():
                    continue
                raise JSONStreamError(self.line(e.pos), "malformed JSON", e.msg) from None
            if end == len(self.buf) and not self.eof and isinstance(obj, (int, float)) and self._more():
                continue  # a number cut by the chunk boundary
            self.pos = end
            return obj

    # ---- structure ----
    def items(self) -> Iterator[tuple[int, Any]]:
        """(line, item) for each item of the array at the cursor."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            self.peek()
            line = self.line()
            yield line, self.value()
            if self.expect(",]") == "]":
                return

    def entries(self) -> Iterator[str]:
        """Keys of the object at the cursor; the caller reads (or streams) each value before the next key."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            if self.peek() != '"':
                self.expect('"')
            key = self.value()
            self.expect(":")
            yield key
            if self.expect(",}") == "}":
                return


def iter_array(f: IO[bytes], key: str | None = None, header: dict | None = None) -> Iterator[tuple[int, Any]]:
    """(line, item) of a top-level array, or of the first array inside a top-level object (or of `key`'s).

    Scalar and object values met before the array are stored in `header` (Discord's guild and channel).
    """
    s = JSONStream(f)
    c = s.peek()
    if c == "[":
        yield from s.items()
        return
    if c != "{":
        raise JSONStreamError(s.line(), "not a JSON array or object", f"starts with {c or 'nothing'!r}")
    for k in s.entries():
        if s.peek() == "[" and (key is None or k == key):
            yield from s.items()
            return
        v = s.value()
        if header is not None:
            header[k] = v
    raise JSONStreamError(s.line(), "no array found",
                          f"expected a list of rows{f' under {key!r}' if key else ''}")


def iter_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text, error) of newline-separated UTF-8, from byte chunks cut anywhere.

    Lines are decoded a chunk at a time (one C call instead of one per line, which `json.loads` on bytes
    would otherwise do with its encoding sniffing); a chunk with a bad byte is redone line by line, so
    only the bad line comes back as (n, None, "bad byte 0x..").
    """
    lineno, tail = 0, b""
    for data in chunks:
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        yield from _decode(lines, lineno)
        lineno += len(lines)
    if tail.strip():
        yield from _decode([tail], lineno)


def _decode(lines: list[bytes], start: int) -> Iterator[tuple[int, str | None, str]]:
    try:
        text = b"\n".join(lines).decode("utf-8")
    except UnicodeDecodeError:
        for i, raw in enumerate(lines, start + 1):
            try:
                yield i, raw.decode("utf-8"), ""
            except UnicodeDecodeError as e:
                yield i, None, f"bad byte {raw[e.start]:#04x} at column {e.start + 1}"
        return
    for i, line in enumerate(text.split("\n"), start + 1):
        yield i, line, ""


def file_chunks(f: IO[bytes], ctx=None, name: str = "") -> Iterator[bytes]:
    """CHUNK-sized reads of `f`; with a `ctx`, the progress line shows how far into the file they are."""
    total = os.fstat(f.fileno()).st_size if ctx is not None else 0
    while data := f.read(CHUNK):
        yield data
        if ctx is not None:
            ctx.position(name, f.tell(), total)
