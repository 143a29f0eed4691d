"""The web playground in headless Chromium: generate, rate, compare, history; model output is never HTML."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.serve_util import MARKUP, markup_model, running_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_at(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (.ci/run installs it)")
    model = markup_model(tmp_path_factory)
    db = tmp_path_factory.mktemp("browser") / "feedback.db"
    with running_server(model, db) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        # bypass_csp: the page's Content-Security-Policy forbids eval, which Playwright's waits use; it also means
        # the XSS test below shows that inserting text as text is safe on its own, without CSP's help
        page = browser.new_context(bypass_csp=True).new_page()
        problems: list[str] = []
        page.on("dialog", lambda d: (problems.append("dialog: " + d.message), d.dismiss()))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append("console: " + m.text) if m.type == "error" else None)
        csp = page.goto(url + "/").headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        yield page, db, problems
        browser.close()


def generate(page, prompt: str, button: str, temperature: str, seed: str = "", max_tokens: int = 40) -> None:
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", temperature)
    page.fill("#seed", seed)
    page.click(button)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)


def test_generate_rate_compare_and_history(page_at) -> None:
    page, db, problems = page_at
    generate(page, "the cat", "#generate", "1.0", seed="3")
    text = page.text_content("#out-0")
    assert len(text) > 5
    page.click("#up")
    page.wait_for_function("document.getElementById('status').textContent === 'feedback saved, thank you'")
    assert page.is_disabled("#up") and page.is_disabled("#down")

    generate(page, "the dog", "#compare", "1.0", seed="5")
    a, b = page.text_content("#out-a"), page.text_content("#out-b")
    assert a and b and a != b
    page.click("#prefer-b")
    page.wait_for_function("document.getElementById('status').textContent === 'feedback saved, thank you'")

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT kind, source, prompt, completion, label, chosen, rejected, meta FROM events "
                           "ORDER BY id").fetchall()
    assert rows[0][:5] == ("rating", "web", "the cat", text, 1)
    assert rows[1][:3] == ("compare", "web", "the dog") and rows[1][5:7] == (b, a)
    assert '"temperature": 1' in rows[1][7]  # the sampling settings travel with the feedback
    history = page.locator("#history li")
    assert history.count() == 2 and "compare" in history.nth(0).text_content()
    history.nth(1).click()  # an old entry comes back, already rated
    assert page.input_value("#prompt") == "the cat" and page.text_content("#out-0") == text
    assert page.is_disabled("#up")
    assert not problems, problems


def test_markup_from_the_model_is_shown_as_text(page_at) -> None:
    """The model itself writes <img onerror> and <script>; the page must show them, never run them."""
    page, _, problems = page_at
    generate(page, "hello", "#generate", "0", max_tokens=80)
    shown = page.text_content("#out-0")
    assert shown == MARKUP[len("hello"):]  # the markup came out of the model's stream (then end-of-text)
    assert page.locator("#out-0 *").count() == 0  # ...and stayed text: no element was created
    assert page.locator("#history li img, #history li script").count() == 0
    assert "<img src=x onerror=alert(1)>" in page.locator("#history li").first.text_content()
    assert not problems, problems  # an executed alert() would show up here as a dialog
