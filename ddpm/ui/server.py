"""The ``ddpm ui`` server: Starlette routes over :mod:`ddpm.ui.sampling`, :mod:`ddpm.ui.forward` and
:mod:`ddpm.ui.edit`, behind :class:`ddpm.ui.security.LocalOnly`, on uvicorn.

Every answer the page did not ask for as a file is JSON; a refused request is one line,
``{"error": "..."}``, with its status (400 bad input, 403 refused, 404 unknown, 409 busy, 413 too
large). A sampling or editing request is answered with server-sent events (``started``, ``progress``,
``images``, then one of ``done``, ``cancelled`` or ``error``) read by the page with ``fetch``; the drawing
runs in a thread of its own and stops at its next step once the request is cancelled or its reader has gone.
A model serves one request at a time, a sample or an edit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ddpm.data import load_images
from ddpm.errors import UserError
from ddpm.loading import describe_run, load_model
from ddpm.runtime import resolve_bf16, resolve_device
from ddpm.samplers import DEFAULT_SAMPLER, SAMPLERS
from ddpm.ui import DEFAULT_PORT, NotFound, RequestError, TooLarge
from ddpm.ui.edit import MAX_EDIT_BYTES, EditInputs, EditRequest, as_pil, check_edit, edit_info, run_edit
from ddpm.ui.forward import (
    MAX_DATA_IMAGES,
    MAX_UPLOAD_BYTES,
    THEORY,
    ImageStore,
    curves,
    noised,
    open_upload,
    processes,
    theory_section,
)
from ddpm.ui.sampling import (
    MAX_IMAGES,
    Cancelled,
    ModelSlot,
    SampleRequest,
    check_request,
    png_bytes,
    run_sample,
)
from ddpm.ui.security import LocalOnly

STATIC = Path(__file__).resolve().parent / "static"
MAX_JSON_BYTES = 64 * 1024
#: Seconds between keep-alive comments on an event stream that has nothing to say.
HEARTBEAT = 1.0
FINAL_EVENTS = ("done", "cancelled", "error")
log = logging.getLogger("ddpm.ui")


class UI:
    """What the server holds: the models, the image store, the processes and the device."""

    def __init__(self, slots: Sequence[ModelSlot], images: ImageStore | None = None, device: Any = "cpu") -> None:
        self.slots, self.images, self.device = list(slots), images or ImageStore(), device
        self.processes = processes([(s.name, s.loaded.diffusion) for s in self.slots])
        self._diffusions: dict[int, Any] = {}
        self.inputs = EditInputs()
        self.workers: set[threading.Thread] = set()

    def slot(self, index: Any) -> ModelSlot:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.slots):
            raise NotFound(f"no model {index!r}: the models are 0..{len(self.slots) - 1}" if self.slots
                           else "no model was given: start 'ddpm ui RUN_OR_MODEL'")
        return self.slots[index]

    def diffusion(self, index: int) -> Any:
        if not 0 <= index < len(self.processes):
            raise NotFound(f"no process {index}: there are {len(self.processes)}")
        if index not in self._diffusions:
            self._diffusions[index] = self.processes[index].build()
        return self._diffusions[index]

    def state(self) -> dict[str, Any]:
        """What the page needs to draw its controls."""
        return {"models": [s.info() for s in self.slots], "samplers": list(SAMPLERS),
                "default_sampler": DEFAULT_SAMPLER, "max_images": MAX_IMAGES, "max_upload_bytes": MAX_UPLOAD_BYTES,
                "images": self.images.info(), "processes": [p.label for p in self.processes], "edit": edit_info()}

    def start(self, worker: threading.Thread) -> None:
        self.workers = {w for w in self.workers if w.is_alive()} | {worker}
        worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every request and wait for the drawing threads (each stops at its next step)."""
        for slot in self.slots:
            slot.cancel()
        for worker in list(self.workers):
            worker.join(timeout)


