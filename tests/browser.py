"""The web page in a real headless Chromium: kvgraph's page server on 127.0.0.1, puppeteer-core driving the browser.

A missing browser or npm packages fail the test (they are part of what is tested), never skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "examples" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def page_url(server, **params) -> str:
    return f"{server.url}/web/?{urlencode(params)}"


def browser(*urls: str, reload: bool = False, screenshot: Path | None = None, timeout: int = 300) -> list[dict]:
    """Load each URL in one headless Chromium; what the page shows in #result, one dict per load."""
    assert shutil.which("node"), "Node.js is not installed: the page cannot be driven"
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: install Debian's chromium (.ci/run does)"
    assert (WEB_DIR / "node_modules" / "puppeteer-core").is_dir(), f"run `npm ci` in {WEB_DIR} (.ci/run does)"
    command = ["node", str(WEB_DIR / "drive.mjs"), *urls, "--timeout", str(timeout)]
    command += ["--reload"] if reload else []
    command += ["--screenshot", str(screenshot)] if screenshot else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout * (len(urls) + reload) + 60)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
