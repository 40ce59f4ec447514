"""Quality at equal budget: our `mnist` recipe against diffusers' unconditional-training recipe.

Both train the same 280,177-parameter U-Net (diffusers' ``UNet2DModel`` in our `mnist` preset's
layout: the count is checked) on MNIST for the same wall-clock budget, in alternating slices so
that a slow spell of the machine hits both alike. What differs is the recipe:

- ours: :func:`ddpm.train.train` with the `mnist` run preset (Adam, lr 2e-3 after 100 warm-up
  steps, batch 64, EMA 0.999, L_simple), resumed slice after slice;
- diffusers: the loop of its ``examples/unconditional_image_generation/train_unconditional.py``
  with that script's defaults (AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, cosine
  schedule with 500 warm-up steps over 100 epochs, batch 16, ``EMAModel`` with power 3/4 up to
  0.9999, ``DDPMScheduler`` linear 1000 steps, MSE on ε, gradient clipping at 1).

Then each model's EMA weights are scored the same way:

- test bits/dim with our evaluator (the full bound, all T terms) on the first ``--bpd-images``
  test images; both are ε-predictors on the same linear schedule, so one evaluator serves both;
- samples from the same DDIM sampler, noise and steps; a grid of 64 goes to ``bench/img/``;
- a sample-quality score that needs no download: the Fréchet distance between samples and test
  images in the 128-d feature space of a small MNIST classifier trained here (seeded), with the
  distance between as many *training* images and the test images as the floor.

    python -m bench.quality --minutes 20 --bpd-images 200 --append
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import common
from bench.mnist_fd import features, frechet_distance, train_classifier
from ddpm.config import get_config
from ddpm.data import ImageData, load_images
from ddpm.images import make_grid, save_image
from ddpm.models import UNet, get_preset
from ddpm.runtime import num_parameters

IMG = Path(__file__).with_name("img")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help=f"MNIST .npz (x_train, x_test; default ${common.MNIST_ENV})")
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per recipe (default 20)")
    parser.add_argument("--slices", type=int, default=5, help="alternating slices the budget is cut into")
    parser.add_argument("--bpd-images", type=int, default=1000, help="test images for bits/dim (default 1000)")
    parser.add_argument("--samples", type=int, default=500, help="samples per model for the score (default 500)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the samples (default 50)")
    parser.add_argument("--train-limit", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--classifier-epochs", type=float, default=1.0, help="epochs of the feature classifier")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out/quality", help="working directory (runs, weights, report)")
    parser.add_argument("--img", default=str(IMG), help="where the sample grids go (default bench/img)")
    parser.add_argument("--skip-train", action="store_true", help="score the models already trained in --out")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- the two recipes


class DiffusersRecipe:
    """The training loop of diffusers' train_unconditional.py, on one process, without accelerate."""

    def __init__(self, ours: UNet, data: ImageData, batch: int = 16, epochs: int = 100, seed: int = 0) -> None:
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        from ddpm.models.diffusers_io import UNET2D

        torch.manual_seed(seed)
        self.model = UNet2DModel.from_config(UNET2D.config_to(ours.config))
        if num_parameters(self.model) != num_parameters(ours):
            raise RuntimeError("the diffusers twin does not have our parameter count")
        self.batch = batch
        self.data = data
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.optimizer = common.diffusers_example_adamw(self.model.parameters())
        total = epochs * math.ceil(len(data) / self.batch)
        self.lr_scheduler = get_cosine_schedule_with_warmup(self.optimizer, num_warmup_steps=500,
                                                            num_training_steps=total)
        self.ema = EMAModel(self.model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.generator)
        self.cursor = 0
        self.step = 0
        self.seconds = 0.0
        self.loss = float("nan")

    def _batch(self) -> Tensor:
        if self.cursor + self.batch > len(self.order):  # a new epoch (the last partial batch dropped)
            self.order = torch.randperm(len(self.data), generator=self.generator)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return self.data.to_float(idx)

    def train_for(self, seconds: float) -> None:
        self.model.train()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            clean = self._batch()
            noise = torch.randn(clean.shape, generator=self.generator)
            t = torch.randint(0, 1000, (clean.shape[0],), generator=self.generator)
            noisy = self.scheduler.add_noise(clean, noise, t)
            loss = F.mse_loss(self.model(noisy, t).sample.float(), noise.float())
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.ema.step(self.model.parameters())
            self.step += 1
            self.loss = loss.item()
        self.seconds += time.perf_counter() - start

    def ema_network(self) -> nn.Module:
        from diffusers import UNet2DModel

        net = UNet2DModel.from_config(self.model.config)
        self.ema.copy_to(net.parameters())
        return net.eval()


