"""The chat page in a real browser: headless Chromium opens it on loopback, types an instruction,
clicks Send and watches the answer stream in; a screenshot is saved and checked.

Chromium is driven through chromedriver's W3C WebDriver protocol, which is plain HTTP + JSON, so
the standard library's urllib is the whole client: no selenium or playwright needed. CI installs
Debian's chromium and chromium-driver (.ci/run); without them the test is skipped.
"""

import base64
import json
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                                reason="needs /usr/bin/chromium and chromedriver (apt-get install chromium chromium-driver)")


class WebDriver:
    """The few WebDriver commands the test uses, over HTTP."""

    def __init__(self, profile: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.process = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                if self.call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1000,800"]
        options = {"binary": str(CHROMIUM), "args": args}
        session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}})
        self.session = f"/session/{session['sessionId']}"

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def go(self, url):
        self.call("POST", f"{self.session}/url", {"url": url})

    def find(self, css):
        return self.call("POST", f"{self.session}/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css, text, clear=False):
        element = self.find(css)
        if clear:
            self.call("POST", f"{self.session}/element/{element}/clear", {})
        self.call("POST", f"{self.session}/element/{element}/value", {"text": text})

    def click(self, css):
        self.call("POST", f"{self.session}/element/{self.find(css)}/click", {})

    def script(self, source, *args):
        return self.call("POST", f"{self.session}/execute/sync", {"script": source, "args": list(args)})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("GET", f"{self.session}/screenshot"))

    def quit(self):
        try:
            self.call("DELETE", self.session)
        finally:
            self.process.terminate()
            self.process.wait(timeout=10)


class Recorder:
    """Wraps the server's generator to keep the text of each answer it streams."""

    def __init__(self, inner):
        self.inner, self.answers = inner, []

    def __getattr__(self, name):
        if name == "batch_engine":  # answered through stream() to record it; batched answers equal it (test_serve.py)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def stream(self, ids, sampling):
        text = []
        for piece in self.inner.stream(ids, sampling):
            text.append(piece.text)
            yield piece
        self.answers.append("".join(text))


def test_chat_page_streams_an_answer(tiny_model_dir, tmp_path):
    from mlxft.backends.mlx.stream import load_generator
    from mlxft.serve.server import make_server

    recorder = Recorder(load_generator(str(tiny_model_dir)))
    server = make_server(recorder, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = WebDriver(tmp_path / "profile")
    try:
        browser.go(server.url + "/")
        assert browser.script("return document.title") == "mlxft chat"
        # Count how often the answer's text changes: a streamed answer grows in several steps.
        browser.script("""window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
                {subtree: true, childList: true, characterData: true});""")
        browser.type("#instruction", "Write a headline about the weather.")
        browser.type("#temperature", "1", clear=True)  # the tiny random model only says newlines when greedy
        browser.type("#max_tokens", "32", clear=True)
        browser.click("#send")
        deadline = time.time() + 60
        while (state := browser.script("const a = document.querySelector('.answer');"
                                       "return a ? [a.dataset.done || '', a.textContent] : ['', ''];"))[0] == "":
            assert time.time() < deadline, "no answer within a minute"
            time.sleep(0.1)
        done, text = state
        assert done == "1", text
        assert text == recorder.answers[-1] and text.strip()  # exactly what the server streamed
        assert browser.script("return window.updates") > 3
        assert "Write a headline about the weather." in browser.script("return document.querySelector('.user').textContent")
        assert browser.script("return document.getElementById('status').textContent").startswith("done (")
        png = browser.screenshot()
    finally:
        browser.quit()
        server.shutdown()
        server.server_close()
    shot = tmp_path / "chat-page.png"
    shot.write_bytes(png)
    assert shot.stat().st_size > 1000
    assert len(np.unique(png_pixels(shot.read_bytes()).reshape(-1, 3), axis=0)) > 1


def png_pixels(data: bytes) -> np.ndarray:
    """RGB pixels [H, W, 3] of an 8-bit RGB or RGBA PNG (what Chromium's screenshots are)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += chunk
    channels = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    rows = np.zeros((height, width * channels), np.uint8)
    previous = np.zeros(width * channels, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + previous) % 256
        elif kind == 1:  # each byte adds the one a pixel to its left: a running sum per channel
            row = np.cumsum(line.reshape(width, channels), axis=0).reshape(-1) % 256
        else:  # average and Paeth depend on the byte just decoded to the left: byte by byte
            row = _unfilter_slow(kind, line.tolist(), previous.tolist(), channels)
        rows[y] = row
        previous = np.asarray(row, np.int32)
    return rows.reshape(height, width, channels)[:, :, :3]


def _unfilter_slow(kind, line, above, bpp):
    out = [0] * len(line)
    for i, value in enumerate(line):
        left = out[i - bpp] if i >= bpp else 0
        up = above[i]
        if kind == 3:
            out[i] = (value + (left + up) // 2) % 256
        else:
            upper_left = above[i - bpp] if i >= bpp else 0
            p = left + up - upper_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
            predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
            out[i] = (value + predictor) % 256
    return out
