"""Latent against pixel diffusion at an equal CPU budget: train both, then measure them.

``train`` runs, side by side and with ``--threads`` CPU threads each, the pixel preset for
``--budget`` minutes and the latent chain in the same minutes: ``ddpm train-autoencoder`` for
``--ae-minutes``, then ``ddpm train --autoencoder`` for what is left of the budget after the
autoencoder's whole command (its start-up, data loading and scale factor included). ``train.time_limit``
counts from a command's start, so the latent run's encoding of the data set is inside its share.
The commands are the ones a user types; their wall times go to ``--out``/budget.json.

``eval`` measures the trained runs with ``--threads`` threads on a quiet machine: the autoencoder's
reconstructions of the test split (PSNR on [0, 1]; for MNIST also the Fréchet distance of the
reconstructions in the classifier features of :mod:`bench.mnist_fd`), its encode and decode speed,
``--samples`` samples of each model at the same sampler and NFE (MNIST: FD against the test set)
and the sampling speed of both, in alternating rounds (latent: decoding included). Grids for the
gallery go to ``--out``; ``--append`` adds an entry to bench/RESULTS.md.

    python -m bench.latent train mnist --data mnist.npz --out bench/out/latent_mnist --budget 20 --ae-minutes 7
    python -m bench.latent eval mnist --data mnist.npz --out bench/out/latent_mnist --append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bench import common
from ddpm.data import load_images
from ddpm.generate import SamplerSettings, generate, grid_image
from ddpm.loading import load_model

#: The data set's pixel preset, autoencoder preset and latent preset.
PRESETS = {"mnist": ("mnist", "mnist-f4", "mnist-latent"), "cifar10": ("cifar10", "cifar10-f4", "cifar10-latent")}
#: More steps than any budget here reaches: the time limit ends every run.
UNLIMITED = "10000000"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latent", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("train", "eval"))
    p.add_argument("dataset", choices=tuple(PRESETS))
    p.add_argument("--data", default=None, help="MNIST .npz, or the CIFAR-10 image-folder tree (train/ and test/)")
    p.add_argument("--out", required=True, help="where the runs, budget.json, eval.json and grids go")
    p.add_argument("--budget", type=float, default=20.0, help="train: minutes for each side (default 20)")
    p.add_argument("--ae-minutes", type=float, default=7.0, help="train: the autoencoder's share (default 7)")
    p.add_argument("--class-cond", action="store_true", help="train: class-conditional U-Nets (both sides)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (train: 1 each, side by side)")
    p.add_argument("--samples", type=int, default=1000, help="eval: samples per model (default 1000)")
    p.add_argument("--sampler", default="dpm++2m-sde", help="eval: sampler of both models")
    p.add_argument("--nfe", type=int, default=20, help="eval: network evaluations per sample")
    p.add_argument("--guidance", type=float, default=None, help="eval: classifier-free guidance scale")
    p.add_argument("--speed-images", type=int, default=250, help="eval: images per timed sampling call")
    p.add_argument("--repeats", type=int, default=5, help="eval: timed rounds of sampling and coding")
    p.add_argument("--recon-images", type=int, default=10_000, help="eval: test images reconstructed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="eval: append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- train


def _command(args: argparse.Namespace, *words: str) -> list[str]:
    opts = ["--data", str(args.data), "--quiet", "--train.threads", str(args.threads), "--train.steps", UNLIMITED,
            "--train.sample_every", "0", "--train.sample_count", "16"]
    if words[0] == "train":  # one small preview at the end, outside the training but inside the budget
        opts += ["--train.sample_steps", "20"]
    return [sys.executable, "-m", "ddpm", *words, *opts]


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    common.say("$ " + " ".join(cmd[1:]) + f"  > {log}")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def train_stage(args: argparse.Namespace, out: Path) -> dict:
    pixel_preset, ae_preset, latent_preset = PRESETS[args.dataset]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cond = ["--train.class_cond", "true"] if args.class_cond else []
    pixel_cmd = _command(args, "train", "--preset", pixel_preset, "--out", str(out / "pixel"), "--overwrite",
                         "--train.time_limit", f"{args.budget:g}", *cond)
    ae_cmd = _command(args, "train-autoencoder", "--preset", ae_preset, "--out", str(out / "autoencoder"),
                      "--overwrite", "--train.time_limit", f"{args.ae_minutes:g}")
    start = time.perf_counter()
    pixel = _run(pixel_cmd, out / "pixel.log", env)
    if _run(ae_cmd, out / "autoencoder.log", env).wait() != 0:
        pixel.kill()
        raise SystemExit(f"the autoencoder run failed: see {out / 'autoencoder.log'}")
    ae_seconds = time.perf_counter() - start
    left = args.budget - ae_seconds / 60
    if left <= 0:
        pixel.kill()
        raise SystemExit(f"the autoencoder took {ae_seconds / 60:.2f} min of the {args.budget:g}: lower --ae-minutes")
    latent_cmd = _command(args, "train", "--preset", latent_preset, "--autoencoder", str(out / "autoencoder"),
                          "--out", str(out / "latent"), "--overwrite", "--train.time_limit", f"{left:.3f}", *cond)
    latent_start = time.perf_counter()
    if _run(latent_cmd, out / "latent.log", env).wait() != 0:
        pixel.kill()
        raise SystemExit(f"the latent run failed: see {out / 'latent.log'}")
    latent_seconds = time.perf_counter() - latent_start
    if pixel.wait() != 0:
        raise SystemExit(f"the pixel run failed: see {out / 'pixel.log'}")
    pixel_seconds = time.perf_counter() - start

    def summary(run: str) -> dict:
        path = out / run / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    budget = {
        "budget_min": args.budget, "threads_each": args.threads, "class_cond": args.class_cond,
        "pixel": {"command": " ".join(pixel_cmd[1:]), "seconds": pixel_seconds, "summary": summary("pixel")},
        "autoencoder": {"command": " ".join(ae_cmd[1:]), "seconds": ae_seconds, "summary": summary("autoencoder")},
        "latent": {"command": " ".join(latent_cmd[1:]), "seconds": latent_seconds, "summary": summary("latent")},
    }
    (out / "budget.json").write_text(json.dumps(budget, indent=2))
    common.say(f"pixel {pixel_seconds / 60:.2f} min; autoencoder {ae_seconds / 60:.2f} + latent "
               f"{latent_seconds / 60:.2f} = {(ae_seconds + latent_seconds) / 60:.2f} min; {out / 'budget.json'}")
    return budget


# ---------------------------------------------------------------------------- eval


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], measured on [0, 1] after rounding to 8 bits."""
    def to8(t: Tensor) -> Tensor:
        return ((t.clamp(-1, 1) + 1) * 127.5).round() / 255
    mse = (to8(x) - to8(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def save_grid(images: Tensor, path: Path, nrow: int) -> Path:
    grid_image(images, nrow=nrow).save(path, optimize=True)
    common.say(f"wrote {path}")
    return path


@torch.no_grad()
def eval_stage(args: argparse.Namespace, out: Path) -> dict:
    threads = common.set_threads(args.threads)
    pixel, latent = load_model(out / "pixel"), load_model(out / "latent")
    vae = latent.autoencoder
    assert vae is not None
    side = pixel.image_shape[-1]
    test = load_images(args.data, side, pixel.image_shape[0], split="test")
    results: dict = {"threads": threads, "pixel_run": pixel.description, "latent_run": latent.description}

    # The autoencoder: reconstructions of the test split (posterior mean), and coding speed.
    n = min(args.recon_images, len(test))
    x = test.to_float(slice(0, n))
    recon = torch.cat([vae.decode(vae.encode(part).mode()) for part in x.split(500)])
    scores = psnr(recon, x)
    results["psnr_mean"], results["psnr_std"] = scores.mean().item(), scores.std().item()
    results["recon_images"] = n
    order = torch.arange(16 if args.dataset == "mnist" else 10)
    save_grid(torch.cat([x[order], recon[order].clamp(-1, 1)]), out / f"reconstructions_{args.dataset}.png", len(order))
    batch = x[:256]
    z = vae.encode(batch).mode()
    times = common.time_alternating({"encode": lambda: vae.encode(batch).mode(), "decode": lambda: vae.decode(z)},
                                    args.repeats, 1, torch.device("cpu"))
    results["encode_img_s"] = len(batch) / common.medians(times)["encode"]
    results["decode_img_s"] = len(batch) / common.medians(times)["decode"]

    # Samples of both models, same sampler, NFE and seeds.
    settings = SamplerSettings(sampler=args.sampler, steps=args.nfe)
    guidance = args.guidance if pixel.num_classes else None
    drawn = {}
    for name, loaded in (("pixel", pixel), ("latent", latent)):
        start = time.perf_counter()
        s = generate(loaded.model, loaded.diffusion.build(), args.samples, settings, seed=args.seed,
                     guidance_scale=guidance, batch_size=250, progress=True, autoencoder=loaded.autoencoder)
        results[f"{name}_nfe"] = s.nfe
        results[f"{name}_sample_seconds"] = time.perf_counter() - start
        drawn[name] = s.images
        if loaded.num_classes:  # a row per class
            k = loaded.num_classes
            per = min(8, args.samples // k)
            idx = torch.tensor([c + k * j for c in range(k) for j in range(per)])
            save_grid(s.images[idx], out / f"samples_{args.dataset}_{name}.png", per)
        else:
            save_grid(s.images[:64], out / f"samples_{args.dataset}_{name}.png", 8)

    if args.dataset == "mnist":
        from bench.mnist_fd import FeatureSpace

        with torch.enable_grad():  # a first run trains the classifier
            space = FeatureSpace(args.data, seed=args.seed)
        results["classifier_accuracy"] = space.accuracy
        results["fd_floor_samples"] = space.floor(args.samples)
        results["fd_floor_recon"] = space.floor(n)
        results["recon_fd"] = space.distance(recon)
        for name, images in drawn.items():
            results[f"{name}_fd"] = space.distance(images)
            results[f"{name}_confident"] = space.confident(images)

    # Sampling speed: the same call for both, in alternating rounds (latent: decoding included).
    def sampler(loaded):
        return lambda: generate(loaded.model, loaded.diffusion.build(), args.speed_images, settings, seed=args.seed,
                                guidance_scale=guidance, batch_size=args.speed_images, progress=False,
                                autoencoder=loaded.autoencoder)

    times = common.time_alternating({"pixel": sampler(pixel), "latent": sampler(latent)}, args.repeats, 1,
                                    torch.device("cpu"), label="sampling")
    results["pixel_img_s"] = args.speed_images / common.medians(times)["pixel"]
    results["latent_img_s"] = args.speed_images / common.medians(times)["latent"]
    speedup = common.paired_ratio(times["pixel"], times["latent"])
    results["speedup"] = {"median": speedup.median, "low": speedup.low, "high": speedup.high,
                          "coverage": speedup.coverage, "rounds": speedup.rounds}
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    common.say(json.dumps(results, indent=2))
    if args.append:
        append(args, out, results, speedup)
    return results


def append(args: argparse.Namespace, out: Path, r: dict, speedup: common.Ratio) -> None:
    budget = json.loads((out / "budget.json").read_text())
    steps = {k: budget[k]["summary"].get("step", "?") for k in ("pixel", "autoencoder", "latent")}
    facts = [
        f"training (`python -m bench.latent train {args.dataset} --budget {budget['budget_min']:g} ...`): both sides "
        f"side by side, {budget['threads_each']} thread each; pixel `{PRESETS[args.dataset][0]}` "
        f"{budget['pixel']['seconds'] / 60:.1f} min ({steps['pixel']} steps); autoencoder "
        f"`{PRESETS[args.dataset][1]}` {budget['autoencoder']['seconds'] / 60:.1f} min ({steps['autoencoder']} steps) "
        f"+ latent `{PRESETS[args.dataset][2]}` {budget['latent']['seconds'] / 60:.1f} min ({steps['latent']} steps, "
        f"encoding included) = {(budget['autoencoder']['seconds'] + budget['latent']['seconds']) / 60:.1f} min"
        + ("; class-conditional" if budget["class_cond"] else ""),
        f"evaluation: {r['threads']} threads; {args.sampler} at {args.nfe} NFE, seed {args.seed}"
        + (f", guidance {args.guidance:g}" if args.guidance is not None else ""),
    ]
    rows = [
        ["autoencoder PSNR, test split (dB, mean ± sd)", f"{r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} "
                                                         f"({r['recon_images']} images)"],
        ["autoencoder encode / decode (img/s, batch 256)", f"{r['encode_img_s']:,.0f} / {r['decode_img_s']:,.0f}"],
    ]
    if "recon_fd" in r:
        rows += [
            ["FD of reconstructions (floor)", f"{r['recon_fd']:.2f} ({r['fd_floor_recon']:.2f})"],
            [f"FD of {args.samples} samples: pixel / latent (floor)",
             f"{r['pixel_fd']:.2f} / {r['latent_fd']:.2f} ({r['fd_floor_samples']:.2f})"],
            ["confidently one digit: pixel / latent", f"{r['pixel_confident']:.3f} / {r['latent_confident']:.3f}"],
        ]
    rows += [
        [f"sampling img/s ({args.speed_images} per call): pixel / latent",
         f"{r['pixel_img_s']:,.1f} / {r['latent_img_s']:,.1f}"],
        ["latent speed-up (pixel time / latent time)", f"{speedup} ({100 * speedup.coverage:.0f}%, "
                                                       f"{speedup.rounds} rounds)"],
    ]
    body = common.markdown_table(["", "measured"], rows)
    common.append_entry(f"latent vs pixel diffusion on {args.dataset}, equal CPU budget", "bench.latent", None, facts,
                        body)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.data is None:
        args.data = str(common.mnist_path(None)) if args.dataset == "mnist" else None
    if args.data is None or not Path(args.data).exists():
        raise SystemExit(f"--data: no such data set {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(args, out) if args.stage == "train" else eval_stage(args, out)


if __name__ == "__main__":
    main()
