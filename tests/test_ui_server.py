"""``ddpm ui``'s server through Starlette's TestClient: what it refuses (Host, Origin, fetch metadata,
bad input, big uploads, a busy model), that cancelling stops the drawing, and that what it serves is
what the library computes (generate()'s images bit for bit, q(x_t | x_0), the schedule's curves)."""

from __future__ import annotations

import ast
import base64
import dataclasses
import http.client
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from ddpm.cli import main  # noqa: E402
from ddpm.conditioning import prompts_of, run_network  # noqa: E402
from ddpm.config import DiffusionConfig, get_config  # noqa: E402
from ddpm.data import Fit, prepare_image  # noqa: E402
from ddpm.generate import SamplerSettings, generate, grid_image  # noqa: E402
from ddpm.images import make_grid, to_uint8  # noqa: E402
from ddpm.img2img import img2img, results_grid  # noqa: E402
from ddpm.inpaint import inpaint, masked_preview, read_mask  # noqa: E402
from ddpm.loading import LoadedModel  # noqa: E402
from ddpm.models import UNet, get_preset  # noqa: E402
from ddpm.models.diffusers_io import DDIMOptions  # noqa: E402
from ddpm.tokenizer import WordTokenizer  # noqa: E402
from ddpm.ui import forward as forward_view  # noqa: E402
from ddpm.ui.forward import MAX_UPLOAD_BYTES, ImageStore  # noqa: E402
from ddpm.ui.sampling import ModelSlot, SampleRequest, command_line, png_bytes, trajectory_every  # noqa: E402
from ddpm.ui.security import host_name, refusal  # noqa: E402
from ddpm.ui.server import UI, allowed_names, create_app, load_ui  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = "http://127.0.0.1:8765"
ORIGIN = {"Origin": BASE}
DIFFUSION = DiffusionConfig(timesteps=100)


def tiny_unet(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(get_preset("tiny"), num_classes=num_classes)).eval()
    with torch.no_grad():  # off DDPM's zero initialisation, so the images depend on the weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


CAPTIONS = ["a bar at the top", "a bar high", "a bar low", "a bar at the bottom", "a red square"]


