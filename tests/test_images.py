"""ddpm.images: uint8 conversion, grids against a brute-force layout, atomic PNG / GIF / npz writing."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoints import atomic_write
from ddpm.errors import UserError
from ddpm.images import auto_scale, make_grid, save_gif, save_image, save_npz, save_pngs, to_uint8


def random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_to_uint8_inverts_the_data_scaling_on_all_256_levels(dtype):
    # bfloat16 would be off by one on the upper levels if the arithmetic stayed in bfloat16.
    levels = torch.arange(256, dtype=torch.uint8)
    x = (levels.double() / 127.5 - 1).to(dtype)
    assert torch.equal(to_uint8(x), levels)


def test_to_uint8_clamps_and_maps_nan_to_grey():
    x = torch.tensor([-3.0, -1.004, 1.004, 2.0, float("inf"), float("nan")])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 255, 128]


# ------------------------------------------------------------------------------ grids


def brute_force_grid(x: np.ndarray, nrow: int, padding: int, pad_value: int, scale: int) -> np.ndarray:
    """The grid [H', W', C] pixel by pixel, from the layout rule alone."""
    N, C, H, W = x.shape
    cols = min(nrow, N)
    rows = -(-N // cols)
    h, w = H * scale, W * scale
    out = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, C), pad_value, np.uint8)
    for n in range(N):
        top, left = padding + (n // cols) * (h + padding), padding + (n % cols) * (w + padding)
        for i in range(h):
            for j in range(w):
                out[top + i, left + j] = x[n, :, i // scale, j // scale]
    return out


@pytest.mark.parametrize(
    "N, C, nrow, padding, pad_value, scale",
    [(5, 1, 3, 2, 255, 2), (7, 3, 4, 1, 0, 3), (2, 1, 8, 0, 255, 1), (4, 3, 2, 3, 128, 1)],
)
def test_make_grid_matches_a_brute_force_layout(N, C, nrow, padding, pad_value, scale):
    x = random_uint8(N, C, 3, 4)
    img = make_grid(x, nrow=nrow, padding=padding, pad_value=pad_value, scale=scale)
    cols, rows = min(nrow, N), -(-N // min(nrow, N))
    assert img.size == (cols * (4 * scale + padding) + padding, rows * (3 * scale + padding) + padding)
    assert img.mode == ("L" if C == 1 else "RGB")
    pixels = np.asarray(img).reshape(img.height, img.width, C)
    np.testing.assert_array_equal(pixels, brute_force_grid(x.numpy(), nrow, padding, pad_value, scale))


def test_make_grid_tiles_sit_where_the_size_formula_says():
    x = random_uint8(5, 1, 3, 4)
    a = np.asarray(make_grid(x, nrow=3, padding=2, scale=2))  # tiles 8 wide, 6 high; pitch 10 by 8
    np.testing.assert_array_equal(a[2:8, 2:10], np.kron(x[0, 0].numpy(), np.ones((2, 2), np.uint8)))
    np.testing.assert_array_equal(a[10:16, 12:20], np.kron(x[4, 0].numpy(), np.ones((2, 2), np.uint8)))
    assert (a[10:16, 22:30] == 255).all()  # the empty sixth cell
    assert (a[0:2] == 255).all() and (a[:, 20:22] == 255).all()


def test_make_grid_default_nrow_is_about_the_square_root():
    assert make_grid(random_uint8(10, 1, 2, 2), padding=0).size == (8, 6)  # 4 columns, 3 rows


def test_make_grid_accepts_floats_in_minus_one_one():
    x = random_uint8(4, 3, 5, 5)
    img = make_grid(x.float() / 127.5 - 1, scale=2)
    assert np.array_equal(np.asarray(img), np.asarray(make_grid(x, scale=2)))


def test_make_grid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        make_grid(random_uint8(2, 2, 4, 4))
    with pytest.raises(ValueError):
        make_grid(random_uint8(1, 4, 4))


def test_auto_scale_brings_tiles_to_comfortable_sizes():
    assert [auto_scale(s) for s in (8, 16, 28, 32, 64, 256)] == [8, 4, 2, 2, 1, 1]


# ------------------------------------------------------------------------------ atomic writing


def test_save_image_writes_a_png_that_reloads_equal_and_leaves_no_temp_files(tmp_path):
    img = make_grid(random_uint8(3, 3, 6, 6))
    path = save_image(img, tmp_path / "a" / "b" / "grid.png")
    assert path == tmp_path / "a" / "b" / "grid.png"
    assert os.listdir(path.parent) == ["grid.png"]
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == "RGB"
        assert np.array_equal(np.asarray(back), np.asarray(img))


def test_save_image_wants_an_extension(tmp_path):
    with pytest.raises(UserError, match="extension"):
        save_image(Image.new("L", (2, 2)), tmp_path / "grid")


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    with pytest.raises(RuntimeError, match="boom"), atomic_write(path, durable=False) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_file_system_errors_are_user_errors_and_writer_bugs_are_not(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match="cannot create"), atomic_write(tmp_path / "file" / "x.png"):
        pass

    with pytest.raises(OSError) as info, atomic_write(tmp_path / "y.png", durable=False):
        raise OSError("cannot write mode F as PNG")  # what Pillow raises: an OSError with no errno
    assert not isinstance(info.value, UserError)
    assert os.listdir(tmp_path) == ["file"]


def test_save_gif_has_every_frame_and_holds_the_last(tmp_path):
    frames = [make_grid(random_uint8(4, 1, 5, 5, seed=k)) for k in range(5)]
    path = save_gif(frames, tmp_path / "anim.gif", duration_ms=[50, 50, 50, 50, 1000])
    assert os.listdir(tmp_path) == ["anim.gif"]
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["loop"] == 0
        for k, frame in enumerate(frames):
            gif.seek(k)
            assert gif.info["duration"] == (1000 if k == 4 else 50)
            assert np.array_equal(np.asarray(gif.convert("L")), np.asarray(frame))


def test_save_gif_checks_durations_and_frame_sizes(tmp_path):
    with pytest.raises(ValueError, match="durations"):
        save_gif([Image.new("L", (2, 2))] * 2, tmp_path / "a.gif", duration_ms=[10])
    with pytest.raises(ValueError, match="one size"):
        save_gif([Image.new("L", (2, 2)), Image.new("L", (2, 3))], tmp_path / "a.gif")


@pytest.mark.parametrize("C", [1, 3])
def test_save_pngs_numbers_files_from_start_index(tmp_path, C):
    x = random_uint8(3, C, 4, 5)
    paths = save_pngs(x, tmp_path / "samples", start_index=7)
    assert [p.name for p in paths] == ["000007.png", "000008.png", "000009.png"]
    assert sorted(os.listdir(tmp_path / "samples")) == ["000007.png", "000008.png", "000009.png"]
    for p, img in zip(paths, x):
        with Image.open(p) as back:
            assert np.array_equal(np.asarray(back).reshape(4, 5, C), img.permute(1, 2, 0).numpy())


def test_save_npz_writes_nhwc_uint8_and_labels(tmp_path):
    x = random_uint8(6, 3, 4, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 9])
    path = save_npz(x, tmp_path / "samples_6x4x5x3.npz", labels=labels)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (6, 4, 5, 3)
        assert np.array_equal(f["arr_0"], x.permute(0, 2, 3, 1).numpy())
        assert np.array_equal(f["arr_1"], labels.numpy())
    # Floats are converted, grey keeps its channel axis, and a name without ".npz" is kept as given.
    grey = random_uint8(2, 1, 3, 3)
    path = save_npz(grey.float() / 127.5 - 1, tmp_path / "grey")
    assert sorted(os.listdir(tmp_path)) == ["grey", "samples_6x4x5x3.npz"]
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        assert np.array_equal(f["arr_0"], grey.permute(0, 2, 3, 1).numpy())
