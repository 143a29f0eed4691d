"""DiscordChatExporter JSON exports -> conversations, one document each, rendered as "author: content" lines.

    {"guild": {...}, "channel": {...}, "messages": [{"id", "type", "timestamp", "author": {"name",
     "nickname", ...}, "content", ...}, ...]}

Messages stream one at a time (jsonstream), so a large export never sits in memory; a conversation ends
where the channel fell silent for longer than `--gap`. Messages without text (attachments, stickers) and
system messages (joins, pins, calls) are left out and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pocketlm.data.ingest.jsonstream import JSONStreamError, iter_array
from pocketlm.data.records import Record

CHAT_TYPES = {"Default", "Reply", None}  # the exporter's names for messages people typed


def _name(d: Any) -> str:
    if isinstance(d, dict):
        return str(d.get("name") or d.get("id") or "?")
    return str(d or "?")


class Conversation:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.authors: dict[str, None] = {}
        self.start = self.end = None
        self.first_id = None

    def add(self, author: str, content: str, when: datetime, msg_id: Any) -> None:
        if not self.lines:
            self.start, self.first_id = when, msg_id
        self.end = when
        self.lines.append(f"{author}: {content}")
        self.authors[author] = None


def read(item: str, ctx, fmt: str = "discord") -> Iterator[Record]:
    path = Path(item)
    header: dict = {}
    gap = ctx.opts.gap
    conv = Conversation()

    def flush() -> Iterator[Record]:
        if conv.lines:
            guild, channel = _name(header.get("guild")), _name(header.get("channel"))
            yield {"text": "\n".join(conv.lines), "source": f"discord:{guild}/{channel}",
                   "meta": {"guild": guild, "channel": channel, "start": conv.start.isoformat(),
                            "end": conv.end.isoformat(), "messages": len(conv.lines),
                            "authors": list(conv.authors), "first_message_id": conv.first_id, "file": str(path)}}

    with open(path, "rb") as f:
        try:
            for line, msg in iter_array(f, key="messages", header=header):
                where = f"{path}:{line}"
                if not isinstance(msg, dict):
                    ctx.problems.report(where, "not a message", f"expected an object, got {type(msg).__name__}")
                    continue
                if msg.get("type") not in CHAT_TYPES:
                    ctx.skip("system message")
                    continue
                content = msg.get("content")
                if not isinstance(content, str) or not content.strip():
                    ctx.skip("message without text")
                    continue
                try:
                    when = datetime.fromisoformat(str(msg.get("timestamp")).replace("Z", "+00:00"))
                    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
                except ValueError:
                    ctx.problems.report(where, "bad timestamp", f"{msg.get('timestamp')!r} is not ISO 8601")
                    continue
                author = msg.get("author")
                name = (author.get("nickname") or author.get("name")) if isinstance(author, dict) else None
                if not name:
                    ctx.problems.report(where, "message without author")
                    continue
                if conv.lines and (when - conv.end).total_seconds() > gap:
                    yield from flush()
                    conv = Conversation()
                conv.add(str(name), content.strip(), when, msg.get("id"))
        except JSONStreamError as e:
            ctx.problems.report(f"{path}:{e.line}", e.reason, f"{e.detail}; rest of the export skipped")
    yield from flush()
