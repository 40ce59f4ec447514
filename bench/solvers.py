"""Sample quality against network evaluations (NFE): our solvers and diffusers' schedulers on one model.

One trained `mnist` model (a run directory, its EMA weights), the same x_T for every method (image
i's noise comes from generator (seed, i), as ``ddpm.generate`` draws it), and for every method and
NFE the Fréchet distance of ``--samples`` samples to the MNIST test set in the features of the
classifier of :mod:`bench.mnist_fd` (the floor: as many training images). diffusers' schedulers
run at their defaults (given the model's linear β schedule) and drive the same network's ε:
``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M), ``UniPCMultistepScheduler`` and ``DDIMScheduler``.

A method of ours is ``NAME[:SPACING][:OPTION=VALUE]...`` (``eta``, ``order``, ``final_step``,
``lower_order_final``: :class:`ddpm.generate.SamplerSettings`' fields), e.g. ``unipc:trailing:order=2``;
``--spacings``, ``--etas``, ``--orders``, ``--final-steps`` and ``--lower-order-final`` cross every
method with those values where they apply (``default``: the solver's own). A value equal to the
solver's default is left out of a point's name, so the plain name is the default point.

Results go to ``--out``/solvers.json as they come (a rerun skips the points already there), then
to a plot (``--plot``; the default points) and, with ``--append``, to bench/RESULTS.md. ``--list``
prints the points and stops.

    python -m bench.solvers runs/mnist --data mnist.npz --samples 1000 --append
    python -m bench.solvers runs/mnist --data mnist.npz --nfe 5,7,10,15 --methods dpm++2m-sde,dpm++3m-sde \\
        --spacings default,logsnr --etas 0.25,0.5,0.75,1 --final-steps denoise,sigma-min --list
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench import common
from bench.mnist_fd import FeatureSpace
from ddpm.generate import SamplerSettings, generate, image_generators
from ddpm.loading import load_model
from ddpm.samplers import DEFAULT_ETA, DEFAULT_SPACING, FINAL_STEP_SAMPLERS, MULTISTEP, ORDERS

OURS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "unipc", "unipc-bh1", "heun")
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
                   help="which methods; NAME[:SPACING][:OPTION=VALUE]... runs one of ours with another spacing or "
                        "options (eta, order, final_step, lower_order_final)")
    p.add_argument("--spacings", default="default", help="spacings to cross our methods with (default: their own)")
    p.add_argument("--etas", default="default", help="etas for ddim and the SDE solvers (e.g. 0,0.5,1)")
    p.add_argument("--orders", default="default", help="UniPC's orders (e.g. 1,2,3)")
    p.add_argument("--final-steps", default="default", help="final steps of ddim and the multistep solvers "
                                                             "(denoise,sigma-min)")
    p.add_argument("--lower-order-final", default="default", help="the multistep solvers' lower-order last steps "
                                                                   "(on,off; off only where it changes the chain)")
    p.add_argument("--list", action="store_true", help="print the points (method@NFE) and stop")
    p.add_argument("--batch", type=int, default=250, help="images per network call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/solvers", help="where solvers.json goes")
    p.add_argument("--plot", default=None, help="the FD-vs-NFE plot (default: plot.png in --out; a run that "
                   "should replace a gallery figure names it)")
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


#: The options a method name may carry, read from their text.
OPTIONS: dict[str, Any] = {"eta": float, "order": int, "final_step": str,
                           "lower_order_final": lambda v: {"true": True, "on": True, "false": False, "off": False}[v]}
#: The options' defaults where the solver takes them (UniPC's order: ddpm.samplers.UniPC).
DEFAULTS: dict[str, Any] = {"eta": DEFAULT_ETA.get, "order": lambda name: 3, "final_step": lambda name: "denoise",
                            "lower_order_final": lambda name: True}
#: Which of our solvers take each axis of the sweep.
TAKES = {"spacing": lambda name: name != "dpm-adaptive", "eta": lambda name: name in DEFAULT_ETA and name != "ddpm",
         "order": lambda name: name in ORDERS, "final_step": lambda name: name in FINAL_STEP_SAMPLERS,
         "lower_order_final": lambda name: name in MULTISTEP}


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:SPACING][:OPTION=VALUE]...`` as the sampler's name and its :class:`SamplerSettings` fields."""
    name, *parts = method.split(":")
    fields: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            fields["spacing"] = key
        elif key in OPTIONS:
            fields[key] = OPTIONS[key](value)
        else:
            raise SystemExit(f"bench.solvers: unknown option {key!r} in {method!r}; choose from {', '.join(OPTIONS)}")
    return name, fields


