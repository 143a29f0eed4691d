"""HTML files and URLs: the page's main text (trafilatura), or its tables rendered row by row.

With `--html-table "{speaker}: {line}"` each row of every table whose header names the template's fields
(any case) becomes one line; `{0}`, `{1}` address columns by position instead, for tables without a
header. Script pages list speaker and line in cells, so a page's rows form one document (or one per row
with `--per-row`). A page without such a table is reported and counted. URLs go through the polite
Fetcher (robots.txt, per-host rate limit, on-disk cache, retries).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from pathlib import Path

from pocketlm.data.ingest import is_url, unescape
from pocketlm.data.records import Record, make
from pocketlm.errors import PocketLMError

_SPACE = re.compile(r"\s+")


class TableTemplate:
    """A row template over table cells: header names (case-insensitive) or column positions."""

    def __init__(self, template: str) -> None:
        self.template = unescape(template)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise PocketLMError(f"bad --html-table template {template!r}: {e}") from None
        if not fields or any(f == "" for f in fields):
            raise PocketLMError(f"--html-table {template!r} must name columns: \"{{speaker}}: {{line}}\" or \"{{0}}: {{1}}\"")
        self.names = list(dict.fromkeys(f for f in fields if not f.isdigit()))
        self.positions = sorted({int(f) for f in fields if f.isdigit()})

    def columns(self, header: list[str] | None) -> dict[str, int] | None:
        """Column index of each named field in this header, or None when the table does not fit."""
        if not self.names:
            return {}
        if not header:
            return None
        index = {h.lower(): i for i, h in reversed(list(enumerate(header)))}
        cols = {n: index.get(n.lower()) for n in self.names}
        return None if any(i is None for i in cols.values()) else cols

    def render(self, cells: list[str], cols: dict[str, int]) -> str | None:
        """The row's line, or None when it lacks the columns (a spanning stage direction) or is empty."""
        need = list(cols.values()) + self.positions
        if need and max(need) >= len(cells):
            return None
        if not any(cells[i] for i in need):
            return None
        return self.template.format(*cells, **{n: cells[i] for n, i in cols.items()})


def _cell_text(cell) -> str:
    for br in cell.iter("br"):  # a <br> inside a cell is a line break, not nothing
        br.tail = "\n" + (br.tail or "")
    return "\n".join(_SPACE.sub(" ", ln).strip() for ln in cell.text_content().split("\n")).strip()


def tables(root) -> Iterator[tuple[list[str] | None, list[list[str]]]]:
    """(header, rows) of each table; the header is a row of <th> cells (or None)."""
    for table in root.iter("table"):
        header, rows = None, []
        for tr in table.iter("tr"):
            if tr.getparent() is not table and tr.getparent().getparent() is not table:
                continue  # a nested table's rows belong to that table
            cells = tr.xpath("./th|./td")
            if not cells:
                continue
            texts = [_cell_text(c) for c in cells]
            if header is None and not rows and all(c.tag == "th" for c in cells):
                header = texts
            else:
                rows.append(texts)
        yield header, rows


def table_lines(html: bytes | str, tpl: TableTemplate) -> tuple[list[str] | None, str]:
    """(rendered lines of every matching table in page order, or None when no table matches; page title)."""
    import lxml.html

    root = lxml.html.document_fromstring(html)
    title = _SPACE.sub(" ", root.findtext(".//title") or "").strip()
    lines, matched = [], False
    for header, rows in tables(root):
        cols = tpl.columns(header)
        if cols is None and rows and tpl.names:  # no <th> row: try the first row as the header
            cols = tpl.columns(rows[0])
            rows = rows[1:]
        if cols is None:
            continue
        matched = True
        lines.extend(line for line in (tpl.render(r, cols) for r in rows) if line)
    return (lines if matched else None), title


def main_text(html: bytes | str) -> tuple[str | None, str | None]:
    """(main text, title) via trafilatura: boilerplate (menus, footers) removed."""
    try:
        import trafilatura
    except ImportError:
        raise PocketLMError("reading HTML needs trafilatura: pip install 'pocketlm[data]'") from None
    doc = trafilatura.bare_extraction(html, include_comments=False, include_tables=True, with_metadata=True)
    if doc is None:
        return None, None
    return doc.text, doc.title


def _load(item: str, ctx) -> tuple[bytes | str, dict] | None:
    if not is_url(item):
        return Path(item).read_bytes(), {"file": str(Path(item))}
    from pocketlm.data.ingest.fetch import Fetcher, FetchError

    fetcher = ctx.state.get("fetcher")
    if fetcher is None:
        o = ctx.opts
        fetcher = ctx.state["fetcher"] = Fetcher(o.cache, o.rate, o.retries, o.backoff, o.timeout)
    try:
        page = fetcher.get(item)
    except FetchError as e:
        ctx.problems.report(item, e.reason, e.detail if e.detail != item else "")
        return None
    body: bytes | str = page.body
    if page.charset:
        try:
            body = page.body.decode(page.charset, errors="replace")
        except LookupError:
            pass  # an unknown charset name: let the parser read the <meta> tag
    return body, {"url": item}


def read(item: str, ctx, fmt: str = "html") -> Iterator[Record]:
    loaded = _load(item, ctx)
    if loaded is None:
        return
    html, meta = loaded
    if not html.strip():
        ctx.problems.report(item, "empty page")
        return
    if not ctx.opts.html_table:
        text, title = main_text(html)
        if not text or not text.strip():
            ctx.problems.report(item, "no main text", "nothing but boilerplate; try --html-table for tables")
            return
        yield make(text, item, **meta, **({"title": title} if title else {}))
        return
    tpl = ctx.state.get("table_template")
    if tpl is None:
        tpl = ctx.state["table_template"] = TableTemplate(ctx.opts.html_table)
    try:
        lines, title = table_lines(html, tpl)
    except Exception as e:  # lxml's ParserError for a page that is not HTML at all
        ctx.problems.report(item, "unparsable HTML", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    if lines is None:
        want = ", ".join(tpl.names) if tpl.names else f"{max(tpl.positions) + 1} columns"
        ctx.problems.report(item, "no matching table", f"no table with {want}")
        return
    if not lines:
        ctx.skip("table without rows")
        return
    if title:
        meta["title"] = title  # the episode, for `split --group-by title`
    if ctx.opts.per_row:
        for i, line in enumerate(lines):
            yield make(line, item, **meta, row=i)
    else:
        yield make("\n".join(lines), item, **meta, rows=len(lines))
