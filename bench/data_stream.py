"""Streamed training data: peak memory, decode throughput against what training consumes, and the
per-step cost of streaming.

Three parts (``--parts``), on images this script generates (``--workdir``; 64x64 RGB PNGs of smooth
colour fields in 10 class folders, and the same packed as WebDataset shards):

- ``rss``: the peak memory of ``ddpm train`` (the tiny preset at 64x64, batch 8, a few steps) on each of
  ``--sizes`` images, held in memory against streamed from the folder and from the shards. Memory is
  the process tree's PSS (the trainer and its DataLoader workers, a page they share counted once),
  sampled every 50 ms, and the trainer's own peak RSS (``ru_maxrss``).
- ``decode``: the images per second each streaming source delivers with 0, 1 and 2 workers, decoded to
  32x32 (the ``cifar10`` preset's input) in batches of 128 while nothing else runs, against what the
  ``cifar10`` preset's training step consumes: on this CPU (measured) and on an H100 (its forward +
  backward FLOPs per image from torch's flop counter, at ``--gpu-tflops`` x ``--gpu-mfu``: an estimate,
  no GPU measured). A source slower than the H100's rate would starve it.
- ``mnist``: seconds per training step of the ``mnist`` preset on the first ``--mnist-count`` MNIST
  images (``--data``'s .npz, written once as a folder of PNGs), held in memory against streamed with 2
  workers, in alternating rounds; the ratio is the median of per-round ratios with an order-statistic
  interval.

    python -m bench.data_stream --sizes 10000,100000 --parts rss --append
    python -m bench.data_stream --sizes 10000 --parts decode,mnist --data mnist.npz --append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import common
from bench.train_throughput import Contender
from ddpm.config import get_config
from ddpm.data import list_folder, make_fit
from ddpm.models import UNet, get_preset
from ddpm.shards import INDEX, open_shards, pack_folder
from ddpm.streaming import FolderStream
from ddpm.train import train

#: An H100 SXM's dense bfloat16 tensor-core peak (NVIDIA's data sheet), FLOP/s.
H100_FLOPS = 989.4e12


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.data_stream", description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="rss,decode,mnist", help="rss, decode, mnist (comma-separated)")
    parser.add_argument("--sizes", default="10000,100000", help="generated data set sizes for rss (the first for "
                                                                "decode)")
    parser.add_argument("--workdir", default=None, help="where the generated images and shards go (kept between "
                                                        "runs; default a temporary folder)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each rss and mnist run")
    parser.add_argument("--decode-batches", type=int, default=20, help="batches of 128 timed per decode reading")
    parser.add_argument("--decode-batch", type=int, default=128, help="batch size of the decode part (default 128)")
    parser.add_argument("--cifar-batch", type=int, default=8, help="batch of the timed cifar10 CPU step")
    parser.add_argument("--cifar-repeats", type=int, default=3, help="timed cifar10 CPU steps")
    parser.add_argument("--gpu-tflops", type=float, default=H100_FLOPS / 1e12, help="the GPU's peak TFLOP/s")
    parser.add_argument("--gpu-mfu", type=float, default=0.4, help="the share of that peak a step reaches")
    parser.add_argument("--data", default=None, help=f"MNIST .npz for the mnist part (default ${common.MNIST_ENV})")
    parser.add_argument("--mnist-count", type=int, default=10000, help="MNIST images of the mnist part")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the mnist part")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- data


def generate(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` PNGs of smooth random colour fields (8x8 noise, bicubic to ``size``) in 10 class folders."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == n:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = folder / f"c{i % 10}" / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        low.resize((size, size), Image.Resampling.BICUBIC).save(path)
    return folder


def shards_of(folder: Path, out: Path) -> Path:
    if not (out / INDEX).is_file():
        pack_folder(folder, out, max_count=1000, overwrite=True)
    return out


def data_sets(workdir: Path, n: int) -> tuple[Path, Path]:
    common.say(f"data: {n:,} generated 64x64 images in {workdir}")
    folder = generate(workdir / f"images-{n}", n)
    return folder, shards_of(folder, workdir / f"shards-{n}")


# ---------------------------------------------------------------------------- peak memory


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return found


def _pss_kib(pid: int) -> int:
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return 0


def peak_memory(cmd: Sequence[str]) -> tuple[float, float]:
    """Run ``cmd``; its process tree's peak PSS and its own peak RSS, in MiB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    return peak[0] / 1024, usage.ru_maxrss / 1024