def text_model() -> LoadedModel:
    """The tiny-text preset's network (a U-Net with its own text transformer), untrained but jittered."""
    torch.manual_seed(0)
    config = get_config("tiny-text", {"data.source": "bars"})
    model = run_network(config, WordTokenizer.from_captions(CAPTIONS)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return LoadedModel(model, config.diffusion, "a text model", config, conditioning=prompts_of(model, None))


def loaded(kind: str = "plain") -> LoadedModel:
    if kind == "text":
        return text_model()
    if kind == "grey":
        torch.manual_seed(0)
        return LoadedModel(UNet(dataclasses.replace(get_preset("tiny"), in_channels=1)).eval(), DIFFUSION, "grey")
    return LoadedModel(tiny_unet(3 if kind == "classes" else 0), DIFFUSION, f"a {kind} model")


def make_ui(*kinds: str, **kwargs) -> UI:
    slots = [ModelSlot(i, f"runs/{kind}", loaded(kind)) for i, kind in enumerate(kinds or ("plain",))]
    return UI(slots, ImageStore(torch.arange(2 * 64, dtype=torch.uint8).reshape(2, 1, 8, 8) * 2, "bars"), **kwargs)


@pytest.fixture
def client():
    with TestClient(create_app(make_ui("plain", "classes", "text")), base_url=BASE) as c:
        yield c


def events(response):
    """(name, data) of each server-sent event of a streamed response."""
    name = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[len("event:"):].strip()
        elif line.startswith("data:"):
            yield name, json.loads(line[len("data:"):])


def draw(client, **request):
    with client.stream("POST", "/api/sample", json=request, headers=ORIGIN) as response:
        assert response.status_code == 200, response.read()
        return list(events(response))


def images_in(got) -> torch.Tensor:
    """The images the ``images`` events brought, in order, as uint8 [N, C, H, W]."""
    return torch.stack([decode(url) for name, data in got if name == "images" for url in data["images"]])


def decode(url: str) -> torch.Tensor:
    assert url.startswith("data:image/png;base64,")
    return png_tensor(base64.b64decode(url.split(",", 1)[1]))


def png_tensor(data: bytes) -> torch.Tensor:
    array = np.array(Image.open(io.BytesIO(data)))
    return torch.from_numpy(array if array.ndim == 3 else array[:, :, None]).permute(2, 0, 1)


# ---------------------------------------------------------------------------- the page


def test_the_page_is_served_with_its_scripts_and_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "innerHTML" not in client.get("/static/app.js").text  # user text only ever as textContent


def test_the_state_names_the_models_and_the_edit_views_choices(client):
    state = client.get("/api/state").json()
    assert [(m["name"], m["num_classes"], m["text"]) for m in state["models"]] == [
        ("plain", 0, False), ("classes", 3, False), ("text", 0, True)]
    assert state["models"][0]["default_steps"]["ddpm"] == 100 and state["models"][0]["default_steps"]["ddim"] == 20
    assert state["edit"]["methods"] == ["repaint", "replacement", "img2img"]
    assert state["edit"]["repaint"] == {"steps": 250, "jump_length": 10, "resamples": 10}  # Lugmayr et al.'s
    assert state["images"] == {"data": 2, "source": "bars"}
    assert state["processes"][0] == "plain: linear, T = 100" and len(state["processes"]) == 6


# ---------------------------------------------------------------------------- who may ask


@pytest.mark.parametrize("host,name", [("127.0.0.1:8765", "127.0.0.1"), ("[::1]:8765", "::1"),
                                       ("LocalHost:80", "localhost"), ("example.org", "example.org")])
def test_host_names(host, name):
    assert host_name(host) == name


@pytest.mark.parametrize("method,path,headers,refused", [
    ("GET", "/", {"host": "127.0.0.1:8765"}, False),
    ("GET", "/", {"host": "localhost:9000"}, False),  # an SSH tunnel's other port
    ("GET", "/", {"host": "[::1]:8765"}, False),
    ("GET", "/", {"host": "evil.example:8765"}, True),  # DNS rebinding
    ("GET", "/", {}, True),
    ("POST", "/api/sample", {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765"}, False),
    ("POST", "/api/sample", {"host": "127.0.0.1:8765", "origin": "http://evil.example"}, True),
    ("POST", "/api/sample", {"host": "127.0.0.1:8765", "origin": "null"}, True),
    ("POST", "/api/sample", {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:9999"}, True),
    ("POST", "/api/sample", {"host": "127.0.0.1:8765"}, False),  # not a browser: no cross-site request
    ("GET", "/api/state", {"host": "127.0.0.1:8765", "sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}, True),
    ("GET", "/api/state", {"host": "127.0.0.1:8765", "sec-fetch-site": "same-site"}, True),
    ("GET", "/", {"host": "127.0.0.1:8765", "sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}, False),
    ("GET", "/api/results/x/grid.png", {"host": "127.0.0.1:8765", "sec-fetch-site": "cross-site",
                                        "sec-fetch-mode": "navigate"}, True),
    ("GET", "/api/state", {"host": "127.0.0.1:8765", "sec-fetch-site": "same-origin"}, False),
])
def test_what_is_refused(method, path, headers, refused):
    assert (refusal(method, path, headers, []) is not None) == refused


def test_listen_allows_this_machines_names():
    assert allowed_names(None) == []
    assert "box.lan" in allowed_names("box.lan") and "0.0.0.0" not in allowed_names("0.0.0.0")
    assert refusal("GET", "/", {"host": "box.lan:8765"}, allowed_names("box.lan")) is None


@pytest.mark.parametrize("headers", [{"Host": "evil.example:8765"}, {"Origin": "http://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}])
def test_another_website_cannot_drive_it(client, headers):
    response = client.post("/api/sample", json={"model": 0}, headers=headers)
    assert response.status_code == 403
    assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
    assert client.get("/api/state").json()["models"][0]["busy"] is False
    assert client.get("/api/state", headers=headers).status_code == 403


# ---------------------------------------------------------------------------- sampling


def test_the_images_are_generates_for_the_same_arguments_and_the_command_says_so(client):
    got = draw(client, model=1, sampler="ddim", steps=6, seed=11, num_images=5, batch_size=2, label=2,
               guidance_scale=2.5)
    names = [name for name, _ in got]
    assert names[0] == "started" and names[-1] == "done" and names.count("images") == 3 and "progress" in names
    images = images_in(got)
    expected = generate(loaded("classes").model, DIFFUSION.build(), 5, SamplerSettings("ddim", 6), seed=11,
                        label=2, guidance_scale=2.5, batch_size=2, progress=False)
    assert torch.equal(images, expected.uint8())
    done = got[-1][1]
    assert done["command"] == ("ddpm sample runs/classes --out samples --sampler ddim --steps 6 --seed 11 "
                               "--num-images 5 --batch-size 2 --label 2 --guidance-scale 2.5 --bf16 false")
    assert done["labels"] == [2] * 5 and done["nfe"] == 6 and len(done["frames"]) == 6
    progress = [data["fraction"] for name, data in got if name == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1


@pytest.mark.slow
def test_the_downloads_and_the_scrubber_frames_are_the_chains(client):
    done = draw(client, model=0, sampler="ddpm", steps=25, seed=3, num_images=4, batch_size=4)[-1][1]
    expected = generate(loaded().model, DIFFUSION.build(), 4, SamplerSettings("ddpm", 25), seed=3, batch_size=4,
                        progress=False, trajectory_every=1)
    assert [f["t"] for f in done["frames"]] == (expected.trajectory["timesteps"] + 1).tolist()  # every kept step
    assert len(done["frames"]) == 25
    grid = client.get(done["grid"])
    assert grid.headers["content-type"] == "image/png"
    assert torch.equal(png_tensor(grid.content), png_tensor(png_bytes(grid_image(expected.uint8()))))
    for k in (0, 13, 24):
        for which in ("x_t", "pred_x0"):
            frame = png_tensor(client.get(f"{done['frames_url']}/{k}/{which}.png").content)
            grid = make_grid(expected.trajectory[which][k].clamp(-1, 1), nrow=2)
            assert torch.equal(frame, png_tensor(png_bytes(grid)))
    gif = client.get(done["gif"])
    assert gif.content[:6] == b"GIF89a" and Image.open(io.BytesIO(gif.content)).n_frames > 10
    assert client.get(f"{done['frames_url']}/25/x_t.png").status_code == 404
    assert client.get("/api/results/nope/grid.png").status_code == 404


def test_a_text_model_takes_the_prompts(client):
    request = {"model": 2, "sampler": "ddim", "steps": 4, "num_images": 2, "batch_size": 2, "prompt": "a red square",
               "negative_prompt": "blur", "guidance_scale": 3}
    got = draw(client, **request)
    images = images_in(got)
    text = text_model()
    expected = generate(text.model, text.diffusion.build(), 2, SamplerSettings("ddim", 4), prompts=["a red square"],
                        negative_prompt="blur", guidance_scale=3.0, conditioning=text.conditioning, batch_size=2,
                        progress=False)
    assert torch.equal(images, expected.uint8())
    other = draw(client, **{**request, "prompt": "a bar at the bottom"})
    assert not torch.equal(images_in(other)[0], images[0])
    assert got[-1][1]["prompts"] == ["a red square"] * 2
    assert "--prompt 'a red square' --negative-prompt blur" in got[-1][1]["command"]


def test_a_diffusers_models_ddim_is_its_schedulers_in_both_views():
    """A diffusers scheduler config's DDIM (steps_offset, set_alpha_to_one) is what ddpm sample and the image
    verbs use for --sampler ddim (LoadedModel.sampler_settings): the page's images are those."""
    sd_like = LoadedModel(tiny_unet(), DIFFUSION, "sd-like", ddim=DDIMOptions(steps_offset=1, set_alpha_to_one=False))
    settings = sd_like.sampler_settings(SamplerSettings("ddim", 5))
    assert settings.timesteps is not None and settings != SamplerSettings("ddim", 5)
    with TestClient(create_app(UI([ModelSlot(0, "sd", sd_like)])), base_url=BASE) as client:
        got = draw(client, model=0, sampler="ddim", steps=5, num_images=2, batch_size=2)
        expected = generate(sd_like.model, DIFFUSION.build(), 2, settings, batch_size=2, progress=False)
        assert torch.equal(images_in(got), expected.uint8())
        key = edit_input(client, 0, content=gradient_png())
        edited = run_edit(client, model=0, input=key["input"], method="img2img", strength=0.8, sampler="ddim", steps=5)
        image = png_tensor(client.get(key["url"]).content)
        expected = img2img(sd_like.model, DIFFUSION.build(), image[None], 0.8, settings, progress=False)
        assert torch.equal(images_in(edited), expected.uint8())


def test_the_trajectory_is_thinned_to_at_most_a_hundred_frames():
    slot = ModelSlot(0, "m", LoadedModel(tiny_unet(), DiffusionConfig(timesteps=1000), "m"))
    assert trajectory_every(slot, SamplerSettings("ddpm"), 64) == 10
    assert trajectory_every(slot, SamplerSettings("ddim", 100), 64) == 1
    assert trajectory_every(slot, SamplerSettings("ddim", 101), 64) == 2
    config = dataclasses.replace(get_preset("tiny"), image_size=256, attn_resolutions=())
    big = ModelSlot(0, "m", LoadedModel(UNet(config), DiffusionConfig(timesteps=1000), "m"))
    assert trajectory_every(big, SamplerSettings("ddpm"), 64) == 500  # 2 frames of 64 images, 2 x 50 MB each
    assert trajectory_every(big, SamplerSettings("ddpm"), 16) == 100  # 10 frames of 16
    assert trajectory_every(big, SamplerSettings("ddpm"), 1) == 10


def test_the_command_line_quotes_what_it_must():
    slot = ModelSlot(0, "my runs/a b", loaded(), weights="raw", device="cpu", bf16=True)
    line = command_line(slot, SampleRequest(prompt="it's"))
    assert line.startswith("ddpm sample 'my runs/a b' --out samples --sampler dpm++2m-sde --seed 0")
    assert line.endswith("--prompt 'it'\"'\"'s' --weights raw --device cpu --bf16 true")


@pytest.mark.parametrize("body,status,message", [
    ({"model": 7}, 404, "no model 7"),
    ({"model": "0"}, 400, "model must be an integer"),
    ({"num_images": 0}, 400, "between 1 and 64"),
    ({"num_images": 65}, 400, "between 1 and 64"),
    ({"batch_size": True}, 400, "batch_size must be an integer"),
    ({"seed": -1}, 400, "seed"),
    ({"sampler": "euler"}, 400, "unknown sampler 'euler'"),
    ({"steps": 101}, 400, "between 1 and T=100"),
    ({"sampler": "dpm-adaptive", "steps": 5}, 400, "chooses its own steps"),
    ({"label": 1}, 400, "needs a class-conditional model"),
    ({"guidance_scale": 3}, 400, "unconditional"),
    ({"guidance_scale": "3"}, 400, "guidance_scale must be a number"),
    ({"prompt": "a cat"}, 400, "needs a text-conditional model"),
    ({"prompt": "x" * 1001}, 400, "at most 1000 characters"),
    ({"path": "/etc/passwd"}, 400, "unknown field 'path'"),
    ([1, 2], 400, "a JSON object"),
])
def test_bad_requests_get_one_line_of_json(client, body, status, message):
    response = client.post("/api/sample", json=body, headers=ORIGIN)
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert message in error and "\n" not in error and set(response.json()) == {"error"}


@pytest.mark.parametrize("request_kwargs,status", [
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ({"content": b'{"model": 0}', "headers": {"Content-Type": "text/plain"}}, 415),  # what a form could send
    ({"content": b" " * 70_000, "headers": {"Content-Type": "application/json"}}, 413),
])
def test_bodies_that_are_not_small_json_are_refused(client, request_kwargs, status):
    response = client.post("/api/sample", **request_kwargs)
    assert response.status_code == status and "error" in response.json()


def test_unknown_pages_and_methods_are_json_errors(client):
    assert client.get("/api/nothing").json() == {"error": "no such page: /api/nothing"}
    response = client.get("/api/sample")
    assert response.status_code == 405 and "error" in response.json()


class Gate:
    """A forward hook that holds the network until opened: a request that stays busy as long as a test wants."""

    def __init__(self, model: nn.Module) -> None:
        self.open, self.calls = threading.Event(), 0
        model.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1
        assert self.open.wait(10), "the test never opened the gate"


def test_a_busy_model_says_so_and_cancelling_stops_it():
    ui = make_ui("plain", "classes")
    gate = Gate(ui.slots[0].loaded.model)
    with TestClient(create_app(ui), base_url=BASE) as client:
        with client.stream("POST", "/api/sample", json={"model": 0, "sampler": "ddpm"}, headers=ORIGIN) as response:
            stream = events(response)
            assert next(stream)[0] == "started"
            busy = client.post("/api/sample", json={"model": 0}, headers=ORIGIN)
            assert busy.status_code == 409 and "busy with another request" in busy.json()["error"]
            assert client.get("/api/state").json()["models"][0]["busy"] is True
            assert client.post("/api/cancel", json={"model": 0}, headers=ORIGIN).json() == {"cancelled": True}
            gate.open.set()
            assert [name for name, _ in stream][-1] == "cancelled"
        assert gate.calls <= 2  # of DDPM's 100 steps: it stopped at the next one
        assert client.post("/api/cancel", json={"model": 0}, headers=ORIGIN).json() == {"cancelled": False}
        assert draw(client, model=0, sampler="ddim", steps=2, num_images=1, batch_size=1)[-1][0] == "done"
        assert ui.slots[0].result is not None


def test_a_reader_that_goes_away_stops_the_drawing():
    ui = make_ui()
    gate = Gate(ui.slots[0].loaded.model)
    with TestClient(create_app(ui), base_url=BASE) as client:
        with client.stream("POST", "/api/sample", json={"model": 0, "sampler": "ddpm"}, headers=ORIGIN) as response:
            assert next(events(response))[0] == "started"
        gate.open.set()  # the stream is closed: the drawing stops at its next step and frees the model
        for _ in range(100):
            if not client.get("/api/state").json()["models"][0]["busy"]:
                break
            threading.Event().wait(0.05)
        assert not client.get("/api/state").json()["models"][0]["busy"] and gate.calls < 50
        assert ui.slots[0].result is None


# ---------------------------------------------------------------------------- the forward process


def test_x_t_is_q_sample_with_one_noise_per_seed(client):
    diffusion = DIFFUSION.build()
    x0 = torch.arange(2 * 64, dtype=torch.uint8).reshape(2, 1, 8, 8)[1:] * 2
    for t in (0, 1, 37, 100):
        got = png_tensor(client.get(f"/api/forward.png?process=0&image=d1&t={t}&seed=4").content)
        # q(x_t | x_0) = N(sqrt(abar) x0, (1 - abar) I), with the view's epsilon drawn from the seed
        x = x0.float() / 127.5 - 1
        if t:
            eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
            abar = diffusion.alphas_cumprod[t - 1]
            x = (abar.sqrt() * x + (1 - abar).sqrt() * eps).float()
        assert (got.int() - to_uint8(x.clamp(-1, 1))[0].int()).abs().max() <= 1  # float rounding at a level's edge
    assert client.get("/api/forward.png?image=pattern&t=0").status_code == 200
    assert client.get("/api/forward.png?image=d9&t=0").status_code == 404
    assert client.get("/api/forward.png?image=d0&t=101").status_code == 400
    assert client.get("/api/forward.png?image=d0&t=x").json() == {"error": "t must be an integer, got 'x'"}
    assert client.get("/api/forward.png?process=99&image=d0&t=1").status_code == 404


@pytest.mark.parametrize("index,schedule,T", [(0, "linear", 100), (3, "linear", 1000), (4, "cosine", 1000),
                                              (5, "scaled_linear", 1000)])
def test_the_curves_are_the_schedules(client, index, schedule, T):
    curves = client.get(f"/api/process/{index}").json()
    assert curves["T"] == T and schedule in curves["label"]
    betas = torch.tensor(curves["betas"], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(torch.tensor(curves["alphas_cumprod"], dtype=torch.float64), abar)
    torch.testing.assert_close(torch.tensor(curves["snr"], dtype=torch.float64), abar / (1 - abar))
    previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])  # DDPM eq. 7
    torch.testing.assert_close(torch.tensor(curves["posterior_variance"], dtype=torch.float64),
                               (1 - previous) / (1 - abar) * betas)
    assert client.get("/api/process/6").status_code == 404


def test_the_theory_sections_are_served_from_the_docs(client):
    for key, heading in forward_view.THEORY_SECTIONS.items():
        section = client.get(f"/api/theory/{key}").json()
        assert section["text"].lstrip("#").strip().startswith(heading) and section["path"] == "docs/theory.md"
        assert f"#{section['anchor']}" and len(section["text"]) > 500
    assert "q_sample" in client.get("/api/theory/forward").json()["text"]
    assert client.get("/api/theory/secrets").status_code == 404
    whole = client.get("/docs/theory.md")
    assert whole.headers["content-type"].startswith("text/plain")
    assert whole.text == (ROOT / "docs" / "theory.md").read_text(encoding="utf-8")


def test_the_theory_is_refused_in_one_line_when_the_docs_are_not_installed(tmp_path):
    with pytest.raises(forward_view.NotFound, match="not installed with the package"):
        forward_view.theory_section("forward", tmp_path / "theory.md")


def png_upload(size=(20, 12), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "orange" if mode == "RGB" else 1).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_upload_is_noised_and_oversized_or_broken_ones_are_refused(client):
    added = client.post("/api/images", content=png_upload(), headers=ORIGIN).json()
    assert (added["width"], added["height"], added["channels"]) == (20, 12, 3)
    x0 = png_tensor(client.get(f"/api/forward.png?image={added['image']}&t=0").content)
    assert x0.shape == (3, 12, 20) and x0[:, 0, 0].tolist() == [255, 165, 0]
    big = client.post("/api/images", content=b"\0" * (MAX_UPLOAD_BYTES + 1), headers=ORIGIN)
    assert big.status_code == 413 and "8 MiB" in big.json()["error"]
    chunked = client.post("/api/images", content=iter([b"\0" * 2**20] * 9), headers=ORIGIN)  # no Content-Length
    assert chunked.status_code == 413
    bomb = client.post("/api/images", content=png_upload((5000, 5000), "1"), headers=ORIGIN)
    assert bomb.status_code == 413 and "5000x5000" in bomb.json()["error"]
    broken = client.post("/api/images", content=b"<svg onload=alert(1)>", headers=ORIGIN)
    assert broken.status_code == 400 and broken.json()["error"].startswith("not an image Pillow can read")
    foreign = client.post("/api/images", content=png_upload(), headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403


def test_uploads_are_shrunk_and_only_the_last_ones_kept():
    store = ImageStore()
    first = store.add(png_upload((1000, 500)))
    assert (first["width"], first["height"]) == (256, 128)
    for _ in range(forward_view.MAX_UPLOADS):
        store.add(png_upload())
    with pytest.raises(forward_view.NotFound):
        store.get(first["image"])


# ---------------------------------------------------------------------------- the Edit view


def bitmap(keep: torch.Tensor) -> str:
    """The page's mask: [H, W] of 1 (keep) and 0 (generate), one bit per pixel row by row, in base64."""
    return base64.b64encode(np.packbits(keep.numpy().astype(np.uint8).ravel()).tobytes()).decode("ascii")


#: The left three columns and a 2x2 square are generated.
KEEP = torch.ones(8, 8)
KEEP[:, :3] = 0
KEEP[5:7, 5:7] = 0


def edit_input(client, model=0, **upload) -> dict:
    if "image" in upload:
        response = client.post(f"/api/edit/inputs?model={model}&image={upload['image']}", headers=ORIGIN)
    else:
        response = client.post(f"/api/edit/inputs?model={model}", content=upload.get("content", png_upload((40, 30))),
                               headers=ORIGIN)
    assert response.status_code == 200, response.json()
    return response.json()


def run_edit(client, **request):
    with client.stream("POST", "/api/edit", json=request, headers=ORIGIN) as response:
        assert response.status_code == 200, response.read()
        return list(events(response))


def gradient_png(size=(40, 30)) -> bytes:
    """An RGB image with something in every pixel: a ramp in red, the other in green, a block of blue."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    array[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    array[h // 4:h // 2, w // 4:w // 2, 2] = 200
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_to_edit_is_made_the_models_size_as_the_data_loader_makes_it(client):
    upload = gradient_png((40, 30))
    got = edit_input(client, 0, content=upload)
    assert (got["width"], got["height"], got["channels"], got["source_size"]) == (8, 8, 3, [40, 30])
    shown = png_tensor(client.get(got["url"]).content)
    expected, _ = prepare_image(Image.open(io.BytesIO(upload)), Fit((8, 8), 3, None, False))  # resize, centre crop
    assert torch.equal(shown, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    # A grey data-set image for a colour model: the loader's conversion (grey copied to R, G and B).
    data = edit_input(client, 0, image="d1")
    assert torch.equal(png_tensor(client.get(data["url"]).content), (torch.arange(64, 128).reshape(1, 8, 8) * 2)
                       .to(torch.uint8).expand(3, -1, -1))
    assert client.post("/api/edit/inputs?model=0&image=d9", headers=ORIGIN).status_code == 404
    assert client.post("/api/edit/inputs?model=0&image=../etc/passwd", headers=ORIGIN).status_code == 404
    assert client.post("/api/edit/inputs?model=5", content=upload, headers=ORIGIN).status_code == 404
    big = client.post("/api/edit/inputs?model=0", content=b"\0" * (MAX_UPLOAD_BYTES + 1), headers=ORIGIN)
    assert big.status_code == 413 and "8 MiB" in big.json()["error"]
    bomb = client.post("/api/edit/inputs?model=0", content=png_upload((5000, 5000), "1"), headers=ORIGIN)
    assert bomb.status_code == 413
    broken = client.post("/api/edit/inputs?model=0", content=b"<svg onload=alert(1)>", headers=ORIGIN)
    assert broken.status_code == 400 and broken.json()["error"].startswith("not an image Pillow can read")
    assert client.get("/api/edit/inputs/enope/image.png").status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("method,options,settings", [
    ("repaint", {"steps": 10, "jump_length": 3, "resamples": 2}, SamplerSettings("ddpm", 10)),
    ("replacement", {"sampler": "ddim", "steps": 6}, SamplerSettings("ddim", 6)),
])
def test_inpainting_is_the_librarys_and_the_downloads_are_what_the_command_reads(client, method, options, settings):
    key = edit_input(client, 1, content=gradient_png())
    got = run_edit(client, model=1, input=key["input"], method=method, mask=bitmap(KEEP), seed=4, num_samples=3,
                   label=2, guidance_scale=2.0, **options)
    names = [name for name, _ in got]
    assert names[0] == "started" and names[-1] == "done" and names.count("images") == 1 and "progress" in names
    image = png_tensor(client.get(key["url"]).content)
    repaint = {"jump_length": 3, "resamples": 2} if method == "repaint" else {}
    expected = inpaint(loaded("classes").model, DIFFUSION.build(), image[None], KEEP[None, None], method, settings,
                       num_samples=3, seed=4, label=2, guidance_scale=2.0, progress=False, **repaint)
    assert torch.equal(images_in(got), expected.uint8())
    done = got[-1][1]
    assert done["nfe"] == expected.nfe == (19 if method == "repaint" else 6) and done["count"] == 3
    for i, url in enumerate(done["outputs"]):
        assert torch.equal(png_tensor(client.get(url).content), expected.uint8()[i])
    # What the command reads: image.png as shown, mask.png as ddpm inpaint's read_mask reads it.
    assert torch.equal(png_tensor(client.get(done["image"]).content), image)
    mask_png = client.get(done["mask"]).content
    assert torch.equal(png_tensor(mask_png)[0], (KEEP * 255).to(torch.uint8))
    assert torch.equal(read_mask_bytes(mask_png), KEEP[None, None])
    shown = [(masked_preview(image[None], KEEP[None, None]), "masked")]
    assert client.get(done["grid"]).content == png_bytes(results_grid(image[None], expected.images, 3, shown))
    tail = "--seed 4 --num-samples 3 --label 2 --guidance-scale 2.0 --bf16 false"
    assert done["command"] == {
        "repaint": f"ddpm inpaint runs/classes --image image.png --mask mask.png --method repaint --out edit "
                   f"--steps 10 --jump-length 3 --resamples 2 {tail}",
        "replacement": f"ddpm inpaint runs/classes --image image.png --mask mask.png --method replacement --out edit "
                       f"--sampler ddim --steps 6 {tail}"}[method]


def read_mask_bytes(data: bytes) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "mask.png").write_bytes(data)
        return read_mask(Path(tmp) / "mask.png")


def test_img2img_is_the_librarys_and_strength_zero_gives_the_image_back(client):
    key = edit_input(client, 2, content=gradient_png())
    image = png_tensor(client.get(key["url"]).content)
    request = {"model": 2, "input": key["input"], "method": "img2img", "strength": 0.5, "sampler": "ddim", "steps": 8,
               "seed": 9, "num_samples": 2, "prompt": "a red square", "guidance_scale": 3}
    got = run_edit(client, **request)
    text = text_model()
    expected = img2img(text.model, text.diffusion.build(), image[None], 0.5, SamplerSettings("ddim", 8), num_samples=2,
                       seed=9, prompts=["a red square"], guidance_scale=3.0, conditioning=text.conditioning,
                       progress=False)
    assert torch.equal(images_in(got), expected.uint8()) and got[-1][1]["nfe"] == 4 and got[-1][1]["mask"] is None
    assert got[-1][1]["command"] == ("ddpm img2img runs/text --image image.png --strength 0.5 --out edit "
                                     "--sampler ddim --steps 8 --seed 9 --num-samples 2 --guidance-scale 3.0 "
                                     "--prompt 'a red square' --bf16 false")
    zero = run_edit(client, **{**request, "strength": 0})
    assert torch.equal(images_in(zero), image[None].expand(2, -1, -1, -1)) and zero[-1][1]["nfe"] == 0


@pytest.mark.slow
def test_the_command_line_draws_the_pages_edits_again(tmp_path, capsys, monkeypatch):
    """The page's image.png and mask.png, given to the command it shows, give the same images (both verbs)."""
    tiny_unet().save_pretrained(tmp_path / "tiny")
    ui = load_ui([str(tmp_path / "tiny")], device="cpu")
    with TestClient(create_app(ui), base_url=BASE) as client:
        key = edit_input(client, 0, content=gradient_png((12, 20)))
        for request in ({"method": "replacement", "sampler": "dpm++2m", "steps": 5, "mask": bitmap(KEEP)},
                        {"method": "img2img", "strength": 0.6, "steps": 10}):
            done = run_edit(client, model=0, input=key["input"], seed=3, num_samples=2, **request)[-1][1]
            out = tmp_path / request["method"]
            out.mkdir()
            for name in ("image", "mask"):
                if done[name]:
                    (out / f"{name}.png").write_bytes(client.get(done[name]).content)
            monkeypatch.chdir(out)  # where the page's files were saved: the command names them image.png and mask.png
            command = shlex.split(done["command"])
            assert "--device" in command and main([*command[1:], "--quiet"]) == 0, capsys.readouterr().err
            cli = sorted((out / "edit" / "images").glob("*.png"))
            page = [png_tensor(client.get(url).content) for url in done["outputs"]]
            assert len(cli) == 2 and all(torch.equal(png_tensor(p.read_bytes()), x) for p, x in zip(cli, page))


def test_a_text_model_and_a_class_model_get_their_conditions_checked(client):
    key = edit_input(client, 0)["input"]
    for body, message in (({"label": 1}, "needs a class-conditional model"), ({"prompt": "a cat"}, "text-conditional")):
        response = client.post("/api/edit", json={"model": 0, "input": key, "method": "img2img", **body},
                               headers=ORIGIN)
        assert response.status_code == 400 and message in response.json()["error"]


ALL_KEEP, NONE_KEPT = torch.ones(8, 8), torch.zeros(8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("body,status,message", [
    ({"mask": bitmap(torch.ones(8, 7))}, 400, "the mask has 7 bytes; a 8x8 image's has 8"),
    ({"mask": bitmap(ALL_KEEP)}, 400, "nothing to inpaint"),
    ({"mask": bitmap(NONE_KEPT)}, 400, "keeps no pixel"),
    ({"mask": "@@not base64@@"}, 400, "the mask is not base64"),
    ({"mask": None}, 400, "inpainting needs a mask"),
    ({"mask": 7}, 400, "mask must be a string"),
    ({"method": "img2img", "strength": 1.5}, 400, "must lie in [0, 1]"),
    ({"method": "img2img", "strength": -0.1}, 400, "must lie in [0, 1]"),
    ({"method": "img2img", "strength": "half"}, 400, "strength must be a number"),
    ({"method": "img2img", "sampler": "dpm-adaptive", "steps": None}, 400, "dpm-adaptive picks its own steps"),
    ({"method": "img2img", "mask": bitmap(KEEP)}, 400, "img2img takes no mask"),
    ({"method": "outpaint"}, 400, "unknown method 'outpaint'"),
    ({"sampler": "ddim"}, 400, "RePaint's steps are DDPM's"),
    ({"steps": 101}, 400, "between 1 and T=100"),
    ({"jump_length": 0}, 400, "between 1 and 1000"),
    ({"num_samples": 17}, 400, "between 1 and 16"),
    ({"input": "enope"}, 404, "no image 'enope' to edit"),
    ({"model": 3}, 400, "the image is a colour (RGB) image; the model draws grey 8x8 images"),
    ({"path": "/etc/passwd"}, 400, "unknown field 'path'"),
])
def test_bad_edits_get_one_line_of_json(body, status, message):
    with TestClient(create_app(make_ui("plain", "classes", "text", "grey")), base_url=BASE) as client:
        key = edit_input(client, 0)["input"]  # made for model 0: 3 channels
        mask = None if body.get("method") == "img2img" else bitmap(KEEP)
        request = {"model": 0, "input": key, "method": "repaint", "mask": mask, "steps": 5, **body}
        response = client.post("/api/edit", json=request, headers=ORIGIN)
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert message in error and "\n" not in error and set(response.json()) == {"error"}
        assert not client.get("/api/state").json()["models"][0]["busy"]


def test_an_edit_body_past_its_limit_is_refused(client):
    response = client.post("/api/edit", content=b" " * (300 * 1024),
                           headers={**ORIGIN, "Content-Type": "application/json"})
    assert response.status_code == 413 and "256 KiB" in response.json()["error"]


@pytest.mark.parametrize("path", ["/api/edit", "/api/edit/inputs?model=0"])
@pytest.mark.parametrize("headers", [{"Host": "evil.example:8765"}, {"Origin": "http://evil.example"},
                                     {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}])
def test_another_website_cannot_edit(client, path, headers):
    response = client.post(path, content=gradient_png(), headers=headers)
    assert response.status_code == 403 and set(response.json()) == {"error"}


def test_an_edit_holds_the_model_as_a_sample_does_and_cancelling_stops_it():
    ui = make_ui("plain")
    gate = Gate(ui.slots[0].loaded.model)
    with TestClient(create_app(ui), base_url=BASE) as client:
        key = edit_input(client, 0)["input"]
        request = {"model": 0, "input": key, "method": "repaint", "mask": bitmap(KEEP), "steps": 100}
        with client.stream("POST", "/api/edit", json=request, headers=ORIGIN) as response:
            stream = events(response)
            assert next(stream)[0] == "started"
            for busy in (client.post("/api/edit", json=request, headers=ORIGIN),
                         client.post("/api/sample", json={"model": 0}, headers=ORIGIN)):
                assert busy.status_code == 409 and "busy with another request" in busy.json()["error"]
            assert client.post("/api/cancel", json={"model": 0}, headers=ORIGIN).json() == {"cancelled": True}
            gate.open.set()
            assert [name for name, _ in stream][-1] == "cancelled"
        assert gate.calls <= 2 and ui.slots[0].edited is None  # of RePaint's 1,000 steps: it stopped at the next
        again = run_edit(client, **{**request, "steps": 2, "resamples": 1})
        assert again[-1][0] == "done" and ui.slots[0].edited is not None
        assert client.get("/api/edit/results/nope/grid.png").status_code == 404
        assert client.get(f"/api/edit/results/{again[-1][1]['result']}/secret.png").status_code == 404


# ---------------------------------------------------------------------------- the command and the core


def test_ui_has_help_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ui", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in text and "--listen" in text and "--port" in text


def test_without_the_extra_ui_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "ddpm.ui.server", raising=False)
    for name in [name for name in sys.modules if name.split(".")[0] in ("starlette", "uvicorn")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if neither were installed
    assert main(["ui", "--port", "0"]) == 2
    assert capsys.readouterr().err == "ddpm: error: ddpm ui needs a web server that is not installed: " \
                                      "pip install 'ddpm[ui]'\n"


def test_a_model_path_that_is_not_there_is_one_line(capsys):
    assert main(["ui", "no/such/run", "--port", "0"]) == 2
    assert "no/such/run: no such run" in capsys.readouterr().err


@pytest.mark.slow
def test_the_core_never_imports_the_server():
    """Only ddpm/ui/ imports the web framework, and only cli.py's ui verb imports ddpm.ui.server."""
    found = []
    for path in sorted((ROOT / "ddpm").rglob("*.py")):
        if path.parent.name == "ui":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("starlette", "uvicorn")
                      or n.startswith("ddpm.ui") and path.name != "cli.py"]
    assert not found, found


@pytest.mark.slow
def test_ddpm_ui_prints_its_address_and_ctrl_c_stops_it_cleanly_while_it_draws(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "ui", str(tmp_path / "tiny"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("model 0: ") and lines[1].startswith("ddpm ui: http://127.0.0.1:")
        address = lines[1].split()[2]
        with urllib.request.urlopen(address + "api/state") as response:
            assert json.load(response)["models"][0]["name"] == "tiny"
        port = int(address.rstrip("/").rsplit(":", 1)[1])
        drawing = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        drawing.request("POST", "/api/sample", json.dumps({"sampler": "ddpm", "num_images": 64, "batch_size": 64}),
                        {"Content-Type": "application/json"})
        stream = drawing.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"event: started")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 0 and out.strip().endswith("ddpm ui: stopped"), (out, err)
    assert "Traceback" not in err and time.monotonic() - started < 15


def test_a_video_model_is_refused_in_one_line(monkeypatch, capsys):
    class Clips(nn.Module):
        num_classes, sample_shape = 0, (3, 8, 16, 16)

    monkeypatch.setattr("ddpm.ui.server.load_model", lambda *args: LoadedModel(Clips(), DIFFUSION, "clips"))
    assert main(["ui", "runs/video", "--port", "0"]) == 2
    assert capsys.readouterr().err == ("ddpm: error: runs/video is a video model; ddpm ui draws images "
                                       "(sample it with 'ddpm sample')\n")


@pytest.mark.slow
def test_the_autocast_is_decided_once_and_named_in_the_command(tmp_path):
    """bf16 'auto' can differ between processes (measured on a CPU): the page draws with what the server
    decided at its start and its command line says so."""
    ui = UI([ModelSlot(0, "runs/plain", loaded(), bf16=True)])
    with TestClient(create_app(ui), base_url=BASE) as client:
        got = draw(client, model=0, sampler="ddim", steps=3, num_images=2, batch_size=2)
    expected = generate(loaded().model, DIFFUSION.build(), 2, SamplerSettings("ddim", 3), bf16=True, batch_size=2,
                        progress=False)
    assert torch.equal(images_in(got), expected.uint8()) and got[-1][1]["command"].endswith("--bf16 true")
    tiny_unet().save_pretrained(tmp_path / "m")
    assert [s.bf16 for s in load_ui([str(tmp_path / "m")] * 2, device="cpu", bf16=True).slots] == [True, True]
    assert load_ui([str(tmp_path / "m")], device="cpu").slots[0].bf16 is False  # auto; the suite pins float32
