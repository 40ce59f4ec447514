"""Figures: the forward process, the reverse process, the noise schedules, the bound over t, the loss.

Two kinds of figure. Image figures (:func:`forward_process_strip`, :func:`reverse_process_grid`,
:func:`reverse_process_gif`) are grids of images made by :func:`ddpm.images.make_grid` and need only
Pillow. Plots (:func:`plot_schedules`, :func:`plot_bound_terms`, :func:`plot_loss_curve`) need
matplotlib, the optional extra ``viz``; it is imported only when a plot is made, and drawn with
the Agg canvas directly, so no backend is chosen for, and no global state is changed in, the
program that calls these functions.

Timesteps: labels and arguments here are the paper's t (1..T, with t = 0 for the data x_0); the
math core's tensors are 0-based, index i being the paper's t = i + 1 (see :mod:`ddpm.diffusion`).
Images are uint8 ``[N, C, H, W]`` or floats in [-1, 1]; values outside [-1, 1], such as a noisy
x_t, are clamped for display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddpm.checkpoints import atomic_write
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate
from ddpm.images import (
    PADDING,
    PathLike,
    annotate,
    as_float_images,
    auto_scale,
    make_grid,
    save_gif,
    save_image,
    text_width,
)
from ddpm.samplers import default_steps
from ddpm.schedules import SCHEDULES, get_betas

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Fractions of T at which :func:`forward_process_strip` shows x_t by default: for T = 1000 the
#: paper's t = 0, 50, 100, 200, 300, ..., 1000 (dense at the start, where the image fades fastest).
STRIP_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)



# ------------------------------------------------------------------------------- image figures


def forward_process_strip(
    diffusion: GaussianDiffusion,
    images: Tensor,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    scale: int | None = None,
    labels: bool = True,
) -> Image.Image:
    """Real images noised by q(x_t | x_0), [DDPM] eq. 4: one row per image, one column per t.

    Args:
        images: x_0, uint8 ``[N, C, H, W]`` or floats in [-1, 1].
        timesteps: the paper's t for the columns, each in 0..T (t = 0 is x_0 itself, t ≥ 1 is the
            0-based step t − 1); default ``round(f · T)`` for f in :data:`STRIP_FRACTIONS`.
        generator: for the noise; the same generator state gives the same picture.
        scale: tile upscale, default :func:`~ddpm.images.auto_scale` of the image height.
        labels: add a header row with each column's t.

    One noise draw ε per image serves every column, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, so a row shows
    the same image fading into the same noise rather than into fresh noise at every t.
    """
    x0 = as_float_images(images)
    T = diffusion.num_timesteps
    ts = [int(t) for t in timesteps] if timesteps is not None else sorted({round(f * T) for f in STRIP_FRACTIONS})
    bad = [t for t in ts if not 0 <= t <= T]
    if bad or not ts:
        raise UserError(f"strip timesteps are the paper's t in 0..T={T} (0 is the clean image); got {bad or ts}")
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    columns = [x0 if t == 0 else diffusion.q_sample(x0, torch.full((len(x0),), t - 1), noise=eps) for t in ts]
    scale = scale or auto_scale(x0.shape[-2])
    # [N, K, C, H, W] flattened row-major: image n's K columns fill row n of the grid.
    grid = make_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(ts), padding=PADDING, scale=scale)
    return _t_header(grid, ts, (x0.shape[-2] * scale, x0.shape[-1] * scale)) if labels else grid


def reverse_process_grid(
    trajectory: dict[str, Tensor],
    num_images: int = 8,
    num_frames: int = 10,
    scale: int | None = None,
    labels: bool = True,
) -> Image.Image:
    """The reverse process as a grid: for each image, a row of x_t and below it a row of x̂_0.

    Args:
        trajectory: from ``diffusion.sample(..., return_trajectory=True)``: ``timesteps`` [n]
            (0-based original steps, the paper's t − 1), ``x_t`` and ``pred_x0`` [n, B, C, H, W].
        num_images: the first this many of the B images, two grid rows each.
        num_frames: columns, chosen evenly among the n recorded steps, the first (x_T) and the
            last included.
        scale: tile upscale, default :func:`~ddpm.images.auto_scale` of the image height.
        labels: add the paper's t above the columns and "x_t" / "pred x0" beside the rows.

    A column at t shows the input x_t of that reverse step and the model's x̂_0 from it ([DDPM]
    eq. 15, clipped as the sampler clipped it). The last column is t = 1, whose x̂_0 is the sample
    x_0 itself: the last step of both samplers returns x̂_0.
    """
    ts, x_t, pred_x0 = _unpack(trajectory)
    frames = _even_indices(len(ts), num_frames)
    B = min(num_images, x_t.shape[1])
    # [B, 2, K, C, H, W]: per image a row of x_t, then a row of x̂_0, K frames each.
    tiles = torch.stack([x_t[frames, :B], pred_x0[frames, :B]]).permute(2, 0, 1, 3, 4, 5).flatten(0, 2)
    scale = scale or auto_scale(x_t.shape[-2])
    grid = make_grid(tiles, nrow=len(frames), padding=PADDING, scale=scale)
    if not labels:
        return grid
    tile = (x_t.shape[-2] * scale, x_t.shape[-1] * scale)
    return _t_header(grid, [int(ts[i]) + 1 for i in frames], tile, ["x_t", "pred x0"] * B)


def reverse_process_gif(
    trajectory: dict[str, Tensor],
    path: PathLike,
    num_images: int = 16,
    frames: int | None = None,
    duration_ms: int = 80,
    final_hold_ms: int = 1000,
    scale: int | None = None,
    show_pred_x0: bool = False,
    nrow: int | None = None,
) -> Path:
    """An animated GIF of the reverse process: a grid of x_t per recorded step, then the sample x_0.

    Args:
        trajectory: as for :func:`reverse_process_grid`.
        num_images: the first this many images, in a square-ish grid.
        frames: how many of the n recorded steps to show, chosen evenly (first and last kept);
            ``None`` shows them all.
        duration_ms: display time of each step's frame.
        final_hold_ms: display time of the last frame, the sample x_0 (the last step's x̂_0).
        scale: tile upscale, default :func:`~ddpm.images.auto_scale` of the image height.
        show_pred_x0: put the grid of x̂_0 beside the grid of x_t in every frame.
        nrow: images per row of the grid (default: a square-ish grid; a video's frames: one clip a row).

    Every frame carries a caption with the paper's t. Returns ``path``; the GIF has one frame per
    shown step plus the final one (Pillow would merge identical consecutive frames, see
    :func:`~ddpm.images.save_gif`).
    """
    ts, x_t, pred_x0 = _unpack(trajectory)
    steps = _even_indices(len(ts), frames or len(ts))
    B = min(num_images, x_t.shape[1])
    nrow = nrow or math.ceil(math.sqrt(B))
    scale = scale or auto_scale(x_t.shape[-2])

    def frame(x: Tensor, pred: Tensor, caption: str) -> Image.Image:
        panels = [(x, caption), (pred, "pred x0")][: 2 if show_pred_x0 else 1]
        return _hstack_captioned([(make_grid(p, nrow=nrow, padding=PADDING, scale=scale), c) for p, c in panels])

    images = [frame(x_t[i, :B], pred_x0[i, :B], f"x_t  t={int(ts[i]) + 1}") for i in steps]
    images.append(frame(pred_x0[-1, :B], pred_x0[-1, :B], "x_0  (sample)"))
    return save_gif(images, path, [duration_ms] * len(steps) + [final_hold_ms])


def reverse_process_pictures(
    model: Any,
    diffusion: GaussianDiffusion,
    out_dir: PathLike,
    settings: SamplerSettings | None = None,
    num_images: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    bf16: bool | None = None,
    progress: bool = False,
    autoencoder: Any = None,
    **conditions: Any,
) -> list[Path]:
    """Sample 16 images (at least ``num_images``) with their trajectory and write ``reverse.png``
    (:func:`reverse_process_grid` of ``num_images``) and ``reverse.gif`` (:func:`reverse_process_gif`).
    A latent model's ``autoencoder`` decodes the pictures: x_t and x̂_0 as the decoder sees them.

    About 50 steps of the trajectory are recorded, whatever the number of sampling steps. A
    class-conditional model gets the classes in turn, a text-conditional one its prompts;
    ``conditions`` are :func:`~ddpm.generate.generate`'s (``label``, ``prompts``,
    ``negative_prompt``, ``guidance_scale``, ``conditioning``).
    """
    settings = settings or SamplerSettings()
    n = max(num_images, 16)
    total = settings.steps or default_steps(settings.sampler, diffusion.num_timesteps) or diffusion.num_timesteps
    samples = generate(model, diffusion, n, settings, seed=seed, batch_size=n, device=device, bf16=bf16,
                       progress=progress, trajectory_every=max(1, total // 50), autoencoder=autoencoder, **conditions)
    out_dir = Path(out_dir)
    grid = reverse_process_grid(samples.trajectory, num_images=num_images)
    return [save_image(grid, out_dir / "reverse.png"), reverse_process_gif(samples.trajectory, out_dir / "reverse.gif")]


def _unpack(trajectory: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``timesteps`` [n], ``x_t`` and ``pred_x0`` [n, B, C, H, W] from a sampler's trajectory."""
    try:
        ts, x_t, pred_x0 = trajectory["timesteps"], trajectory["x_t"], trajectory["pred_x0"]
    except KeyError as e:
        raise ValueError(f"a trajectory needs 'timesteps', 'x_t' and 'pred_x0' (missing {e})") from None
    if x_t.ndim != 5 or x_t.shape != pred_x0.shape or len(ts) != len(x_t) or len(ts) == 0:
        shapes = ", ".join(str(tuple(v.shape)) for v in (ts, x_t, pred_x0))
        raise ValueError(f"inconsistent trajectory shapes (timesteps, x_t, pred_x0): {shapes}")
    return ts, x_t, pred_x0


def _even_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n-1, both ends included (all n if k ≥ n; the last if k = 1)."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


# ------------------------------------------------------------------------------- labels on images


def _t_header(
    grid: Image.Image, ts: Sequence[int], tile: tuple[int, int], row_labels: Sequence[str] = ()
) -> Image.Image:
    """``grid`` (from make_grid, tiles ``tile`` = (height, width) px) with the paper's t over each column.

    The labels read "t=50" where that fits over a tile, else just "50". ``row_labels`` go to the
    left of the grid's rows, one per row.
    """
    texts = [f"t={t}" for t in ts]
    if max(map(text_width, texts)) > tile[1]:
        texts = [str(t) for t in ts]
    columns = list(zip(_tile_centres(len(ts), tile[1]), texts))
    return annotate(grid, columns, list(zip(_tile_centres(len(row_labels), tile[0]), row_labels)))


def _tile_centres(n: int, size: int) -> list[float]:
    """Where the centres of n tiles of ``size`` px fall along one axis of a make_grid image."""
    return [PADDING + i * (size + PADDING) + size / 2 for i in range(n)]


def _hstack_captioned(panels: Sequence[tuple[Image.Image, str]], gap: int = 8) -> Image.Image:
    """Images side by side, ``gap`` px of white apart, each with its caption centred above it."""
    width = sum(img.width for img, _ in panels) + gap * (len(panels) - 1)
    out = Image.new(panels[0][0].mode, (width, max(img.height for img, _ in panels)), "white")
    x, captions = 0, []
    for img, caption in panels:
        out.paste(img, (x, 0))
        captions.append((x + img.width / 2, caption))
        x += img.width + gap
    return annotate(out, captions)


# ------------------------------------------------------------------------------- plots (matplotlib)


def plot_schedules(T: int = 1000, path: PathLike | None = None) -> Figure | Path:
    """β_t, ᾱ_t and log SNR(t) = log(ᾱ_t / (1 − ᾱ_t)) of the linear and cosine schedules over t = 1..T.

    Three panels (β on a log axis); the linear schedule is [DDPM]'s, scaled by 1000 / T for other T,
    the cosine one [IDDPM] eq. 17. Returns the figure, or writes it to ``path`` (format from the
    extension, e.g. ``.png``) and returns the path.
    """
    fig = new_figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    t = np.arange(1, T + 1)
    for name in SCHEDULES:
        d = GaussianDiffusion(get_betas(name, T))
        acp = d.alphas_cumprod.numpy()
        axes[0].plot(t, d.betas.numpy(), label=name)
        axes[1].plot(t, acp, label=name)
        axes[2].plot(t, np.log(acp) - np.log1p(-acp), label=name)
    labels = [
        (r"$\beta_t$", "variance added at step t (log axis)"),
        (r"$\bar\alpha_t$", r"signal kept: $\bar\alpha_t = \Pi_{s \leq t}\, (1 - \beta_s)$"),
        (r"$\log\,\mathrm{SNR}(t)$", r"$\log\,\bar\alpha_t / (1 - \bar\alpha_t)$"),
    ]
    for ax, (ylabel, title) in zip(axes, labels):
        ax.set(title=title, xlabel="t", ylabel=ylabel, xlim=(0, T))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"Noise schedules, T = {T}")
    return save_figure(fig, path)


