"""Reddit / Pushshift `.zst` NDJSON dumps (RS_* submissions, RC_* comments, or per-subreddit files).

The dump is decompressed as it is read (zstandard, window up to 2 GiB as Pushshift's long-range mode
needs) and split into lines, so memory stays flat however large the dump. Filters: subreddit, minimum
score, created-at window, and which kind of item (submissions' self-text, comments). A dump that ends in
the middle of a frame (an interrupted download) is reported with how many records were read before the
cut; those records are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pocketlm.data.ingest.jsonstream import iter_lines
from pocketlm.data.records import Record
from pocketlm.errors import PocketLMError

CHUNK = 1 << 20
MAX_WINDOW = 2**31
GONE = {"", "[removed]", "[deleted]"}


def zst_chunks(path: Path, ctx, state: dict) -> Iterator[bytes]:
    """Decompressed chunks of a zstd file, frame after frame; a corrupt or truncated file is reported,
    naming how many lines (`state["lines"]`, kept up to date by the caller) came out before the damage,
    and `state["damaged"]` is set so that the caller drops the cut-off last line."""
    try:
        import zstandard
    except ImportError:
        raise PocketLMError("reading .zst dumps needs zstandard: pip install 'pocketlm[data]'") from None
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    dobj, in_frame, size = dctx.decompressobj(), False, path.stat().st_size
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            out = []
            try:
                while chunk:
                    out.append(dobj.decompress(chunk))
                    in_frame = not dobj.eof
                    chunk = dobj.unused_data if dobj.eof else b""
                    if dobj.eof:
                        dobj = dctx.decompressobj()  # the next frame, if any
            except zstandard.ZstdError as e:
                yield b"".join(out)
                state["damaged"] = True
                ctx.problems.report(f"{path}:{state['lines'] + 1}", "corrupt .zst",
                                    f"{e}; {state['lines']:,} lines read before it, the rest skipped")
                return
            yield b"".join(out)
            ctx.position(path.name, f.tell(), size)
    if in_frame:
        state["damaged"] = True
        ctx.problems.report(f"{path}:{state['lines'] + 1}", "truncated .zst",
                            f"the file ends inside a frame (an interrupted download?); {state['lines']:,} lines "
                            "read before the cut were kept")


def _number(obj: dict, key: str) -> float | None:
    try:
        return float(obj[key])
    except (KeyError, TypeError, ValueError):
        return None


def to_record(obj: dict[str, Any], opts, ctx) -> Record | None:
    """The record of one submission or comment, or None after counting which filter dropped it."""
    is_comment = "body" in obj
    kind = "comment" if is_comment else "submission"
    if opts.reddit_kind != "both" and opts.reddit_kind != kind + "s":
        ctx.skip(f"{kind}s not asked for")
        return None
    sub = str(obj.get("subreddit") or "")
    if opts.subreddit and sub.lower() not in ctx.state["subreddits"]:
        ctx.skip("subreddit")
        return None
    created = _number(obj, "created_utc")
    if (opts.after is not None or opts.before is not None) and created is None:
        ctx.skip("no date")
        return None
    if opts.after is not None and created < opts.after or opts.before is not None and created >= opts.before:
        ctx.skip("date")
        return None
    score = _number(obj, "score")
    if opts.min_score is not None and (score is None or score < opts.min_score):
        ctx.skip("score")
        return None
    if is_comment:
        text = str(obj.get("body") or "")
        if text.strip() in GONE:
            ctx.skip("removed or deleted")
            return None
        thread = str(obj.get("link_id") or "").removeprefix("t3_")
    else:
        body = str(obj.get("selftext") or "")
        if body.strip() in GONE:
            ctx.skip("no self-text")
            return None
        title = str(obj.get("title") or "").strip()
        text = f"{title}\n\n{body}" if title else body
        thread = str(obj.get("id") or "")
    meta = {"kind": kind, "id": obj.get("id"), "subreddit": sub, "author": obj.get("author"),
            "score": obj.get("score"), "created_utc": int(created) if created is not None else None,
            "thread": thread}
    if is_comment:
        meta["parent_id"] = obj.get("parent_id")
    else:
        meta["title"] = obj.get("title")
    return {"text": text, "source": f"reddit:r/{sub}", "meta": meta}


def read(item: str, ctx, fmt: str = "reddit") -> Iterator[Record]:
    path = Path(item)
    ctx.state.setdefault("subreddits", {s.lower().removeprefix("r/") for s in ctx.opts.subreddit})
    state = {"lines": 0, "damaged": False}
    for lineno, line, bad in iter_lines(zst_chunks(path, ctx, state)):
        if state["damaged"]:
            break  # only the half line cut by the damage is left
        state["lines"] = lineno
        if line is None:
            ctx.problems.report(f"{path}:{lineno}", "not UTF-8", bad)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            ctx.problems.report(f"{path}:{lineno}", "malformed JSON", e.msg)
            continue
        if not isinstance(obj, dict):
            ctx.problems.report(f"{path}:{lineno}", "not an object")
            continue
        rec = to_record(obj, ctx.opts, ctx)
        if rec:
            yield rec
