"""Open an exported web folder in headless Chromium, served from loopback, with every other host blocked.

Used by the browser test and the export benchmark: `with Page(site) as p: p.generate(prompt, ...)` runs
`window.pocketlm.generate` in the page and returns the text; `p.blocked` lists every request the page tried
to make outside its own folder (it must stay empty).

`Page(site, webgpu=True)` launches Chromium with a WebGPU adapter on SwiftShader (Chromium's software Vulkan,
shipped with the Debian package), so the WebGPU path runs on a machine without a GPU: correct, but its speed
says nothing about real GPUs. The default launch (`--disable-gpu`) offers no adapter, as on many machines.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Any

from pocketlm.errors import PocketLMError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# navigator.gpu.requestAdapter() gives SwiftShader's adapter (vendor "google", architecture "swiftshader")
WEBGPU_ARGS = ["--no-sandbox", "--disable-background-networking", "--enable-unsafe-webgpu",
               "--use-webgpu-adapter=swiftshader"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class StaticServer:
    """A threaded static file server on 127.0.0.1 (an ephemeral port) for one folder."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StaticServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class Page:
    """The exported page in headless Chromium; only the loopback server's own origin is reachable."""

    def __init__(self, site: Path, executable: str = CHROMIUM, page: str = "index.html", webgpu: bool = False,
                 init_script: str | None = None) -> None:
        self.site, self.executable, self.page_name = Path(site), executable, page
        self.args, self.init_script = WEBGPU_ARGS if webgpu else CHROMIUM_ARGS, init_script
        self.blocked: list[str] = []
        self.requests: list[str] = []  # every URL the page fetched from its own folder
        self.console: list[str] = []

    def __enter__(self) -> Page:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise PocketLMError("the browser check needs playwright: pip install 'pocketlm[export]'") from None
        if not Path(self.executable).exists():
            raise PocketLMError(f"no Chromium at {self.executable}: apt-get install chromium")
        self.server = StaticServer(self.site).__enter__()
        self.pw = sync_playwright().start()
        self.browser = self.pw.chromium.launch(executable_path=self.executable, args=self.args, headless=True)
        self.context = self.browser.new_context(service_workers="block")
        if self.init_script:  # runs before the page's own scripts (e.g. to take WebGPU away)
            self.context.add_init_script(self.init_script)
        origin = self.server.url.rstrip("/")

        def gate(route: Any) -> None:
            url = route.request.url
            if url.startswith(origin + "/") or url.startswith(("data:", "blob:")):
                self.requests.append(url)
                route.continue_()
            else:
                self.blocked.append(url)
                route.abort()

        self.context.route("**/*", gate)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        return self

    def open(self, timeout_s: float = 120) -> float:
        """Load the page and wait until its model is ready; returns the page's own load time in ms."""
        self.page.goto(self.server.url + self.page_name)
        self.page.wait_for_function("window.pocketlmPage !== undefined || "
                                    "document.getElementById('msg')?.textContent.startsWith('Error')",
                                    timeout=timeout_s * 1000)
        self.info = self.page.evaluate("window.pocketlmPage")  # loadMs, backend ("webgpu" | "wasm"), backendNote
        if self.info is None:
            raise RuntimeError(f"the page failed to load: {self.page.inner_text('#msg')}; console: {self.console}")
        return float(self.info["loadMs"])

    def generate(self, prompt: str, **opts: Any) -> tuple[str, dict[str, Any]]:
        """window.pocketlm.generate(prompt, opts) in the page: (text, stats)."""
        return tuple(self.page.evaluate(
            "async ([p, o]) => { const t = await window.pocketlm.generate(p, o); return [t, window.pocketlm.lastStats]; }",
            [prompt, opts]))

    def __exit__(self, *exc: Any) -> None:
        self.context.close()
        self.browser.close()
        self.pw.stop()
        self.server.__exit__()
