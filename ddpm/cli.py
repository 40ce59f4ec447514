"""The ``ddpm`` command: argument parsing only; every verb calls a library function.

A user's mistake (:class:`~ddpm.errors.UserError`) is printed as one line ``ddpm: error: ...``
with a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import textwrap
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm.data import DataWarning
from ddpm.errors import UserError

EPILOG_TRAIN = """\
examples:
  ddpm train --preset digits --out runs/digits                 # scikit-learn's 8x8 digits, CPU minutes
  ddpm train --preset mnist --data mnist.npz --out runs/mnist --train.steps 5000
  ddpm train --preset cifar10 --data ./cifar10/train --out runs/cifar --train.batch_size 256
  ddpm train --out runs/mnist --resume                         # continue a stopped run exactly
  torchrun --nproc_per_node=4 -m ddpm train --preset cifar10 --data cifar10 --out runs/c4
  ddpm train --preset mnist-latent --data mnist.npz --autoencoder runs/ae --out runs/ldm   # latent diffusion

--data is a folder of images (sub-folders per class give labels), an .npz with x_train/y_train,
a torchvision name (mnist, fashion-mnist, cifar10, cifar100, celeba, ...: downloaded once), or
digits. The run directory gets config.json, metrics.jsonl, samples/step_N.png and checkpoints/.
Every configuration field below can be set; the resolved configuration is printed and saved.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddpm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            # The library's warnings about the user's input (skipped files, upscaled images) as
            # one line each; everything else keeps Python's default display.
            warnings.simplefilter("always", DataWarning)
            default_show = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, DataWarning):
                    print(f"ddpm: warning: {message}", file=sys.stderr)
                else:
                    default_show(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            return args.handler(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"ddpm: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("ddpm: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="Denoising diffusion probabilistic models: train, sample, evaluate and picture them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with 'ddpm demo' (no download, a few CPU minutes). 'ddpm VERB --help' explains each verb.",
    )
    parser.set_defaults(command=None, debug=False)
    sub = parser.add_subparsers(title="verbs", metavar="VERB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    common.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N or mps")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_train(sub, common)
    _add_train_autoencoder(sub, common)
    _add_sample(sub, common)
    _add_eval(sub, common)
    _add_viz(sub, common)
    _add_export(sub, common)
    _add_data(sub, common)
    _add_demo(sub, common)
    _add_inpaint(sub, common)
    _add_img2img(sub, common)
    _add_invert(sub, common)
    _add_interpolate(sub, common)
    _add_ui(sub, common)
    return parser


# ---------------------------------------------------------------------------- train


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    from ddpm.config import RUN_PRESETS, SECTIONS
    from ddpm.models import NETWORKS

    p = sub.add_parser("train", parents=[common], help="train a model on images (or captioned images)",
                       description="Train a DDPM U-Net (Ho et al. 2020, Algorithm 1) with the paper's recipe, or a "
                                   "text-to-image model on captioned images (a text-to-image preset).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_TRAIN)
    _add_run_arguments(p, RUN_PRESETS, "digits")
    _prompt_arguments(p, "the training previews' prompts (text-to-image runs; default: the data's first captions)",
                      negative=False)
    _add_config_options(p, {**SECTIONS, "model": tuple(config for config, _ in NETWORKS.values())},
                        skip={"data.source", "train.sample_prompts"})
    p.set_defaults(handler=cmd_train, command="train")


def _add_run_arguments(p: argparse.ArgumentParser, presets: dict[str, Any], default_preset: str) -> None:
    """--preset, --data, --out, --resume and --overwrite of a training verb."""
    p.add_argument("--preset", default=None, choices=list(presets),
                   help=f"model size and recipe (default: {default_preset} for a new run; a resumed run keeps its own)")
    p.add_argument("--data", default=None, help="training data (folder, .npz, torchvision name or digits)")
    p.add_argument("--out", required=True, help="the run directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="start over in --out, deleting the old run's files")


def _add_config_options(p: argparse.ArgumentParser, sections: dict[str, Any], skip: set[str]) -> None:
    """One ``--section.field`` option per configuration field (and ``--field`` where the name is
    unique), with the field's documentation and default as help; ``skip`` names those set otherwise.
    A section may be a tuple of types (the networks a run's model can be): each field once, with
    the network it belongs to named when not all have it."""
    from ddpm.config import field_docs, field_types

    kinds = {name: t if isinstance(t, tuple) else (t,) for name, t in sections.items()}
    unique = _unique_field_names(kinds)
    for section, types_ in kinds.items():
        group = p.add_argument_group(f"{section} options")
        seen: set[str] = set()
        for section_type in types_:
            docs = field_docs(section_type)
            for field in dataclasses.fields(section_type):
                key = f"{section}.{field.name}"
                if key in skip or field.name in seen:
                    continue
                seen.add(field.name)
                flags = [f"--{key}"]
                if unique.get(field.name) == section and field.name not in ("steps", "device"):
                    flags.append(f"--{field.name.replace('_', '-')}")
                owners = [t for t in types_ if field.name in {f.name for f in dataclasses.fields(t)}]
                whose = f" [{_network_name(owners[0])}]" if len(owners) < len(types_) else ""
                hints = field_types(section_type)
                group.add_argument(*flags, dest=f"cfg:{key}", default=argparse.SUPPRESS,
                                   metavar=_metavar(hints[field.name]),
                                   help=(_field_help(field, docs, hints) + whose).replace("%", "%%"))


def _field_help(field: Any, docs: dict[str, str], types_: dict[str, Any]) -> str:
    default = field.default if field.default is not dataclasses.MISSING else None
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    if default is None and types_[field.name] == bool | None:
        shown = "auto"
    return f"{docs.get(field.name, '')} (default {shown})".strip()


def _network_name(config_type: type) -> str:
    return {"unet": "DDPM U-Net", "unet2d_condition": "conditional U-Net, text-to-image presets"}.get(
        getattr(config_type, "ARCH", ""), config_type.__name__)


def _unique_field_names(kinds: dict[str, tuple[type, ...]]) -> dict[str, str]:
    seen: dict[str, set[str]] = {}
    for section, types_ in kinds.items():
        for section_type in types_:
            for field in dataclasses.fields(section_type):
                seen.setdefault(field.name, set()).add(section)
    return {name: next(iter(found)) for name, found in seen.items() if len(found) == 1}


def _metavar(annotation: Any) -> str:
    if annotation == bool | None:
        return "BOOL|auto"
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    names = {"int": "N", "float": "X", "bool": "BOOL", "str": "TEXT"}
    parts = []
    for option in options if typing.get_origin(annotation) in (types.UnionType, typing.Union) else [annotation]:
        if typing.get_origin(option) is tuple:
            item = names.get(getattr(typing.get_args(option)[0], "__name__", ""), "N")
            parts.append(f"{item},{item},...")
        else:
            parts.append(names.get(getattr(option, "__name__", ""), "TEXT"))
    return "|".join(dict.fromkeys(parts)) + ("|none" if type(None) in typing.get_args(annotation) else "")


def _prompt_arguments(p: argparse.ArgumentParser, what: str, negative: bool = True) -> None:
    """--prompt (repeatable), --prompts-file and, for sampling, --negative-prompt."""
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help=f"{what}; give it several times for several prompts, taken in turn")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="prompts, one per line (after any --prompt)")
    if negative:
        p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                       help="what guidance steers away from: the unconditional half of classifier-free guidance "
                            "(default: the empty prompt)")


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt and --prompts-file, or None if neither was given."""
    if args.prompt is None and args.prompts_file is None:
        return None
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: no such file")
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise UserError(f"--prompts-file {path}: not UTF-8 text ({e.reason})") from None
    if not prompts:
        raise UserError(f"--prompts-file {args.prompts_file}: no prompts in it (one per line)")
    return prompts


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    return {key[len("cfg:"):]: value for key, value in vars(args).items() if key.startswith("cfg:")}


def cmd_train(args: argparse.Namespace) -> int:
    from ddpm.config import RunConfig, get_config
    from ddpm.train import train

    overrides = _overrides(args)
    prompts = _prompts(args)
    if prompts is not None:
        overrides["train.sample_prompts"] = "\n".join(prompts)
    for key in ("data.autoencoder", "data.text_encoder"):
        if overrides.get(key):
            # Recorded absolute, so that sampling from the run works from any directory.
            overrides[key] = str(Path(overrides[key]).resolve())
    config, explicit = _run_config(args, overrides, RunConfig, get_config, "digits")
    _report(train(config, args.out, resume=args.resume, overwrite=args.overwrite, explicit=explicit,
                  progress=not args.quiet))
    return 0


def _report(result: Any) -> None:
    """What a training verb prints at the end: the steps, and every file it wrote for a person."""
    if result.nothing_to_do:
        return
    print(f"trained {result.step} steps in {result.seconds / 60:.1f} min ({result.images_per_second:.0f} img/s)")
    if result.skipped_steps:
        print(f"skipped:     {result.skipped_steps} steps with a non-finite loss or gradient")
    if "autoencoder" in result.extra:
        print(f"autoencoder: {result.extra['autoencoder']} (scaling_factor {result.extra['scaling_factor']:.5g})")
    if result.checkpoint:
        print(f"checkpoint:  {result.checkpoint}")
    if result.sample_grid:
        print(f"samples:     {result.sample_grid}")
    print(f"metrics:     {result.run_dir / 'metrics.jsonl'}")


def _run_config(args: argparse.Namespace, overrides: dict[str, str], config_type: Any, get_config: Any,
                default_preset: str) -> tuple[Any, set[str]]:
    """The configuration a training verb asked for (a preset, or a resumed run's own, with the
    overrides), and the overrides given explicitly."""
    if args.data is not None:
        overrides["data.source"] = args.data
    if args.device != "auto" or "train.device" not in overrides:
        overrides.setdefault("train.device", args.device)
    if args.resume:
        if args.preset is not None:
            print(f"ddpm: note: --preset {args.preset} is ignored with --resume: the run's saved configuration wins "
                  "(change a resumable field with --section.field)", file=sys.stderr)
        config = config_type.from_dict(_load_json(Path(args.out) / "config.json")).replace(overrides)
    else:
        config = get_config(args.preset or default_preset, overrides)
        if not config.data.source:
            raise UserError(f"--data is required with --preset {args.preset or default_preset} "
                            "(a folder, an .npz, a torchvision name or digits)")
    return config, set(overrides) - ({"train.device"} if args.device == "auto" else set())


EPILOG_TRAIN_AUTOENCODER = """\
examples:
  ddpm train-autoencoder --preset mnist-f4 --data mnist.npz --out runs/ae
  ddpm train-autoencoder --out runs/ae --resume --train.steps 6000
  ddpm train-autoencoder --preset cifar10-f4 --data cifar10 --out runs/ae-c --disc-weight 0.5 --disc-start 2000
  ddpm train --preset mnist-latent --data mnist.npz --autoencoder runs/ae --out runs/ldm

