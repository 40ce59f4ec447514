"""The speeds README's preset table gives: a training step and a sampling forward of each preset, in one run.

For each preset, at its README batch: images per second of a full training step (forward,
backward, Adam; float32, as ``ddpm train`` runs on the CPU) and of a ``no_grad`` forward (one
network evaluation of a sampler), medians of ``--repeats`` timed runs after a warm-up.

    python -m bench.preset_speed --append
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench import common
from ddpm.models import UNet, get_preset
from ddpm.runtime import num_parameters

CPU = torch.device("cpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.preset_speed", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="cifar10:8,mnist:64,digits:64", help="preset:batch pairs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--append", action="store_true", help="append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


def measure(preset: str, batch: int, repeats: int) -> list[object]:
    model = common.perturb(UNet(get_preset(preset)), seed=1).train()
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    sr = {}
    if c.low_res_channels:  # a super-resolution stage also reads the image at half the side, and its level
        sr = {"low_res": torch.randn(batch, c.low_res_channels, c.image_size // 2, c.image_size // 2, generator=g),
              "noise_level": torch.rand(batch, generator=g)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(x, t, **sr), x).backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            model(x, t, **sr)

    speeds = []
    for fn in (step, forward):
        fn()  # warm-up
        seconds = statistics.median(common.time_call(fn, CPU) for _ in range(repeats))
        speeds.append(batch / seconds)
    common.say(f"{preset}: training {speeds[0]:.1f} img/s, forward {speeds[1]:.1f} img/s")
    return [preset, f"{num_parameters(model):,}", batch, f"{speeds[0]:.1f}", f"{speeds[1]:.1f}"]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    rows = [measure(name, int(batch), args.repeats) for name, batch in (p.split(":") for p in args.presets.split(","))]
    body = common.markdown_table(["preset", "parameters", "batch", "training img/s", "forward img/s"], rows)
    print(body)
    if args.append:
        common.append_entry("Preset speeds for README (training step and sampling forward, float32)",
                            "bench.preset_speed", argv,
                            [f"{threads} threads, median of {args.repeats} runs after one warm-up"], body)


if __name__ == "__main__":
    main()
