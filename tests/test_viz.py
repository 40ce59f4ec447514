"""ddpm.viz: the forward strip and reverse-process figures from real diffusions, and the plots."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, images, linear_betas, viz
from ddpm.errors import UserError
from ddpm.images import to_uint8

PITCH = 16 + viz.PADDING  # 16 x 16 images at scale 1


def binary_images(n: int, size: int = 16, seed: int = 123) -> torch.Tensor:
    """uint8 [n, 1, size, size] of 0 / 255: the most variance, so correlations are clear.

    (Not seed 0: the strips' noise is drawn from seed 0, and torch's rand and randn from one seed
    are correlated.)
    """
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.uint8) * 255


def tile(a: np.ndarray, row: int, col: int, size: int = 16, top: int = 0) -> np.ndarray:
    y, x = top + viz.PADDING + row * (size + viz.PADDING), viz.PADDING + col * (size + viz.PADDING)
    return a[y : y + size, x : x + size]


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


# ------------------------------------------------------------------------------ forward process


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(linear_betas(1000))


def strip(diffusion, x, seed=0, **kwargs):
    return viz.forward_process_strip(diffusion, x, generator=torch.Generator().manual_seed(seed), scale=1, **kwargs)


def test_forward_strip_layout_and_the_paper_s_default_timesteps(diffusion):
    x = binary_images(3)
    img = strip(diffusion, x, labels=False)
    ts = [0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert img.mode == "L" and img.size == (len(ts) * PITCH + viz.PADDING, 3 * PITCH + viz.PADDING)
    a = np.asarray(img)
    for n in range(3):
        assert np.array_equal(tile(a, n, 0), x[n, 0].numpy())  # t = 0 is the image itself
        assert corr(tile(a, n, 1), x[n, 0].numpy()) > 0.9  # t = 50: sqrt(alpha_bar) = 0.99
        assert abs(corr(tile(a, n, 11), x[n, 0].numpy())) < 0.3  # t = T: sqrt(alpha_bar) = 0.006


def test_forward_strip_shares_one_noise_draw_across_a_row(diffusion):
    # From x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, recover eps at t = 300 and t = 700 (pixels that
    # were not clamped): the same draw if the noise is shared, independent draws otherwise.
    x = binary_images(2)
    a = np.asarray(strip(diffusion, x, timesteps=[300, 700], labels=False)).astype(float) / 127.5 - 1
    x0 = x.numpy().astype(float) / 127.5 - 1
    for n in range(2):
        eps, inside = [], np.ones((16, 16), bool)
        for col, t in enumerate([300, 700]):
            abar = diffusion.alphas_cumprod[t - 1].item()
            x_t = tile(a, n, col)
            inside &= np.abs(x_t) < 1
            eps.append((x_t - abar**0.5 * x0[n, 0]) / (1 - abar) ** 0.5)
        assert inside.sum() > 50
        assert corr(eps[0][inside], eps[1][inside]) > 0.99


def test_forward_strip_is_reproducible_and_accepts_floats(diffusion):
    x = binary_images(2)
    a = np.asarray(strip(diffusion, x, seed=1))
    assert np.array_equal(a, np.asarray(strip(diffusion, x, seed=1)))
    assert np.array_equal(a, np.asarray(strip(diffusion, x.float() / 127.5 - 1, seed=1)))
    assert not np.array_equal(a, np.asarray(strip(diffusion, x, seed=2)))


def test_forward_strip_labels_add_a_header_above_the_same_grid(diffusion):
    x = binary_images(2)
    plain, labelled = strip(diffusion, x, labels=False), strip(diffusion, x, labels=True)
    header = labelled.height - plain.height
    assert labelled.width == plain.width and 8 <= header <= 30
    a = np.asarray(labelled)
    assert np.array_equal(a[header:], np.asarray(plain))
    assert (a[:header] < 128).any()  # some text was drawn


def test_forward_strip_timesteps_scale_with_T_and_are_checked():
    d = GaussianDiffusion(linear_betas(100))
    x = binary_images(1, size=8)
    img = viz.forward_process_strip(d, x, labels=False)  # t = 0, 5, 10, 20, ..., 100 at auto scale 8
    assert img.size == (12 * (64 + viz.PADDING) + viz.PADDING, 64 + 2 * viz.PADDING)
    with pytest.raises(UserError, match="0..T=100"):
        viz.forward_process_strip(d, x, timesteps=[0, 101])


# ------------------------------------------------------------------------------ reverse process


@pytest.fixture(scope="module")
def trajectory():
    d = GaussianDiffusion(linear_betas(100))
    x, traj = d.sample(
        lambda x, t: torch.tanh(x), (4, 1, 8, 8), sampler="ddpm", generator=torch.Generator().manual_seed(0),
        return_trajectory=True, trajectory_every=10,
    )
    assert traj["timesteps"].tolist() == [99, 89, 79, 69, 59, 49, 39, 29, 19, 9, 0]
    return x, traj


def test_reverse_grid_rows_alternate_x_t_and_pred_x0_over_even_frames(trajectory):
    sample, traj = trajectory
    img = viz.reverse_process_grid(traj, num_images=3, num_frames=5, scale=1, labels=False)
    pitch = 8 + viz.PADDING
    assert img.size == (5 * pitch + viz.PADDING, 6 * pitch + viz.PADDING)
    a = np.asarray(img)
    frames = [0, 2, 5, 8, 10]  # 5 of the 11 records, evenly, both ends kept
    for b in range(3):
        for col, k in enumerate(frames):
            assert np.array_equal(tile(a, 2 * b, col, 8), to_uint8(traj["x_t"][k, b, 0]).numpy())
            assert np.array_equal(tile(a, 2 * b + 1, col, 8), to_uint8(traj["pred_x0"][k, b, 0]).numpy())
        # The last step's x̂_0 is the sample, as the docstring says.
        assert np.array_equal(tile(a, 2 * b + 1, 4, 8), to_uint8(sample[b, 0]).numpy())


def test_reverse_grid_labels_and_frame_count(trajectory):
    _, traj = trajectory
    plain = viz.reverse_process_grid(traj, num_frames=50, labels=False)  # more than recorded: all 11
    assert plain.size == (11 * (64 + viz.PADDING) + viz.PADDING, 8 * (64 + viz.PADDING) + viz.PADDING)
    labelled = viz.reverse_process_grid(traj, num_frames=50)
    assert labelled.width > plain.width and labelled.height > plain.height


@pytest.mark.parametrize("show_pred_x0", [False, True])
def test_reverse_gif_frames_durations_and_size(tmp_path, trajectory, show_pred_x0):
    sample, traj = trajectory
    path = viz.reverse_process_gif(
        traj, tmp_path / "rev.gif", num_images=4, frames=4, duration_ms=40, final_hold_ms=700,
        scale=2, show_pred_x0=show_pred_x0,
    )
    grid = 2 * (16 + viz.PADDING) + viz.PADDING  # 4 images, 2 x 2, 16 px tiles
    with Image.open(path) as gif:
        assert gif.n_frames == 4 + 1  # the chosen steps, then the sample
        assert gif.width == (2 * grid + 8 if show_pred_x0 else grid) and gif.height > grid
        gif.seek(0)
        assert gif.info["duration"] == 40
        gif.seek(4)  # the caption of this frame differs; the GIF must not crop the frame to fit the first
        assert gif.info["duration"] == 700
        last = np.asarray(gif.convert("L"))[-grid:, :grid]
    expected = np.asarray(viz.make_grid(sample, nrow=2, scale=2))
    assert np.array_equal(last, expected)


# ------------------------------------------------------------------------------ plots


def assert_png(path, min_size=(300, 200)):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_size[0] and img.height >= min_size[1]


@pytest.mark.slow
def test_plot_schedules_writes_a_png_or_returns_a_figure(tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    path = viz.plot_schedules(T=100, path=tmp_path / "plots" / "schedules.png")
    assert path == tmp_path / "plots" / "schedules.png"
    assert_png(path, (1000, 300))
    fig = viz.plot_schedules(T=50)
    assert len(fig.axes) == 3 and all(ax.get_xlabel() == "t" for ax in fig.axes)
    assert fig.axes[0].get_lines()[0].get_xdata()[0] == 1  # the paper's t = 1..T
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # no pyplot, no global backend


@pytest.mark.slow
def test_plot_bound_terms_averages_a_batch_and_states_the_total(tmp_path):
    terms = torch.cat([torch.full((3, 1), 2.0), torch.full((3, 99), 1e-3)], dim=1)
    fig = viz.plot_bound_terms(terms, prior=0.001)
    assert "2.1000 bits/dim" in fig.axes[0].get_title()  # 2 + 99e-3 + 1e-3
    assert fig.axes[0].get_yscale() == "log"
    assert_png(viz.plot_bound_terms(terms[0], tmp_path / "bound.png", title="x"))
    with pytest.raises(UserError, match=".png"):
        viz.plot_bound_terms(terms, tmp_path / "bound.xyz")


def test_plot_loss_curve_reads_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (1 + s)}) for s in range(0, 200, 10)]
    lines.insert(3, json.dumps({"step": 30, "eval_bpd": 3.2}))
    metrics.write_text("\n".join(lines) + '\n{"step": 200, "lo')  # cut off by an interrupted run
    assert_png(viz.plot_loss_curve(metrics, tmp_path / "loss.png"))

    metrics.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(UserError, match=":2 is not a JSON line"):
        viz.plot_loss_curve(metrics, tmp_path / "loss.png")
    metrics.write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="no lines"):
        viz.plot_loss_curve(metrics, tmp_path / "loss.png")
    with pytest.raises(UserError, match="cannot read"):
        viz.plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "loss.png")


def test_without_matplotlib_plots_say_how_to_install_it_and_images_still_work(monkeypatch, diffusion):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install matplotlib \(or 'ddpm\[viz\]'\)"):
        viz.plot_schedules(T=10)
    with pytest.raises(UserError, match="pip install matplotlib"):
        viz.plot_bound_terms(torch.ones(10))
    assert strip(diffusion, binary_images(1)).mode == "L"


def test_labelled_rows_stack_one_grid_per_label():
    rows = [(torch.zeros(3, 1, 8, 8), "ddim (10 NFE)"), (torch.ones(3, 1, 8, 8), "dpm++2m (10 NFE)")]
    img = images.labelled_rows(rows, scale=2)
    grid = images.make_grid(rows[0][0], nrow=3, padding=images.PADDING, scale=2)
    assert img.height == 2 * grid.height and img.width > grid.width  # the labels take a margin on the left
    pixels = np.asarray(img.convert("L"))
    left = img.width - grid.width
    # The first row's images are mid-grey (0 in [-1, 1]), the second's white; the margin holds dark text.
    assert abs(int(pixels[grid.height // 2, left + grid.width // 2]) - 128) <= 1
    assert pixels[grid.height + grid.height // 2, left + grid.width // 2] == 255
    assert pixels[:, :left].min() < 100
