"""Inpainting MNIST test digits: RePaint against the replacement method, at equal NFE and at RePaint's defaults.

For each mask of ``--masks`` (``half``: the right half generated; ``centre``: the centre square of half
the side generated) and each method, ``--images`` test digits are completed once (seeded) and scored
in the features of :mod:`bench.mnist_fd`'s classifier: its accuracy on the completions against the
digits' true labels, and the Fréchet distance of the completions to the test set; beside them the
same for the originals (the ceiling) and for the masked inputs with the hole left grey (the floor).

A method is ``repaint:K:j:r`` (K kept DDPM steps, jumps of j, r resamples: 2,410 NFE at the paper's
250:10:10) or ``replacement:SAMPLER:NFE``. Every RePaint entry brings a replacement run at its NFE
(with ``--replacement-sampler``, DDPM's ancestral steps by default, at most T of them), so the two are
compared at equal cost as well as at RePaint's defaults. RePaint at its defaults costs 2,410 network
evaluations a digit: on 2 CPU cores and the ``mnist`` preset about an hour for 500 digits and a mask.

    python -m bench.inpainting runs/mnist --data mnist.npz --out bench/out/inpainting --append
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from bench import common
from ddpm.data import load_images
from ddpm.generate import SamplerSettings
from ddpm.images import labelled_rows, save_image
from ddpm.inpaint import inpaint, masked_preview, repaint_nfe
from ddpm.loading import load_model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.inpainting", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained MNIST model (run, checkpoint or model directory)")
    p.add_argument("--data", default=None, help="MNIST .npz (default $DDPM_MNIST)")
    p.add_argument("--out", required=True, help="where results.json and the grids go")
    p.add_argument("--images", type=int, default=500, help="test digits per mask (default 500)")
    p.add_argument("--masks", default="half,centre", help="half and/or centre (default both)")
    p.add_argument("--methods", default="repaint:250:10:10,repaint:50:10:3",
                   help="repaint:K:j:r and replacement:SAMPLER:NFE entries (default the paper's RePaint and a "
                        "cheap one, each with replacement at its NFE)")
    p.add_argument("--replacement-sampler", default="ddpm", help="the sampler of the equal-NFE replacement runs")
    p.add_argument("--batch", type=int, default=250, help="images per model call")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


def make_mask(kind: str, side: int) -> Tensor:
    """[1, 1, side, side]: 1 keeps a pixel (diffusers' convention), 0 generates it."""
    mask = torch.ones(1, 1, side, side)
    if kind == "half":
        mask[..., side // 2:] = 0
    elif kind == "centre":
        lo = side // 4
        mask[..., lo:lo + side // 2, lo:lo + side // 2] = 0
    else:
        raise SystemExit(f"error: unknown mask {kind!r} (half or centre)")
    return mask


def methods(spec: str, replacement_sampler: str, T: int) -> list[dict]:
    """The methods of ``--methods``, each RePaint entry followed by replacement at its NFE."""
    out = []
    for entry in spec.split(","):
        kind, *rest = entry.split(":")
        if kind == "repaint":
            K, j, r = (int(v) for v in rest)
            nfe = repaint_nfe(K, j, r)
            out.append({"name": f"RePaint {K} steps, j={j}, r={r}", "method": "repaint", "steps": K, "jump": j,
                        "resamples": r, "nfe": nfe})
            out.append({"name": f"replacement, {replacement_sampler} at {min(nfe, T)} NFE", "method": "replacement",
                        "sampler": replacement_sampler, "steps": min(nfe, T), "nfe": min(nfe, T)})
        elif kind == "replacement":
            sampler, nfe = rest[0], int(rest[1])
            out.append({"name": f"replacement, {sampler} at {nfe} NFE", "method": "replacement", "sampler": sampler,
                        "steps": nfe, "nfe": nfe})
        else:
            raise SystemExit(f"error: unknown method {entry!r} (repaint:K:j:r or replacement:SAMPLER:NFE)")
    return out


def complete(loaded, images: Tensor, mask: Tensor, m: dict, args: argparse.Namespace) -> Tensor:
    sampler = "ddpm" if m["method"] == "repaint" else m["sampler"]
    settings = SamplerSettings(sampler, m["steps"])
    return inpaint(loaded.model, loaded.diffusion.build(), images, mask, m["method"], settings,
                   jump_length=m.get("jump", 10), resamples=m.get("resamples", 10), seed=args.seed,
                   batch_size=args.batch, progress=False, autoencoder=loaded.autoencoder).images


def accuracy(space, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        predicted = torch.cat([space.classifier(part.clamp(-1, 1)).argmax(1) for part in images.split(1000)])
    return (predicted == labels).float().mean().item()


@torch.no_grad()
def measure(args: argparse.Namespace) -> dict:
    from bench.mnist_fd import FeatureSpace

    threads = common.set_threads(args.threads)
    loaded = load_model(args.run)
    with torch.enable_grad():  # a first run trains the classifier
        space = FeatureSpace(args.data, seed=args.seed)
    test = load_images(args.data, 28, 1, split="test", limit=args.images)
    images, labels = test.to_float(slice(0, len(test))), test.labels
    results = {"run": loaded.description, "images": len(images), "threads": threads,
               "originals": {"accuracy": accuracy(space, images, labels), "fd": space.distance(images)},
               "fd_floor": space.floor(len(images)), "masks": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for kind in args.masks.split(","):
        mask = make_mask(kind, 28)
        masked = masked_preview(images, mask)
        rows = {"masked": {"accuracy": accuracy(space, masked, labels), "fd": space.distance(masked), "nfe": 0}}
        shown = [(images[:10], "original"), (masked[:10], "masked")]
        for m in methods(args.methods, args.replacement_sampler, loaded.diffusion.timesteps):
            start = time.perf_counter()
            done = complete(loaded, images, mask, m, args)
            rows[m["name"]] = {"accuracy": accuracy(space, done, labels), "fd": space.distance(done), "nfe": m["nfe"],
                               "seconds": time.perf_counter() - start}
            common.say(f"{kind}, {m['name']}: {rows[m['name']]}")
            shown.append((done[:10], m["name"]))
        results["masks"][kind] = rows
        common.say(f"wrote {save_image(labelled_rows(shown), out / f'inpainting_{kind}.png')}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    rows = [["originals", "", f"{results['originals']['accuracy']:.3f}", f"{results['originals']['fd']:.2f}", ""]]
    for kind, entries in results["masks"].items():
        rows += [[kind, name, f"{r['accuracy']:.3f}", f"{r['fd']:.2f}", r["nfe"]] for name, r in entries.items()]
    return common.markdown_table(["mask", "method", "classifier accuracy", "FD to the test set", "NFE per digit"],
                                 rows)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.data = str(common.mnist_path(args.data))
    results = measure(args)
    common.say(table(results))
    if args.append:
        common.append_entry("inpainting MNIST test digits: RePaint against replacement", "bench.inpainting", argv,
                            [f"model: {results['run']}", f"{results['images']} test digits per mask, seed "
                             f"{args.seed}, {results['threads']} threads; FD floor {results['fd_floor']:.2f}"],
                            table(results))
    return results


if __name__ == "__main__":
    main()
