"""CPU time per image of Stable Diffusion's U-Net: ours (ddpm.models.ConditionalUNet) against
diffusers' UNet2DConditionModel on the same input, with the same weights.

The SD 1.5 network (``ConditionalUNetConfig.preset("sd15")``: 859,520,964 parameters) with random
weights in float32 predicts the noise of a batch of 64x64x4 latents (a 512x512 image) against 77
CLIP-wide tokens at a random timestep, in eval mode without gradients: one network evaluation of
sampling (classifier-free guidance spends two per step). Our model is built and seeded; diffusers'
is built on the meta device and given a copy of our weights (the names are diffusers' own), so
the two hold equal but separate tensors; their outputs are compared before any timing. Rounds
alternate which model runs first (``common.time_alternating``); the ratio is the median of the
per-round time ratios with a distribution-free interval (``common.paired_ratio``).

    python -m bench.sd_unet_speed --threads 8 --repeats 10 --append

Memory: two copies of the weights, about 7 GB in float32.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from bench import common
from ddpm.models import ConditionalUNet, ConditionalUNetConfig
from ddpm.models.diffusers_io import UNET2D_CONDITION
from ddpm.runtime import num_parameters

#: The largest |ours − diffusers| accepted, relative to the output's standard deviation: float32
#: sums in another order (our upsampling is four 2x2 convolutions, diffusers' nearest x2 and a 3x3).
AGREEMENT = 1e-3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sd_unet_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", help="ConditionalUNetConfig preset (default sd15; tiny to try)")
    parser.add_argument("--size", type=int, default=None,
                        help="latent side (default: the preset's sample_size, 64 for sd15 = 512x512 images)")
    parser.add_argument("--batch", type=int, default=1, help="latents per call (default 1)")
    parser.add_argument("--tokens", type=int, default=77, help="text tokens attended to (default 77, CLIP's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch CPU threads (default {torch.get_num_threads()})")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    return parser.parse_args(argv)


def twins(config: ConditionalUNetConfig) -> tuple[ConditionalUNet, Any]:
    """Our U-Net with seeded random weights, and diffusers' holding a copy of them."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ours = ConditionalUNet(config).eval()
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(UNET2D_CONDITION.config_to(config))
    state = UNET2D_CONDITION.state_to({k: v.clone() for k, v in ours.state_dict().items()}, config)
    theirs.load_state_dict(state, assign=True, strict=True)
    return ours, theirs.eval()


def inputs(config: ConditionalUNetConfig, side: int, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(batch, config.in_channels, side, side, generator=generator),
        "t": torch.randint(0, 1000, (batch,), generator=generator),
        "context": torch.randn(batch, tokens, config.cross_attention_dim, generator=generator),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time both models; print and return the per-image medians (seconds), the ratio and its interval."""
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    config = ConditionalUNetConfig.preset(args.preset)
    side = args.size or (config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0])
    ours, theirs = twins(config)
    counts = [num_parameters(m) for m in (ours, theirs)]
    if counts[0] != counts[1]:
        raise SystemExit(f"parameter counts differ: ours {counts[0]:,}, diffusers {counts[1]:,}")
    common.say(f"preset {args.preset}: {counts[0]:,} parameters in both; {side}x{side} latents, batch {args.batch}, "
               f"{args.tokens} tokens, {threads} threads, float32")
    v = inputs(config, side, args.batch, args.tokens)
    calls = {"ours": lambda: ours(v["x"], v["t"], v["context"]),
             "diffusers": lambda: theirs(v["x"], v["t"], v["context"]).sample}
    with torch.inference_mode():
        a, b = calls["ours"](), calls["diffusers"]()
        difference = (a - b).abs().max().item()
        relative = difference / b.std().item()
        common.say(f"max |ours - diffusers| {difference:.2e} ({relative:.1e} of the output's std)")
        if not relative <= AGREEMENT:
            raise SystemExit(f"the outputs disagree: {relative:.1e} of the std > {AGREEMENT:g}")
        times = common.time_alternating(calls, args.repeats, args.warmup, torch.device("cpu"), label="forward")
    per_image = {name: t / args.batch for name, t in common.medians(times).items()}
    ratio = common.paired_ratio(times["ours"], times["diffusers"])
    common.say(f"per image: ours {per_image['ours']:.4g} s, diffusers {per_image['diffusers']:.4g} s; "
               f"time ratio ours/diffusers {ratio} ({100 * ratio.coverage:.0f}% interval)")
    table = common.markdown_table(
        ["U-Net", "ours (s/image)", "diffusers (s/image)", "ours / diffusers (time)", "interval (coverage)"],
        [[args.preset, f"{per_image['ours']:.4g}", f"{per_image['diffusers']:.4g}", f"{ratio.median:.3f}",
          ratio.interval_cell()]])
    print(table)
    if args.append:
        common.append_entry(
            f"Stable Diffusion U-Net CPU time per image, preset {args.preset}", "bench.sd_unet_speed", argv,
            [f"{counts[0]:,} parameters in both, random weights, float32, eval mode without gradients; "
             f"{side}x{side}x{config.in_channels} latents, batch {args.batch}, {args.tokens} tokens; {threads} "
             f"threads; {args.warmup} warm-up + {args.repeats} timed rounds, alternating, medians per image; "
             f"max |ours - diffusers| {difference:.2e}"],
            table)
    return {**per_image, "ratio": ratio.median, "interval": (ratio.low, ratio.high), "max_abs_diff": difference,
            "params": counts[0]}


if __name__ == "__main__":
    main()