The objective is latent diffusion's KL-f recipe: L1 summed over pixels + 1e-6 KL, with an optional
hinge PatchGAN (--disc-weight > 0, from --disc-start on, with Esser et al.'s adaptive weight) and
an optional LPIPS term (--lpips). The run directory gets config.json, metrics.jsonl,
samples/step_N.png (originals above, reconstructions below), checkpoints/, and at the end
autoencoder/: the model in the diffusers layout with scaling_factor = 1/std of its latents.
"""


def _add_train_autoencoder(sub: Any, common: argparse.ArgumentParser) -> None:
    from ddpm.train_autoencoder import PRESETS, AutoencoderRunConfig

    p = sub.add_parser("train-autoencoder", parents=[common], help="train a KL autoencoder for latent diffusion",
                       description="Train latent diffusion's KL autoencoder (Rombach et al. 2022) on images.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_TRAIN_AUTOENCODER)
    _add_run_arguments(p, PRESETS, "mnist-f4")
    p.add_argument("--lpips", default=None, metavar="PATH",
                   help="turn on the perceptual term with LPIPS-VGG16 weights from this local safetensors file "
                        "(the lpips package's state dict; nothing is downloaded, so without it there is no "
                        "perceptual term); its weight is --loss.perceptual_weight, 1 by default with --lpips")
    # The autoencoder trainer holds its images in memory: the streaming options are train's.
    _add_config_options(p, AutoencoderRunConfig.SECTIONS, skip={"data.source", "data.autoencoder", "loss.lpips_path",
                                                                "model.scaling_factor", "data.stream", "data.workers",
                                                                "data.shard_shuffle", "data.cache"})
    p.set_defaults(handler=cmd_train_autoencoder, command="train-autoencoder")


def cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from ddpm.train_autoencoder import AutoencoderRunConfig, get_config, train_autoencoder

    overrides = _overrides(args)
    if args.lpips is not None:
        overrides["loss.lpips_path"] = str(Path(args.lpips).resolve())
        overrides.setdefault("loss.perceptual_weight", "1.0")
    config, explicit = _run_config(args, overrides, AutoencoderRunConfig, get_config, "mnist-f4")
    _report(train_autoencoder(config, args.out, resume=args.resume, overwrite=args.overwrite, explicit=explicit,
                              progress=not args.quiet))
    return 0


def _load_json(path: Path) -> Any:
    from ddpm.checkpoints import load_json

    if not path.is_file():
        raise UserError(f"{path.parent} holds no run to resume (no config.json)")
    return load_json(path)


# ---------------------------------------------------------------------------- sample


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, a checkpoint directory, a saved model, a diffusers-layout "
                                 "directory (e.g. google/ddpm-cifar10-32 downloaded) or a diffusers pipeline "
                                 "directory (Stable Diffusion 1.x/2.x, or what ddpm export writes)")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw training weights")


def _sampler_arguments(p: argparse.ArgumentParser, seed_help: str = "random seed") -> None:
    _solver_arguments(p)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--batch-size", type=int, default=64, help="images per model call batch")
    _bf16_argument(p, "bfloat16 autocast")


def _bf16_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                   help=f"{what} (auto: on for CUDA, off for the CPU, as measured)")


def _solver_arguments(p: argparse.ArgumentParser) -> None:
    from ddpm.samplers import DEFAULT_NFE, DEFAULT_SAMPLER, DEFAULT_SAMPLER_BY_NFE, FINAL_STEPS, SAMPLERS
    from ddpm.schedules import SPACINGS

    by_nfe = ", ".join(f"{nfe}: {name}" for nfe, name in DEFAULT_SAMPLER_BY_NFE.items())
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help=f"the reverse-process solver (default: by the NFE asked, {by_nfe}; {DEFAULT_SAMPLER} at the "
                        f"default {DEFAULT_NFE}): ddpm is the paper's Algorithm 2 (ancestral, all T steps by "
                        "default), ddim is DDIM, dpm++2m / dpm++3m DPM-Solver++ multistep, dpm++2m-sde / dpm++3m-sde "
                        "their stochastic variants, unipc / unipc-bh1 UniPC with B(h) = e^h - 1 / h, heun Karras et "
                        "al.'s Heun, dpm-adaptive picks its own steps from --rtol")
    p.add_argument("--steps", type=int, default=None,
                   help=f"network evaluations (NFE) per image (default: all T for ddpm, {DEFAULT_NFE} for the "
                        "others; heun spends 2K-1 for K steps)")
    p.add_argument("--spacing", default=None, choices=list(SPACINGS),
                   help="which timesteps the chain visits (default: the sampler's own: uniform for ddpm, leading "
                        "for ddim, trailing for the SDE solvers, logsnr for dpm++2m, dpm++3m and unipc, karras for "
                        "heun)")
    p.add_argument("--eta", type=float, default=None,
                   help="ddim's eta (default 0, deterministic; 1 like DDPM) or the SDE solvers' noise amount (default "
                        "1, the reverse SDE; 0 is their ODE, dpm++2m / dpm++3m)")
    p.add_argument("--order", type=int, default=None, choices=[1, 2, 3], help="UniPC's order (default 3)")
    p.add_argument("--final-step", default="denoise", choices=list(FINAL_STEPS),
                   help="the last step: denoise returns the last evaluation's predicted x0 (default); sigma-min "
                        "steps to timestep 0's noise level instead, without evaluating there (ddim and the "
                        "multistep solvers)")
    p.add_argument("--lower-order-final", default=True, action=argparse.BooleanOptionalAction,
                   help="the multistep solvers' last steps at lower order: the one before last at most second "
                        "order, the last first order (default on)")
    p.add_argument("--rtol", type=float, default=None, help="dpm-adaptive's relative tolerance (default 0.05)")


def _solver_options(args: argparse.Namespace) -> dict[str, Any]:
    """The solver options of ``args`` but the sampler and its NFE, as :class:`ddpm.generate.SamplerSettings` fields."""
    return {"eta": args.eta, "spacing": args.spacing, "rtol": args.rtol, "order": args.order,
            "lower_order_final": args.lower_order_final, "final_step": args.final_step}


def _bf16(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "true": True, "false": False}[args.bf16]


def _add_sample(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sample", parents=[common], help="draw images from a trained model",
        description="Draw samples with a fast solver (default: DPM-Solver++ 2M SDE, 20 network evaluations, the best "
                    "measured), an ODE solver, DDIM, or DDPM's 1000 ancestral steps; write a PNG grid, PNGs or an "
                    ".npz. Prints the NFE spent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              ddpm sample runs/mnist --out out/mnist --num-images 64
              ddpm sample runs/mnist --out out/fid --sampler unipc --steps 10 --num-images 10000 --npz --no-grid
              ddpm sample runs/mnist --out out/paper --sampler ddpm              # Algorithm 2, 1000 steps
              ddpm sample ddpm-cifar10-32/ --out out/cifar --sampler ddim --steps 100
              ddpm sample runs/cond --out out/sevens --label 7 --guidance-scale 3
              ddpm sample runs/mnist-14 --upsampler runs/mnist-sr --out out/cascade     # 14x14, then 14 -> 28
              ddpm sample runs/mnist --latents out/inv/latents.npy --sampler ddim --out out/decoded
              ddpm sample stable-diffusion-v1-5/ --out out/sd --prompt "a photo of a cat" \\
                  --negative-prompt "blurry" --guidance-scale 7.5 --sampler ddim --steps 50 --num-images 4
              ddpm sample runs/video --out out/video --num-images 16 --mp4        # a video model: GIF, MP4, grid
              ddpm sample runs/video --out out/next --first-frames clip.gif --num-first-frames 2 --frames 8
              ddpm sample runs/video --out out/long --frames 24 --context 4        # extended beyond 8 frames
            """))
    _model_arguments(p)
    p.add_argument("--out", required=True, help="output directory")
    _sampler_arguments(p, seed_help="random seed: image i of a seed is the same whatever --batch-size")
    p.add_argument("--num-images", type=int, default=64, help="how many images")
    _condition_arguments(p)
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--pngs", action="store_true", help="write every image as images/NNNNNN.png")
    p.add_argument("--npz", action="store_true", help="write samples.npz (uint8 NHWC arr_0, as FID tools take)")
    _dynamic_threshold_argument(p)
    p.add_argument("--latents", default=None, metavar="FILE.npy",
                   help="start from these x_T (e.g. 'ddpm invert's latents.npy) instead of fresh noise; the number "
                        "of images is the file's (decode with the sampler, steps and spacing that encoded them)")
    cascade = p.add_argument_group("cascaded sampling (SR3 / Imagen)")
    cascade.add_argument("--upsampler", default=None, metavar="SR_RUN",
                         help="enlarge the model's images with this super-resolution model (a run, checkpoint or "
                              "model directory with low_res_channels); grid.png is the enlarged images, "
                              "base_grid.png the model's own")
    cascade.add_argument("--upsampler-sampler", default=None, help="the super-resolution stage's solver (default: "
                                                                  "--sampler)")
    cascade.add_argument("--upsampler-steps", type=int, default=None, help="its NFE (default: --steps)")
    cascade.add_argument("--noise-level", type=float, default=0.2,
                         help="the augmentation level in [0, 1] the low-resolution images are noised to before the "
                              "stage sees them (Imagen's noise-conditioning augmentation; default 0.2, as "
                              "imagen-pytorch)")
    _video_arguments(p)
    p.set_defaults(handler=cmd_sample, command="sample")


