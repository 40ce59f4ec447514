"""Sampling throughput: DDPM-1000 and DDIM-50, ours vs diffusers' pipelines, with the same network.

Ours runs :meth:`ddpm.GaussianDiffusion.sample`; diffusers runs ``DDPMPipeline`` and
``DDIMPipeline`` (progress bars off, ``output_type="np"``) on ``UNet2DModel`` holding the same
weights in the same layout. Both end with uint8-ready images. Runs alternate in one process; the
ratio is the median of per-round ratios, with an order-statistic interval for it.

A full DDPM-1000 run of the CIFAR-10 network takes most of an hour on two CPU cores, so
``--timed-steps N`` times a chain of N steps and projects to the full count (every step costs one
network call and a few elementwise operations, the same at any spacing); the table says which
rows are projected.

It also checks that the two DDIM implementations agree: from the same x_T, with η = 0 and 50
steps, ours and diffusers' ``DDIMScheduler`` (leading spacing, which keeps {0, 20, ..., 980} as
ours does) should end at the same images up to float32 rounding, without clipping and with it.

    python -m bench.sample_throughput --preset mnist --batch 64 --timed-steps 50 --append
    python -m bench.sample_throughput --preset cifar10 --batch 8 --timed-steps 10 --append
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from bench import common
from bench.cuda_graph import GraphedModel
from ddpm.config import get_config
from ddpm.models import UNet, get_preset
from ddpm.runtime import autocast, num_parameters


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sample_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10", help="U-Net and run preset (default cifar10)")
    parser.add_argument("--batch", type=int, default=8, help="images per run (default 8)")
    parser.add_argument("--timed-steps", type=int, default=0,
                        help="time chains of this many steps and project (default 0: run every step)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    gpu = parser.add_argument_group("GPU options (bf16, channels-last and compile apply to both contenders)")
    gpu.add_argument("--bf16", action="store_true", help="bfloat16 autocast around the network calls (CUDA only)")
    gpu.add_argument("--channels-last", action="store_true", help="both networks in channels_last memory format")
    gpu.add_argument("--compile", action="store_true", help="torch.compile both networks")
    gpu.add_argument("--cuda-graph", action="store_true",
                     help="ours replays its network from a captured CUDA graph (bench.cuda_graph; on a "
                          "CPU the same buffer logic runs eagerly)")
    return parser.parse_args(argv)


def ddpm_scheduler(diffusion_cfg) -> object:
    """diffusers' DDPMScheduler on our run's schedule (the paper's linear one, T = 1000)."""
    from diffusers import DDPMScheduler

    if diffusion_cfg.schedule != "linear" or diffusion_cfg.timesteps != 1000:
        raise SystemExit("the comparison needs the paper's linear schedule with T = 1000")
    if diffusion_cfg.var_type not in ("fixed_small", "fixed_large"):
        raise SystemExit("the comparison needs a fixed variance (fixed_small or fixed_large)")
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=diffusion_cfg.var_type,
                         clip_sample=True)


