"""Every command the README marks for testing runs as written, on tiny settings.

A shell block preceded by ``<!-- test -->`` is run line by line in a scratch directory. Only the
sizes change: ``--preset`` becomes ``tiny`` (``tiny-latent`` for a latent preset), training stops
after 2 steps, sampling takes 3 steps and a few images, evaluation scores 2 images, the demo trains
a few steps; the README's placeholder paths point at small data made here (a resumed run goes on
to step 4). Set-up lines (``python3 -m venv``,
``pip install``, ``. .venv/bin/activate``) are skipped: the suite already runs in that environment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- test -->\s*```(?:bash|sh|console)\n(.*?)```", re.DOTALL)

# The README's placeholders and their stand-ins (created by the fixture).
PLACEHOLDERS = ("path/to/images", "mnist.npz", "ddpm-cifar10-32", "mnist_pairs/train", "stable-diffusion-v1-5",
                "digit.png", "mask.png")
# The one that needs diffusers and transformers to be made (a tiny random Stable Diffusion pipeline).
STABLE_DIFFUSION = "stable-diffusion-v1-5"


def commands() -> list[str]:
    lines = []
    for block in BLOCK.findall(README.read_text(encoding="utf-8")):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.extend(part.strip() for part in line.split("&&"))
    setup = ("python3 -m venv", "pip install", ". .venv/bin/activate", "source .venv/bin/activate")
    return [c for c in lines if not c.startswith(setup)]


def shrink(command: str) -> list[str]:
    """The command with tiny sizes (see the module docstring)."""
    argv = shlex.split(command)
    out: list[str] = []
    skip = False
    replace = {"--preset": "tiny", "--steps": "3", "--size": "8", "--frames": "4", "--context": "2",
               "--train.steps": "4", "--num-images": "4", "--limit": "2",
               "--minutes": "0.05", "--nproc_per_node": "2", "--nproc-per-node": "2"}
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        key = arg.split("=")[0]
        if key == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
            small = ("tiny-text" if "pairs" in name and "-f4" not in name else
                     "tiny-video" if "moving" in name else "tiny")
            out += [arg, small + ("-latent" if name.endswith("-latent") else "")]
            skip = True
            continue
        if key in replace and "=" in arg:
            out.append(f"{key}={replace[key]}")
        elif key in replace:
            out += [arg, replace[key]]
            skip = True
        else:
            out.append(arg)
    if "train" in out and "--resume" not in out:
        out += ["--train.steps", "2", "--train.sample_every", "0", "--train.batch_size", "4"]
    if "demo" in out:
        out += ["--steps", "3", "--sample-steps", "3"]
    if out[0] == "ddpm":
        out = [sys.executable, "-m", "ddpm", *out[1:], *(["--quiet"] if out[1] != "export" else [])]
    elif out[0] == "torchrun":
        out = [sys.executable, "-m", "torch.distributed.run", *out[1:]]
    elif out[0] == "python":
        out[0] = sys.executable
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    folder = work / "path" / "to" / "images"
    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 10), (40 * i, 100, 200 if label == "cats" else 20)).save(folder / label / f"{i}.png")
    rng = np.random.default_rng(0)
    np.savez(work / "mnist.npz", x_train=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8),
             y_train=np.arange(16) % 10, x_test=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
             y_test=np.arange(4))
    from ddpm.models import UNet, get_preset

    UNet(get_preset("tiny")).save_diffusers(work / "ddpm-cifar10-32")
    pairs = work / "mnist_pairs" / "train"
    pairs.mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.new("L", (16, 8), 20 * i).save(pairs / f"{i:06d}.png")
        rows.append({"file_name": f"{i:06d}.png", "text": ["a seven and a three", "a one and a two"][i % 2]})
    (pairs / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # An image and a mask of the tiny preset's size (8x8 RGB) for the image-to-image verbs; white keeps.
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(work / "digit.png")
    Image.fromarray(np.repeat(np.array([[255] * 4 + [0] * 4], np.uint8), 8, 0)).save(work / "mask.png")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import diffusers
        import transformers
    except ImportError:
        return work
    from test_workflow_stable_diffusion import SCHEDULERS, save_pipeline

    save_pipeline((transformers, diffusers), work / STABLE_DIFFUSION, "sd1", SCHEDULERS["sd"])
    return work


def test_the_readme_has_tested_commands():
    cmds = commands()
    assert any(c.startswith("ddpm demo") for c in cmds)
    assert any(c.startswith("python -m pytest") for c in cmds)
    for verb in ("train", "train-autoencoder", "sample", "eval", "viz", "export", "inpaint", "img2img", "invert",
                 "interpolate"):
        assert any(c.startswith(f"ddpm {verb}") for c in cmds), verb
    assert any(c.startswith("torchrun") for c in cmds)


@pytest.mark.slow
def test_readme_commands_run(workdir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for command in commands():
        if command.startswith("python -m pytest"):
            continue  # this is the suite that is running
        if STABLE_DIFFUSION in command and not (workdir / STABLE_DIFFUSION).is_dir():
            continue  # no diffusers or transformers to make its stand-in
        argv = shrink(command)
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n-> {' '.join(argv)}\n{done.stderr[-2000:]}"