def _dynamic_threshold_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dynamic-threshold", type=float, nargs="?", const=0.995, default=None, metavar="P",
                   help="Imagen's dynamic thresholding of the predicted x0 at percentile P (0.995 if P is left out) "
                        "in place of clipping to [-1, 1] (pixel models)")


def _sample_settings(args: argparse.Namespace, loaded: Any, sampler: str | None = None,
                     steps: int | None = None) -> Any:
    """:func:`_settings` for ``loaded`` with the dynamic threshold, and another sampler or NFE if given
    (without --sampler, the sampler for that NFE)."""
    from ddpm.generate import SamplerSettings
    from ddpm.samplers import default_sampler

    steps = args.steps if steps is None else steps
    own = sampler not in (None, args.sampler or default_sampler(args.steps))  # another solver: its own options
    settings = SamplerSettings(sampler or args.sampler, steps, dynamic_threshold=args.dynamic_threshold,
                               **({} if own else _solver_options(args)))
    return loaded.sampler_settings(settings)


def _condition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional models)")
    _prompt_arguments(p, "what to draw (text-to-image models; default: the empty, unconditional prompt)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale w (1: the conditional model alone; Stable Diffusion uses 7.5)")


def _conditions(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """generate()'s condition arguments from the command line."""
    return {"label": args.label, "prompts": _prompts(args), "negative_prompt": args.negative_prompt,
            "guidance_scale": args.guidance_scale, "conditioning": loaded.conditioning}


def _video_arguments(p: argparse.ArgumentParser) -> None:
    from ddpm.video_sampling import CONDITIONING_METHODS, DEFAULT_GUIDANCE_WEIGHT

    g = p.add_argument_group("video models (a model of ddpm.models.video_unet)")
    g.add_argument("--frames", type=int, default=None,
                   help="frames per clip (default: the model's; more are drawn by autoregressive extension)")
    g.add_argument("--first-frames", default=None, metavar="FILE",
                   help="continue these frames: a GIF/MP4, an image, or an .npy/.npz of clips (N, T, H, W[, C])")
    g.add_argument("--num-first-frames", type=int, default=None, metavar="K",
                   help="how many frames of --first-frames to keep (default: all of them)")
    g.add_argument("--conditioning", default="reconstruction", choices=list(CONDITIONING_METHODS),
                   help="how given frames condition the rest: VDM's reconstruction guidance (default) or replacement")
    g.add_argument("--guidance-weight", type=float, default=DEFAULT_GUIDANCE_WEIGHT, metavar="W",
                   help=f"reconstruction guidance's weight w_r (default {DEFAULT_GUIDANCE_WEIGHT:g})")
    g.add_argument("--context", type=int, default=None, metavar="K",
                   help="frames each extension window is conditioned on (default: half the model's frames)")
    g.add_argument("--fps", type=float, default=8, help="frames per second of the GIF and MP4 (default 8)")
    g.add_argument("--mp4", action="store_true", help="also write samples.mp4 (needs pip install 'ddpm[video]')")
    g.add_argument("--no-gif", action="store_true", help="do not write samples.gif")


_VIDEO_OPTIONS = ("frames", "first_frames", "num_first_frames", "context")


def _is_video(loaded: Any, args: argparse.Namespace) -> bool:
    """Whether ``loaded`` is a video model; a video option given for an image model is one line."""
    from ddpm.models.video_unet import VideoUNet

    if isinstance(loaded.model, VideoUNet):
        return True
    given = [f"--{name.replace('_', '-')}" for name in _VIDEO_OPTIONS if getattr(args, name, None) is not None]
    if given:
        raise UserError(f"{', '.join(given)} need(s) a video model; {args.model} is an image model")
    return False


def _sample_video(args: argparse.Namespace, loaded: Any, device: Any) -> int:
    from ddpm.video_sampling import generate_video, read_first_frames, write_videos

    channels, _, height, width = loaded.model.sample_shape
    first = None if args.first_frames is None else read_first_frames(args.first_frames, args.num_first_frames,
                                                                      channels, (height, width))
    settings = _settings(args, loaded)
    samples = generate_video(loaded.model, loaded.diffusion.build(), args.num_images, settings,
                             seed=args.seed, frames=args.frames, first_frames=first, method=args.conditioning,
                             guidance_weight=args.guidance_weight, context=args.context, label=args.label,
                             batch_size=args.batch_size, device=device, bf16=_bf16(args), progress=not args.quiet)
    print(f"{len(samples.videos)} clips of {samples.videos.shape[2]} frames with {settings.sampler}: "
          f"{samples.nfe:g} network evaluations each")
    _print_paths(write_videos(samples, args.out, gif=not args.no_gif, mp4=args.mp4, grid=not args.no_grid,
                              npz=args.npz, fps=args.fps))
    return 0


def _settings(args: argparse.Namespace, loaded: Any) -> Any:
    """The sampler options, with the DDIM of the loaded model's diffusers scheduler config if it has one."""
    from ddpm.generate import SamplerSettings

    return loaded.sampler_settings(SamplerSettings(args.sampler, args.steps, **_solver_options(args)))


def cmd_sample(args: argparse.Namespace) -> int:
    from ddpm.generate import generate, write_samples
    from ddpm.loading import describe_run, load_model
    from ddpm.runtime import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.weights, device)
    print(describe_run(loaded))
    if _is_video(loaded, args):
        if args.upsampler or args.latents or args.dynamic_threshold is not None:
            raise UserError("--upsampler, --latents and --dynamic-threshold are for image models; this is a video "
                            "model")
        return _sample_video(args, loaded, device)
    if args.upsampler:
        return _sample_cascade(args, loaded, device)
    latents = None
    if args.latents:
        from ddpm.inversion import read_noise

        latents = read_noise(args.latents, loaded.model.sample_shape)
    settings = _sample_settings(args, loaded)
    samples = generate(loaded.model, loaded.diffusion.build(), args.num_images if latents is None else len(latents),
                       settings, seed=args.seed, latents=latents, batch_size=args.batch_size,
                       device=device, bf16=_bf16(args), progress=not args.quiet, autoencoder=loaded.autoencoder,
                       **_conditions(args, loaded))
    print(f"{len(samples.images)} images with {settings.sampler}: {samples.nfe:g} network evaluations each")
    _print_paths(write_samples(samples, args.out, grid=not args.no_grid, pngs=args.pngs, npz=args.npz))
    return 0