def train_both(args: argparse.Namespace, out: Path, data: ImageData) -> dict[str, dict]:
    from ddpm.train import train

    config = get_config("mnist", {
        "data.source": args.data, "train.steps": "100000000", "train.seed": str(args.seed),
        "train.threads": str(args.threads), "train.sample_every": "0", "train.sample_count": "16",
        "train.sample_steps": "10", "train.device": "cpu",
    })
    ours_net = UNet(config.model)
    peer = DiffusersRecipe(ours_net, data, seed=args.seed)
    slice_s = args.minutes * 60 / args.slices
    ours = {"steps": 0, "seconds": 0.0, "batch": config.train.batch_size}
    run = out / "ours"
    for k in range(args.slices):
        # Who goes first flips every slice, as in common.time_alternating.
        for name in ("ours", "diffusers") if k % 2 == 0 else ("diffusers", "ours"):
            common.say(f"slice {k + 1}/{args.slices}: {name} for {slice_s:.0f} s")
            if name == "ours":
                start = time.perf_counter()
                cfg = config.replace({"train.time_limit": str(slice_s / 60)})
                result = train(cfg, run, resume=k > 0, overwrite=k == 0, explicit={"train.time_limit"},
                               progress=False, log=lambda m: None, data=data)
                ours["seconds"] += time.perf_counter() - start  # start-up and checkpoints count too
                ours["steps"] = result.step
                ours["loss"] = result.last_loss
            else:
                peer.train_for(slice_s)
            common.say(f"  ours: {ours['steps']} steps in {ours['seconds']:.0f} s; "
                       f"diffusers: {peer.step} steps in {peer.seconds:.0f} s")
    from safetensors.torch import save_file

    save_file(peer.ema_network().state_dict(), str(out / "diffusers_ema.safetensors"))
    (out / "diffusers_config.json").write_text(json.dumps(dict(peer.model.config), default=str))
    theirs = {"steps": peer.step, "seconds": peer.seconds, "batch": peer.batch, "loss": peer.loss}
    for d in (ours, theirs):
        d["img_per_s"] = d["steps"] * d["batch"] / d["seconds"]
    (out / "train.json").write_text(json.dumps({"ours": ours, "diffusers": theirs}, indent=1))
    return {"ours": ours, "diffusers": theirs}


