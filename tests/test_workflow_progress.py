"""Sampling tells its progress and stops when told: the callback of ddpm.samplers.sample and
ddpm.generate.generate (what ``ddpm ui`` streams and cancels with)."""

import dataclasses

import pytest
import torch

from ddpm import GaussianDiffusion, linear_betas
from ddpm.generate import SamplerSettings, generate
from ddpm.models import UNet, get_preset
from ddpm.samplers import kept_timesteps, sample

DIFFUSION = GaussianDiffusion(linear_betas(100))


def tiny_model(num_classes: int = 0) -> UNet:
    torch.manual_seed(0)
    model = UNet(dataclasses.replace(get_preset("tiny"), num_classes=num_classes)).eval()
    with torch.no_grad():  # off DDPM's zero initialisation of the output layer, so outputs differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


class Stop(Exception):
    pass


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("heun", 5), ("dpm++2m-sde", 4), ("dpm-adaptive", None)])
def test_the_callback_hears_every_step_the_trajectory_records(sampler, steps):
    heard = []
    x, trajectory = sample(DIFFUSION, tiny_model(), (2, 3, 8, 8), sampler=sampler, steps=steps,
                           generator=torch.Generator().manual_seed(0), return_trajectory=True,
                           callback=heard.append, **({"rtol": 0.5} if steps is None else {}))
    assert [h["step"] for h in heard] == list(range(len(heard)))
    assert heard[-1]["k"] == 0 and all(h["total"] == heard[0]["total"] for h in heard)
    assert torch.equal(torch.tensor([h["timestep"] for h in heard]), trajectory["timesteps"])
    assert torch.equal(torch.stack([h["x_t"] for h in heard]), trajectory["x_t"])
    assert torch.equal(torch.stack([h["pred_x0"] for h in heard]), trajectory["pred_x0"])
    if steps is not None:  # one call per kept timestep (Heun's 5 NFE keep 3), from the first kept step down
        kept = kept_timesteps(DIFFUSION, sampler, steps)
        assert [h["timestep"] for h in heard] == sorted(kept, reverse=True)
        assert [h["k"] for h in heard] == list(range(len(kept) - 1, -1, -1))


def test_an_exception_from_the_callback_stops_the_chain_at_that_step():
    calls = []
    model = tiny_model()
    model.register_forward_hook(lambda *args: calls.append(1))

    def stop_at_third(step):
        if step["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(DIFFUSION, model, (1, 3, 8, 8), sampler="ddpm", steps=50, callback=stop_at_third)
    assert len(calls) == 3  # of 50 steps


def test_generate_tells_each_step_and_batch_and_the_images_are_the_same():
    plain = generate(tiny_model(3), DIFFUSION, 5, SamplerSettings("ddim", 3), seed=7, batch_size=2, progress=False)
    events = []
    told = generate(tiny_model(3), DIFFUSION, 5, SamplerSettings("ddim", 3), seed=7, batch_size=2, progress=False,
                    callback=events.append)
    assert torch.equal(told.images, plain.images)
    where = [(e["event"], e["first"], e["batch"]) for e in events]
    assert where == [("step", 0, 2)] * 3 + [("batch", 0, 2)] + [("step", 2, 2)] * 3 + [("batch", 2, 2)] + [
        ("step", 4, 1)] * 3 + [("batch", 4, 1)]
    batches = [e["images"] for e in events if e["event"] == "batch"]
    assert torch.equal(torch.cat(batches), told.images)
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1, 2] * 3


def test_generate_stops_when_the_callback_raises_and_restores_the_model():
    model = tiny_model().train()
    seen = []

    def stop_after_first_batch(event):
        seen.append(event["event"])
        if event["event"] == "batch":
            raise Stop

    with pytest.raises(Stop):
        generate(model, DIFFUSION, 6, SamplerSettings("ddim", 4), batch_size=2, progress=False,
                 callback=stop_after_first_batch)
    assert seen == ["step"] * 4 + ["batch"] and model.training
