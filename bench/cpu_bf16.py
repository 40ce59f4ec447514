"""bfloat16 autocast on the CPU against float32: a training step and a sampling forward, and sample quality.

Our machines' CPUs have AVX-512 BF16, so ``torch.autocast("cpu", dtype=torch.bfloat16)`` may pay.
This measures, in one process and in alternating rounds (ratios of adjacent runs, medians with an
order-statistic interval, :func:`bench.common.paired_ratio`):

On this machine's PyTorch (2.13.0, CPU wheel) ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
False, so a bf16 convolution falls back to ``aten::_slow_conv2d_forward`` (a profile of the `mnist`
forward: 748 ms in it against 43 ms of ``aten::mkldnn_convolution`` in float32).

- a training step (forward, backward, Adam) of the `mnist` U-Net at batch 64 and of the `cifar10`
  U-Net at batch 8, float32 against bf16 autocast;
- a sampling forward (``no_grad``) at the same batches;
- with ``--run``, sample quality: the same model, x_T and sampler under float32 and bf16, scored by
  the Fréchet distance of :mod:`bench.mnist_fd` (float32 vs bf16 at equal NFE).

    python -m bench.cpu_bf16 --repeats 8 --run runs/mnist --data mnist.npz --append
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bench import common
from ddpm.generate import SamplerSettings, generate
from ddpm.models import UNet, get_preset
from ddpm.runtime import autocast

CPU = torch.device("cpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_bf16", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mnist:64,cifar10:8", help="preset:batch pairs (default mnist:64,cifar10:8)")
    p.add_argument("--repeats", type=int, default=8, help="timed rounds (default 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--what", default="step,forward", help="what to time: step, forward or both (default both)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", default=None, help="a trained mnist run: also compare sample quality")
    p.add_argument("--data", default=None, help=f"MNIST .npz for --run (default ${common.MNIST_ENV})")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--append", action="store_true", help="append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


def speed(preset: str, batch: int, args: argparse.Namespace) -> list[list[object]]:
    """Rows of the speed table for one preset: training step and sampling forward, bf16 / float32."""
    model = common.perturb(UNet(get_preset(preset)), seed=1).train()
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step(bf16: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(CPU, bf16):
            out = model(x, t)
        F.mse_loss(out.float(), noise).backward()
        optimizer.step()

    def forward(bf16: bool) -> None:
        with torch.no_grad(), autocast(CPU, bf16):
            model(x, t)

    rows = []
    chosen = args.what.split(",")
    for what, fn in (("training step", step), ("sampling forward", forward)):
        if what.split()[-1] not in chosen:
            continue
        times = common.time_alternating({"float32": lambda fn=fn: fn(False), "bf16": lambda fn=fn: fn(True)},
                                        args.repeats, args.warmup, CPU, label=f"{preset} {what}")
        med = common.medians(times)
        speedup = common.paired_ratio(times["float32"], times["bf16"])  # > 1: bf16 is faster
        rows.append([preset, batch, what, f"{med['float32'] * 1e3:.0f}", f"{med['bf16'] * 1e3:.0f}",
                     f"{speedup.median:.3f}", speedup.interval_cell()])
        common.say(f"{preset} {what}: bf16 speed-up {speedup}")
    return rows


def quality(args: argparse.Namespace) -> list[list[object]]:
    """FD of the same model's samples under float32 and bf16 autocast (same x_T, sampler, NFE)."""
    from bench.mnist_fd import FeatureSpace
    from ddpm.loading import load_model

    space = FeatureSpace(common.mnist_path(args.data))
    loaded = load_model(args.run, "ema", CPU)
    diffusion = loaded.diffusion.build()
    rows = []
    for bf16 in (False, True):
        s = generate(loaded.model, diffusion, args.samples, SamplerSettings(args.sampler, args.steps), seed=0,
                     batch_size=250, bf16=bf16, progress=False)
        rows.append(["bf16" if bf16 else "float32", f"{args.sampler}-{args.steps}", args.samples,
                     f"{space.distance(s.images):.2f}", f"{space.confident(s.images):.3f}"])
        common.say(f"quality: {rows[-1]}")
    rows.append(["floor (training images)", "", args.samples, f"{space.floor(args.samples):.2f}", ""])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    rows = []
    for item in args.presets.split(","):
        preset, batch = item.split(":")
        rows += speed(preset, int(batch), args)
    body = common.markdown_table(
        ["preset", "batch", "what", "float32 ms", "bf16 ms", "bf16 speed-up", "interval"], rows)
    if args.run:
        body += "\n\n" + common.markdown_table(["precision", "sampler", "samples", "FD", "confident"], quality(args))
    print(body)
    if args.append:
        common.append_entry("bfloat16 autocast on the CPU against float32", "bench.cpu_bf16", argv,
                            [f"{threads} threads, {args.repeats} alternating rounds after {args.warmup} warm-up",
                             "speed-up = float32 time / bf16 time (> 1: bf16 faster), median of per-round ratios"],
                            body)


if __name__ == "__main__":
    main()
