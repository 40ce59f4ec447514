"""The one place that draws images (ddpm.generate): reproducible per image, counted, labelled."""

import dataclasses

import pytest
import torch

from ddpm import GaussianDiffusion, linear_betas
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, generate
from ddpm.models import UNet, get_preset


def tiny_model(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(get_preset("tiny"), num_classes=num_classes)).eval()
    with torch.no_grad():  # off DDPM's zero initialisation of the output layer, so outputs differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


DIFFUSION = GaussianDiffusion(linear_betas(100))


@pytest.mark.slow
@pytest.mark.parametrize("settings", [SamplerSettings("ddpm", 8), SamplerSettings("ddim", 6, eta=0.5)])
def test_a_seed_gives_the_same_images_whatever_the_batch_size(settings):
    whole = generate(tiny_model(), DIFFUSION, 5, settings, seed=3, batch_size=5, progress=False)
    split = generate(tiny_model(), DIFFUSION, 5, settings, seed=3, batch_size=2, progress=False)
    other = generate(tiny_model(), DIFFUSION, 5, settings, seed=4, batch_size=5, progress=False)
    # Equal up to the float32 rounding of a different batch shape in the convolutions.
    torch.testing.assert_close(split.images, whole.images, atol=2e-5, rtol=0)
    assert (other.images - whole.images).abs().max() > 0.1
    # And the first images of a longer call are the images of a shorter one.
    longer = generate(tiny_model(), DIFFUSION, 7, settings, seed=3, batch_size=4, progress=False)
    torch.testing.assert_close(longer.images[:5], whole.images, atol=2e-5, rtol=0)


def test_network_evaluations_are_counted_once_per_guided_step():
    model = tiny_model(num_classes=3)
    samples = generate(model, DIFFUSION, 4, SamplerSettings("ddim", 5), guidance_scale=2.0, batch_size=3,
                       progress=False)
    assert samples.nfe == 5
    assert samples.labels.tolist() == [0, 1, 2, 0]  # the classes in turn across batches
    assert generate(model, DIFFUSION, 2, SamplerSettings("ddim", 3), label=2, progress=False).labels.tolist() == [2, 2]


def test_trajectory_and_range():
    samples = generate(tiny_model(), DIFFUSION, 3, SamplerSettings("ddpm", 10), trajectory_every=2, progress=False)
    assert samples.images.shape == (3, 3, 8, 8) and samples.images.abs().max() <= 1
    traj = samples.trajectory
    assert traj["x_t"].shape[1:] == (3, 3, 8, 8) and int(traj["timesteps"][0]) == 99


@pytest.mark.parametrize("bf16,dtype", [(True, torch.bfloat16), (False, torch.float32), (None, torch.float32)])
def test_bf16_means_autocast_on_the_cpu_too(bf16, dtype):
    """bf16=True runs the network under bfloat16 autocast on the CPU; auto (None) is float32 where the
    rule says so (the suite pins it: DDPM_CPU_BF16=off)."""
    model, seen = tiny_model(), []
    model.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    samples = generate(model, DIFFUSION, 2, SamplerSettings("ddim", 2), bf16=bf16, progress=False)
    assert set(seen) == {dtype} and samples.images.dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    ({"label": 1}, "unconditional"),
    ({"guidance_scale": 3.0}, "unconditional"),
    ({"num_images": 0}, "at least 1"),
])
def test_bad_requests_are_user_errors(kwargs, message):
    args = {"num_images": 2, **kwargs}
    with pytest.raises(UserError, match=message):
        generate(tiny_model(), DIFFUSION, args.pop("num_images"), SamplerSettings("ddim", 2), progress=False, **args)
