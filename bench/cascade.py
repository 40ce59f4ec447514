"""A super-resolution cascade against pixel diffusion at an equal CPU budget: train all three, then measure.

``train`` runs, side by side and with ``--threads`` CPU threads each, the pixel ``mnist`` preset for
``--budget`` minutes and the cascade in the same minutes: the base ``mnist-14`` (14x14) for
``--base-minutes``, then the super-resolution stage ``mnist-sr`` (14 -> 28) for what is left of the
budget after the base's whole command. The commands are the ones a user types; their wall times go to
``--out``/budget.json. The stage's run preset (``--preset mnist-sr``, training with
:class:`ddpm.superres.SuperResolution`) comes with train.py's super-resolution condition: until then
the stage's command fails and says so.

``eval`` measures the trained runs on a quiet machine (``--threads`` threads): ``--samples`` images of the
pixel model and of the cascade (base at ``--nfe``, stage at ``--sr-nfe`` and augmentation level
``--level``; ``--levels`` sweeps the level), their Fréchet distance to the test set in the features of
:mod:`bench.mnist_fd`, and for reference the FD of the base's samples enlarged bilinearly (what the
stage must beat) and of the stage applied to real test digits made small by :func:`ddpm.superres.degrade`
(what it loses on perfect inputs); then the sampling speed of both, in alternating rounds. Grids for the
gallery go to ``--out``; ``--append`` adds an entry to bench/RESULTS.md.

    python -m bench.cascade train --data mnist.npz --out bench/out/cascade --budget 30 --base-minutes 12
    python -m bench.cascade eval --data mnist.npz --out bench/out/cascade --append
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
import torch.nn.functional as F

from bench import common
from ddpm.data import load_images
from ddpm.generate import SamplerSettings, generate, grid_image
from ddpm.loading import load_model
from ddpm.superres import CASCADES, SAMPLE_LEVEL, cascade, degrade, upsample

#: More steps than any budget here reaches: the time limit ends every run.
UNLIMITED = "10000000"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cascade", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("train", "eval"))
    p.add_argument("--data", default=None, help="MNIST .npz (default $DDPM_MNIST)")
    p.add_argument("--out", required=True, help="where the runs, budget.json, eval.json and grids go")
    p.add_argument("--budget", type=float, default=30.0, help="train: minutes for each side (default 30)")
    p.add_argument("--base-minutes", type=float, default=12.0, help="train: the base model's share (default 12)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (train: 1 each, side by side)")
    p.add_argument("--samples", type=int, default=1000, help="eval: samples per model (default 1000)")
    p.add_argument("--sampler", default="dpm++2m-sde", help="eval: the pixel model's and the base's sampler")
    p.add_argument("--nfe", type=int, default=20, help="eval: their network evaluations per sample")
    p.add_argument("--sr-sampler", default="dpm++2m-sde", help="eval: the stage's sampler")
    p.add_argument("--sr-nfe", type=int, default=10, help="eval: the stage's network evaluations (default 10)")
    p.add_argument("--level", type=float, default=SAMPLE_LEVEL, help="eval: the augmentation level (default 0.2)")
    p.add_argument("--levels", default="", help="eval: also FD at these levels, e.g. 0,0.1,0.3")
    p.add_argument("--speed-images", type=int, default=250, help="eval: images per timed sampling call")
    p.add_argument("--repeats", type=int, default=5, help="eval: timed rounds of sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="eval: append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- train


def _command(args: argparse.Namespace, preset: str, out: Path, minutes: float) -> list[str]:
    return [sys.executable, "-m", "ddpm", "train", "--preset", preset, "--data", str(args.data), "--out", str(out),
            "--overwrite", "--quiet", "--train.threads", str(args.threads), "--train.steps", UNLIMITED,
            "--train.sample_every", "0", "--train.sample_count", "16", "--train.sample_steps", "20",
            "--train.time_limit", f"{minutes:.3f}"]


def train_stage(args: argparse.Namespace, out: Path) -> dict:
    presets = CASCADES["mnist"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    def launch(cmd: list[str], name: str) -> subprocess.Popen:
        common.say("$ " + " ".join(cmd[1:]) + f"  > {out / name}.log")
        return subprocess.Popen(cmd, stdout=(out / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env)

    pixel_cmd = _command(args, "mnist", out / "pixel", args.budget)
    base_cmd = _command(args, presets.base, out / "base", args.base_minutes)
    start = time.perf_counter()
    pixel = launch(pixel_cmd, "pixel")
    if launch(base_cmd, "base").wait() != 0:
        pixel.kill()
        raise SystemExit(f"the base run failed: see {out / 'base.log'}")
    base_seconds = time.perf_counter() - start
    left = args.budget - base_seconds / 60
    if left <= 0:
        pixel.kill()
        raise SystemExit(f"the base took {base_seconds / 60:.2f} min of the {args.budget:g}: lower --base-minutes")
    sr_cmd = _command(args, presets.upsampler, out / "sr", left)
    sr_start = time.perf_counter()
    if launch(sr_cmd, "sr").wait() != 0:
        pixel.kill()
        raise SystemExit(f"the super-resolution run failed (is its run preset {presets.upsampler} there yet?): see "
                         f"{out / 'sr.log'}")
    sr_seconds = time.perf_counter() - sr_start
    if pixel.wait() != 0:
        raise SystemExit(f"the pixel run failed: see {out / 'pixel.log'}")
    budget = {"budget_min": args.budget, "threads_each": args.threads,
              "pixel": {"command": " ".join(pixel_cmd[1:]), "seconds": time.perf_counter() - start},
              "base": {"command": " ".join(base_cmd[1:]), "seconds": base_seconds},
              "sr": {"command": " ".join(sr_cmd[1:]), "seconds": sr_seconds}}
    for run in ("pixel", "base", "sr"):
        path = out / run / "summary.json"
        budget[run]["summary"] = json.loads(path.read_text()) if path.is_file() else {}
    (out / "budget.json").write_text(json.dumps(budget, indent=2))
    common.say(f"pixel {budget['pixel']['seconds'] / 60:.2f} min; base {base_seconds / 60:.2f} + stage "
               f"{sr_seconds / 60:.2f} min; {out / 'budget.json'}")
    return budget


# ---------------------------------------------------------------------------- eval


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    grid_image(images, nrow=nrow).save(path, optimize=True)
    common.say(f"wrote {path}")
    return path


@torch.no_grad()
def eval_stage(args: argparse.Namespace, out: Path) -> dict:
    from bench.mnist_fd import FeatureSpace

    threads = common.set_threads(args.threads)
    pixel, base, sr = (load_model(out / name) for name in ("pixel", "base", "sr"))
    with torch.enable_grad():  # a first run trains the classifier
        space = FeatureSpace(args.data, seed=args.seed)
    settings = SamplerSettings(args.sampler, args.nfe)
    sr_settings = SamplerSettings(args.sr_sampler, args.sr_nfe)
    r: dict = {"threads": threads, "runs": {k: v.description for k, v in (("pixel", pixel), ("base", base),
                                                                          ("sr", sr))},
               "fd_floor": space.floor(args.samples)}
    drawn = generate(pixel.model, pixel.diffusion.build(), args.samples, settings, seed=args.seed, batch_size=250)
    small, large = cascade(base, sr, args.samples, settings, sr_settings, args.level, seed=args.seed, batch_size=250)
    up = F.interpolate(small.images, size=large.images.shape[2:], mode="bilinear", align_corners=False)
    test = load_images(args.data, 28, 1, split="test", limit=args.samples)
    real = test.to_float(slice(0, len(test)))
    on_real = upsample(sr.model, sr.diffusion.build(), degrade(real, 2), sr_settings, args.level, seed=args.seed,
                       batch_size=250, progress=False)
    r.update(pixel_fd=space.distance(drawn.images), cascade_fd=space.distance(large.images),
             bilinear_fd=space.distance(up.clamp(-1, 1)), stage_on_real_fd=space.distance(on_real.images),
             pixel_nfe=drawn.nfe, base_nfe=small.nfe, sr_nfe=large.nfe)
    r["levels"] = {level: space.distance(cascade(base, sr, args.samples, settings, sr_settings, float(level),
                                                 seed=args.seed, batch_size=250, progress=False)[1].images)
                   for level in filter(None, args.levels.split(","))}
    save_grid(drawn.images[:64], out / "samples_mnist_pixel.png")
    save_grid(torch.cat([up[:32].clamp(-1, 1), large.images[:32]]), out / "samples_mnist_cascade.png")

    def timed(fn):
        return lambda: fn(args.speed_images)

    times = common.time_alternating(
        {"pixel": timed(lambda n: generate(pixel.model, pixel.diffusion.build(), n, settings, batch_size=n,
                                           progress=False)),
         "cascade": timed(lambda n: cascade(base, sr, n, settings, sr_settings, args.level, batch_size=n,
                                            progress=False))},
        args.repeats, 1, torch.device("cpu"), label="sampling")
    r["pixel_img_s"] = args.speed_images / common.medians(times)["pixel"]
    r["cascade_img_s"] = args.speed_images / common.medians(times)["cascade"]
    speedup = common.paired_ratio(times["pixel"], times["cascade"])
    r["speedup"] = {"median": speedup.median, "low": speedup.low, "high": speedup.high, "coverage": speedup.coverage,
                    "rounds": speedup.rounds}
    (out / "eval.json").write_text(json.dumps(r, indent=2))
    common.say(json.dumps(r, indent=2))
    if args.append:
        append(args, out, r, speedup)
    return r


def append(args: argparse.Namespace, out: Path, r: dict, speedup: common.Ratio) -> None:
    budget_path = out / "budget.json"
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() else None
    facts = [f"evaluation: {r['threads']} threads; pixel and base {args.sampler} at {args.nfe} NFE, stage "
             f"{args.sr_sampler} at {args.sr_nfe} NFE, augmentation level {args.level:g}, seed {args.seed}"]
    if budget:
        facts.insert(0, f"training: pixel `mnist` {budget['pixel']['seconds'] / 60:.1f} min, side by side with base "
                        f"`mnist-14` {budget['base']['seconds'] / 60:.1f} min + stage `mnist-sr` "
                        f"{budget['sr']['seconds'] / 60:.1f} min, {budget['threads_each']} thread each")
    rows = [[f"FD of {args.samples} samples: pixel / cascade (floor)",
             f"{r['pixel_fd']:.2f} / {r['cascade_fd']:.2f} ({r['fd_floor']:.2f})"],
            ["FD of the base's samples enlarged bilinearly", f"{r['bilinear_fd']:.2f}"],
            ["FD of the stage on real test digits made 14x14", f"{r['stage_on_real_fd']:.2f}"],
            *([[f"cascade FD at level {level}", f"{fd:.2f}"] for level, fd in r["levels"].items()]),
            [f"sampling img/s ({args.speed_images} per call): pixel / cascade",
             f"{r['pixel_img_s']:,.1f} / {r['cascade_img_s']:,.1f}"],
            ["cascade speed-up (pixel time / cascade time)", f"{speedup} ({100 * speedup.coverage:.0f}%, "
                                                            f"{speedup.rounds} rounds)"]]
    common.append_entry("super-resolution cascade vs pixel diffusion on MNIST, equal CPU budget", "bench.cascade",
                        None, facts, common.markdown_table(["", "measured"], rows))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.data = str(common.mnist_path(args.data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(args, out) if args.stage == "train" else eval_stage(args, out)


if __name__ == "__main__":
    main()
