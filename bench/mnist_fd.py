"""The Fréchet distance of MNIST samples in the features of a small MNIST classifier trained here.

No download: the Inception network of FID cannot be fetched on these machines, so the scores of
bench/ use the 128-d penultimate layer of a small CNN trained (seeded) on the MNIST training split.
``FeatureSpace`` trains it once per data file and seed and caches its weights (safetensors) under
bench/out/, so that every benchmark scores in the same features; it also holds the test images'
features and the floor (the distance between as many training images and the test set).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.checkpoints import load_state_dict, save_state_dict
from ddpm.data import ImageData, load_images

#: Where the classifier's weights are cached ($DDPM_BENCH_CACHE, else bench/out).
CACHE = Path(os.environ.get("DDPM_BENCH_CACHE", Path(__file__).with_name("out")))


class Classifier(nn.Module):
    """A small MNIST CNN; its 128-d penultimate layer is the feature space of the Fréchet distance."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_classifier(train: ImageData, test: ImageData, epochs: float, seed: int) -> tuple[Classifier, float]:
    torch.manual_seed(seed)
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    steps = int(epochs * len(train) / 128)
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(math.ceil(epochs))])
    for i in range(steps):
        idx = order[i * 128:(i + 1) * 128]
        loss = F.cross_entropy(net(train.to_float(idx)), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(test.to_float(slice(i, i + 1000))).argmax(1) for i in range(0, len(test), 1000)])
    return net, (pred == test.labels).float().mean().item()


@torch.no_grad()
def features(net: Classifier, x: Tensor) -> np.ndarray:
    return torch.cat([net.features(x[i:i + 500]) for i in range(0, len(x), 500)]).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), the matrix square root through eigenvalues of Σa^½ Σb Σa^½."""
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())



class FeatureSpace:
    """The classifier's features of the MNIST test split, and distances of samples to them."""

    def __init__(self, data: str | Path, seed: int = 0, epochs: float = 1.0, cache: Path | None = None) -> None:
        cache = Path(os.environ.get("DDPM_BENCH_CACHE", CACHE)) if cache is None else cache
        self.train = load_images(data, 28, 1, split="train")
        self.test = load_images(data, 28, 1, split="test")
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()[:12]
        path = cache / f"mnist_classifier_{digest}_s{seed}_e{epochs:g}.safetensors"
        self.classifier = Classifier()
        if path.is_file():
            self.classifier.load_state_dict(load_state_dict(path))
            self.classifier.eval()
        else:
            self.classifier, _ = train_classifier(self.train, self.test, epochs, seed)
            save_state_dict(path, self.classifier.state_dict())
        with torch.no_grad():
            pred = torch.cat([self.classifier(self.test.to_float(slice(i, i + 1000))).argmax(1)
                              for i in range(0, len(self.test), 1000)])
        self.accuracy = (pred == self.test.labels).float().mean().item()
        self.test_features = features(self.classifier, self.test.to_float(slice(0, len(self.test))))

    def floor(self, n: int) -> float:
        """The distance of ``n`` training images to the test set: what a perfect sampler would score."""
        return frechet_distance(features(self.classifier, self.train.to_float(slice(0, n))), self.test_features)

    def distance(self, images: Tensor) -> float:
        """FD of float images [N, 1, 28, 28] in [-1, 1] (rounded to 8 bits, as a PNG holds them) to the test set."""
        x = (images.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1
        return frechet_distance(features(self.classifier, x), self.test_features)

    def confident(self, images: Tensor) -> float:
        """The fraction of images the classifier calls one digit with p > 0.9."""
        with torch.no_grad():
            p = self.classifier(images.clamp(-1, 1)).softmax(1)
        return (p.max(1).values > 0.9).float().mean().item()
