"""Speed of our U-Net against diffusers' UNet2DModel in the same layout.

Both models get the same weights, inputs, batch and thread count; runs alternate in one process
(which model goes first alternates too, against drift), after warm-up, and the medians are
compared. Forward is timed in eval mode without gradients (sampling); a training step is forward,
MSE to a noise target, backward and an Adam step, in train mode (dropout on).

    python -m bench.unet_speed --preset cifar10 --batch 8 --repeats 5 --append
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ddpm.models import UNet, get_preset
from ddpm.models.diffusers_io import config_to_diffusers, state_dict_to_diffusers

RESULTS = Path(__file__).with_name("RESULTS.md")


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the comparison, print a table, and return the medians in seconds and the ratios."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Imported here so that --help works without diffusers.
    from diffusers import UNet2DModel

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = get_preset(args.preset)
    torch.manual_seed(0)
    ours = UNet(config).to(device)
    with torch.no_grad():
        # Off DDPM's zero initialisation, so that the outputs compared below are not all zero.
        for p in ours.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)
    theirs = UNet2DModel.from_config(config_to_diffusers(config)).to(device)
    theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict(), config))
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
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

    results: dict[str, dict[str, float]] = {}
    for task, make in (("forward", forward), ("train step", train_step)):
        times: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(args.warmup + args.repeats):
            order = list(calls) if r % 2 == 0 else list(reversed(calls))
            for name in order:
                elapsed = _time(make(name), device)
                if r >= args.warmup:
                    times[name].append(elapsed)
        medians = {name: statistics.median(v) for name, v in times.items()}
        results[task] = {**medians, "ratio": medians["ours"] / medians["diffusers"]}
        print(f"{task}: ours {medians['ours'] * 1e3:.1f} ms, diffusers "
              f"{medians['diffusers'] * 1e3:.1f} ms, ratio {results[task]['ratio']:.3f}",
              flush=True)

    table = _table(results)
    print(table)
    if args.append:
        _append(args, argv, table, counts[0])
    return results


def _table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| task | ours (ms) | diffusers (ms) | ours / diffusers |", "|---|---:|---:|---:|"]
    for task, r in results.items():
        rows.append(f"| {task} | {r['ours'] * 1e3:.1f} | {r['diffusers'] * 1e3:.1f} | "
                    f"{r['ratio']:.3f} |")
    return "\n".join(rows)


def _machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def _commit() -> str:
    """The checked-out commit, so that an entry says which code it measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=RESULTS.parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True,
                               cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def _append(args: argparse.Namespace, argv: list[str], table: str, count: int) -> None:
    import diffusers

    if not RESULTS.exists():
        RESULTS.write_text("# Benchmarks\n\nAppended by `python -m bench.unet_speed --append`.\n")
    entry = (
        f"\n## {datetime.date.today().isoformat()}: U-Net speed, preset {args.preset}\n\n"
        f"- machine: {_machine(args.device)}\n"
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}\n"
        f"- command: `python -m bench.unet_speed {' '.join(argv)}` at {_commit()}\n"
        f"- {count:,} parameters in both models; batch {args.batch}, {args.threads} threads, "
        f"device {args.device}, {args.warmup} warm-up + {args.repeats} timed runs each, medians\n\n"
        f"{table}\n"
    )
    with RESULTS.open("a") as f:
        f.write(entry)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
