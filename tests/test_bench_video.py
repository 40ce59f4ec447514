"""The Moving MNIST benchmark runs end to end on tiny data (an untrained model); its numbers are not checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpm.models import VideoUNet, get_video_preset
from ddpm.video_data import write_moving_mnist


@pytest.mark.slow
def test_video_mnist_runs_on_tiny_data(tmp_path, capsys, monkeypatch):
    from bench.video_mnist import main, ssim

    monkeypatch.setenv("DDPM_BENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    digits = np.zeros((200, 28, 28), np.uint8)
    for i in range(200):  # a bar whose place is its class
        k = i % 10
        digits[i, 4 + 2 * k:6 + 2 * k, 6:22] = rng.integers(150, 256)
    np.savez(tmp_path / "mnist.npz", x_train=digits, y_train=np.arange(200) % 10, x_test=digits[:50],
             y_test=np.arange(50) % 10)
    data = write_moving_mnist(tmp_path / "mnist.npz", tmp_path / "mm.npz", num_videos=8, num_test=6, frames=8,
                              size=32, num_digits=1)
    VideoUNet(get_video_preset("moving-mnist")).save_pretrained(tmp_path / "model")
    results = main(["--run", str(tmp_path / "model"), "--data", str(data), "--mnist", str(tmp_path / "mnist.npz"),
                    "--out", str(tmp_path / "out"), "--num-samples", "6", "--num-continued", "3", "--weights", "2",
                    "--steps", "2", "--classifier-epochs", "0.7"])
    assert set(results["continuation"]["methods"]) == {"replacement", "reconstruction w=2"}
    assert len(results["continuation"]["methods"]["replacement"]["mse"]) == 6
    assert 0 <= results["class_consistency"]["test_clips"] <= 1
    assert (tmp_path / "out" / "samples.gif").is_file() and (tmp_path / "out" / "continuations.png").is_file()
    assert "| replacement |" in capsys.readouterr().out
    # SSIM: 1 for equal frames, lower for different ones.
    a = torch.rand(2, 1, 16, 16)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64)) and (ssim(a, 1 - a) < 0.5).all()