def train_command(source: Path, out: Path, stream: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "ddpm", "train", "--preset", "tiny", "--data", str(source), "--out", str(out),
            "--overwrite", "--quiet", "--model.image_size", "64", "--model.attn_resolutions", "",
            "--train.batch_size", "8", "--train.steps", str(steps), "--train.sample_every", "0", "--train.ckpt_every",
            str(steps), "--train.sample_count", "1", "--train.sample_steps", "1", "--data.stream", stream,
            "--data.workers", "2"]


def measure_rss(workdir: Path, sizes: Sequence[int], steps: int) -> tuple[list[list[object]], dict]:
    rows, results = [], {}
    for n in sizes:
        folder, shards = data_sets(workdir, n)
        for name, source, stream in (("in memory", folder, "false"), ("streamed folder", folder, "true"),
                                     ("streamed shards", shards, "auto")):
            pss, rss = peak_memory(train_command(source, workdir / "run", stream, steps))
            common.say(f"  {n:,} images, {name}: peak PSS {pss:.0f} MiB (trainer RSS {rss:.0f} MiB)")
            results[f"{n}/{name}"] = {"pss_mib": pss, "rss_mib": rss}
            rows.append([f"{n:,}", name, f"{pss:.0f}", f"{rss:.0f}"])
    return rows, results


# ---------------------------------------------------------------------------- decode throughput


def decode_rate(batches, count: int, batch: int) -> float:
    """Images per second of ``count`` batches, after the first (the workers' start)."""
    next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch / (time.perf_counter() - start)


def cifar10_rates(batch: int, repeats: int, tflops: float, mfu: float) -> tuple[float, float, float]:
    """The cifar10 preset's training step: img/s on this CPU, its FLOPs per image, an H100's img/s."""
    options = argparse.Namespace(batch=batch, channels_last=False, compile=False, bf16=False, fused=False)
    torch.manual_seed(0)
    step = Contender("ours", UNet(get_preset("cifar10")), options, torch.device("cpu"))
    flops = step.flops_per_image()
    times = common.time_alternating({"cifar10": step.step}, repeats, 1, torch.device("cpu"))["cifar10"]
    return batch / float(np.median(times)), flops, tflops * 1e12 * mfu / flops


def measure_decode(workdir: Path, n: int, args: argparse.Namespace) -> tuple[list[list[object]], dict]:
    folder, shards = data_sets(workdir, n)
    fit = make_fit("generated", 32, 3)
    cpu, flops, gpu = cifar10_rates(args.cifar_batch, args.cifar_repeats, args.gpu_tflops, args.gpu_mfu)
    common.say(f"  cifar10 step: {cpu:.1f} img/s on this CPU; {flops / 1e9:.2f} GFLOP/img, so ~{gpu:,.0f} img/s "
               f"on a GPU of {args.gpu_tflops:g} TFLOP/s at {args.gpu_mfu:.0%} MFU")
    rows, results = [], {"cifar10_cpu_img_s": cpu, "cifar10_gflop_per_img": flops / 1e9, "gpu_img_s": gpu}
    for name in ("folder", "shards"):
        for workers in (0, 1, 2):
            source = (FolderStream(list_folder(folder), fit, workers) if name == "folder"
                      else open_shards(str(shards), fit, workers=workers))
            rate = decode_rate(source.batches(args.decode_batch, 0, flip=True), args.decode_batches, args.decode_batch)
            verdict = "keeps up" if rate >= gpu else f"starves it ({rate / gpu:.1%} of its rate)"
            common.say(f"  {name}, {workers} worker(s): {rate:,.0f} img/s; the H100 estimate: {verdict}")
            results[f"{name}/{workers}"] = rate
            rows.append([name, workers, f"{rate:,.0f}", f"{rate / cpu:.1f}x", f"{rate / gpu:.3f}", verdict])
    return rows, results


# ---------------------------------------------------------------------------- MNIST step time


