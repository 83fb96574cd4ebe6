"""`nanochat serve` as users start it (a subprocess on a free port), then a property-based fuzz of its OpenAPI
schema with schemathesis: no input may produce a 5xx."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_testdata import HELLO_QUESTION, HELLO_REPLY, free_socket

REPO = Path(__file__).resolve().parents[2]
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def served(model_folder, tmp_path_factory):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", str(model_folder), "--port", str(port),
                                 "--max-batch", "4", "--temperature", "0", "--max-tokens", "16",
                                 "--log-level", "warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nanochat serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_nanochat_serve_answers_api_and_ui(served):
    import openai

    url, _, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": HELLO_QUESTION}])
    assert reply.choices[0].message.content == HELLO_REPLY  # --temperature 0 made the default greedy
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "gradio" in page.text.lower()


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (pip install schemathesis)")
def test_openapi_fuzz_finds_no_server_error(served, tmp_path):
    url, proc, log = served
    run = subprocess.run([str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                          "--max-examples", "10", "--phases", "coverage,fuzzing", "--workers", "2", "--seed", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"},
                         cwd=tmp_path)  # it writes a .schemathesis/ cache in its working directory
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "Server error" not in run.stdout
    assert proc.poll() is None  # still serving
    # and it shuts down cleanly on Ctrl-C
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()
