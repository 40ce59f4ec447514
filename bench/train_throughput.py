"""Training throughput of the DDPM CIFAR-10 U-Net: ours vs diffusers' UNet2DModel vs lucidrains' Unet.

One training step is what a trainer does per batch: sample t and ε, forward, MSE to ε, backward,
an Adam step. Ours and diffusers' ``UNet2DModel`` have the identical layout (parameter counts
checked equal) and the same weights; lucidrains' ``Unet(dim=64, dim_mults=(1, 2, 4, 8))`` is the
configuration of that library's README, a different network (its own count is shown). All run
with the same batch, precision, device and threads, alternating in one process; the ratio to
diffusers is the median of per-round ratios, with an order-statistic interval for it
(``common.paired_ratio``).

Also measured in the same run:

- FLOPs per image of a training step (forward + backward) from ``torch.utils.flop_counter``
  (ours is credited with diffusers' count: the same network, though ours executes fewer FLOPs);
- the achieved FLOP rate and its share of a matmul ceiling measured here (the same dtype: bf16 on
  CUDA with ``--bf16``, float32 otherwise): the model FLOP utilisation;
- memory: on CUDA the peak allocated by a step; on the CPU the bytes autograd saves for backward
  (activations, counted once per storage) plus weights, gradients and Adam's two moments.

GPU options (``--bf16 --channels-last --compile --fused``) apply to every contender alike, except
``diffusers-example``: diffusers' UNet2DModel trained as its ``train_unconditional.py`` example
ships (float32, AdamW, no compile), the baseline of the GPU target "2x diffusers' example setup".

    python -m bench.train_throughput --batch 8 --repeats 5 --append
    python -m bench.train_throughput --device cuda --batch 128 --models ours,diffusers,diffusers-example,lucidrains \
        --bf16 --channels-last --fused --compile --append
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import common
from ddpm.models import UNet, get_preset
from ddpm.runtime import autocast, num_parameters


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10", help="our U-Net preset (default cifar10)")
    parser.add_argument("--models", default="ours,diffusers,lucidrains",
                        help="contenders, comma-separated (default ours,diffusers,lucidrains)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--fused", action="store_true", help="fused Adam (CUDA)")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    return parser.parse_args(argv)


#: The contenders that are diffusers' network in our layout: the ratios are taken against them.
BASELINES = ("diffusers", "diffusers-example")


def build(name: str, ours: UNet) -> tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor], Tensor]]:
    """The network and how to call it: ``call(net, x_t, t) -> ε̂``."""
    if name == "ours":
        return ours, lambda net, x, t: net(x, t)
    if name in BASELINES:
        twin = common.diffusers_twin(ours)
        if num_parameters(twin) != num_parameters(ours):
            raise RuntimeError("diffusers' twin does not have our parameter count")
        return twin, lambda net, x, t: net(x, t).sample
    if name == "lucidrains":
        from denoising_diffusion_pytorch import Unet

        c = ours.config
        net = Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=c.in_channels, dropout=c.dropout)
        return net, lambda net, x, t: net(x, t)
    raise SystemExit(f"unknown model {name!r}: choose from ours, diffusers, diffusers-example, lucidrains")


class Contender:
    """One network with its optimizer and a fixed batch, ready to take training steps."""

    def __init__(self, name: str, ours: UNet, args: argparse.Namespace, device: torch.device) -> None:
        self.name = name
        net, self.call = build(name, ours)
        self.params = num_parameters(net)
        self.net = common.perturb(net, seed=1).to(device).train()
        # diffusers' train_unconditional.py as it ships: float32, its AdamW, no compile; the GPU
        # options are what the others add on top of their defaults.
        example = name == "diffusers-example"
        channels_last = args.channels_last and not example
        compile_ = args.compile and not example
        bf16 = args.bf16 and not example
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if example:
            self.optimizer = common.diffusers_example_adamw(self.net.parameters())
        else:
            fused = {"fused": True} if args.fused and device.type == "cuda" else {}
            self.optimizer = torch.optim.Adam(self.net.parameters(), lr=2e-4, **fused)
        self.forward = torch.compile(self.net) if compile_ else self.net
        c = ours.config
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, c.in_channels, c.image_size, c.image_size)
        self.x = torch.randn(shape, generator=g).to(device)
        self.noise = torch.randn(shape, generator=g).to(device)
        self.t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.device, self.bf16 = device, bf16

    def loss(self) -> Tensor:
        with autocast(self.device, self.bf16):
            out = self.call(self.forward, self.x, self.t)
        return F.mse_loss(out.float(), self.noise)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()

    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of the batch, per image (the optimizer's few FLOPs left out)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.call(self.net, self.x, self.t).float().pow(2).mean().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.x.shape[0]

    def memory_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        saved: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in self.net.parameters())
        return (sum(saved.values()) + 4 * weights) / 2**20  # weights, gradients, Adam's m and v


def matmul_ceiling(device: torch.device, bf16: bool, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in the step's dtype: what the device can do at best."""
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = [common.time_call(lambda: a @ b, device) for _ in range(repeats + 1)][1:]
    return 2 * n**3 / min(times)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = common.set_threads(args.threads)
    torch.manual_seed(0)
    ours = UNet(get_preset(args.preset))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    contenders: dict[str, Contender] = {}
    for name in names:
        try:
            contenders[name] = Contender(name, ours, args, device)
        except ImportError as e:
            common.say(f"skipping {name}: {e}")
    ceiling = matmul_ceiling(device, args.bf16)
    common.say(f"matmul ceiling: {ceiling / 1e12:.3f} TFLOP/s")
    results: dict[str, dict[str, float]] = {}
    for name, c in contenders.items():
        results[name] = {"params": c.params, "flops": c.flops_per_image(), "memory_mb": c.memory_mb()}
    times = common.time_alternating({n: c.step for n, c in contenders.items()}, args.repeats, args.warmup, device,
                                    label="step")
    # Measured again after the steps, and the better reading kept: a slow spell of a shared
    # machine during one reading would otherwise inflate every MFU.
    ceiling = max(ceiling, matmul_ceiling(device, args.bf16))
    common.say(f"matmul ceiling (best of two readings): {ceiling / 1e12:.3f} TFLOP/s")
    baselines = [b for b in BASELINES if b in results]
    twin = baselines[0] if baselines else None
    if "ours" in results and twin:
        # One network, so one model-FLOP count: the textbook one that diffusers' layers execute
        # (ours computes upsample + 3x3 conv as four 2x2 convs, fewer FLOPs for the same function).
        results["ours"]["flops"] = results[twin]["flops"]
    for name, median in common.medians(times).items():
        r = results[name]
        r["step_s"] = median
        r["img_per_s"] = args.batch / median
        r["mfu"] = r["flops"] * r["img_per_s"] / ceiling
        for base in baselines:
            ratio = common.paired_ratio(times[base], times[name])
            r[f"vs_{base}"] = ratio.median
            r[f"vs_{base}_interval"] = ratio.interval_cell() if name != base else ""
    rows = [[name, f"{r['params']:,}", f"{r['flops'] / 1e9:.2f}", f"{r['step_s'] * 1000:.1f}", f"{r['img_per_s']:.2f}",
             *[cell for base in baselines for cell in (f"{r[f'vs_{base}']:.3f}", r[f"vs_{base}_interval"])],
             f"{100 * r['mfu']:.1f}%", f"{r['memory_mb']:.0f}"]
            for name, r in results.items()]
    memory = "peak allocated (MiB)" if device.type == "cuda" else "saved + weights×4 (MiB)"
    table = common.markdown_table(["model", "params", "GFLOP/img (fwd+bwd)", "step (ms)", "img/s",
                                   *[h for b in baselines for h in (f"throughput vs {b}", "interval (coverage)")],
                                   "MFU", memory], rows)
    print(table)
    if args.append:
        flags = [f for f in ("bf16", "channels_last", "compile", "fused") if getattr(args, f)]
        common.append_entry(
            f"training throughput, preset {args.preset}", "bench.train_throughput", argv,
            [f"batch {args.batch}, {threads} threads, device {device}, {args.warmup} warm-up + {args.repeats} "
             f"timed steps each, alternating, medians; ratios are medians of per-round ratios "
             f"with an order-statistic interval; options: {', '.join(flags) or 'none (float32)'}",
             f"MFU against a {'bf16' if args.bf16 and device.type == 'cuda' else 'float32'} matmul ceiling "
             f"measured in the same run: {ceiling / 1e12:.3f} TFLOP/s",
             "lucidrains: `Unet(dim=64, dim_mults=(1, 2, 4, 8))`, a different network from the other two"],
            table, device=device)
    return results


if __name__ == "__main__":
    main()
