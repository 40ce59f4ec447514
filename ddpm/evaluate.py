"""Evaluation: the variational bound in bits/dim on a data split, and FID / KID / IS via torch-fidelity.

``evaluate_bpd`` is the likelihood evaluation of Ho et al. (2020, Table 2): the full bound
L_T + Σ L_{t−1} + L_0 of every test image (all T terms, not an estimate over a few t), reported
with its standard error over images and broken down by term. ``evaluate_fid`` hands samples and
reference images to torch-fidelity, an optional extra whose Inception weights must be cached or
given as a local file (they are never unpickled: we load them with ``weights_only=True``).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm import checkpoints
from ddpm.data import load_images
from ddpm.errors import UserError
from ddpm.loading import LoadedModel
from ddpm.viz import plot_bound_terms

#: Why a latent model has no bits/dim (docs/theory.md, "Latent diffusion").
LATENT_BPD = ("bits/dim of pixels is not defined for a latent model: its bound is on the latents, and the "
              "autoencoder's decoder gives no likelihood of the pixels; use --fid (with --no-bpd) for sample quality")


#: Why a text-conditional model's bits/dim are not computed here.
TEXT_BPD = ("bits/dim of a text-conditional model would be the bound given each image's caption, which ddpm eval "
            "does not compute yet; use --fid (with --no-bpd) for sample quality")


@torch.no_grad()
def evaluate_bpd(
    loaded: LoadedModel,
    source: str,
    split: str = "test",
    limit: int | None = 1000,
    batch_size: int = 64,
    max_batch: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
    clip_denoised: bool = True,
    progress: bool = True,
    root: str | None = None,
) -> dict[str, Any]:
    """The bound in bits/dim of ``limit`` images of a data split, with its per-term breakdown.

    Returns a JSON-ready report: ``bpd`` (mean total), ``bpd_stderr``, ``prior_bpd`` (L_T),
    ``decoder_bpd`` (L_0), ``terms`` (the mean of each term, index i = 0-based step i, so
    ``terms[0]`` is L_0), ``num_images``, timing and what was evaluated. A class-conditional
    model is given the images' labels (the null label if the data has none).
    """
    if loaded.autoencoder is not None:
        raise UserError(LATENT_BPD)
    if loaded.conditioning is not None:
        raise UserError(TEXT_BPD)
    if getattr(loaded.model.config, "low_res_channels", 0):
        raise UserError("bits/dim of a super-resolution stage would be the bound given each image's low-resolution "
                        "version, which ddpm eval does not compute; sample it with ddpm sample BASE --upsampler RUN")
    channels, *size = loaded.model.sample_shape
    device = torch.device(device)
    data = load_images(source, tuple(size), channels, split=split, root=root, limit=limit, progress=progress)
    diffusion = loaded.diffusion.build()
    generator = torch.Generator(device=device).manual_seed(seed)
    totals, priors = [], []
    terms_sum = torch.zeros(diffusion.num_timesteps, dtype=torch.float64)
    start = time.perf_counter()
    order = torch.arange(len(data))
    for begin in tqdm(range(0, len(data), batch_size), desc="bits/dim", unit="batch", disable=not progress):
        idx = order[begin:begin + batch_size]
        x0 = data.to_float(idx).to(device)
        kwargs = {}
        if loaded.num_classes:
            kwargs["y"] = data.labels[idx].to(device)
        out = diffusion.bits_per_dim(loaded.model, x0, clip_denoised=clip_denoised, model_kwargs=kwargs,
                                     max_batch=max_batch, generator=generator, progress=progress)
        totals.append(out["total_bpd"])
        priors.append(out["prior_bpd"])
        terms_sum += out["terms"].sum(0)
    total = torch.cat(totals)
    n = len(total)
    terms = terms_sum / n
    return {
        "bpd": total.mean().item(),
        "bpd_stderr": (total.std().item() / math.sqrt(n)) if n > 1 else None,
        "prior_bpd": torch.cat(priors).mean().item(),
        "decoder_bpd": terms[0].item(),
        "terms": terms.tolist(),
        "num_images": n,
        "data": data.describe(),
        "split": split,
        "model": loaded.description,
        "diffusion": {"timesteps": diffusion.num_timesteps, "schedule": loaded.diffusion.schedule,
                      "mean_type": loaded.diffusion.mean_type, "var_type": loaded.diffusion.var_type},
        "clip_denoised": clip_denoised,
        "seconds": time.perf_counter() - start,
    }


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] as torch-fidelity wants them: 3-channel uint8 tensors."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def evaluate_fid(
    samples: Tensor,
    reference: Tensor,
    inception_weights: str | None = None,
    kid: bool = True,
    isc: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """FID (and KID, IS) of uint8 ``samples`` [N, C, H, W] against uint8 ``reference`` images.

    Needs the ``torch-fidelity`` package (``pip install 'ddpm[metrics]'``) and its Inception
    weights: cached by an earlier online run, or a local file ``inception_weights``
    (pt_inception-2015-12-05-6726825d.pth), which is read with ``weights_only=True`` first so
    that nothing in it is executed.
    """
    try:
        import torch_fidelity
    except ImportError as e:
        raise UserError(f"FID needs torch-fidelity: pip install 'ddpm[metrics]' ({e})") from e
    kwargs: dict[str, Any] = {
        "input1": _UInt8Images(samples), "input2": _UInt8Images(reference), "fid": True, "kid": kid,
        "isc": isc, "cuda": torch.device(device).type == "cuda", "verbose": progress,
        "kid_subset_size": min(1000, len(samples), len(reference)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if inception_weights:
            kwargs["feature_extractor_weights_path"] = _checked_weights_copy(Path(inception_weights), Path(tmp))
        try:
            metrics = torch_fidelity.calculate_metrics(**kwargs)
        except Exception as e:
            if "download" in str(e).lower() or "urlopen" in repr(e).lower() or isinstance(e, OSError):
                raise UserError(
                    "FID needs torch-fidelity's Inception weights, which could not be downloaded "
                    f"({type(e).__name__}: {e}); pass a local copy with --inception PATH "
                    "(pt_inception-2015-12-05-6726825d.pth)") from e
            raise
    names = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
             "kernel_inception_distance_std": "kid_std", "inception_score_mean": "is", "inception_score_std": "is_std"}
    return {names[k]: float(v) for k, v in metrics.items() if k in names}


def _checked_weights_copy(path: Path, tmp: Path) -> str:
    """Load a user's weights without unpickling arbitrary objects, and hand torch-fidelity our own copy.

    torch-fidelity reads the file with ``torch.load(weights_only=False)``; the file it sees is
    one we wrote from tensors that a ``weights_only=True`` load accepted.
    """
    if not path.is_file():
        raise UserError(f"--inception {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--inception {path}: not a PyTorch weights file that loads safely ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"--inception {path}: expected a state dict of tensors")
    copy = tmp / path.name
    torch.save(state, copy)
    return str(copy)


def write_bpd_report(report: dict[str, Any], out_dir: str | Path, plot: bool = True) -> list[Path]:
    """Write ``bpd.json`` and, if matplotlib is installed, ``bound.png`` (the terms over t)."""
    out_dir = Path(out_dir)
    written = []
    path = out_dir / "bpd.json"
    checkpoints.save_json(path, report)
    written.append(path)
    if plot:
        try:
            written.append(Path(plot_bound_terms(torch.tensor(report["terms"]), out_dir / "bound.png",
                                                 prior=report["prior_bpd"],
                                                 title=f"{report['bpd']:.3f} bits/dim, {report['num_images']} images")))
        except UserError:  # matplotlib is missing: the JSON still has everything
            pass
    return written
