"""``ddpm ui`` in a real browser: Debian's headless Chromium driven by Playwright (its driver only, no
browser download), against the server started here on a free loopback port.

The page samples 4 images from a tiny model and they are, bit for bit, what ``ddpm sample`` draws when
run with the command line the page shows; the scrubber shows the chain's kept steps; the forward view
noises a data-set image as q(x_t | x_0) says; the Edit view inpaints an uploaded image under a mask drawn
with the mouse as ``ddpm.inpaint.inpaint`` and ``ddpm inpaint`` do, and img2img at strength 0 gives the
image back; another website's requests and a DNS-rebinding name are refused by the server. Where
Chromium or Playwright is missing the tests skip with the reason.

Screenshots of each view are taken every time (and kept under 100 KB); with ``DDPM_UI_SCREENSHOTS=DIR``
they are saved there for docs/gallery.md. ``DDPM_UI_MODEL=RUN`` samples from that model instead of the
untrained tiny one (the gallery's come from a class-conditional digits model, see docs/gallery.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import io
import os
import shlex
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from test_ui_server import Gate, decode, png_tensor, text_model  # noqa: E402

from ddpm.cli import main  # noqa: E402
from ddpm.data import Fit, prepare_image  # noqa: E402
from ddpm.generate import SamplerSettings, generate  # noqa: E402
from ddpm.images import make_grid  # noqa: E402
from ddpm.inpaint import inpaint, read_mask  # noqa: E402
from ddpm.models import UNet, get_preset  # noqa: E402
from ddpm.samplers import DEFAULT_SAMPLER  # noqa: E402
from ddpm.ui.edit import as_pil  # noqa: E402
from ddpm.ui.forward import noised  # noqa: E402
from ddpm.ui.sampling import ModelSlot, png_bytes  # noqa: E402
from ddpm.ui.server import UI, bind, create_app, load_ui  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("DDPM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# What this machine's Chromium needs to start as root in a closed network (docs: machines/python.md),
# and a resolver rule that points a foreign name at this machine, as DNS rebinding would.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP rebind.test 127.0.0.1"]
SCREENSHOTS = os.environ.get("DDPM_UI_SCREENSHOTS")
MAX_SCREENSHOT = 100_000


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright: the driver is enough, no browser download)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set DDPM_CHROMIUM)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        except Exception as e:  # a browser that is there but will not start: say why
            pytest.skip(f"Chromium at {CHROMIUM} would not start: {str(e).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1040, "height": 760})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    if os.environ.get("DDPM_UI_MODEL"):
        return os.environ["DDPM_UI_MODEL"]
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(get_preset("tiny"), num_classes=3))
    with torch.no_grad():  # off DDPM's zero initialisation, so the samples depend on every weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ui") / "tiny"
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_source(tmp_path_factory) -> str:
    try:
        import sklearn  # noqa: F401 (the digits ship with scikit-learn, the dev extra's)
    except ImportError:
        from conftest import write_bars_npz

        return str(write_bars_npz(tmp_path_factory.mktemp("data") / "bars.npz", 16, 4))
    return "digits"


@contextlib.contextmanager
def serving(ui: UI):
    """The server on a free loopback port, in a thread of this process, for the tests' time."""
    sock = bind("127.0.0.1", 0)
    app = create_app(ui)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    port = sock.getsockname()[1]
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", port=port, ui=ui, app=app)
    finally:
        ui.stop()
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir, data_source):
    with serving(load_ui([model_dir], data=data_source, quiet=True)) as running:
        yield running


def fetched(page, url: str) -> bytes:
    """The bytes the page gets for ``url`` (a same-origin fetch from inside the page)."""
    values = page.evaluate("async (url) => Array.from(new Uint8Array(await (await fetch(url)).arrayBuffer()))", url)
    return bytes(values)


def screenshot(page, name: str) -> None:
    """A full-page screenshot in 128 colours (a page has few): checked under 100 KB, saved with DDPM_UI_SCREENSHOTS."""
    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB").quantize(128)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < MAX_SCREENSHOT, f"{name}: {len(buffer.getvalue())} bytes"
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SCREENSHOTS) / name).write_bytes(buffer.getvalue())


def set_range(page, selector: str, value: int) -> None:
    page.eval_on_selector(selector, "(s, v) => { s.value = String(v); s.dispatchEvent(new Event('input')); }", value)


def wait_for_image(page, selector: str, part: str) -> None:
    page.wait_for_function("([s, part]) => { const i = document.querySelector(s); "
                           "return i.src.includes(part) && i.complete && i.naturalWidth > 0; }", arg=[selector, part])