def plot_bound_terms(
    terms: Tensor | np.ndarray,
    path: PathLike | None = None,
    prior: float | None = None,
    title: str | None = None,
) -> Figure | Path:
    """The variational bound's terms in bits/dim over the paper's t = 1..T, [DDPM] eq. 5.

    Args:
        terms: ``[T]``, or ``[B, T]`` (averaged over B), as ``bits_per_dim(...)["terms"]``: column
            i is the paper's t = i + 1 and holds L_{t−1}, the KL term at t, with the decoder's
            L_0 at t = 1.
        prior: L_T, the prior term (``prior_bpd``, averaged), added to the total in the title.
        title: replaces the default title, which states the total.

    The terms go on a log axis (L_0 is of order a bit, late terms 1e-6 or less; non-positive values
    are not drawn); the running sum Σ_{s≤t} L_{s−1} on a second, linear axis shows where the bound
    is spent. Returns the figure, or writes it to ``path`` and returns the path.
    """
    terms = torch.as_tensor(terms, dtype=torch.float64).cpu()
    if terms.ndim == 2:
        terms = terms.mean(dim=0)
    if terms.ndim != 1 or len(terms) == 0:
        raise ValueError(f"expected bound terms [T] or [B, T], got shape {tuple(terms.shape)}")
    t = np.arange(1, len(terms) + 1)
    cumulative = terms.cumsum(0).numpy()
    total = cumulative[-1] + (prior or 0.0)
    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    # L_0 as a marker of its own: on the line it is one point at the axis's left edge.
    ax.plot(t[1:], terms[1:].numpy(), color="C0", label=r"KL terms $L_{t-1}$")
    ax.plot(t[:1], terms[:1].numpy(), "o", color="C0", label=r"decoder $L_0$ (t = 1)")
    ax.set(yscale="log", xlabel="t", ylabel="bits/dim per term", xlim=(0, len(terms) + 1))
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(t, cumulative, color="C1", label=r"cumulative $\Sigma_{s \leq t}\, L_{s-1}$ (right axis)")
    ax2.set_ylabel("cumulative bits/dim")
    # On the second axes, which is drawn on top, so that no curve crosses the legend.
    ax2.legend(handles=ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0], loc="center right")
    prior_text = f" with prior $L_T$ = {prior:.2g}" if prior is not None else ""
    ax.set_title(title or f"Variational bound: {total:.4f} bits/dim{prior_text}")
    return save_figure(fig, path)


