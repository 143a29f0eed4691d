"""Polite HTTP fetching for `ingest`: robots.txt honoured, a minimum delay per host, an on-disk cache,
retries with exponential backoff on timeouts, 429 and 5xx (Retry-After respected), and a User-Agent that
names pocketlm. Built on httpx; robots.txt is parsed by the standard library's robotparser.

The cache holds one body file and one JSON header file per URL (named by the URL's sha256), written
atomically; a cached page is served without touching the network, so a second run is offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

from pocketlm import __version__
from pocketlm.atomic import atomic_open, atomic_write_text
from pocketlm.errors import PocketLMError

USER_AGENT = f"pocketlm/{__version__} (+training-data ingest; honours robots.txt)"
ROBOTS_AGENT = "pocketlm"
RETRY_STATUS = {429, 500, 502, 503, 504}
PERMANENT = {404, 410}  # cached like pages, so a rerun does not ask again
MAX_WAIT = 60.0  # cap on a Retry-After or backoff delay, seconds


class FetchError(Exception):
    """A URL that could not be fetched; `reason` is the short label counted in the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Page:
    url: str
    status: int
    content_type: str
    body: bytes
    from_cache: bool

    @property
    def charset(self) -> str | None:
        for part in self.content_type.split(";")[1:]:
            k, _, v = part.partition("=")
            if k.strip().lower() == "charset" and v.strip():
                return v.strip().strip('"')
        return None


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pocketlm" / "http"


class Fetcher:
    def __init__(self, cache: str | Path | None = None, rate: float = 1.0, retries: int = 3, backoff: float = 1.0,
                 timeout: float = 30.0) -> None:
        try:
            import httpx
        except ImportError:
            raise PocketLMError("fetching URLs needs httpx: pip install 'pocketlm[data]'") from None
        self.httpx = httpx
        self.cache = Path(cache) if cache else default_cache()
        self.rate, self.retries, self.backoff = rate, retries, backoff
        self.client = httpx.Client(headers={"User-Agent": USER_AGENT}, timeout=timeout, follow_redirects=True)
        self.robots: dict[str, RobotFileParser | None] = {}
        self.unreachable: set[str] = set()  # hosts whose robots.txt failed with 5xx / network errors
        self.last: dict[str, float] = {}  # host -> time of its last request
        self.requests = 0  # network requests made (the tests count cache hits with it)

    def close(self) -> None:
        self.client.close()

    # ---- cache ----
    def _paths(self, url: str) -> tuple[Path, Path]:
        key = hashlib.sha256(url.encode()).hexdigest()
        folder = self.cache / key[:2]
        return folder / f"{key}.body", folder / f"{key}.json"

    def _cached(self, url: str) -> Page | None:
        body, head = self._paths(url)
        try:
            info = json.loads(head.read_text(encoding="utf-8"))
            return Page(url, info["status"], info["content_type"], body.read_bytes(), True)
        except (OSError, ValueError, KeyError):
            return None

    def _store(self, url: str, page: Page) -> None:
        body, head = self._paths(url)
        body.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(body, "wb") as f:
            f.write(page.body)
        atomic_write_text(head, json.dumps({"url": url, "final_url": page.url, "status": page.status,
                                            "content_type": page.content_type, "fetched": time.time()}))

    # ---- network ----
    def _wait_turn(self, host: str, delay: float) -> None:
        wait = self.last.get(host, -1e9) + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last[host] = time.monotonic()

    def _request(self, url: str, host: str, delay: float) -> Page:
        """GET with retries; returns the final response (any status) or raises FetchError."""
        attempt = 0
        while True:
            self._wait_turn(host, delay)
            self.requests += 1
            try:
                r = self.client.get(url)
            except self.httpx.HTTPError as e:
                if attempt >= self.retries:
                    raise FetchError("network error", f"{type(e).__name__}: {e}") from None
                pause = self.backoff * 2 ** attempt
            else:
                if r.status_code not in RETRY_STATUS or attempt >= self.retries:
                    return Page(str(r.url), r.status_code, r.headers.get("content-type", ""), r.content, False)
                pause = self.backoff * 2 ** attempt
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit():
                    pause = max(pause, float(retry_after))
            time.sleep(min(pause, MAX_WAIT))
            attempt += 1

    def _robots(self, scheme: str, host: str) -> RobotFileParser | None:
        """The host's robots.txt rules (None: no robots.txt, everything allowed); fetched once, cached."""
        if host in self.robots:
            return self.robots[host]
        url = f"{scheme}://{host}/robots.txt"
        page = self._cached(url)
        if page is None:
            try:
                page = self._request(url, host, self.rate)
            except FetchError:
                page = Page(url, 599, "", b"", False)
            if page.status < 500:
                self._store(url, page)
        rp: RobotFileParser | None = None
        if page.status >= 500:  # RFC 9309: an unreachable robots.txt means "crawl nothing" (not cached)
            rp = RobotFileParser()
            rp.disallow_all = True
            self.unreachable.add(host)
        elif page.status in (401, 403):  # the standard reading: robots.txt itself is forbidden -> disallow all
            rp = RobotFileParser()
            rp.disallow_all = True
        elif page.status < 400:
            rp = RobotFileParser(url)
            rp.parse(page.body.decode("utf-8", "replace").splitlines())
        self.robots[host] = rp
        return rp

    def get(self, url: str) -> Page:
        """The page at `url`, from the cache or the network; FetchError for robots, HTTP errors, failures."""
        cached = self._cached(url)
        if cached is not None:
            if cached.status >= 400:
                raise FetchError(f"HTTP {cached.status}", f"{url}, cached: delete {self.cache} to ask again")
            return cached
        parts = urlsplit(url)
        host = parts.netloc
        rp = self._robots(parts.scheme, host)
        if host in self.unreachable:
            raise FetchError("robots.txt unreachable", f"{url}: {host}/robots.txt kept failing, so nothing is fetched")
        if rp is not None and not rp.can_fetch(ROBOTS_AGENT, url):
            raise FetchError("disallowed by robots.txt", url)
        delay = self.rate
        if rp is not None:
            delay = max(delay, float(rp.crawl_delay(ROBOTS_AGENT) or 0))
        page = self._request(url, host, delay)
        if page.status in PERMANENT or page.status < 400:
            self._store(url, page)  # under the URL asked for, so a redirect is a cache hit too
        if page.status >= 400:
            raise FetchError(f"HTTP {page.status}", url)
        return page