def test_the_page_draws_what_ddpm_sample_draws_and_scrubs_the_chain(page, server, tmp_path):
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]")
    assert page.is_visible("#edit-tab") and page.is_hidden("#prompt")  # inpaint and img2img exist; not a text model
    page.fill("#seed", "5")
    page.fill("#num-images", "4")
    page.fill("#batch-size", "4")
    page.click("#sample-button")
    page.wait_for_selector("body[data-sample=done]", timeout=120_000)
    urls = page.eval_on_selector_all("#images img.sample", "images => images.map(image => image.src)")
    got = torch.stack([decode(url) for url in urls])

    # The command the page shows, run as it says (with our own --out and --pngs), draws the same images.
    command = shlex.split(page.text_content("#command"))
    assert command[:3] == ["ddpm", "sample", server.ui.slots[0].source] and "--seed" in command
    out = command.index("--out") + 1
    command[out] = str(tmp_path / "cli")
    assert main([*command[1:], "--pngs", "--quiet"]) == 0
    cli = torch.stack([png_tensor(p.read_bytes()) for p in sorted((tmp_path / "cli" / "images").glob("*.png"))])
    assert got.shape[0] == 4 and torch.equal(got, cli)

    # The scrubber walks the first batch's chain: label and x_t frame as generate() recorded them.
    loaded = server.ui.slots[0]
    chain = generate(loaded.loaded.model, loaded.diffusion, 4, SamplerSettings(), seed=5, batch_size=4,
                     progress=False, trajectory_every=1).trajectory
    frames = int(page.get_attribute("#scrubber", "max")) + 1
    assert frames == len(chain["timesteps"]) == 20
    set_range(page, "#scrubber", 7)
    wait_for_image(page, "#frame-xt", "/7/x_t.png")
    wait_for_image(page, "#frame-x0", "/7/pred_x0.png")
    assert page.text_content("#scrub-label") == f"frame 8 of 20: t = {int(chain['timesteps'][7]) + 1}"
    shown = png_tensor(fetched(page, page.get_attribute("#frame-xt", "src")))
    assert torch.equal(shown, png_tensor(png_bytes(make_grid(chain["x_t"][7].clamp(-1, 1), nrow=2))))
    assert fetched(page, page.get_attribute("#download-gif", "href"))[:6] == b"GIF89a"
    screenshot(page, "ui_sample.png")


