"""The chat page of ``gptlab-serve`` in a real headless Chromium, driven over the DevTools protocol
(a small client on ``websocket-client``): it shows the model's name and the sampling settings, streams
an answer from the API (the same text the API gives for the same settings), and renders (screenshot).
``GPTLAB_CHAT_SCREENSHOT=docs/chat_page.png pytest tests/test_chat_page.py`` also saves the screenshot there
(the README's picture)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from gptlab.inference import load_model
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.serving.app import build_server
from test_serving import READY_WITHIN_S, http, running

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
websocket = pytest.importorskip("websocket", reason="the DevTools client needs websocket-client (the dev extra)")
pytest.importorskip("fastapi", reason='the server needs the serve extra: pip install "gptlab[serve]"')

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1100,640", "--hide-scrollbars"]


class DevTools:
    """A headless Chromium and one page, driven over the Chrome DevTools protocol."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes its port here once it listens
        deadline = time.monotonic() + READY_WITHIN_S
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "Chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=60)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict:
        """Send one command; its result (events that arrive meanwhile are skipped)."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        """Poll ``expression`` until it is truthy (bounded); its value."""
        deadline = time.monotonic() + READY_WITHIN_S
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"never true: {expression}"
            time.sleep(0.1)
        return value

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("page") / "tiny.pt"
    torch.save(GPT(GPTConfig.from_name("gpt2-tiny", context_length=256)).state_dict(), path)
    with running(build_server(load_model(init_from=path), "tiny-page", port=0, max_batch_size=4)) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    tools = DevTools(tmp_path / "profile")
    yield tools
    tools.close()


def test_the_page_shows_the_model_and_settings_and_streams_the_api_answer(page_server, browser, tmp_path):
    browser.call("Page.navigate", url=page_server.url + "/")
    assert browser.wait_for("document.getElementById('model-name')?.textContent === 'tiny-page'")
    info = browser.js("document.getElementById('model-info').textContent")
    assert "context 256 tokens" in info and "prompt style alpaca" in info
    summary = browser.js("document.getElementById('settings-summary').textContent")
    assert summary == "sending: temperature=0, top_p=1, top_k=0, max_tokens=128"
    browser.js("document.getElementById('max_tokens').value = '24';"
               "document.getElementById('max_tokens').dispatchEvent(new Event('input'));"
               "document.getElementById('input').value = 'Name a primary color.';"
               "document.getElementById('composer').requestSubmit()")
    meta = browser.wait_for("document.querySelector('.msg.assistant .meta')?.textContent")
    assert "tokens" in meta and "finish: " in meta, meta
    shown = browser.js("(() => { const m = document.querySelector('.msg.assistant');"
                       " return m.textContent.slice(0, m.textContent.length - m.querySelector('.meta').textContent.length) })()")
    status, _, api = http("POST", page_server.url + "/v1/chat/completions",
                          {"model": "tiny-page", "messages": [{"role": "user", "content": "Name a primary color."}],
                           "temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 24})
    assert status == 200 and shown == api["choices"][0]["message"]["content"] and shown
    assert browser.js("document.querySelector('.msg.user').textContent") == "Name a primary color."
    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    Path(os.environ.get("GPTLAB_CHAT_SCREENSHOT") or tmp_path / "chat.png").write_bytes(png)


def test_the_page_reports_an_error_from_the_api(page_server, browser):
    browser.call("Page.navigate", url=page_server.url + "/")
    browser.wait_for("document.getElementById('model-name')?.textContent === 'tiny-page'")
    browser.js("document.getElementById('max_tokens').value = '100000';"
               "document.getElementById('input').value = 'Hello';"
               "document.getElementById('composer').requestSubmit()")
    error = browser.wait_for("document.querySelector('.msg.error')?.textContent")
    assert "beyond the model's context of 256 tokens" in error
