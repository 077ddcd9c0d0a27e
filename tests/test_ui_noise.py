"""A user sees only the studio's own lines: ``launch.py --demo`` (start, a page load, a first
generation) and ``launch.py generate --demo`` print nothing from Gradio, bitsandbytes, diffusers
or transformers — no "To create a public link, set share=True", no kernel warnings, no per-file
component lines, no progress bars. Every line printed must match the allow-list below."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest_ui import CHROMIUM, api_client, free_port

ROOT = Path(__file__).resolve().parents[1]

# every line the studio itself prints on these paths
STUDIO_LINES = [
    r"Model: Demo mode: the offline tiny SD3 models\.",
    r"SD3\.5 Studio is running at http://127\.0\.0\.1:\d+/ \(Ctrl\+C stops it\)",
    r"Loading (transformer|vae|text_encoder(_2|_3)?|tokenizer(_2|_3)?|scheduler)…",
    r"Building the tiny demo models.*",
    r"Assembling the pipeline…",
    r"Ready…",
    r"seed: \d+",
    r"note: .+",  # the engine's notes on what it changed or decided, e.g. SLG's layers on the demo model
    r".*/images/\d{4}-\d\d-\d\d/[0-9a-f]+\.png",
]


def strays(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.strip() and not any(re.fullmatch(p, line.strip()) for p in STUDIO_LINES)]


def _env(tmp_path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # what a user has: nothing set
        env.pop(k, None)
    return env


def _demo_dir(data: Path, tiny_family) -> None:
    """Link the session's tiny family in (the models are not rebuilt for this test)."""
    tiny = data / "models" / "tiny"
    tiny.parent.mkdir(parents=True)
    tiny.symlink_to(next(iter(tiny_family.values())).parent, target_is_directory=True)


def test_cli_generate_prints_only_the_studios_lines(tmp_path, tiny_family):
    data = tmp_path / "data"
    _demo_dir(data, tiny_family)
    run = subprocess.run([sys.executable, "launch.py", "generate", "a red fox", "--demo", "--steps", "1",
                          "--data-dir", str(data)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith(".png")
    assert not strays(run.stdout + "\n" + run.stderr), strays(run.stdout + "\n" + run.stderr)


def test_the_server_prints_only_the_studios_lines(tmp_path, tiny_family, request):
    """Start, open the page in a browser (each component's files), generate once through the API."""
    data = tmp_path / "data"
    _demo_dir(data, tiny_family)
    port = free_port()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "launch.py", "--demo", "--port", str(port), "--data-dir",
                                 str(data)], cwd=ROOT, env=_env(tmp_path), stdout=fo, stderr=fe)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
            assert proc.poll() is None, err.read_text()[-3000:]
        else:
            pytest.fail("the studio did not answer within two minutes")
        if os.path.exists(CHROMIUM):
            page = request.getfixturevalue("page")
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("#txt2img-generate").wait_for()
            page.locator("#inpaint-editor").count()

        client = api_client(url)
        files, seed, info = client.predict(prompt="a fox", steps=1, api_name="/txt2img")
        assert files and "1 image(s)" in info
        time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    printed = out.read_text() + "\n" + err.read_text()
    assert re.search(r"SD3\.5 Studio is running at http://127\.0\.0\.1:\d+/", printed), printed
    assert "share=True" not in printed
    assert not strays(printed), strays(printed)
