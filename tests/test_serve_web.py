"""The web chat page in headless Chromium (Debian's `chromium`, driven by Playwright with the system browser):
load the page, send a message, watch the answer stream into the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, one_torch_thread, tiny_checkpoint

from gpt2.decode.engine import Engine
from gpt2.model import GPT
from gpt2.serve.api import create_app

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("no chromium browser installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


def test_page_streams_an_answer(browser, tmp_path, tokenizer_ok):
    model = GPT.from_pretrained(tiny_checkpoint(tmp_path / "tiny")).eval()
    with LiveServer(create_app(Engine(model), model_name="tiny")) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        assert page.title() == "gpt2-scratch chat"
        # count how many times the answer's text changes while it streams in
        page.evaluate("""() => {
            window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
                {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "24")
        page.fill("#input", "Write a haiku about the sea.")
        page.click("#send")
        page.wait_for_function("() => document.querySelector('.msg.assistant') && "
                               "!document.getElementById('send').disabled", timeout=20000)
        shown = page.inner_text(".msg.assistant")
        assert page.inner_text(".msg.user") == "Write a haiku about the sea."
        # the same conversation, greedy, through the API without streaming: the page showed exactly that
        body = {"messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 24,
                "temperature": 0}
        expected = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert shown.strip() == expected["choices"][0]["message"]["content"].strip() != ""
        assert page.evaluate("window.updates") > 3  # user message, empty answer, then several deltas
        assert not page.query_selector(".msg.error")
        page.close()