def _sample_cascade(args: argparse.Namespace, base: Any, device: Any) -> int:
    from ddpm.generate import grid_image, write_samples
    from ddpm.images import save_image
    from ddpm.loading import describe_run, load_model
    from ddpm.superres import cascade

    if args.latents:
        raise UserError("--latents and --upsampler do not go together (x_T is the base model's alone)")
    upsampler = load_model(args.upsampler, args.weights, device)
    print(f"upsampler: {describe_run(upsampler)}")
    conditions = _conditions(args, base)
    small, large = cascade(base, upsampler, args.num_images, _sample_settings(args, base),
                           _sample_settings(args, upsampler, args.upsampler_sampler, args.upsampler_steps),
                           args.noise_level,
                           seed=args.seed, label=args.label, guidance_scale=args.guidance_scale,
                           prompts=conditions["prompts"], negative_prompt=args.negative_prompt,
                           batch_size=args.batch_size, device=device, bf16=_bf16(args), progress=not args.quiet)
    sizes = ["x".join(map(str, samples.images.shape[2:])) for samples in (small, large)]
    print(f"{len(large.images)} images: {small.nfe:g} network evaluations each at {sizes[0]}, then {large.nfe:g} at "
          f"{sizes[1]} (augmentation level {args.noise_level:g})")
    written = write_samples(large, args.out, grid=not args.no_grid, pngs=args.pngs, npz=args.npz)
    if not args.no_grid:
        written.append(save_image(grid_image(small.uint8()[:100]), Path(args.out) / "base_grid.png"))
    _print_paths(written)
    return 0


def _print_paths(paths: Sequence[Path]) -> None:
    if len(paths) > 5:
        print(f"wrote {len(paths)} files, e.g. {paths[0]} ... {paths[-1]}")
    else:
        for path in paths:
            print(f"wrote {path}")


# ---------------------------------------------------------------------------- eval


