"""Sample quality against network evaluations (NFE): our solvers and diffusers' schedulers on one model.

One trained `mnist` model (a run directory, its EMA weights), the same x_T for every method (image
i's noise comes from generator (seed, i), as ``ddpm.generate`` draws it), and for every method and
NFE the Fréchet distance of ``--samples`` samples to the MNIST test set in the features of the
classifier of :mod:`bench.mnist_fd` (the floor: as many training images). diffusers' schedulers
run at their defaults (given the model's linear β schedule) and drive the same network's ε:
``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M), ``UniPCMultistepScheduler`` and ``DDIMScheduler``.

Results go to ``--out``/solvers.json as they come (a rerun skips the points already there), then
to a plot (``--plot``) and, with ``--append``, to bench/RESULTS.md.

    python -m bench.solvers runs/mnist --data mnist.npz --samples 1000 --append
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bench import common
from bench.mnist_fd import FeatureSpace
from ddpm.generate import SamplerSettings, generate, image_generators
from ddpm.loading import load_model

OURS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "heun")
THEIRS = ("diffusers-dpm++2m", "diffusers-unipc", "diffusers-ddim")
#: The sample count of the small-sample FDs every point also records (the first 250 images, etc.).
QUARTER = 250


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.solvers", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained mnist run directory (EMA weights are used)")
    p.add_argument("--data", default=None, help=f"MNIST .npz (default ${common.MNIST_ENV})")
    p.add_argument("--samples", type=int, default=1000, help="samples per point (default 1000)")
    p.add_argument("--ddpm-samples", type=int, default=250, help="samples for DDPM-1000 (default 250)")
    p.add_argument("--ddim1000-samples", type=int, default=None, help="samples for DDIM-1000 (default --samples)")
    p.add_argument("--nfe", default="5,10,20,50", help="NFEs for the solvers and diffusers (default 5,10,20,50)")
    p.add_argument("--ddim-nfe", default="10,20,50,100,1000", help="NFEs for our DDIM")
    p.add_argument("--methods", default=",".join((*OURS, "ddim", "ddpm", *THEIRS)),
                   help="which methods; NAME:SPACING runs one of ours with another spacing")
    p.add_argument("--batch", type=int, default=250, help="images per network call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/solvers", help="where solvers.json goes")
    p.add_argument("--plot", default="docs/img/solvers_mnist.png", help="the FD-vs-NFE plot")
    p.add_argument("--append", action="store_true", help="append an entry to bench/RESULTS.md")
    p.add_argument("--grid", default=None, help="also draw the same seeds under every method at --grid-nfe (a PNG)")
    p.add_argument("--grid-nfe", type=int, default=10)
    p.add_argument("--grid-count", type=int, default=12)
    return p.parse_args(argv)


@torch.no_grad()
def diffusers_sample(kind: str, model: nn.Module, n: int, nfe: int, seed: int, batch: int) -> tuple[Tensor, float]:
    """Samples from a diffusers scheduler at its defaults, driving our network's ε; returns them and the NFE."""
    import diffusers

    cls = {"diffusers-dpm++2m": diffusers.DPMSolverMultistepScheduler,
           "diffusers-unipc": diffusers.UniPCMultistepScheduler,
           "diffusers-ddim": diffusers.DDIMScheduler}[kind]
    out, calls = [], 0
    for first in range(0, n, batch):
        m = min(batch, n - first)
        scheduler = cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
        scheduler.set_timesteps(nfe)
        x = torch.stack([torch.randn(1, 28, 28, generator=g) for g in image_generators(seed, first, m, "cpu")])
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(x, t), torch.full((m,), int(t)))
            calls += 1
            x = scheduler.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out), calls / len(out)


