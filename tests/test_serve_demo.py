"""Chapter 20 (serving): `guide demo chat` as a live process, driven by gradio_client and headless Chromium."""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

GUIDE = str(Path(sys.executable).parent / "guide")


def test_demo_help():
    r = subprocess.run([GUIDE, "demo", "chat", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "127.0.0.1" in r.stdout


@pytest.fixture(scope="module")
def demo_url():
    from guide.serve.demo import free_port
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([GUIDE, "demo", "chat", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True).start()
    url, t0 = f"http://127.0.0.1:{port}/", time.monotonic()
    try:
        while time.monotonic() - t0 < 120:
            if proc.poll() is not None: raise RuntimeError("demo exited:\n" + "".join(lines))
            try:
                if httpx.get(url, timeout=2).status_code == 200: break
            except httpx.TransportError: pass
            time.sleep(0.2)
        else: raise RuntimeError("demo did not come up:\n" + "".join(lines))
        yield url
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(5)


def test_gradio_client_streams_a_reply(demo_url):
    from gradio_client import Client
    client = Client(demo_url, verbose=False)
    reply = client.predict("What is a list?", 16, 0.0, False, api_name="/chat")
    assert isinstance(reply, str) and reply.strip()
    # greedy is deterministic (a new client: one client's session keeps its chat history)
    assert Client(demo_url, verbose=False).predict("What is a list?", 16, 0.0, False, api_name="/chat") == reply
    job = Client(demo_url, verbose=False).submit("How do I open a file?", 24, 0.0, False, api_name="/chat")
    job.result(timeout=60)
    outs = job.outputs()
    assert len(outs) >= 2 and all(outs[i + 1].startswith(outs[i]) for i in range(len(outs) - 1))   # streamed, growing
    from guide.serve.structured import JSON_START, json_feed
    as_json = Client(demo_url, verbose=False).predict("A user record, please", 64, 0.0, True, api_name="/chat")   # the JSON-mode box
    assert as_json.startswith("{") and json_feed(JSON_START, as_json) is not None, as_json


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_screenshot(demo_url, tmp_path):
    import numpy as np
    from PIL import Image
    from guide.serve.demo import chromium_screenshot
    shot = chromium_screenshot(demo_url, tmp_path / "chat.png")
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape[0] >= 600 and img.std() > 5          # a rendered page, not a blank one


def test_demo_refuses_a_missing_model_folder():
    r = subprocess.run([GUIDE, "demo", "chat", "--model", "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such model folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