def plot_loss_curve(metrics_jsonl_path: PathLike, path: PathLike, smoothing: float = 0.9) -> Path:
    """Training loss against step from a JSONL metrics file, raw and smoothed; written to ``path``.

    Reads the lines that have both ``step`` and ``loss`` (others, e.g. evaluation records, are
    skipped; so is a cut-off last line from an interrupted run). The smoothed curve is an
    exponential moving average with weight ``smoothing`` on the past, bias-corrected like
    TensorBoard's so that it starts at the first values rather than at 0. The y axis is
    logarithmic when every loss is positive.
    """
    steps, losses = _read_loss_records(Path(metrics_jsonl_path))
    ema, smoothed = 0.0, []
    for i, value in enumerate(losses):
        ema = smoothing * ema + (1 - smoothing) * value
        smoothed.append(ema / (1 - smoothing ** (i + 1)))
    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=0.8, label="loss")
    ax.plot(steps, smoothed, color="C0", label=f"EMA ({smoothing})")
    ax.set(xlabel="step", ylabel="loss", title=f"Training loss ({Path(metrics_jsonl_path).name})")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _read_loss_records(metrics: Path) -> tuple[list[float], list[float]]:
    try:
        lines = metrics.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read the metrics file {metrics}: {e.strerror or e}") from e
    steps, losses = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a line cut off by an interrupted run
                break
            raise UserError(f"{metrics}:{n} is not a JSON line") from None
        if isinstance(record, dict) and "step" in record and "loss" in record:
            steps.append(float(record["step"]))
            losses.append(float(record["loss"]))
    if not losses:
        raise UserError(f"{metrics} has no lines with both 'step' and 'loss'")
    return steps, losses


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib Figure on its own Agg canvas: no pyplot, no backend switch, nothing global."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError("plots need matplotlib: pip install matplotlib (or 'ddpm[viz]')") from e
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike | None, dpi: int = 120) -> Figure | Path:
    """The figure itself, or the path it was written to (atomically; format from the extension)."""
    if path is None:
        return fig
    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"cannot save a plot as {path}: use .png, .pdf or .svg")
    with atomic_write(path, durable=False) as f:
        fig.savefig(f, format=fmt, dpi=dpi)
    return Path(path)