# ---------------------------------------------------------------------------- requests


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes, whatever Content-Length said."""
    length = request.headers.get("content-length")
    too_large = TooLarge(f"the request is larger than {limit / 2**20:g} MiB" if limit >= 2**20 else
                         f"the request is larger than {limit // 1024} KiB")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_json(request: Request, limit: int = MAX_JSON_BYTES) -> Any:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("send JSON (Content-Type: application/json)", 415)
    try:
        return json.loads(await read_body(request, limit))
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the request body is not valid JSON") from None


def query_int(request: Request, name: str, default: int | None = None) -> int:
    value = request.query_params.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be an integer, got {value!r}") from None


def png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------------------- routes


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def state(request: Request) -> Response:
    return JSONResponse(request.app.state.ui.state())


async def sample(request: Request) -> Response:
    ui: UI = request.app.state.ui
    body = SampleRequest.parse(await read_json(request))
    slot = ui.slot(body.model)
    check_request(slot, body)
    return stream(ui, slot, "sample", lambda emit, cancel: run_sample(slot, body, emit, cancel, ui.device))


async def edit(request: Request) -> Response:
    ui: UI = request.app.state.ui
    body = EditRequest.parse(await read_json(request, MAX_EDIT_BYTES))
    slot = ui.slot(body.model)
    image = ui.inputs.get(body.input)
    mask = check_edit(slot, body, image)
    return stream(ui, slot, "edit", lambda emit, cancel: run_edit(slot, body, image, mask, emit, cancel, ui.device))


def stream(ui: UI, slot: ModelSlot, what: str, run: Any) -> Response:
    """Take the model and answer with the events of ``run(emit, cancel)`` (a result with a ``summary()``),
    which draws in a thread of its own."""
    cancel = slot.begin()
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(name: str, data: dict[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (name, data))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            cancel.set()

    ui.start(threading.Thread(target=work, args=(slot, run, emit, cancel), daemon=True,
                              name=f"ddpm-ui-{what}-{slot.index}"))
    return StreamingResponse(events(queue, cancel, slot), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def work(slot: ModelSlot, run: Any, emit: Any, cancel: threading.Event) -> None:
    """Draw in this thread; the model is free again before the last event is sent."""
    try:
        final = ("done", run(emit, cancel).summary())
    except Cancelled:
        final = ("cancelled", {"message": "cancelled"})
    except UserError as e:
        final = ("error", {"error": str(e)})
    except Exception as e:  # a bug: the traceback goes to the server's console, one line to the page
        log.exception("sampling failed")
        final = ("error", {"error": f"internal error: {type(e).__name__}: {e}"})
    finally:
        slot.finish()
    emit(*final)


async def events(queue: asyncio.Queue, cancel: threading.Event, slot: ModelSlot) -> AsyncIterator[str]:
    """The event stream of one request; when its reader goes, the drawing is told to stop."""
    try:
        yield sse("started", {"model": slot.index})
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), HEARTBEAT)
            except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10's is not the builtin)
                yield ": keep-alive\n\n"
                continue
            yield sse(name, data)
            if name in FINAL_EVENTS:
                return
    finally:
        cancel.set()


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def cancel(request: Request) -> Response:
    body = await read_json(request)
    index = body.get("model") if isinstance(body, dict) else None
    return JSONResponse({"cancelled": request.app.state.ui.slot(index).cancel()})


def result_of(request: Request) -> Any:
    wanted = request.path_params["result"]
    for slot in request.app.state.ui.slots:
        if slot.result is not None and slot.result.id == wanted:
            return slot.result
    raise NotFound("no such result (each model keeps its latest only)")


async def result_grid(request: Request) -> Response:
    return png(result_of(request).grid_png())


async def result_gif(request: Request) -> Response:
    data = await asyncio.to_thread(result_of(request).gif)
    return Response(data, media_type="image/gif", headers={"Cache-Control": "no-store"})


async def result_frame(request: Request) -> Response:
    frame = request.path_params
    return png(result_of(request).frame_png(frame["k"], frame["which"]))


async def edit_input(request: Request) -> Response:
    """An image to edit, made model ``model``'s size and channels: the body's upload, or ``image`` of the store."""
    ui: UI = request.app.state.ui
    slot = ui.slot(query_int(request, "model", 0))
    key = request.query_params.get("image")
    image = as_pil(ui.images.get(key)) if key is not None else open_upload(await read_body(request, MAX_UPLOAD_BYTES))
    return JSONResponse(ui.inputs.add(image, slot.loaded.image_shape))


async def edit_input_png(request: Request) -> Response:
    return png(png_bytes(as_pil(request.app.state.ui.inputs.get(request.path_params["key"]))))


def edited_of(request: Request) -> Any:
    wanted = request.path_params["result"]
    for slot in request.app.state.ui.slots:
        if slot.edited is not None and slot.edited.id == wanted:
            return slot.edited
    raise NotFound("no such edit (each model keeps its latest only)")


async def edit_file(request: Request) -> Response:
    return png(edited_of(request).png(request.path_params["name"]))


async def edit_output(request: Request) -> Response:
    return png(edited_of(request).output_png(request.path_params["i"]))


async def upload(request: Request) -> Response:
    data = await read_body(request, MAX_UPLOAD_BYTES)
    return JSONResponse(request.app.state.ui.images.add(data))


async def forward(request: Request) -> Response:
    ui: UI = request.app.state.ui
    diffusion = ui.diffusion(query_int(request, "process", 0))
    x0 = ui.images.get(request.query_params.get("image", "pattern"))
    image = noised(diffusion, x0, query_int(request, "t"), query_int(request, "seed", 0))
    return png(png_bytes(image))


async def process(request: Request) -> Response:
    ui: UI = request.app.state.ui
    index = request.path_params["index"]
    diffusion = ui.diffusion(index)
    return JSONResponse({"label": ui.processes[index].label, **curves(diffusion)})


async def theory(request: Request) -> Response:
    return JSONResponse(theory_section(request.path_params["key"]))


async def theory_page(request: Request) -> Response:
    """The whole of docs/theory.md as text (the one file of the source tree the page may show)."""
    if not THEORY.is_file():
        raise NotFound("docs/theory.md is not installed with the package: read it in the source repository")
    return PlainTextResponse(THEORY.read_text(encoding="utf-8"))


async def refused(request: Request, exc: Exception) -> Response:
    status = exc.status if isinstance(exc, RequestError) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


async def http_error(request: Request, exc: HTTPException) -> Response:
    message = f"no such page: {request.url.path}" if exc.status_code == 404 else exc.detail
    return JSONResponse({"error": message}, status_code=exc.status_code)


ROUTES = [
    Route("/", index),
    Route("/api/state", state),
    Route("/api/sample", sample, methods=["POST"]),
    Route("/api/cancel", cancel, methods=["POST"]),
    Route("/api/results/{result}/grid.png", result_grid),
    Route("/api/results/{result}/trajectory.gif", result_gif),
    Route("/api/results/{result}/frames/{k:int}/{which}.png", result_frame),
    Route("/api/images", upload, methods=["POST"]),
    Route("/api/edit", edit, methods=["POST"]),
    Route("/api/edit/inputs", edit_input, methods=["POST"]),
    Route("/api/edit/inputs/{key}/image.png", edit_input_png),
    Route("/api/edit/results/{result}/{name}.png", edit_file),
    Route("/api/edit/results/{result}/outputs/{i:int}.png", edit_output),
    Route("/api/forward.png", forward),
    Route("/api/process/{index:int}", process),
    Route("/api/theory/{key}", theory),
    Route("/docs/theory.md", theory_page),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]


def create_app(ui: UI, names: Sequence[str] = ()) -> LocalOnly:
    """The ASGI application: the routes behind the Host/Origin checks (``names``: Host names allowed
    besides IP addresses and localhost)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        ui.stop()  # a stopping server stops the drawing too

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={RequestError: refused, UserError: refused, HTTPException: http_error})
    app.state.ui = ui
    return LocalOnly(app, names)