def settings(method: str, nfe: int) -> SamplerSettings:
    """Our sampler ``NAME`` or ``NAME:SPACING`` (a spacing other than the solver's default) at ``nfe``."""
    name, _, spacing = method.partition(":")
    return SamplerSettings(name, nfe, spacing=spacing or None)


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(method, NFE, samples) for every point of the sweep, cheapest first."""
    nfes = [int(v) for v in args.nfe.split(",")]
    methods = args.methods.split(",")
    todo = []
    for method in methods:
        if method == "ddim":
            todo += [(method, k, args.ddim1000_samples or args.samples if k == 1000 else args.samples)
                     for k in map(int, args.ddim_nfe.split(","))]
        elif method == "ddpm":
            todo.append((method, 1000, args.ddpm_samples))
        else:
            todo += [(method, k, args.samples) for k in nfes]
    return sorted(todo, key=lambda p: p[1] * p[2])


def plot(results: dict, floor: float, path: Path) -> Path:
    from ddpm.viz import new_figure, save_figure

    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    by_method: dict[str, list[tuple[int, float]]] = {}
    for r in results.values():
        if ":" in r["method"]:
            continue  # spacing variants: in the table, not the plot
        by_method.setdefault(r["method"], []).append((r["nfe"], r["fd"]))
    for method, values in sorted(by_method.items()):
        values.sort()
        style = "--" if method.startswith("diffusers") else "-"
        ax.plot([v[0] for v in values], [v[1] for v in values], style, marker="o", ms=3, label=method)
    ax.axhline(floor, color="grey", lw=0.8, ls=":", label="floor (training images)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("FD to the test set (classifier features)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    return save_figure(fig, path)


def comparison_grid(args: argparse.Namespace, loaded: object, diffusion: object) -> Path:
    """The first ``--grid-count`` seeds under every method at ``--grid-nfe`` (DDPM: 1000), one row each."""
    from ddpm.images import labelled_rows, save_image

    rows = []
    methods = args.methods.split(",")
    for method in [m for m in methods if m != "ddpm"] + ["ddpm"] * ("ddpm" in methods):
        nfe = 1000 if method == "ddpm" else args.grid_nfe
        if method.startswith("diffusers"):
            x, used = diffusers_sample(method, loaded.model, args.grid_count, nfe, args.seed, args.grid_count)
        else:
            s = generate(loaded.model, diffusion, args.grid_count, settings(method, nfe), seed=args.seed,
                         batch_size=args.grid_count, bf16=False, progress=False)
            x, used = s.images, s.nfe
        rows.append((x, f"{method} ({used:g} NFE)"))
    return save_image(labelled_rows(rows), args.grid)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    data = common.mnist_path(args.data)
    threads = common.set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "solvers.json"
    results: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    loaded = load_model(args.run, "ema", "cpu")
    diffusion = loaded.diffusion.build()
    space = FeatureSpace(data, seed=args.seed)
    floor = space.floor(args.samples)
    common.say(f"classifier test accuracy {space.accuracy:.4f}; floor FD {floor:.2f} ({args.samples} training images)")
    for method, nfe, n in points(args):
        key = f"{method}@{nfe}"
        if key in results and results[key]["samples"] == n:
            continue
        start = time.perf_counter()
        if method.startswith("diffusers"):
            x, used = diffusers_sample(method, loaded.model, n, nfe, args.seed, args.batch)
        else:
            s = generate(loaded.model, diffusion, n, settings(method, nfe), seed=args.seed,
                         batch_size=args.batch, bf16=False, progress=False)
            x, used = s.images, s.nfe
        seconds = time.perf_counter() - start
        results[key] = {"method": method, "nfe": nfe, "nfe_used": used, "samples": n, "fd": space.distance(x),
                        "confident": space.confident(x), "seconds": seconds, "img_per_s": n / seconds,
                        # FD of consecutive quarters of QUARTER samples: a smaller sample's FD and its spread,
                        # to compare with the points drawn with fewer samples (DDPM-1000, DDIM-1000).
                        "fd_quarters": [space.distance(x[i:i + QUARTER]) for i in range(0, n - QUARTER + 1, QUARTER)]}
        common.say(f"{key}: {json.dumps(results[key])}")
        results_path.write_text(json.dumps(results, indent=1))
    path = plot(results, floor, Path(args.plot))
    common.say(f"wrote {path} and {results_path}")
    if args.grid:
        common.say(f"wrote {comparison_grid(args, loaded, diffusion)}")
    if args.append:
        rows = [[r["method"], r["nfe"], f"{r['nfe_used']:g}", r["samples"], f"{r['fd']:.2f}", f"{r['confident']:.3f}",
                 f"{r['img_per_s']:.1f}"] for r in sorted(results.values(), key=lambda r: (r["method"], r["nfe"]))]
        common.append_entry(
            "MNIST sample quality against NFE (our solvers vs diffusers' schedulers, one model)", "bench.solvers", argv,
            [f"model: {loaded.description}", f"{threads} threads; FD in the bench.mnist_fd classifier's features "
             f"(test accuracy {space.accuracy:.4f}); floor {floor:.2f} ({args.samples} training images)",
             f"plot: {args.plot}"],
            common.markdown_table(["method", "NFE", "NFE used", "samples", "FD", "confident", "img/s"], rows))
    return results


if __name__ == "__main__":
    main()
