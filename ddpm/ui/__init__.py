"""``ddpm ui``: a local web page to sample from models, watch the reverse process and explore the forward one.

The page is static (``static/``: HTML, CSS and a little vanilla JavaScript, shipped with the package,
so it works offline); the server (:mod:`ddpm.ui.server`) is Starlette on uvicorn, the optional extra
``ui``, and streams a sampling run's progress and images as server-sent events. Starlette with a static
page won over gradio on what it brings: about 7 packages against about 52, and no analytics to turn
off. The work behind the page knows nothing of HTTP: :mod:`ddpm.ui.sampling` (one request at a time
per model, drawn by :func:`ddpm.generate.generate` as ``ddpm sample`` draws), :mod:`ddpm.ui.forward`
(q(x_t | x_0) and the schedule's curves), :mod:`ddpm.ui.edit` (inpainting under a drawn mask and
img2img, as ``ddpm inpaint`` and ``ddpm img2img`` draw them) and :mod:`ddpm.ui.security` (what a request
must be to be served: the Host and Origin checks against DNS rebinding and cross-site requests).

Nothing else in the library imports this package; ``ddpm ui`` imports it when it runs.
"""

#: Where ``ddpm ui`` listens unless ``--port`` says otherwise.
DEFAULT_PORT = 8765


class RequestError(Exception):
    """A request the server refuses: its one-line message goes back as ``{"error": ...}`` with ``status``."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class Busy(RequestError):
    """The model is drawing for another request (one at a time per model)."""

    status = 409


class NotFound(RequestError):
    status = 404


class TooLarge(RequestError):
    status = 413