def mnist_folder(npz: Path, out: Path, count: int) -> Path:
    """The first ``count`` MNIST training images as PNGs in one folder per digit (written once)."""
    if out.is_dir() and sum(1 for _ in out.rglob("*.png")) == count:
        return out
    with np.load(npz) as f:
        x, y = f["x_train"][:count], f["y_train"][:count]
    for i, (image, label) in enumerate(zip(x, y)):
        path = out / str(int(label)) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return out


def step_seconds(folder: Path, out: Path, stream: str, steps: int) -> float:
    """Seconds per step of the mnist preset, from its metrics' clock (set-up and the last preview left out)."""
    config = get_config("mnist", {"data.source": str(folder), "data.stream": stream, "data.workers": "2",
                                  "train.steps": str(steps), "train.log_every": "1", "train.sample_every": "0",
                                  "train.ckpt_every": str(steps), "train.sample_count": "1", "train.sample_steps": "1"})
    train(config, out, overwrite=True, progress=False, log=lambda message: None)
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = min(2, len(times) - 2)  # the first steps warm up the allocator and the workers
    return (times[-1] - times[first]) / (len(times) - 1 - first)


def measure_mnist(workdir: Path, args: argparse.Namespace) -> tuple[list[list[object]], dict]:
    folder = mnist_folder(common.mnist_path(args.data), workdir / f"mnist-{args.mnist_count}", args.mnist_count)
    times: dict[str, list[float]] = {"false": [], "true": []}
    for r in range(args.rounds):
        for stream in ("false", "true") if r % 2 == 0 else ("true", "false"):
            times[stream].append(step_seconds(folder, workdir / "mnist-run", stream, args.steps))
            common.say(f"  mnist round {r + 1}, {'streamed' if stream == 'true' else 'in memory'}: "
                       f"{times[stream][-1] * 1000:.1f} ms/step")
    ratio = common.paired_ratio(times["true"], times["false"])  # streamed time over in-memory time
    memory, streamed = float(np.median(times["false"])), float(np.median(times["true"]))
    rows = [["in memory", f"{memory * 1000:.1f}", "1"],
            ["streamed folder, 2 workers", f"{streamed * 1000:.1f}", f"{ratio.median:.3f} {ratio.interval_cell()}"]]
    return rows, {"memory_s": memory, "stream_s": streamed, "ratio": ratio.median}


# ---------------------------------------------------------------------------- the run


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"rss", "decode", "mnist"}:
        raise SystemExit(f"error: unknown part(s) {', '.join(sorted(parts - {'rss', 'decode', 'mnist'}))}")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="data_stream-"))
    results: dict[str, dict] = {}
    tables = []
    if "rss" in parts:
        rows, results["rss"] = measure_rss(workdir, sizes, args.steps)
        title = "Peak memory of `ddpm train` (tiny preset at 64x64 without attention, batch 8, 2 workers streaming)"
        tables.append(f"{title}:\n\n" + common.markdown_table(
            ["images", "source", "peak PSS, trainer + workers (MiB)", "trainer peak RSS (MiB)"], rows))
    if "decode" in parts:
        rows, results["decode"] = measure_decode(workdir, sizes[0], args)
        d = results["decode"]
        tables.append(
            f"Decode throughput to 32x32, batches of {args.decode_batch}, nothing else running; the cifar10 step "
            f"takes {d['cifar10_cpu_img_s']:.1f} img/s on this CPU and ~{d['gpu_img_s']:,.0f} img/s on an H100 "
            f"({d['cifar10_gflop_per_img']:.2f} GFLOP/img at {args.gpu_tflops:g} TFLOP/s x {args.gpu_mfu:.0%}; "
            "estimated):\n\n" + common.markdown_table(
                ["source", "workers", "img/s", "vs the CPU step", "vs the H100 estimate", "an H100"], rows))
    if "mnist" in parts:
        rows, results["mnist"] = measure_mnist(workdir, args)
        tables.append(f"mnist preset on {args.mnist_count:,} MNIST images, s/step over {args.steps} steps, "
                      f"{args.rounds} alternating rounds:\n\n" + common.markdown_table(
                          ["data", "ms/step", "step time vs in memory (interval)"], rows))
    body = "\n\n".join(tables)
    print(body)
    if args.append:
        common.append_entry("streamed training data", "bench.data_stream", argv,
                            [f"parts {', '.join(sorted(parts))}; generated data in {workdir}"], body)
    return results


if __name__ == "__main__":
    main()
