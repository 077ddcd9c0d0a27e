"""launch.py as a user runs it: generate end to end, the start-up message without weights.

Two tests run launch.py as a subprocess (a generate and the server), as a user's shell does; the
others call the same ``studio.app.cli.main`` in this process (``main_here``), which spares each an
interpreter start and the torch/diffusers imports."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, data_dir, env=None, timeout=240):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(data_dir / "hf"), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
        timeout=timeout, env=full_env, cwd=ROOT,
    )


@pytest.fixture
def data_dir(demo_config):
    return demo_config.data_dir  # already holds the tiny family


def test_generate_demo_writes_a_png_and_prints_its_path(data_dir):
    from PIL import Image

    from studio.gallery import Gallery
    from studio.metadata import read_png_info
    from test_pnginfo import a1111_parse  # an independent A1111 infotext parser

    out = run("generate", "a red fox, snow", "--demo", "--negative", "blurry: low", "--steps", "3",
              "--seed", "11", "--width", "320", "--data-dir", str(data_dir), data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    paths = out.stdout.split()
    assert len(paths) == 1
    png = Path(paths[0])
    assert png.is_file() and png.suffix == ".png" and data_dir in png.parents
    assert "seed: 11" in out.stderr
    # the full JSON chunk reads back exactly
    info = read_png_info(png)
    assert (info.fields["prompt"], info.fields["negative_prompt"], info.fields["seed"], info.fields["steps"],
            info.fields["width"], info.fields["height"]) == ("a red fox, snow", "blurry: low", 11, 3, 320, 256)
    # the A1111 `parameters` chunk, read by A1111's own rules
    params = a1111_parse(Image.open(png).text["parameters"])
    assert params["Prompt"] == "a red fox, snow" and params["Negative prompt"] == "blurry: low"
    assert (params["Seed"], params["Steps"], params["Size"]) == ("11", "3", "320x256")
    # and it is in the gallery's index
    page = Gallery(data_dir).list(query="fox")
    assert [Path(i.path) for i in page.items] == [png]


def test_generate_json_with_flags_before_the_subcommand(data_dir, main_here):
    out = main_here("--demo", "--data-dir", str(data_dir), "generate", "a cat", "--count", "2", "--seed", "5",
                    "--steps", "2", "--width", "250", "--height", "256", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [i["seed"] for i in result["images"]] == [5, 6]
    assert all(Path(i["path"]).is_file() for i in result["images"])
    assert any("snapped to 256" in n for n in result["notes"])
    # img2img from the first image
    init = result["images"][0]["path"]
    out = main_here("generate", "a cat", "--demo", "--data-dir", str(data_dir), "--mode", "img2img",
                    "--init-image", init, "--strength", "0.5", "--steps", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"][0]["path"].endswith(".png")


def test_generate_bad_input_is_a_message_not_a_traceback(data_dir, main_here):
    out = main_here("generate", "x", "--demo", "--data-dir", str(data_dir), "--width", "0")
    assert out.returncode == 2
    assert "Width 0 is out of range: use 256–" in out.stderr
    assert "Traceback" not in out.stderr
    out = main_here("generate", "x", "--demo", "--data-dir", str(data_dir), "--mode", "img2img", "--steps", "4",
                    "--init-image", str(data_dir / "missing.png"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "missing.png" in out.stderr


def test_generate_without_weights_says_how_to_get_them(tmp_path, main_here):
    out = main_here("generate", "a red fox", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "stabilityai/stable-diffusion-3.5-medium" in out.stderr
    assert "licence" in out.stderr and "hf auth login" in out.stderr and "--demo" in out.stderr


def test_model_flag_loads_any_sd3_folder(tiny_family, tmp_path, main_here):
    """--model pointed at an SD3-architecture diffusers folder (not a studio demo build) generates."""
    import shutil

    foreign = tmp_path / "my-finetune"
    shutil.copytree(tiny_family["sd3-medium"], foreign)
    (foreign / "studio_tiny.json").unlink()  # nothing marks it as ours
    out = main_here("generate", "a fox", "--model", str(foreign), "--steps", "2", "--width", "256", "--height",
                    "256", "--data-dir", str(tmp_path / "d"), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model"] == "SD3 Medium" and Path(result["images"][0]["path"]).is_file()


def test_pickled_checkpoint_is_refused(tmp_path, main_here):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    out = main_here("generate", "x", "--model", str(ckpt), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "pickled checkpoint" in out.stderr and "Traceback" not in out.stderr


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_studio_starts_without_weights_and_says_which_model_is_missing(tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--port", str(port), "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
    )
    try:
        deadline = time.time() + 120
        status = None
        while time.time() < deadline and status is None:
            time.sleep(1)
            if proc.poll() is not None:
                break
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                pass
        assert status == 200, "the studio serves its page without any weights"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "No model yet" in output and "stabilityai/stable-diffusion-3.5-medium" in output
    assert "Traceback" not in output


def test_share_without_auth_refuses(tmp_path, main_here, monkeypatch):
    import gradio

    def launched(*args, **kwargs):  # a regression fails here instead of serving until the timeout
        raise AssertionError("--share without --auth started the server")

    monkeypatch.setattr(gradio.Blocks, "launch", launched)
    out = main_here("--share", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "--auth" in out.stderr and "Traceback" not in out.stderr