def test_the_forward_view_noises_a_data_image_and_plots_the_schedule(page, server):
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]")
    page.click("button[data-view=forward]")
    page.wait_for_function("() => document.querySelectorAll('.plot polyline').length >= 4")
    page.fill("#data-index", "3")
    page.dispatch_event("#data-index", "input")
    set_range(page, "#t-slider", 250)
    wait_for_image(page, "#xt-image", "t=250")
    diffusion = server.ui.diffusion(0)
    shown = png_tensor(fetched(page, page.get_attribute("#xt-image", "src")))
    expected = noised(diffusion, server.ui.images.get("d3"), 250, 0)
    assert torch.equal(shown, png_tensor(png_bytes(expected)))
    abar = float(diffusion.alphas_cumprod[249])
    assert f"ᾱ = {abar:.4f}" in page.text_content("#forward-values")

    page.click("details[data-theory=forward] summary")
    page.wait_for_function("() => document.querySelector('details[data-theory=forward] pre').textContent.length > 0")
    assert "q_sample" in page.text_content("details[data-theory=forward] pre")
    screenshot(page, "ui_forward.png")

    page.select_option("#process", label="cosine, T = 1000")
    page.wait_for_function("() => document.getElementById('xt-image').src.includes('process=1')")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "teal").save(buffer, format="PNG")
    page.set_input_files("#upload", files=[{"name": "teal.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    page.wait_for_function("() => document.getElementById('image-source').value.startsWith('u')")
    wait_for_image(page, "#x0-image", "image=u")
    assert png_tensor(fetched(page, page.get_attribute("#x0-image", "src")))[:, 0, 0].tolist() == [0, 128, 128]


def stroke(page, selector: str, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through ``points`` (fractions of the element's width and height), button held."""
    box = page.locator(selector).bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=5)
    page.mouse.up()


CANVAS_PIXELS = """() => { const c = document.getElementById('mask-canvas');
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""


def test_the_edit_view_inpaints_under_a_drawn_mask_as_the_library_and_the_command_do(page, server, tmp_path):
    page.goto(server.url)
    page.wait_for_selector("body[data-ready]")
    page.click("#edit-tab")
    page.wait_for_function("() => document.body.dataset.editInput")  # the data set's first image, to start with
    first = page.evaluate("() => document.body.dataset.editInput")

    # Upload a data-set image enlarged 5 times: the server makes it the model's size as the data loader would.
    buffer = io.BytesIO()
    digit = as_pil(server.ui.images.get("d3"))
    digit.resize((digit.width * 5, digit.height * 5), Image.Resampling.NEAREST).save(buffer, format="PNG")
    upload = buffer.getvalue()
    page.set_input_files("#edit-upload", files=[{"name": "digit.png", "mimeType": "image/png", "buffer": upload}])
    page.wait_for_function("(first) => document.body.dataset.editInput !== first", arg=first)
    slot = server.ui.slots[0]
    C, H, W = slot.loaded.image_shape
    made, _ = prepare_image(Image.open(io.BytesIO(upload)), Fit((H, W), C, None, False))
    assert "resized and centre-cropped" in page.text_content("#edit-note")

    # A broad stroke across the lower part of the image: those pixels are generated, and shown tinted.
    set_range(page, "#brush", float(page.eval_on_selector("#brush", "brush => brush.max")))
    stroke(page, "#mask-canvas", [(0.02, 0.75), (0.5, 0.75), (0.98, 0.75)])
    page.select_option("#edit-method", "repaint")
    for selector, value in (("#edit-steps", "20"), ("#edit-jump", "5"), ("#edit-resamples", "3"),
                            ("#edit-seed", "7"), ("#edit-samples", "4")):
        page.fill(selector, value)
    assert "50 network evaluations per result" in page.text_content("#edit-note")  # 20 + 3 jumps · 2 · 5
    page.click("#edit-button")
    page.wait_for_selector("body[data-edit=done]", timeout=120_000)
    urls = page.eval_on_selector_all("#edit-images img.edited", "images => images.map(image => image.src)")
    got = torch.stack([decode(url) for url in urls])

    # The page's image.png is the upload made the model's size; its mask.png is the stroke.
    image_png = fetched(page, page.get_attribute("#edit-download-image", "href"))
    image = png_tensor(image_png)
    assert torch.equal(image, torch.from_numpy(made.copy()).permute(2, 0, 1))
    (tmp_path / "image.png").write_bytes(image_png)
    (tmp_path / "mask.png").write_bytes(fetched(page, page.get_attribute("#edit-download-mask", "href")))
    mask = read_mask(tmp_path / "mask.png")
    generated = (mask[0, 0] == 0).nonzero()
    radius = float(page.eval_on_selector("#brush", "brush => brush.value"))
    assert len(set(generated[:, 1].tolist())) == W and (generated[:, 0] + 0.5 - 0.75 * H).abs().max() <= radius
    shown = torch.tensor(page.evaluate(CANVAS_PIXELS), dtype=torch.uint8).reshape(H, W, 4)[..., :3].permute(2, 0, 1)
    tinted = (shown != image.expand(3, -1, -1)).any(0)
    assert torch.equal(tinted, mask[0, 0] == 0)

    expected = inpaint(slot.loaded.model, slot.diffusion, image[None], mask, "repaint", SamplerSettings("ddpm", 20),
                       jump_length=5, resamples=3, num_samples=4, seed=7, bf16=slot.bf16, progress=False)
    assert torch.equal(got, expected.uint8())
    assert torch.equal(got[:, :, mask[0, 0] == 1], image[None].expand(4, -1, -1, -1)[:, :, mask[0, 0] == 1])

    # The command the page shows, reading the image.png and mask.png saved from it, draws the same images.
    command = shlex.split(page.text_content("#edit-command"))
    assert command[:2] == ["ddpm", "inpaint"] and command[command.index("--mask") + 1] == "mask.png"
    for option, path in (("--image", "image.png"), ("--mask", "mask.png"), ("--out", "edit")):
        command[command.index(option) + 1] = str(tmp_path / path)
    assert main([*command[1:], "--quiet"]) == 0
    cli = torch.stack([png_tensor(p.read_bytes()) for p in sorted((tmp_path / "edit" / "images").glob("*.png"))])
    assert torch.equal(cli, got)
    assert fetched(page, page.get_attribute("#edit-images a", "href"))[:8] == b"\x89PNG\r\n\x1a\n"
    screenshot(page, "ui_edit.png")

    # img2img at strength 0 runs no step: the image comes back (within 8-bit rounding).
    page.select_option("#edit-method", "img2img")
    set_range(page, "#edit-strength", 0)
    page.fill("#edit-samples", "1")
    page.click("#edit-button")
    page.wait_for_function("() => document.body.dataset.edit === 'done' && "
                           "document.getElementById('edit-command').textContent.includes('--strength 0.0')")
    back = decode(page.get_attribute("#edit-images img.edited", "src"))
    assert (back.int() - image.int()).abs().max() <= 1
    assert page.text_content("#edit-status") == "1 result, 0 network evaluations each"


class ForeignSite(http.server.BaseHTTPRequestHandler):
    """Another website (another origin on this machine) whose page tries to drive the UI."""

    def do_GET(self):
        body = b"<!doctype html><title>another site</title><p>nothing to see"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


TRY_TO_DRIVE = """async (ui) => {
  const out = {};
  const json = {method: "POST", headers: {"Content-Type": "application/json"}, body: '{"model": 0}'};
  try { await fetch(ui + "api/sample", json); out.json = "answered"; } catch (e) { out.json = "refused"; }
  const form = {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body: '{"model": 0}'};
  try { out.simple = (await fetch(ui + "api/sample", form)).type; } catch (e) { out.simple = "refused"; }
  try { await fetch(ui + "api/state"); out.read = "answered"; } catch (e) { out.read = "refused"; }
  return out;
}"""


def test_another_website_cannot_drive_it_nor_a_rebinding_name(page, server):
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ForeignSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        foreign = f"http://localhost:{site.server_address[1]}"
        page.goto(foreign + "/")
        before = len(server.app.refused)
        result = server.ui.slots[0].result
        outcome = page.evaluate(TRY_TO_DRIVE, server.url)
        # The browser gets no answer it may read (the no-cors one is a network error: our
        # Cross-Origin-Resource-Policy), and the server refused each request that reached it.
        assert outcome == {"json": "refused", "simple": "refused", "read": "refused"}
        reason = f"cross-origin request from {foreign} refused"
        assert set(list(server.app.refused)[before:]) == {
            ("OPTIONS", "/api/sample", reason), ("POST", "/api/sample", reason), ("GET", "/api/state", reason)}
        assert server.ui.slots[0].result is result and not server.ui.slots[0].info()["busy"]
    finally:
        site.shutdown()

    # A foreign name that resolves to this machine (DNS rebinding) gets only a refusal.
    response = page.goto(f"http://rebind.test:{server.port}/")
    assert response.status == 403 and "is not this server's address" in page.text_content("body")


def test_a_text_model_gets_prompt_fields_and_a_busy_model_says_so(browser):
    """With the tiny-text network: the prompt reaches generate(), and while one page draws, another is told
    the model is busy; Cancel stops the drawing."""
    text = text_model()
    gate = Gate(text.model)
    gate.open.set()
    context = browser.new_context()
    with serving(UI([ModelSlot(0, "runs/text", text)])) as running:
        first, second = context.new_page(), context.new_page()
        for page in (first, second):
            page.goto(running.url)
            page.wait_for_selector("body[data-ready]")
        assert first.is_visible("#prompt") and first.is_visible("#negative-prompt") and first.is_hidden("#label")
        first.fill("#prompt", "a red square")
        first.fill("#steps", "4")
        first.click("#sample-button")
        first.wait_for_selector("body[data-sample=done]")
        urls = first.eval_on_selector_all("#images img.sample", "images => images.map(image => image.src)")
        again = text_model()
        expected = generate(again.model, again.diffusion.build(), 4, SamplerSettings(DEFAULT_SAMPLER, 4),  # the page's
                            prompts=["a red square"],
                            conditioning=again.conditioning, batch_size=4, progress=False)
        assert torch.equal(torch.stack([decode(url) for url in urls]), expected.uint8())
        assert "--prompt 'a red square'" in first.text_content("#command")

        gate.open.clear()  # the next request holds the model until the gate opens
        first.click("#sample-button")
        for _ in range(200):  # until the server holds the model for the first page
            if running.ui.slots[0].info()["busy"]:
                break
            time.sleep(0.05)
        second.click("#sample-button")
        second.wait_for_selector("body[data-sample=busy]")
        assert "busy with another request" in second.text_content("#sample-status")
        first.click("#cancel-button")
        gate.open.set()
        first.wait_for_selector("body[data-sample=cancelled]")
        assert first.text_content("#sample-status") == "cancelled"
    context.close()
