"""Moving MNIST: how good a trained video model's clips are, unconditional and continuing given frames.

Measures a trained video run (``ddpm train`` on a Moving MNIST set, e.g. the ``moving-mnist`` video
preset on ``ddpm data moving-mnist --size 32 --digits 1 --frames 8``) against the set's test clips:

* **per-frame FD**: the Fréchet distance, in the features of :mod:`bench.mnist_fd`'s MNIST classifier,
  between sampled frames and test frames, both resized to 28x28 (bilinear, antialiased), for each frame
  index and for all frames pooled;
* **class consistency**: how often the classifier reads one class in every frame of a clip (each frame's
  digit cropped to its bounding box and centred as MNIST's own digits are: longer side to 20 px, centre
  of mass at the centre of 28x28); the test clips' own figure is the ceiling the classifier allows;
* **continuation**: for test clips given their first ``--given`` frames, the rest drawn by replacement and
  by reconstruction guidance (each ``--weights``), per-frame MSE (squared error summed over the frame's
  pixels in [0, 1], the convention of OpenSTL's Moving MNIST tables) and SSIM (Wang et al. 2004: 11x11
  Gaussian window, sigma 1.5, K = 0.01, 0.03, range 1) against the true continuation.

OpenSTL's supervised predictors report MSE 15-46 per frame on the standard task: 64x64 frames, two digits,
10 frames given and 10 predicted. Ours differs in every term: a quarter of the pixels (an MSE summed over
pixels scales with their number), one digit, 2 frames given and 6 drawn, and a generative model that
samples one of the plausible continuations rather than predicting their mean (which the MSE rewards).

    python -m bench.video_mnist --run runs/mm --data mm32.npz --mnist mnist.npz --out bench/out/video_mnist

writes ``results.json``, ``samples.png``/``samples.gif`` (the gallery's) and ``continuations.png`` (per
clip: the truth, then each method) to ``--out`` and prints a table. It does not train anything.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from bench.mnist_fd import FeatureSpace, features, frechet_distance
from ddpm.checkpoints import save_json
from ddpm.generate import SamplerSettings
from ddpm.images import save_gif, save_image, video_frame_grid, video_frames
from ddpm.loading import load_model
from ddpm.video_data import load_videos
from ddpm.video_sampling import generate_video


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.video_mnist", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the trained video run (or model directory)")
    p.add_argument("--data", required=True, help="the Moving MNIST .npz it was trained on (its test split is used)")
    p.add_argument("--mnist", required=True, help="the MNIST .npz for the classifier (bench.mnist_fd)")
    p.add_argument("--out", required=True, help="where results.json and the pictures go")
    p.add_argument("--num-samples", type=int, default=500, help="unconditional clips for FD and consistency")
    p.add_argument("--num-continued", type=int, default=200, help="test clips continued by each method")
    p.add_argument("--given", type=int, default=2, help="frames given to the continuations (default 2)")
    p.add_argument("--weights", default="1,2,4", help="reconstruction guidance weights w_r (default 1,2,4)")
    p.add_argument("--sampler", default="dpm++2m-sde")
    p.add_argument("--steps", type=int, default=20, help="network evaluations per window")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--classifier-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    loaded = load_model(args.run)
    model, diffusion = loaded.model, loaded.diffusion.build()
    channels, frames, height, width = model.sample_shape
    test = load_videos(args.data, frames=frames, size=(height, width), channels=channels, split="test")
    space = FeatureSpace(args.mnist, seed=args.seed, epochs=args.classifier_epochs)
    settings = SamplerSettings(args.sampler, args.steps)
    common = {"settings": settings, "batch_size": args.batch_size, "progress": False}

    samples = generate_video(model, diffusion, args.num_samples, seed=args.seed, **common)
    real = test.to_float(slice(0, len(test)))
    results = {"run": loaded.description, "num_samples": args.num_samples, "num_test_clips": len(test),
               "classifier_accuracy": space.accuracy, "sampler": f"{args.sampler}, {args.steps} NFE per window",
               "fd": per_frame_fd(space, samples.videos, real),
               "class_consistency": {"samples": class_consistency(space, samples.videos),
                                     "test_clips": class_consistency(space, real)}}

    clips = real[:args.num_continued]
    given = clips[:, :, :args.given]
    methods = [("replacement", None)] + [("reconstruction", float(w)) for w in args.weights.split(",")]
    continued, rows = {}, [clips[:8]]
    for method, weight in methods:
        name = method if weight is None else f"reconstruction w={weight:g}"
        drawn = generate_video(model, diffusion, len(clips), seed=args.seed + 1, first_frames=given, method=method,
                               guidance_weight=weight or 1.0, frames=frames, **common).videos
        continued[name] = continuation_scores(drawn[:, :, args.given:], clips[:, :, args.given:])
        rows.append(drawn[:8])
    results["continuation"] = {"given": args.given, "drawn": frames - args.given, "methods": continued}

    save_image(video_frame_grid(samples.videos[:16]), out / "samples.png")
    save_gif(video_frames(samples.videos[:16], nrow=4), out / "samples.gif", duration_ms=125)
    save_image(video_frame_grid(torch.stack(rows, 1).flatten(0, 1)), out / "continuations.png")
    save_json(out / "results.json", results)
    print_table(results)
    return results


def to_28(frames: Tensor) -> Tensor:
    """Frames [N, 1, H, W] in [-1, 1] resized to 28x28 (bilinear, antialiased), rounded to 8 bits."""
    x = F.interpolate(frames.float(), size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    return ((x.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1).float()


def frames_of(videos: Tensor, t: int | None = None) -> Tensor:
    """Clips [N, C, T, H, W] -> frames [N*T, C, H, W] (or frame ``t`` alone: [N, C, H, W])."""
    return videos[:, :, t] if t is not None else videos.transpose(1, 2).flatten(0, 1)


def per_frame_fd(space: FeatureSpace, samples: Tensor, real: Tensor) -> dict[str, float]:
    """FD of sampled against test frames, for each frame index and pooled ("all")."""
    net = space.classifier
    out = {f"frame {t + 1}": frechet_distance(features(net, to_28(frames_of(samples, t))),
                                              features(net, to_28(frames_of(real, t))))
           for t in range(samples.shape[2])}
    out["all"] = frechet_distance(features(net, to_28(frames_of(samples))), features(net, to_28(frames_of(real))))
    return out


def centred_digit(frame: np.ndarray) -> np.ndarray:
    """A frame's digit as MNIST centres its digits: the bounding box of pixels above a quarter of the frame's
    maximum, its longer side scaled to 20 px, placed in 28x28 with its centre of mass at the centre."""
    mask = frame > 0.25 * max(frame.max(), 1e-6)
    out = np.zeros((28, 28), np.float32)
    if not mask.any():
        return out
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = frame[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = 20 / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))
    digit = np.asarray(Image.fromarray((box * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
                       np.float32) / 255
    total = digit.sum() or 1.0
    cy = (digit.sum(1) * np.arange(digit.shape[0])).sum() / total
    cx = (digit.sum(0) * np.arange(digit.shape[1])).sum() / total
    top, left = int(round(14 - cy)), int(round(14 - cx))
    top, left = min(max(top, 0), 28 - digit.shape[0]), min(max(left, 0), 28 - digit.shape[1])
    out[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return out


@torch.no_grad()
def class_consistency(space: FeatureSpace, videos: Tensor) -> float:
    """The fraction of clips whose frames (digits centred, :func:`centred_digit`) are all read as one class."""
    frames = ((frames_of(videos)[:, 0].clamp(-1, 1) + 1) / 2).numpy()
    digits = torch.from_numpy(np.stack([centred_digit(f) for f in frames]))[:, None] * 2 - 1
    classes = torch.cat([space.classifier(digits[i:i + 1000]).argmax(1) for i in range(0, len(digits), 1000)])
    classes = classes.view(videos.shape[0], videos.shape[2])
    return float((classes == classes[:, :1]).all(1).float().mean())


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM of frames [N, 1, H, W] in [0, 1] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, range 1; 'valid' windows only), one value per frame."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    a, b = a.double(), b.double()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


def continuation_scores(drawn: Tensor, truth: Tensor) -> dict[str, list[float]]:
    """Per drawn frame: the mean over clips of the MSE (summed over pixels in [0, 1]) and of the SSIM."""
    drawn01, truth01 = (drawn.clamp(-1, 1) + 1) / 2, (truth + 1) / 2
    mse = (drawn01 - truth01).pow(2).sum(dim=(1, 3, 4)).mean(0)  # [T]
    scores = [ssim(frames_of(drawn01, t), frames_of(truth01, t)).mean() for t in range(drawn.shape[2])]
    return {"mse": [round(float(v), 3) for v in mse], "ssim": [round(float(v), 4) for v in scores]}


def print_table(results: dict) -> None:
    fd = results["fd"]
    print(f"per-frame FD ({results['num_samples']} clips): " + ", ".join(f"{k} {v:.2f}" for k, v in fd.items()))
    consistency = results["class_consistency"]
    print(f"class kept across a clip: samples {consistency['samples']:.3f}, test clips {consistency['test_clips']:.3f}")
    c = results["continuation"]
    print(f"\n| continuing {c['given']} given frames | MSE per frame ({c['drawn']} drawn) | mean MSE "
          "| SSIM per frame | mean SSIM |\n|---|---|---|---|---|")
    for name, s in c["methods"].items():
        print(f"| {name} | {' '.join(f'{v:.1f}' for v in s['mse'])} | {np.mean(s['mse']):.1f} | "
              f"{' '.join(f'{v:.3f}' for v in s['ssim'])} | {np.mean(s['ssim']):.3f} |")
    if not all(math.isfinite(v) for v in fd.values()):
        print("warning: a non-finite FD (too few samples for the 128 features?)")


if __name__ == "__main__":
    main()