# ---------------------------------------------------------------------------- serving


def load_ui(sources: Sequence[str], weights: str = "ema", device: str = "auto", data: str | None = None,
            quiet: bool = False, bf16: bool | None = None) -> UI:
    """Load the models and ``--data`` for the page, printing what was loaded; ``bf16`` ``None`` is auto,
    decided here once for all of them."""
    resolved = resolve_device(device)
    bf16 = resolve_bf16(bf16, resolved)
    slots = []
    for i, source in enumerate(sources):
        loaded = load_model(source, weights, resolved)
        if len(loaded.image_shape) != 3:
            raise UserError(f"{source} is a video model; ddpm ui draws images (sample it with 'ddpm sample')")
        slot = ModelSlot(i, source, loaded, weights, device, bf16)
        print(f"model {i}: {describe_run(slot.loaded)}")
        slots.append(slot)
    images = None
    if data is not None:
        found = load_images(data, None, split="train", limit=MAX_DATA_IMAGES, progress=not quiet)
        images = ImageStore(found.images, data)
        print(f"data: {len(found.images)} images of {data} for the forward process")
    return UI(slots, images, resolved)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or a one-line :class:`UserError`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port (0: any free one)"
                        ) from None
    sock.listen(128)
    return sock


def allowed_names(listen: str | None) -> list[str]:
    """Host names the page may be opened at besides IP addresses and localhost: with ``--listen``, its
    address and this machine's names."""
    if listen is None:
        return []
    return sorted({listen.lower(), socket.gethostname().lower(), socket.getfqdn().lower()} - {"0.0.0.0", "::", ""})


def serve(sources: Sequence[str], weights: str = "ema", device: str = "auto", data: str | None = None,
          port: int = DEFAULT_PORT, listen: str | None = None, quiet: bool = False, bf16: bool | None = None) -> None:
    """Serve the page until Ctrl-C: on 127.0.0.1 only, unless ``listen`` names an address to bind."""
    ui = load_ui(sources, weights, device, data, quiet, bf16)
    host = listen or "127.0.0.1"
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "localhost"}.get(host, host)
    print(f"ddpm ui: http://{f'[{shown}]' if ':' in shown else shown}:{port}/  (Ctrl-C stops it)", flush=True)
    if listen is not None:
        print(f"ddpm: warning: listening on {host}: anyone who can reach port {port} of this machine can use the "
              "page (there is no password)", flush=True)
    config = uvicorn.Config(create_app(ui, allowed_names(listen)), log_level="warning", timeout_graceful_shutdown=5,
                            lifespan="on")
    server = Server(config, ui)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down; it raises the captured Ctrl-C again on its way out
    finally:
        ui.stop()
        sock.close()
    print("ddpm ui: stopped")


class Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C first cancels the drawing, so that the open event streams end
    (with ``cancelled``) and the graceful shutdown has nothing left to wait for."""

    def __init__(self, config: uvicorn.Config, ui: UI) -> None:
        super().__init__(config)
        self.ui = ui

    def handle_exit(self, sig: int, frame: Any) -> None:
        for slot in self.ui.slots:
            slot.cancel()
        super().handle_exit(sig, frame)
