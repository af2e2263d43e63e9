"""`guide demo vision`: the Gradio app in a subprocess on 127.0.0.1, driven by gradio_client and headless Chromium."""
import os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guide.core import seed_everything
from guide.vision.clip import ClipConfig, ViT
from guide.vision.data import render, sample_scene
from guide.vision.vlm import VLM, VLMConfig, ViTTower, save_vlm

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo CLI serving a small untrained VLM checkpoint (the UI and input handling do not depend on training)."""
    tmp = tmp_path_factory.mktemp("demo")
    seed_everything(0)
    save_vlm(VLM(ViTTower(ViT(ClipConfig(dim=32, n_layers=1))), VLMConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)), tmp / "vlm")
    port = _free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([BIN / "guide", "demo", "vision", "--checkpoint", str(tmp / "vlm"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):                                   # up to 60 s for imports and launch
            if proc.poll() is not None: raise RuntimeError(f"demo exited early:\n{proc.stdout.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5): break
            except OSError: time.sleep(0.25)
        else: raise RuntimeError("demo did not start listening within 60 s")
        yield url, tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()


def test_cli_help_and_bad_checkpoint(tmp_path):
    r = subprocess.run([BIN / "guide", "demo", "vision", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "127.0.0.1" in r.stdout
    r = subprocess.run([BIN / "guide", "demo", "vision", "--checkpoint", str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no VLM checkpoint" in r.stderr


def test_client_good_and_bad_inputs(server):
    from gradio_client import Client, handle_file
    url, tmp = server
    client = Client(url, verbose=False)
    scene = sample_scene(np.random.default_rng(0), (1, 2), 1.0)
    Image.fromarray(render(scene, 32)).save(tmp / "scene.png")
    img, cap, ocr, cnt, status = client.predict(handle_file(str(tmp / "scene.png")), None, api_name="/analyze")
    assert Path(img).exists() and isinstance(cap, str) and status == "OK"
    # grayscale, RGBA and huge-but-allowed inputs are converted, and say so
    Image.fromarray(np.full((64, 48), 200, np.uint8)).save(tmp / "gray.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 100)).save(tmp / "rgba.png")
    assert "grayscale" in client.predict(handle_file(str(tmp / "gray.png")), None, api_name="/analyze")[4]
    assert "transparency" in client.predict(handle_file(str(tmp / "rgba.png")), None, api_name="/analyze")[4]
    # refused with a clear message: not an image, empty file, too many pixels, nothing at all
    (tmp / "notes.txt").write_text("hello"); (tmp / "empty.jpg").write_bytes(b"")
    Image.new("L", (6100, 6100)).save(tmp / "huge.png")
    for name, message in [("notes.txt", "not an image"), ("empty.jpg", "empty"), ("huge.png", "megapixels")]:
        with pytest.raises(Exception, match=message): client.predict(handle_file(str(tmp / name)), None, api_name="/analyze")
    with pytest.raises(Exception, match="No image"): client.predict(None, None, api_name="/analyze")
    # a drawing: the sketchpad sends background, layers and their composite; the white canvas becomes black
    canvas = np.full((256, 256, 3), 255, np.uint8); canvas[40:120, 40:120] = (220, 50, 50)
    Image.fromarray(canvas).save(tmp / "drawing.png")
    sketch = {"background": handle_file(str(tmp / "drawing.png")), "layers": [], "composite": handle_file(str(tmp / "drawing.png"))}
    assert "white canvas turned black" in client.predict(None, sketch, api_name="/analyze")[4]
    # still serving, and deterministic
    assert client.predict(handle_file(str(tmp / "scene.png")), None, api_name="/analyze")[1] == cap
    assert Path(client.predict(api_name="/random_scene")).exists()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_headless_chromium_screenshot(server, tmp_path):
    url, _ = server
    shot = tmp_path / "demo.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=15000",
           "--hide-scrollbars", f"--screenshot={shot}", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert px.shape == (900, 1280)
    assert px.std() > 5, "the screenshot is blank: the Gradio page did not render"
    out = Path(os.environ.get("GUIDE_SCREENSHOT_DIR", Path(__file__).resolve().parents[1] / "artifacts" / "test"))
    out.mkdir(parents=True, exist_ok=True); shutil.copy(shot, out / "vision_demo.png")
