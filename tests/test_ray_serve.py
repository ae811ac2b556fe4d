"""Scale-out: `kvgraph serve EXPORT --ray --replicas 2` on a real local Ray instance (127.0.0.1), driven over
HTTP by the official `openai` client. Requests spread over both replicas (each names itself in the
x-kvgraph-instance header), tokens are those of Generator.generate alone, streams pass through, and
SIGTERM shuts the deployment and Ray down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from kvgraph.runtime import Generator
from test_serve import wait_healthy


PROMPTS = ["abc", "Once upon a time", "x", "Hello world", "The sea", "zz", "Tell me", "q"]


def test_ray_serve_two_replicas_spread_requests_with_identical_tokens(text_export_static):
    import openai

    directory = text_export_static[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "kvgraph.runtime.commands.main", "serve", str(directory), "--ray", "--replicas", "2",
                                "--port", str(port), "--threads", "1", "--max-batch", "2", "--grace", "10"],
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_healthy(url, process, seconds=240)
        seen, deadline = set(), time.time() + 120
        while len(seen) < 2 and time.time() < deadline:  # Ray's router learns of the second replica a moment later
            seen.add(httpx.get(f"{url}/health", timeout=30).headers["x-kvgraph-instance"])
            time.sleep(0.1)
        assert len(seen) == 2, f"requests reached only {seen}"  # both replicas answer
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        alone = Generator.load(directory)
        answers = [None] * (2 * len(PROMPTS))

        def ask(i: int) -> None:
            raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=20,
                                                              temperature=0, extra_body={"min_tokens": 20})
            answers[i] = (raw.headers["x-kvgraph-instance"], raw.parse().choices[0].text)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        want = [alone.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=20, min_new_tokens=20).text for i in range(len(answers))]
        assert [text for _, text in answers] == want
        assert {instance for instance, _ in answers} <= seen  # every answer came from one of the two replicas
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=12,
                                                     temperature=0, stream=True))
        assert len(chunks) > 3 and "".join(c.choices[0].delta.content or "" for c in chunks) == alone.generate(
            "Hi", chat=True, max_new_tokens=12).text
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.completions.create(model="tiny", prompt="abc", temperature=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
