"""Speed of our U-Net against diffusers' UNet2DModel in the same layout.

Both models get the same weights, inputs, batch and thread count; runs alternate in one process
(which model goes first alternates too, against drift), after warm-up; the table gives the median
of the per-round time ratios and a distribution-free interval for it (``common.paired_ratio``).
Forward is timed in eval mode without gradients (sampling); a training step is forward, MSE to a
noise target, backward and an Adam step, in train mode (dropout on).

    python -m bench.unet_speed --preset cifar10 --batch 8 --repeats 12 --append
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from bench import common
from ddpm.models import UNet, get_preset
from ddpm.runtime import num_parameters


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.unet_speed",
        description="Forward and training-step time of ddpm's U-Net vs diffusers' UNet2DModel.",
    )
    parser.add_argument("--preset", default="cifar10", help="U-Net preset (default cifar10)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads (default {torch.get_num_threads()})")
    parser.add_argument("--append", action="store_true",
                        help="append a dated entry to bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float | str]]:
    """Run the comparison, print a table, and return the medians in seconds and the ratios."""
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = torch.device(args.device)
    config = get_preset(args.preset)
    torch.manual_seed(0)
    # Off DDPM's zero initialisation, so that the outputs compared below are not all zero.
    ours = common.perturb(UNet(config)).to(device)
    theirs = common.diffusers_twin(ours)
    counts = [num_parameters(m) for m in (ours, theirs)]
    if counts[0] != counts[1]:
        raise SystemExit(f"parameter counts differ: ours {counts[0]:,}, diffusers {counts[1]:,}")
    print(f"preset {args.preset}: {counts[0]:,} parameters in both; batch {args.batch}, "
          f"{args.threads} threads, {device}", flush=True)

    side = config.image_size
    x = torch.randn(args.batch, config.in_channels, side, side, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.zeros(args.batch, dtype=torch.long, device=device) if config.num_classes else None
    target = torch.randn(args.batch, config.out_channels, side, side, device=device)
    calls = {
        "ours": (ours, lambda: ours(x, t, y)),
        "diffusers": (theirs, lambda: theirs(x, t, class_labels=y).sample),
    }
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (calls["ours"][1]() - calls["diffusers"][1]()).abs().max().item()
    print(f"max |ours - diffusers| on this input: {diff:.2e}")

    optimizers = {name: torch.optim.Adam(m.parameters(), lr=2e-4) for name, (m, _) in calls.items()}

    def forward(name: str) -> Callable[[], object]:
        model, call = calls[name]
        model.eval()

        def run() -> None:
            with torch.no_grad():
                call()

        return run

    def train_step(name: str) -> Callable[[], object]:
        model, call = calls[name]
        model.train()
        optimizer = optimizers[name]

        def run() -> None:
            loss = torch.nn.functional.mse_loss(call(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    results: dict[str, dict[str, float | str]] = {}
    for task, make in (("forward", forward), ("train step", train_step)):
        # make(name) again before every call: it also puts the model in the task's mode.
        fns = {name: (lambda name=name, make=make: make(name)()) for name in calls}
        times = common.time_alternating(fns, args.repeats, args.warmup, device)
        medians = common.medians(times)
        ratio = common.paired_ratio(times["ours"], times["diffusers"])
        results[task] = {**medians, "ratio": ratio.median, "interval": ratio.interval_cell()}
        print(f"{task}: ours {medians['ours'] * 1e3:.1f} ms, diffusers "
              f"{medians['diffusers'] * 1e3:.1f} ms, time ratio {ratio} "
              f"({100 * ratio.coverage:.0f}% interval)", flush=True)

    table = _table(results)
    print(table)
    if args.append:
        common.append_entry(
            f"U-Net speed, preset {args.preset}", "bench.unet_speed", argv,
            [f"{counts[0]:,} parameters in both models; batch {args.batch}, {args.threads} threads, device "
             f"{args.device}, {args.warmup} warm-up + {args.repeats} timed runs each, alternating, medians"],
            table, device=device)
    return results


def _table(results: dict[str, dict[str, float | str]]) -> str:
    rows = [[task, f"{r['ours'] * 1e3:.1f}", f"{r['diffusers'] * 1e3:.1f}", f"{r['ratio']:.3f}",
             r["interval"]]
            for task, r in results.items()]
    return common.markdown_table(["task", "ours (ms)", "diffusers (ms)", "ours / diffusers (time)",
                                  "interval (coverage)"], rows)


if __name__ == "__main__":
    main()