def load_trained(out: Path) -> dict[str, Callable]:
    """Both EMA networks as ε-predictors ``(x_t, t) -> ε̂``."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from ddpm.loading import load_model

    ours = load_model(out / "ours", weights="ema").model.eval()
    config = json.loads((out / "diffusers_config.json").read_text())
    theirs = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(load_file(str(out / "diffusers_ema.safetensors")))
    theirs.eval()
    return {"ours": ours, "diffusers": lambda x, t: theirs(x, t).sample}


# ---------------------------------------------------------------------------- the scores


def score(args: argparse.Namespace, out: Path, train_data: ImageData) -> dict[str, dict]:
    test = load_images(args.data, 28, 1, split="test")
    models = load_trained(out)
    diffusion = get_config("mnist").diffusion.build()
    common.say(f"training the feature classifier ({args.classifier_epochs:g} epochs)")
    classifier, accuracy = train_classifier(train_data, test, args.classifier_epochs, args.seed)
    common.say(f"  test accuracy {accuracy:.4f}")
    n = args.samples
    test_feats = features(classifier, test.to_float(slice(0, len(test))))
    floor = frechet_distance(features(classifier, train_data.to_float(slice(0, n))), test_feats)
    report: dict[str, dict] = {"classifier": {"test_accuracy": accuracy, "fd_train_vs_test": floor, "n": n}}
    x0 = test.to_float(slice(0, args.bpd_images))
    for name, model in models.items():
        common.say(f"{name}: {n} DDIM-{args.sample_steps} samples")
        g = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            x = torch.cat([diffusion.sample(model, (min(100, n - i), 1, 28, 28), sampler="ddim",
                                            steps=args.sample_steps, generator=g) for i in range(0, n, 100)])
        sample_s = time.perf_counter() - start
        x = (x.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1  # what a PNG of the sample holds
        grid = save_image(make_grid(x[:64], nrow=8), Path(args.img) / f"quality_mnist_{name}.png")
        fd = frechet_distance(features(classifier, x), test_feats)
        with torch.no_grad():
            digits = classifier(x).softmax(1)
        confident = (digits.max(1).values > 0.9).float().mean().item()
        common.say(f"{name}: {len(x0)} test images, bits/dim over all {diffusion.num_timesteps} terms")
        start = time.perf_counter()
        with torch.inference_mode():
            bpd = diffusion.bits_per_dim(model, x0, max_batch=500, generator=torch.Generator().manual_seed(args.seed),
                                         progress=True)["total_bpd"]
        stderr = (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else float("nan")
        report[name] = {
            "bpd": bpd.mean().item(), "bpd_stderr": stderr,
            "bpd_images": len(bpd), "bpd_seconds": time.perf_counter() - start, "fd": fd,
            "confident_fraction": confident, "sample_seconds": sample_s, "grid": str(grid),
        }
        common.say(f"  {json.dumps(report[name])}")
    (out / "score.json").write_text(json.dumps(report, indent=1))
    return report


def table(trained: dict, report: dict) -> str:
    rows = []
    for name in ("ours", "diffusers"):
        t, r = trained[name], report[name]
        rows.append([name, f"{t['steps']:,}", t["batch"], f"{t['seconds'] / 60:.1f}", f"{t['img_per_s']:.1f}",
                     f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}", f"{r['fd']:.1f}", f"{r['confident_fraction']:.3f}"])
    return common.markdown_table(
        ["recipe", "steps", "batch", "train min", "img/s", "test bits/dim", "FD (classifier)", "confident"], rows)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.data = str(common.mnist_path(args.data))
    common.set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_images(args.data, 28, 1, split="train", limit=args.train_limit or None)
    if args.skip_train:
        trained = json.loads((out / "train.json").read_text())
    else:
        trained = train_both(args, out, data)
    report = score(args, out, data)
    text = table(trained, report)
    c = report["classifier"]
    print(text)
    if args.append:
        common.append_entry(
            f"quality at equal budget, MNIST, {args.minutes:g} min per recipe", "bench.quality", argv,
            [f"both recipes train the same {num_parameters(UNet(get_preset('mnist'))):,}-parameter U-Net "
             f"in {args.slices} alternating slices; EMA weights scored",
             f"bits/dim: the full bound of our evaluator on the first {args.bpd_images} MNIST test images "
             "(mean ± standard error)",
             f"FD: Fréchet distance of {args.samples} DDIM-{args.sample_steps} samples to the 10,000 test images in "
             f"the features of an MNIST classifier trained here (test accuracy {c['test_accuracy']:.4f}); "
             f"{args.samples} training images score {c['fd_train_vs_test']:.2f} (the floor); "
             "confident: share of samples the classifier gives one class > 0.9",
             "grids: bench/img/quality_mnist_ours.png, bench/img/quality_mnist_diffusers.png"],
            text)
    return {"train": trained, "score": report}


if __name__ == "__main__":
    main()