def _add_eval(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval", parents=[common], help="bits/dim of a data split; FID/KID/IS of samples",
        description="Measure a model: the full variational bound in bits/dim on a data split (always), and FID, "
                    "KID and IS of its samples against the data with --fid (needs torch-fidelity).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              ddpm eval runs/mnist --data mnist.npz --out out/eval              # test bits/dim of 1000 images
              ddpm eval runs/mnist --data mnist.npz --out out/eval --limit 0    # all test images
              ddpm eval runs/cifar --data cifar10 --out out/eval --fid --num-samples 10000 --inception pt_inception.pth
            writes bpd.json (total, per-term breakdown) and bound.png (the terms over t)."""))
    _model_arguments(p)
    p.add_argument("--data", required=True, help="the data to score (folder, .npz, torchvision name or digits)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split (default test)")
    p.add_argument("--limit", type=int, default=1000, help="score at most this many images (0: all; default 1000)")
    p.add_argument("--out", required=True, help="output directory for the report")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--max-batch", type=int, default=1024, help="(image, t) pairs per model call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bpd", action="store_true", help="skip bits/dim (a latent model has none: pass it with --fid)")
    p.add_argument("--fid", action="store_true", help="also FID/KID/IS of samples vs the data (torch-fidelity)")
    p.add_argument("--samples", default=None, help="an .npz of samples for --fid (default: draw --num-samples)")
    p.add_argument("--num-samples", type=int, default=10000, help="samples to draw for --fid")
    group = p.add_argument_group("sampling for --fid")
    _solver_arguments(group)
    _bf16_argument(group, "bfloat16 autocast for --fid sampling")
    p.add_argument("--inception", default=None, help="local Inception weights file for torch-fidelity (offline)")
    p.set_defaults(handler=cmd_eval, command="eval")


def cmd_eval(args: argparse.Namespace) -> int:
    from ddpm.evaluate import evaluate_bpd, evaluate_fid, write_bpd_report
    from ddpm.generate import generate
    from ddpm.loading import describe_run, load_model
    from ddpm.runtime import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.weights, device)
    print(describe_run(loaded))
    if _is_video(loaded, args):
        raise UserError(f"{args.model} is a video model and ddpm eval scores images; measure clips with "
                        "python -m bench.video_mnist (Moving MNIST: per-frame FD, continuation MSE and SSIM)")
    out = Path(args.out)
    written: list[Path] = []
    if not args.no_bpd:
        report = evaluate_bpd(loaded, args.data, args.split, args.limit or None, args.batch_size, args.max_batch,
                              args.seed, device, progress=not args.quiet)
        written += write_bpd_report(report, out)
        print(f"bits/dim: {report['bpd']:.4f} ± {report['bpd_stderr'] or 0:.4f} over {report['num_images']} images "
              f"(L_T {report['prior_bpd']:.2e}, L_0 {report['decoder_bpd']:.4f})")
    if args.fid:
        from ddpm.data import load_images

        channels, size, _ = loaded.image_shape
        reference = load_images(args.data, size, channels, split="train", limit=args.num_samples,
                                progress=not args.quiet).images
        if args.samples:
            samples = _load_samples_npz(Path(args.samples))
        else:
            samples = generate(loaded.model, loaded.diffusion.build(), args.num_samples,
                               _settings(args, loaded), seed=args.seed, batch_size=args.batch_size,
                               device=device, bf16=_bf16(args), progress=not args.quiet,
                               autoencoder=loaded.autoencoder, conditioning=loaded.conditioning).uint8()
        metrics = evaluate_fid(samples, reference, args.inception, device=device, progress=not args.quiet)
        from ddpm.checkpoints import save_json

        path = out / "fid.json"
        save_json(path, {**metrics, "num_samples": len(samples), "num_reference": len(reference)})
        written.append(path)
        print("  ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    _print_paths(written)
    return 0


def _load_samples_npz(path: Path) -> Any:
    import numpy as np
    import torch

    if not path.is_file():
        raise UserError(f"--samples {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arr = f["arr_0"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"--samples {path}: not an .npz with an arr_0 array ({e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise UserError(f"--samples {path}: arr_0 must be uint8 [N, H, W, C], got {arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------- viz


def _add_viz(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "viz", parents=[common], help="pictures of the forward and reverse processes and the schedules",
        description="Make pictures: the forward process on real images, the noise schedules, and the reverse "
                    "process of a trained model (a grid of x_t and predicted x_0, and an animated GIF).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              ddpm viz forward --data digits --out out/viz
              ddpm viz schedules --out out/viz
              ddpm viz reverse runs/digits --out out/viz --steps 100"""))
    from ddpm.schedules import SCHEDULES

    what = p.add_subparsers(title="pictures", metavar="WHAT")
    f = what.add_parser("forward", parents=[common], help="real images noised by q(x_t|x_0) at t = 0, 50, 100, ...")
    f.add_argument("--data", required=True, help="images to noise (folder, .npz, torchvision name or digits)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--num-images", type=int, default=4, help="rows (images)")
    f.add_argument("--image-size", type=int, default=None, help="resize to this (default: the data's own size)")
    f.add_argument("--schedule", default="linear", choices=list(SCHEDULES))
    f.add_argument("--timesteps", type=int, default=1000, help="T")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(handler=cmd_viz_forward, command="viz")
    s = what.add_parser("schedules", parents=[common], help="beta_t, alpha-bar_t and SNR, linear vs cosine")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--timesteps", type=int, default=1000, help="T")
    s.set_defaults(handler=cmd_viz_schedules, command="viz")
    r = what.add_parser("reverse", parents=[common], help="a trained model's reverse process: grid and GIF")
    _model_arguments(r)
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--num-images", type=int, default=8, help="images in the grid (the GIF shows 16)")
    _sampler_arguments(r)
    _condition_arguments(r)
    r.set_defaults(handler=cmd_viz_reverse, command="viz")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1], command="viz")


def cmd_viz_forward(args: argparse.Namespace) -> int:
    import torch

    from ddpm.config import DiffusionConfig
    from ddpm.data import load_images
    from ddpm.images import save_image
    from ddpm.viz import forward_process_strip

    data = load_images(args.data, args.image_size, split="train", limit=args.num_images, progress=False)
    diffusion = DiffusionConfig(timesteps=args.timesteps, schedule=args.schedule).build()
    image = forward_process_strip(diffusion, data.images, generator=torch.Generator().manual_seed(args.seed))
    _print_paths([save_image(image, Path(args.out) / f"forward_{args.schedule}.png")])
    return 0


def cmd_viz_schedules(args: argparse.Namespace) -> int:
    from ddpm.viz import plot_schedules

    _print_paths([Path(plot_schedules(args.timesteps, Path(args.out) / "schedules.png"))])
    return 0


def cmd_viz_reverse(args: argparse.Namespace) -> int:
    from ddpm.loading import describe_run, load_model
    from ddpm.runtime import resolve_device
    from ddpm.viz import reverse_process_pictures

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.weights, device)
    print(describe_run(loaded))
    if _is_video(loaded, args):
        from ddpm.video_sampling import video_reverse_pictures

        _print_paths(video_reverse_pictures(loaded.model, loaded.diffusion.build(), Path(args.out),
                                            _settings(args, loaded),
                                            num_videos=max(1, args.num_images // 4), seed=args.seed, device=device,
                                            bf16=_bf16(args), progress=not args.quiet))
        return 0
    _print_paths(reverse_process_pictures(loaded.model, loaded.diffusion.build(), Path(args.out),
                                          _settings(args, loaded),
                                          num_images=args.num_images, seed=args.seed, device=device,
                                          bf16=_bf16(args), progress=not args.quiet, autoencoder=loaded.autoencoder,
                                          **_conditions(args, loaded)))
    return 0


# ---------------------------------------------------------------------------- export


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="save a model's weights as a diffusers or ddpm directory",
                       description="Write a trained model (EMA weights by default) in the diffusers layout "
                                   "(UNet2DModel: config.json + diffusion_pytorch_model.safetensors) or ours. A "
                                   "latent or text-to-image model becomes a pipeline's folders (unet/, vae/, "
                                   "scheduler/, text_encoder/, tokenizer/); with a frozen CLIP and an autoencoder "
                                   "also a model_index.json, which diffusers' StableDiffusionPipeline loads.")
    _model_arguments(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "ddpm"])
    p.set_defaults(handler=cmd_export, command="export")


