"""Inversion on a trained model: the reconstruction error of test images against the number of steps.

Each of ``--images`` test images is encoded to x_T by a deterministic solver and decoded back with the
same sampler, steps and spacing (:func:`ddpm.inversion.invert`); the score is the per-dimension MSE on
[0, 1], its mean over the images and that mean's standard error, for every sampler of ``--samplers``
and every step count of ``--steps``, beside DDIM's Table 2 (CIFAR-10, the paper's model: .014, .0065,
.0023, .0009 at 10, 20, 50, 100 steps). Encoding costs K − 1 network evaluations, decoding K.
``--grid`` writes the first 8 images above their reconstructions at each step count (for the gallery),
``--append`` an entry to bench/RESULTS.md.

    python -m bench.inversion runs/mnist --data mnist.npz --out bench/out/inversion --append
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench import common
from ddpm.data import load_images
from ddpm.generate import SamplerSettings
from ddpm.images import labelled_rows, save_image
from ddpm.inversion import invert
from ddpm.loading import load_model

#: DDIM's Table 2: per-dimension reconstruction MSE of CIFAR-10 test images by DDIM encoding and decoding.
DDIM_TABLE_2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.inversion", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained model (run, checkpoint or model directory)")
    p.add_argument("--data", default=None, help="the test images (default $DDPM_MNIST)")
    p.add_argument("--out", required=True, help="where results.json (and the grid) go")
    p.add_argument("--images", type=int, default=1000, help="test images inverted (default 1000)")
    p.add_argument("--steps", default="10,20,50,100", help="step counts (default 10,20,50,100, DDIM's Table 2)")
    p.add_argument("--samplers", default="ddim,dpm++2m", help="encoders (default ddim,dpm++2m)")
    p.add_argument("--spacing", default=None, help="the chain's spacing (default: each sampler's own)")
    p.add_argument("--batch", type=int, default=250, help="images per model call")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--grid", action="store_true", help="write reconstructions_inversion.png")
    p.add_argument("--append", action="store_true", help="append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    threads = common.set_threads(args.threads)
    loaded = load_model(args.run)
    channels, side = loaded.image_shape[0], loaded.image_shape[-1]
    test = load_images(args.data, side, channels, split="test", limit=args.images)
    images = test.to_float(slice(0, len(test)))
    diffusion = loaded.diffusion.build()
    results: dict = {"run": loaded.description, "images": len(images), "threads": threads, "points": []}
    shown = {"input": images[:8]}
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            settings = SamplerSettings(sampler, steps, spacing=args.spacing)
            start = time.perf_counter()
            found = invert(loaded.model, diffusion, images, settings, batch_size=args.batch, progress=False,
                           autoencoder=loaded.autoencoder)
            per_image = (((found.reconstruction.images - images) / 2) ** 2).flatten(1).mean(1)
            point = {"sampler": sampler, "steps": steps, "mse": per_image.mean().item(),
                     "mse_stderr": per_image.std().item() / math.sqrt(len(per_image)),
                     "encode_nfe": found.encode_nfe, "decode_nfe": found.reconstruction.nfe,
                     "seconds": time.perf_counter() - start}
            results["points"].append(point)
            common.say(f"{sampler} {steps} steps: MSE {point['mse']:.5f} ± {point['mse_stderr']:.5f} "
                       f"({point['seconds']:.0f} s)")
            shown[f"{sampler} {steps}"] = found.reconstruction.images[:8]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.grid:
        path = save_image(labelled_rows([(v, k) for k, v in shown.items()]), out / "reconstructions_inversion.png")
        common.say(f"wrote {path}")
    return results


def table(results: dict) -> str:
    rows = [[p["sampler"], p["steps"], f"{p['mse']:.5f} ± {p['mse_stderr']:.5f}",
             f"{p['encode_nfe']} + {p['decode_nfe']:g}", DDIM_TABLE_2.get(p["steps"], "") if p["sampler"] == "ddim"
             else ""] for p in results["points"]]
    return common.markdown_table(["encoder", "steps", "MSE per dimension on [0, 1] (± s.e.)", "NFE (encode + decode)",
                                  "DDIM Table 2 (CIFAR-10)"], rows)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.data = str(common.mnist_path(args.data))
    results = measure(args)
    common.say(table(results))
    if args.append:
        common.append_entry("inversion: reconstruction error against steps", "bench.inversion", argv,
                            [f"model: {results['run']}", f"{results['images']} test images, "
                             f"{results['threads']} threads"], table(results))
    return results


if __name__ == "__main__":
    main()
