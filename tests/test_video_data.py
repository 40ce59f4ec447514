"""Video data: arrays and files in, the batch stream's guarantees, and Moving MNIST's physics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import Batch
from ddpm.errors import UserError
from ddpm.video_data import VideoData, bouncing_trajectories, load_videos, moving_mnist, read_video, write_moving_mnist

# The project's real data sets sit beside the clone, in ../shared/data (as tests/test_data.py finds them).
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
HAS_FFMPEG = importlib.util.find_spec("imageio") is not None and importlib.util.find_spec("imageio_ffmpeg") is not None


def _npz(path, n=6, frames=8, side=8):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, frames, side, side), dtype=np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(n) % 3, x_test=x[:2], y_test=np.arange(2))
    return path, x


def test_npz_clips_are_kept_bit_for_bit(tmp_path):
    path, x = _npz(tmp_path / "v.npz")
    data = load_videos(path)
    assert isinstance(data, VideoData) and data.videos.shape == (6, 1, 8, 8, 8) and data.num_classes == 3
    assert np.array_equal(data.videos[:, 0].numpy(), x)
    assert "6 clips of 8 frames" in data.describe()
    # Windows: 8 frames give two clips of 4, in order; labels follow their video.
    halves = load_videos(path, frames=4)
    assert len(halves) == 12 and torch.equal(halves.videos[1, 0], torch.from_numpy(x[0, 4:]))
    assert halves.labels[:4].tolist() == [0, 0, 1, 1]
    test = load_videos(path, split="test", size=4)
    assert test.videos.shape == (2, 1, 8, 4, 4)


def test_batches_are_a_function_of_seed_step_and_rank(tmp_path):
    data = load_videos(_npz(tmp_path / "v.npz", n=10)[0])
    run = data.batches(2, seed=3, image_frames=2)
    first = [next(run) for _ in range(7)]
    resumed = data.batches(2, seed=3, image_frames=2, start_step=4)
    for expected in first[4:]:
        got = next(resumed)
        assert isinstance(got, Batch) and torch.equal(got.x, expected.x) and torch.equal(got.idx, expected.idx)
    b = first[0]
    assert b.x.shape == (2, 1, 10, 8, 8) and b.x.min() >= -1 and b.x.max() <= 1
    # The clips are whole; the two appended frames are frames of some clip of the set.
    torch.testing.assert_close(b.x[:, :, :8], data.to_float(b.idx))
    pool = data.videos.transpose(1, 2).reshape(-1, 1, 8, 8).float() / 127.5 - 1
    for frame in b.x[:, :, 8:].transpose(1, 2).reshape(-1, 1, 8, 8):
        assert (pool - frame).abs().flatten(1).max(1).values.min() == 0
    # Two ranks: disjoint shards of one shuffle.
    a, c = next(data.batches(2, 3, rank=0, world_size=2)), next(data.batches(2, 3, rank=1, world_size=2))
    assert not set(a.idx.tolist()) & set(c.idx.tolist())
    with pytest.raises(UserError, match="image_frames"):
        next(data.batches(2, 3, image_frames=-1))


def _gif(path, frames, size=(10, 12)):
    images = [Image.fromarray(np.full(size[::-1], 40 * i, np.uint8)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def test_gif_folder(tmp_path):
    for i in range(3):
        _gif(tmp_path / f"clip{i}.gif", 4)
    data = load_videos(tmp_path, size=8)
    assert data.videos.shape == (3, 1, 4, 8, 8)  # grey GIFs are read as one channel
    assert data.videos[0, 0, :, 4, 4].tolist() == [0, 40, 80, 120]
    assert load_videos(tmp_path, size=8, channels=3).channels == 3


def test_bad_videos_get_one_line(tmp_path):
    _gif(tmp_path / "still.gif", 1)
    with pytest.raises(UserError, match="1 frame"):
        read_video(tmp_path / "still.gif")
    with pytest.raises(UserError, match="no video has 9 frames"):
        load_videos(_npz(tmp_path / "v.npz")[0], frames=9)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(UserError, match="not videos"):
        load_videos(tmp_path / "bad.npy")
    with pytest.raises(UserError, match="no such"):
        load_videos(tmp_path / "missing.npz")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FFMPEG, reason="MP4 needs imageio and imageio-ffmpeg (pip install 'ddpm[video]')")
def test_mp4_round_trip(tmp_path):
    from ddpm.images import save_mp4

    video = np.zeros((6, 16, 16, 3), np.uint8)
    for t in range(6):
        video[t, 4:12, 2 * t:2 * t + 4] = 255
    save_mp4(list(video), tmp_path / "a.mp4", fps=8)
    frames = read_video(tmp_path / "a.mp4")
    assert frames.shape == (6, 16, 16, 3)
    assert np.abs(frames.astype(int) - video).mean() < 8  # lossy, but the square is where it was


# ------------------------------------------------------------------------------------------- Moving MNIST


def _between_bounces(trajectory):
    """Frame pairs (t, t+1) with no wall touched at t or t + 1 (where the velocity flips)."""
    inside = (trajectory > 0).all(-1) & (trajectory < 1).all(-1)
    return [t for t in range(len(trajectory) - 1) if inside[t] and inside[t + 1]]


def test_trajectories_move_at_constant_velocity_and_bounce():
    traj = bouncing_trajectories(200, 30, 0.1, np.random.default_rng(0))
    assert traj.min() >= 0 and traj.max() <= 1
    steps = np.diff(traj, axis=1)
    bounces = 0
    for k in range(200):
        pairs = _between_bounces(traj[k])
        # The step is the same vector between bounces: speed 0.1, the direction per wall flips only.
        flat = steps[k, pairs]
        assert np.allclose(np.linalg.norm(flat, axis=1), 0.1)
        assert np.allclose(np.abs(flat), np.abs(flat[0]))
        bounces += len(pairs) < 29
    assert bounces > 50  # the walls are met often at this speed


@pytest.mark.slow
@pytest.mark.parametrize("source", ["synthetic", "mnist"])
def test_digits_are_drawn_where_the_trajectory_says_and_move_uniformly(source):
    if source == "mnist":
        if not MNIST.is_file():
            pytest.skip(f"{MNIST} is not here")
        with np.load(MNIST) as f:
            digits, labels = f["x_test"][:500], f["y_test"][:500]
    else:
        digits = np.zeros((5, 28, 28), np.uint8)
        for i in range(5):
            digits[i, 6 + i:14 + i, 10:16] = 50 * (i + 1)  # distinct sprites, away from the borders
        labels = np.arange(5)
    made = moving_mnist(digits, labels, n=20, frames=12, size=64, num_digits=1, seed=1)
    assert made.videos.shape == (20, 12, 64, 64) and made.labels.shape == (20, 1)
    canvas = 64 - 28
    assert np.array_equal(made.positions, (made.trajectories * canvas).astype(np.int64))
    for v in range(20):
        # The frame is the digit at its position on black (one digit: nothing overlaps).
        found = _digit_index(made.videos[v, 0], made.positions[v, 0, 0], digits)
        assert labels[found] == made.labels[v, 0]
        for t in range(12):
            top, left = made.positions[v, 0, t]
            expected = np.zeros((64, 64), np.uint8)
            expected[top:top + 28, left:left + 28] = digits[found]
            assert np.array_equal(made.videos[v, t], expected)
        # From the pixels alone: the digit's shift per frame, found exactly, has the same size in every
        # frame off the walls up to the truncation to whole pixels (a pixel at most), the walls flipping
        # only its signs, and it is the trajectory's step to within that pixel.
        shifts = np.array([_shift(made.videos[v, t], made.videos[v, t + 1]) for t in range(11)])
        pairs = _between_bounces(made.trajectories[v, 0])
        assert np.ptp(np.abs(shifts[pairs]), axis=0).max() <= 1
        steps = np.diff(made.trajectories[v, 0], axis=0) * canvas
        assert np.all(np.abs(shifts[pairs] - steps[pairs]) < 1)


def _digit_index(frame, position, digits):
    top, left = position
    window = frame[top:top + 28, left:left + 28]
    return next(i for i, d in enumerate(digits) if np.array_equal(d, window))


def _shift(a, b, reach=6):
    """The (rows, columns) offset that moves frame a onto frame b exactly."""
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if np.array_equal(np.roll(a, (dy, dx), axis=(0, 1)), b):
                return dy, dx
    raise AssertionError("no exact shift")


def test_moving_mnist_file_loads_as_videos(tmp_path):
    digits = np.zeros((50, 28, 28), np.uint8)
    digits[:, 8:20, 10:18] = 200
    np.savez(tmp_path / "mnist.npz", x_train=digits, y_train=np.arange(50) % 10, x_test=digits[:10],
             y_test=np.arange(10))
    out = write_moving_mnist(tmp_path / "mnist.npz", tmp_path / "mm.npz", num_videos=12, num_test=4, frames=8,
                             size=32, num_digits=1, seed=0)
    data = load_videos(out)
    with np.load(out) as f:
        assert data.videos.shape == (12, 1, 8, 32, 32)
        assert data.num_classes == max(f["y_train"].max(), f["y_test"].max()) + 1  # classes of both splits
        assert torch.equal(data.labels, torch.from_numpy(f["y_train"]).long())
        assert f["positions_train"].shape == (12, 1, 8, 2)
        assert f["x_test"].shape == (4, 8, 32, 32)
    again = write_moving_mnist(tmp_path / "mnist.npz", tmp_path / "mm2.npz", num_videos=12, num_test=4, frames=8,
                               size=32, num_digits=1, seed=0)
    with np.load(out) as f, np.load(again) as g:
        assert np.array_equal(f["x_train"], g["x_train"])  # seeded