def method_name(name: str, fields: dict[str, Any]) -> str:
    """The point's name: ``name`` with the spacing and the options that are not the solver's defaults."""
    spacing = fields.get("spacing")
    parts = [name] + ([spacing] if spacing not in (None, DEFAULT_SPACING.get(name)) else [])
    for key in OPTIONS:
        value = fields.get(key)
        if value is not None and value != DEFAULTS[key](name):
            parts.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return ":".join(parts)


def lower_order_final_matters(name: str, fields: dict[str, Any]) -> bool:
    """Whether turning the lower-order final steps off changes the chain: with an order of 3, or of 2 with a
    last step to σ_min (a last step to the data is first order anyway; see ddpm.samplers.Multistep)."""
    order = 2 if name.startswith("dpm++2m") else 3 if name.startswith("dpm++3m") else fields.get("order") or 3
    return order >= 3 or (order == 2 and fields.get("final_step") == "sigma-min")


def expand(methods: Sequence[str], args: argparse.Namespace) -> list[str]:
    """Every method crossed with the sweep's axes that apply to it and that its name does not fix."""
    axes = {"spacing": args.spacings, "eta": args.etas, "order": args.orders, "final_step": args.final_steps,
            "lower_order_final": args.lower_order_final}
    out = []
    for method in methods:
        name, given = parse_method(method)
        if name in ("ddpm", "dpm-adaptive") or name.startswith("diffusers"):
            out.append(method)
            continue
        values = {key: [None if v == "default" else (OPTIONS[key](v) if key in OPTIONS else v) for v in text.split(",")]
                  for key, text in axes.items() if key not in given and TAKES[key](name)}
        for combination in itertools.product(*values.values()):
            fields = {**given, **{key: value for key, value in zip(values, combination) if value is not None}}
            if fields.get("lower_order_final") is False and not lower_order_final_matters(name, fields):
                continue
            out.append(method_name(name, fields))
    return list(dict.fromkeys(out))


def settings(method: str, nfe: int) -> SamplerSettings:
    """Our sampler ``NAME[:SPACING][:OPTION=VALUE]...`` at ``nfe``."""
    name, fields = parse_method(method)
    return SamplerSettings(name, nfe, **fields)


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(method, NFE, samples) for every point of the sweep, cheapest first."""
    nfes = [int(v) for v in args.nfe.split(",")]
    todo = []
    for method in expand(args.methods.split(","), args):
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
    todo = points(args)
    if args.list:
        for method, nfe, n in todo:
            print(f"{method}@{nfe} ({n} samples)")
        print(f"{len(todo)} points, {sum(n for _, _, n in todo):,} images, {sum(nfe * n for _, nfe, n in todo):,} "
              "network evaluations of one image")
        return {f"{method}@{nfe}": {"method": method, "nfe": nfe, "samples": n} for method, nfe, n in todo}
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
    for method, nfe, n in todo:
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
    path = plot(results, floor, Path(args.plot) if args.plot else Path(args.out) / "plot.png")
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
             f"plot: {path}"],
            common.markdown_table(["method", "NFE", "NFE used", "samples", "FD", "confident", "img/s"], rows))
    return results


if __name__ == "__main__":
    main()