def cmd_export(args: argparse.Namespace) -> int:
    from ddpm.export import export_model
    from ddpm.loading import load_model

    _print_paths(export_model(load_model(args.model, args.weights, "cpu"), Path(args.out), args.format))
    return 0


# ---------------------------------------------------------------------------- data


def _add_data(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "data", parents=[common], help="make or prepare data sets (Moving MNIST; a folder as WebDataset shards)",
        description="Make training data without a download, or prepare it for streaming.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              ddpm data moving-mnist --mnist mnist.npz --out mm.npz      # the standard set: 64x64, 2 digits, 20 frames
              ddpm data moving-mnist --mnist mnist.npz --out mm32.npz --size 32 --digits 1 --frames 8
              ddpm data pack ./images --out shards/images                # WebDataset shards with an index"""))
    what = p.add_subparsers(title="data verbs", metavar="WHAT")
    _add_data_moving_mnist(what, common)
    _add_data_pack(what, common)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1], command="data")


def _add_data_moving_mnist(what: Any, common: argparse.ArgumentParser) -> None:
    m = what.add_parser("moving-mnist", parents=[common],
                        help="Moving MNIST (Srivastava et al. 2015): digits bouncing in a frame, as an .npz of videos")
    m.add_argument("--mnist", required=True, help="an MNIST .npz with x_train, y_train, x_test, y_test (keras')")
    m.add_argument("--out", required=True, help="the .npz to write (x_train, y_train, x_test, y_test, ...)")
    m.add_argument("--num-videos", type=int, default=10_000, help="training videos (default 10000)")
    m.add_argument("--num-test", type=int, default=1_000, help="test videos, from MNIST's test digits (default 1000)")
    m.add_argument("--frames", type=int, default=20, help="frames per video (default 20)")
    m.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    m.add_argument("--digits", type=int, default=2, help="digits per video (default 2)")
    m.add_argument("--digit-size", type=int, default=None, help="digit side (default 28 * size / 64)")
    m.add_argument("--step-length", type=float, default=0.1, help="speed, in canvas widths per frame (default 0.1)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(handler=cmd_data_moving_mnist, command="data")


def cmd_data_moving_mnist(args: argparse.Namespace) -> int:
    from ddpm.video_data import write_moving_mnist

    path = write_moving_mnist(args.mnist, args.out, args.num_videos, args.num_test, args.frames, args.size,
                              args.digits, args.digit_size, args.step_length, args.seed)
    _print_paths([path])
    return 0


def _add_data_pack(verbs: Any, common: argparse.ArgumentParser) -> None:
    p = verbs.add_parser(
        "pack", parents=[common], help="write a folder of images (with labels or captions) as WebDataset shards",
        description="Write a folder of images as WebDataset tar shards (KEY.png/.jpg, KEY.cls with the label of its "
                    "sub-folder, KEY.txt with its metadata.jsonl caption) and their shardindex.json, so that the data "
                    "set can move to where the GPUs are and stream from there (needs the webdataset package).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            examples:
              ddpm data pack ./cifar10/train --out shards/cifar10              # 1000 images a shard
              ddpm data pack ./captioned --out shards/pairs --max-count 5000 --max-size 512
              ddpm train --preset cifar10 --data shards/cifar10 --out runs/c  # streams them
              ddpm train --preset cifar10 --data 'http://host/cifar10/train-{000000..000049}.tar' --out runs/c
            The images are written in a shuffled order (--seed), their bytes as they are."""))
    p.add_argument("folder", help="a folder of images (sub-folders per class give labels; metadata.jsonl captions)")
    p.add_argument("--out", required=True, help="the folder for the shards")
    p.add_argument("--max-count", type=int, default=1000, help="images per shard at most (default 1000)")
    p.add_argument("--max-size", type=float, default=1024, help="megabytes per shard, about (default 1024)")
    p.add_argument("--name", default="train", help="the shards' name: NAME-000000.tar, ... (default train)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="for a folder with train/ and test/")
    p.add_argument("--caption-column", default="text", help="the metadata.jsonl field with the captions")
    p.add_argument("--seed", type=int, default=0, help="the seed of the shuffled order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's order (labels round-robin)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(handler=cmd_data_pack, command="data")


def cmd_data_pack(args: argparse.Namespace) -> int:
    from ddpm.shards import pack_folder

    if args.max_size <= 0:
        raise UserError(f"--max-size must be positive, got {args.max_size}")
    paths = pack_folder(args.folder, args.out, max_count=args.max_count, max_bytes=int(args.max_size * 2**20),
                        shuffle=not args.no_shuffle, seed=args.seed, split=args.split,
                        caption_column=args.caption_column, name=args.name, overwrite=args.overwrite,
                        progress=not args.quiet)
    _print_paths(paths)
    shards = len(paths) - 1
    print(f"{shards} shard(s): {Path(args.out) / f'{args.name}-{{000000..{shards - 1:06d}}}.tar'}; "
          f"train on them with --data {args.out}")
    return 0


# ---------------------------------------------------------------------------- demo


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common], help="train on the built-in 8x8 digits for a few minutes, then picture it",
        description="The whole workflow with no download: train the 'digits' preset on scikit-learn's 8x8 digits "
                    "for a few CPU minutes, then write a grid of samples, the forward process, the schedules and "
                    "the reverse process (PNG and GIF).")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget (default 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: as many as --minutes allow)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDPM sampling steps (default: all 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.set_defaults(handler=cmd_demo, command="demo")


def cmd_demo(args: argparse.Namespace) -> int:
    from ddpm.demo import run_demo

    paths = run_demo(Path(args.out), minutes=args.minutes, steps=args.steps, overwrite=args.overwrite,
                     device=args.device, progress=not args.quiet, sample_steps=args.sample_steps)
    print("the demo wrote:")
    for name, path in paths.items():
        print(f"  {name:<10} {path}")
    return 0


# ---------------------------------------------------------------------------- images in, images out


def _image_parser(sub: Any, common: argparse.ArgumentParser, verb: str, summary: str, description: str, examples: str,
                  sampler: str | None = None, sampler_note: str | None = None) -> argparse.ArgumentParser:
    """A verb that starts from images: the model, --out, the sampler (default ``sampler``, or chosen by the
    verb when None, as ``sampler_note`` says), the condition (a label, or prompts)."""
    p = sub.add_parser(verb, parents=[common], help=summary, description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"examples:\n{textwrap.indent(textwrap.dedent(examples), '  ')}\n"
                              f"--sampler defaults to {sampler_note or sampler} here. A latent model works on the "
                              "image's latents and decodes at the end; --label (a class-conditional model) or "
                              "--prompt (a text-conditional one) and --guidance-scale condition it.")
    _model_arguments(p)
    p.add_argument("--out", required=True, help="output directory")
    _sampler_arguments(p, seed_help="random seed: output i of a seed is the same whatever --batch-size")
    p.set_defaults(sampler=sampler)
    _condition_arguments(p)
    _dynamic_threshold_argument(p)
    return p


def _images_argument(p: argparse.ArgumentParser, name: str = "--image") -> None:
    p.add_argument(name, nargs="+", required=True, metavar="IMG",
                   help="image file(s) of the model's size and kind (grey or RGB), all of one size")


def _model_for_images(args: argparse.Namespace, images: Any = None, what: str = "--image") -> tuple[Any, Any]:
    """The model (described) and the device, with ``images`` (uint8 [N, C, H, W]) checked against it."""
    from ddpm.img2img import check_image_model, check_images
    from ddpm.loading import describe_run, load_model
    from ddpm.runtime import resolve_device

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.weights, device)
    check_image_model(loaded.image_shape, args.model)
    if images is not None:
        check_images(images, loaded.image_shape, what)
    print(describe_run(loaded))
    return loaded, device


def _read_images(paths: Sequence[str]) -> tuple[Any, str]:
    """The images of ``--image`` and how to name them in a message."""
    from ddpm.images import read_images

    return read_images(paths), _images_name(paths)


def _images_name(paths: Sequence[str]) -> str:
    return f"--image {paths[0]}" if len(paths) == 1 else "--image"


def _common_kwargs(args: argparse.Namespace, loaded: Any, device: Any, seed: bool = True) -> dict[str, Any]:
    """The keyword arguments every image-to-image function takes (``seed``: those that draw)."""
    kwargs = {"batch_size": args.batch_size, "device": device, "bf16": _bf16(args), "progress": not args.quiet,
              "autoencoder": loaded.autoencoder, **_conditions(args, loaded)}
    return {**kwargs, "seed": args.seed} if seed else kwargs


def _add_inpaint(sub: Any, common: argparse.ArgumentParser) -> None:
    from ddpm.inpaint import JUMP_LENGTH, METHODS, REPAINT_STEPS, RESAMPLES

    p = _image_parser(
        sub, common, "inpaint", "fill in the masked part of images (RePaint, or replacement with any sampler)",
        "Inpaint with a model trained for plain generation. The mask is diffusers' RePaint convention: white (1) "
        "keeps a pixel, black (0) has it generated (grey >= 128 keeps). RePaint (Lugmayr et al. 2022) runs DDPM's "
        f"ancestral steps on {REPAINT_STEPS} kept steps by default and goes back up {JUMP_LENGTH} steps every "
        f"{JUMP_LENGTH}, {RESAMPLES} times (about 2,400 network evaluations); --method replacement puts the known "
        "pixels back after every step of any sampler (cheap, but blind to them). With RePaint --steps is the number "
        f"of kept DDPM steps (default {REPAINT_STEPS}, at most T), not the NFE. Writes grid.png (input, masked "
        "input, results) and images/NNNNNN.png; prints the NFE spent.",
        """\
        ddpm inpaint runs/mnist --image digit.png --mask left_half.png --out out/inpaint
        ddpm inpaint runs/mnist --image a.png b.png --mask mask.png --out out/inp --num-samples 4 --steps 100
        ddpm inpaint runs/mnist --image digit.png --mask mask.png --method replacement --sampler dpm++2m --out out/r
        """, sampler=None, sampler_note="ddpm for RePaint (its steps are DDPM's), dpm++2m-sde for replacement")
    _images_argument(p)
    p.add_argument("--mask", required=True, metavar="MASK", help="the mask image, of the images' size: white keeps")
    p.add_argument("--method", default="repaint", choices=list(METHODS), help="repaint (default) or replacement")
    p.add_argument("--jump-length", type=int, default=JUMP_LENGTH, help=f"RePaint's j (default {JUMP_LENGTH})")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help=f"RePaint's r (default {RESAMPLES}; 1: none)")
    p.add_argument("--num-samples", type=int, default=1, help="completions of each image (default 1)")
    p.set_defaults(handler=cmd_inpaint, command="inpaint")


def cmd_inpaint(args: argparse.Namespace) -> int:
    from ddpm.img2img import write_results
    from ddpm.inpaint import inpaint, load_inputs, masked_preview
    from ddpm.samplers import DEFAULT_SAMPLER

    images, mask = load_inputs(args.image, args.mask)
    loaded, device = _model_for_images(args, images, _images_name(args.image))
    args.sampler = args.sampler or ("ddpm" if args.method == "repaint" else DEFAULT_SAMPLER)
    samples = inpaint(loaded.model, loaded.diffusion.build(), images, mask, args.method,
                      _sample_settings(args, loaded),
                      jump_length=args.jump_length, resamples=args.resamples, num_samples=args.num_samples,
                      **_common_kwargs(args, loaded, device))
    how = (f"RePaint ({args.resamples} resamples, jumps of {args.jump_length})" if args.method == "repaint"
           else f"replacement with {args.sampler}")
    print(f"{len(samples.images)} inpainted images by {how}: {samples.nfe:g} network evaluations each")
    _print_paths(write_results(args.out, images, samples.images, args.num_samples,
                               [(masked_preview(images, mask), "masked")]))
    return 0


def _add_img2img(sub: Any, common: argparse.ArgumentParser) -> None:
    from ddpm.samplers import DEFAULT_SAMPLER

    p = _image_parser(
        sub, common, "img2img", "edit images by noising them part-way and denoising (SDEdit)",
        "SDEdit (Meng et al. 2022) with diffusers' strength: of the sampler's N steps the last int(N*S) are run, "
        "from the image noised to the first of them. --strength 0 returns the image, 1 all but ignores it. "
        "Writes grid.png (inputs, results) and images/NNNNNN.png.",
        """\
        ddpm img2img runs/mnist --image digit.png --strength 0.5 --out out/edit
        ddpm img2img runs/cifar --image photo.png --strength 0.3 --num-samples 4 --sampler dpm++2m --out out/e
        """, sampler=DEFAULT_SAMPLER)
    _images_argument(p)
    p.add_argument("--strength", type=float, required=True, help="S in [0, 1]: how much of the chain is run")
    p.add_argument("--num-samples", type=int, default=1, help="edits of each image (default 1)")
    p.set_defaults(handler=cmd_img2img, command="img2img")


def cmd_img2img(args: argparse.Namespace) -> int:
    from ddpm.img2img import check_strength, img2img, write_results

    check_strength(args.strength)
    images, what = _read_images(args.image)
    loaded, device = _model_for_images(args, images, what)
    samples = img2img(loaded.model, loaded.diffusion.build(), images, args.strength,
                      _sample_settings(args, loaded),
                      num_samples=args.num_samples, **_common_kwargs(args, loaded, device))
    print(f"{len(samples.images)} images at strength {args.strength:g}: {samples.nfe:g} network evaluations each")
    _print_paths(write_results(args.out, images, samples.images, args.num_samples))
    return 0


def _add_invert(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _image_parser(
        sub, common, "invert", "encode images to their noise x_T (deterministic DDIM / DPM-Solver++) and back",
        "Run the probability-flow ODE from the images up to x_T (DDIM, or --sampler dpm++2m) and write it as "
        "latents.npy ([N, C, H, W] float32, the model's x_T); then decode it back with the same sampler, steps and "
        "spacing and write grid.png (inputs above, reconstructions below) and the reconstruction's per-dimension "
        "MSE on [0, 1]. 'ddpm sample RUN --latents latents.npy' with the same options decodes it again.",
        """\
        ddpm invert runs/mnist --image digit.png --out out/inv --steps 50
        ddpm sample runs/mnist --latents out/inv/latents.npy --sampler ddim --steps 50 --out out/dec
        ddpm invert runs/mnist --image a.png b.png --sampler dpm++2m --steps 20 --out out/inv2
        """, sampler="ddim")
    _images_argument(p)
    p.set_defaults(handler=cmd_invert, command="invert")


def cmd_invert(args: argparse.Namespace) -> int:
    from ddpm.img2img import write_results
    from ddpm.inversion import invert, save_noise

    images, what = _read_images(args.image)
    loaded, device = _model_for_images(args, images, what)
    found = invert(loaded.model, loaded.diffusion.build(), images, _sample_settings(args, loaded),
                   **_common_kwargs(args, loaded, device, seed=False))
    print(f"{len(images)} images encoded in {found.encode_nfe} network evaluations each and decoded in "
          f"{found.reconstruction.nfe:g}: reconstruction MSE {found.mse:.3g} per dimension on [0, 1]")
    written = [save_noise(found.latents, Path(args.out) / "latents.npy")]
    written += write_results(args.out, images, found.reconstruction.images, pngs=False)
    _print_paths(written)
    given = {"--sampler": args.sampler, "--steps": args.steps, "--spacing": args.spacing, "--label": args.label,
             "--guidance-scale": args.guidance_scale, "--dynamic-threshold": args.dynamic_threshold,
             "--negative-prompt": args.negative_prompt}
    options = " ".join(f"{flag} {shlex.quote(str(value))}" for flag, value in given.items() if value is not None)
    options += "".join(f" --prompt {shlex.quote(prompt)}" for prompt in _prompts(args) or [])
    print(f"decode: ddpm sample {args.model} --latents {written[0]} {options} --out OUT")
    return 0


def _add_interpolate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _image_parser(
        sub, common, "interpolate", "images along the great circle between two noises (DDIM's slerp)",
        "Interpolate between two x_T by spherical interpolation (DDIM appendix D.5) and decode every frame with "
        "a deterministic solver. --a and --b are an image (inverted first, as 'ddpm invert') or a .npy of x_T. "
        "Writes interpolation.png (the frames in a row) and interpolation.gif (there and back).",
        """\
        ddpm interpolate runs/mnist --a seven.png --b two.png --out out/interp --steps 50
        ddpm interpolate runs/mnist --a out/inv/latents.npy --b noise.npy --frames 16 --out out/interp
        """, sampler="ddim")
    p.add_argument("--a", required=True, metavar="IMG|NOISE.npy", help="the first end: an image or a .npy of x_T")
    p.add_argument("--b", required=True, metavar="IMG|NOISE.npy", help="the other end")
    p.add_argument("--frames", type=int, default=10, help="frames, both ends included (default 10)")
    p.set_defaults(handler=cmd_interpolate, command="interpolate")


def cmd_interpolate(args: argparse.Namespace) -> int:
    from ddpm.inversion import interpolate, invert, write_interpolation

    if not isinstance(args.frames, int) or args.frames < 2:
        raise UserError(f"--frames must be an integer >= 2 (both ends), got {args.frames}")
    loaded, device = _model_for_images(args)
    ends = [_read_end(loaded, name, value) for name, value in (("--a", args.a), ("--b", args.b))]  # both checked
    for i, (name, value) in enumerate((("--a", args.a), ("--b", args.b))):
        if ends[i].ndim == 4:  # an image: its x_T
            found = invert(loaded.model, loaded.diffusion.build(), ends[i], _sample_settings(args, loaded),
                           **_common_kwargs(args, loaded, device, seed=False))
            print(f"{name}: {value} inverted (reconstruction MSE {found.mse:.3g})")
            ends[i] = found.latents[0]
    samples = interpolate(loaded.model, loaded.diffusion.build(), *ends, args.frames, _sample_settings(args, loaded),
                          **_common_kwargs(args, loaded, device, seed=False))
    print(f"{args.frames} frames decoded with {args.sampler}: {samples.nfe:g} network evaluations each")
    _print_paths(write_interpolation(samples, args.out))
    return 0


def _read_end(loaded: Any, name: str, value: str) -> Any:
    """One end of ``ddpm interpolate``: a .npy's x_T [*sample_shape], or an image [1, C, H, W] to invert."""
    from ddpm.img2img import check_images
    from ddpm.inversion import read_noise

    if value.endswith(".npy"):
        z = read_noise(value, loaded.model.sample_shape)
        if len(z) != 1:
            raise UserError(f"{name} {value} holds {len(z)} noises; give one")
        return z[0]
    images = _read_images([value])[0]
    check_images(images, loaded.image_shape, f"{name} {value}")
    return images


# ---------------------------------------------------------------------------- ui


def _add_ui(sub: Any, common: argparse.ArgumentParser) -> None:
    from ddpm.ui import DEFAULT_PORT

    p = sub.add_parser(
        "ui", parents=[common], help="a local web page: sample, watch the reverse process, explore the forward one",
        description="Serve a page on this machine to draw samples from the models given (any sampler, NFE, seed, "
                    "class or prompt, images streaming in), scrub through the reverse process (x_t and the "
                    "predicted x_0 at every kept step), explore the forward process q(x_t | x_0) with the "
                    "schedule's alpha-bar, SNR and posterior variance, and edit an image: inpaint under a mask drawn "
                    "with the mouse (RePaint or replacement) or img2img with a strength slider. Works offline; needs "
                    "the 'ui' extra.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(f"""\
            examples:
              ddpm ui runs/mnist                          # then open the address it prints
              ddpm ui runs/mnist runs/cifar --data mnist.npz --port 8000
              ddpm ui --data digits                       # the forward process only, no model
              ddpm ui runs/mnist --listen                 # reachable from other machines (no password)

            It listens on 127.0.0.1:{DEFAULT_PORT} unless told otherwise and answers only its own page
            (Host and Origin are checked). The page shows the 'ddpm sample', 'ddpm inpaint' or
            'ddpm img2img' command that draws the same images. Ctrl-C stops it."""))
    p.add_argument("models", nargs="*", metavar="RUN_OR_MODEL",
                   help="run, checkpoint, saved-model or diffusers directories to sample from")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw training weights")
    p.add_argument("--data", default=None,
                   help="images for the forward-process and edit views (folder, .npz, torchvision name or digits; "
                        "the first 100)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default=None, metavar="ADDRESS",
                   help="accept other machines: bind ADDRESS (default 0.0.0.0) instead of 127.0.0.1; anyone who "
                        "reaches the port can use the page")
    _bf16_argument(p, "bfloat16 autocast for sampling, decided once at the start")
    p.set_defaults(handler=cmd_ui, command="ui")


def cmd_ui(args: argparse.Namespace) -> int:
    try:
        from ddpm.ui.server import serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("starlette", "uvicorn"):
            raise
        raise UserError("ddpm ui needs a web server that is not installed: pip install 'ddpm[ui]'") from None
    serve(args.models, weights=args.weights, device=args.device, data=args.data, port=args.port, listen=args.listen,
          quiet=args.quiet, bf16=_bf16(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

