"""Rows of JSONL, JSON, CSV/TSV and Parquet files -> records, through a field or a template.

`--field text` takes one field as the text; `--template "{speaker}: {line}"` renders several (Python format
syntax, so `{author[name]}` reaches into a nested object). The row's other fields are kept in `meta`. A row
that is already a canonical record keeps its source and meta, so re-ingesting our own output is lossless.
Everything streams: JSONL and CSV line by line, JSON arrays item by item, Parquet in record batches.
"""

from __future__ import annotations

import contextlib
import csv
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pocketlm.data.ingest import unescape
from pocketlm.data.ingest.jsonstream import JSONStreamError, file_chunks, iter_array, iter_lines
from pocketlm.data.records import Record
from pocketlm.errors import PocketLMError


class RowTemplate:
    """Turns a row (a dict) into (text, meta); raises KeyError naming a missing field."""

    def __init__(self, field: str | None, template: str | None) -> None:
        if field and template:
            raise PocketLMError("give --field or --template, not both")
        self.template = unescape(template) if template else None
        self.field = field or ("text" if not template else None)
        if self.template:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
            except ValueError as e:
                raise PocketLMError(f"bad --template {template!r}: {e}") from None
            if not names or any(n == "" or n.isdigit() for n in names):
                raise PocketLMError(f"--template {template!r} must name fields, e.g. \"{{speaker}}: {{line}}\"")
            self.used = {n.split(".")[0].split("[")[0] for n in names}
        else:
            self.used = {self.field}

    def render(self, row: dict[str, Any]) -> str:
        if self.template:
            try:
                return self.template.format_map(row)
            except (KeyError, IndexError) as e:
                raise KeyError(str(e).strip("'\"")) from None
            except (TypeError, ValueError, AttributeError) as e:
                raise KeyError(f"cannot render ({e})") from None
        if self.field not in row:
            raise KeyError(self.field)
        value = row[self.field]
        if value is None:
            raise KeyError(f"{self.field} (null)")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    def record(self, row: Any, where: str, source: str, ctx, jsonable: bool = False) -> Record | None:
        """The record of one row, or None after reporting / counting why not."""
        if not isinstance(row, dict):
            ctx.problems.report(where, "not an object", f"a row must be a JSON object, got {type(row).__name__}")
            return None
        try:
            text = self.render(row)
        except KeyError as e:
            ctx.problems.report(where, "missing field", f"{e.args[0]}; fields here: {', '.join(map(str, row))[:200]}")
            return None
        if not text.strip():
            ctx.skip("empty text")
            return None
        meta = {k: v for k, v in row.items() if k not in self.used}
        src = source
        if self.field == "text" and isinstance(meta.get("meta"), dict):  # a canonical record
            inner = meta.pop("meta")
            src = str(meta.pop("source", None) or source)
            meta = {**inner, **meta}
        if jsonable:
            meta = {k: _jsonable(v) for k, v in meta.items()}
        return {"text": text, "source": src, "meta": meta}


def _jsonable(v: Any) -> Any:
    """Parquet/Arrow values (dates, decimals, bytes) as JSON values."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def read(item: str, ctx, fmt: str) -> Iterator[Record]:
    tpl = ctx.state.get("row_template")
    if tpl is None:
        tpl = ctx.state["row_template"] = RowTemplate(ctx.opts.field, ctx.opts.template)
    reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}[fmt]
    yield from reader(Path(item), tpl, ctx)


def _jsonl(path: Path, tpl: RowTemplate, ctx) -> Iterator[Record]:
    with contextlib.ExitStack() as stack:
        if path.suffix.lower() == ".zst":  # rows.jsonl.zst: decompressed as it is read
            from pocketlm.data.ingest.reddit import zst_chunks

            state = {"lines": 0, "damaged": False}
            chunks = zst_chunks(path, ctx, state)
        else:
            state = {"damaged": False}
            chunks = file_chunks(stack.enter_context(open(path, "rb")), ctx, path.name)
        for lineno, line, bad in iter_lines(chunks):
            if state["damaged"]:
                break  # the half line a truncated .zst ends with
            state["lines"] = lineno
            where = f"{path}:{lineno}"
            if line is None:
                ctx.problems.report(where, "not UTF-8", bad)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line.lstrip("\ufeff") if lineno == 1 else line)
            except json.JSONDecodeError as e:
                ctx.problems.report(where, "malformed JSON", e.msg)
                continue
            rec = tpl.record(row, where, str(path), ctx)
            if rec:
                yield rec


def _json(path: Path, tpl: RowTemplate, ctx) -> Iterator[Record]:
    with open(path, "rb") as f:
        try:
            for line, row in iter_array(f):
                rec = tpl.record(row, f"{path}:{line}", str(path), ctx)
                if rec:
                    yield rec
        except JSONStreamError as e:  # the rest of the file cannot be found reliably: skip it
            ctx.problems.report(f"{path}:{e.line}", e.reason, f"{e.detail}; rest of the file skipped")


def _lines(path: Path, ctx) -> Iterator[str]:
    """Decoded lines; a line that is not UTF-8 is reported and dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                ctx.problems.report(f"{path}:{lineno}", "not UTF-8", f"bad byte {raw[e.start]:#04x}")
                yield "\n"  # keep csv's line count aligned with the file


def _csv(path: Path, tpl: RowTemplate, ctx) -> Iterator[Record]:
    csv.field_size_limit(1 << 30)  # long texts in one cell are the point of a text corpus
    reader = csv.DictReader(_lines(path, ctx), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    start = 2
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:
                ctx.problems.report(where, "malformed CSV", f"{len(row[None]) + len(reader.fieldnames)} cells "
                                    f"under {len(reader.fieldnames)} headers")
                continue
            if all(v is None or not v.strip() for v in row.values()):
                continue
            rec = tpl.record(row, where, str(path), ctx)
            if rec:
                yield rec
    except csv.Error as e:
        ctx.problems.report(f"{path}:{reader.line_num}", "malformed CSV", f"{e}; rest of the file skipped")


def _parquet(path: Path, tpl: RowTemplate, ctx) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PocketLMError("reading Parquet needs pyarrow: pip install 'pocketlm[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        ctx.problems.report(str(path), "unreadable Parquet", str(e).splitlines()[0])
        return
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                rec = tpl.record(row, f"{path}:row {n}", str(path), ctx, jsonable=True)
                if rec:
                    yield rec
    except OSError as e:
        ctx.problems.report(f"{path}:row {n + 1}", "unreadable Parquet", f"{str(e).splitlines()[0]}; rest skipped")