def ddim_scheduler(clip: bool = True) -> object:
    """diffusers' DDIMScheduler keeping ours' steps {0, T/K, ...}: leading spacing, no offset, ᾱ_{-1} = 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True,
                         steps_offset=0, timestep_spacing="leading")


def ddim_agreement(ours: UNet, twin: torch.nn.Module, diffusion, batch: int, device: torch.device,
                   clip: bool) -> float:
    """Largest |ours − diffusers| over the images of one DDIM-50 (η = 0) run from the same x_T.

    With ``clip``, x̂0 is clipped to [-1, 1] and ε re-derived from the clipped x̂0 on both sides
    (improved-diffusion's rule; diffusers needs ``use_clipped_model_output=True`` for it, while its
    pipeline's default keeps the unclipped ε in the direction term).
    """
    scheduler = ddim_scheduler(clip)
    c = ours.config
    x_T = torch.randn((batch, c.in_channels, c.image_size, c.image_size),
                      generator=torch.Generator().manual_seed(7)).to(device)
    with torch.inference_mode():
        a = diffusion.sample(ours, x_T.shape, sampler="ddim", steps=50, noise=x_T.clone(), clip_denoised=clip)
        scheduler.set_timesteps(50)
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(twin(x, t).sample, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
    return (a - x).abs().max().item()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float | str]]:
    args = parse_args(argv)
    from diffusers import DDIMPipeline, DDPMPipeline

    device = torch.device(args.device)
    threads = common.set_threads(args.threads)
    torch.manual_seed(0)
    ours = common.perturb(UNet(get_preset(args.preset))).to(device).eval()
    twin = common.diffusers_twin(ours).eval()
    diffusion = get_config(args.preset).diffusion.build()
    net_ours, net_theirs = ours, twin
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        twin.to(memory_format=torch.channels_last)
    if args.compile:
        net_ours, net_theirs = torch.compile(ours), torch.compile(twin)
    if args.cuda_graph:
        net_ours = GraphedModel(net_ours)
    pipes = {"ddpm": DDPMPipeline(unet=net_theirs, scheduler=ddpm_scheduler(get_config(args.preset).diffusion)),
             "ddim": DDIMPipeline(unet=net_theirs, scheduler=ddim_scheduler())}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    c = ours.config
    shape = (args.batch, c.in_channels, c.image_size, c.image_size)
    results: dict[str, dict[str, float | str]] = {}
    for sampler, full in (("ddpm", 1000), ("ddim", 50)):
        steps = min(full, args.timed_steps) if args.timed_steps else full
        g_ours, g_theirs = torch.Generator(device).manual_seed(0), torch.Generator(device).manual_seed(0)

        def run_ours(sampler: str = sampler, steps: int = steps, g: torch.Generator = g_ours) -> None:
            with torch.inference_mode(), autocast(device, args.bf16):
                x = diffusion.sample(net_ours, shape, sampler=sampler, steps=steps, generator=g, device=device)
                x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu().numpy()

        def run_theirs(sampler: str = sampler, steps: int = steps, g: torch.Generator = g_theirs) -> None:
            kwargs = {"eta": 0.0} if sampler == "ddim" else {}
            with torch.inference_mode(), autocast(device, args.bf16):
                pipes[sampler](batch_size=args.batch, generator=g, num_inference_steps=steps,
                               output_type="np", **kwargs)

        fns: dict[str, Callable[[], None]] = {"ours": run_ours, "diffusers": run_theirs}
        times = common.time_alternating(fns, args.repeats, args.warmup, device, label=f"{sampler}-{steps}")
        med = common.medians(times)
        ratio = common.paired_ratio(times["diffusers"], times["ours"])
        scale = full / steps
        results[sampler] = {"steps": full, "timed_steps": steps, **{f"{k}_img_per_s": args.batch / (v * scale)
                                                                   for k, v in med.items()}}
        results[sampler]["ours_50k_min"] = 50_000 / results[sampler]["ours_img_per_s"] / 60
        results[sampler].update(ratio=ratio.median, interval=ratio.interval_cell())
    diff = {clip: ddim_agreement(ours, twin, diffusion, min(args.batch, 8), device, clip) for clip in (False, True)}
    rows = [[f"{s.upper()}-{r['steps']}", f"{r['ours_img_per_s']:.4g}", f"{r['diffusers_img_per_s']:.4g}",
             f"{r['ratio']:.3f}", r["interval"],
             f"{r['ours_50k_min']:,.0f}",
             "measured" if r["timed_steps"] == r["steps"] else f"from {r['timed_steps']} steps"]
            for s, r in results.items()]
    table = common.markdown_table(["sampler", "ours img/s", "diffusers img/s", "ours / diffusers throughput",
                                   "interval (coverage)", "ours: 50k images (min)", "full chain"], rows)
    print(table)
    agreement = (f"DDIM-50 (η = 0) from the same x_T as diffusers' DDIMScheduler: max |difference| "
                 f"{diff[False]:.2e} without clipping, {diff[True]:.2e} with x̂0 clipped (ε re-derived on both sides)")
    print(agreement)
    results["ddim_max_abs_diff"] = {"unclipped": diff[False], "clipped": diff[True]}
    if args.append:
        common.append_entry(
            f"sampling throughput, preset {args.preset}", "bench.sample_throughput", argv,
            [f"{num_parameters(ours):,} parameters in both networks; batch {args.batch}, {threads} threads, "
             f"device {device}, {args.warmup} warm-up + {args.repeats} timed runs each, alternating, medians; "
             f"options: {_options(args, device)}",
             "projected rows time a chain of the stated length and scale to the full step count",
             agreement],
            table, device=device)
    return results


def _options(args: argparse.Namespace, device: torch.device) -> str:
    flags = [f for f in ("bf16", "channels_last", "compile") if getattr(args, f)]
    if args.cuda_graph:
        flags.append("cuda_graph (ours only)" if device.type == "cuda" else "cuda_graph (eager stand-in: no CUDA)")
    return ", ".join(flags) or "none (float32)"


if __name__ == "__main__":
    main()
