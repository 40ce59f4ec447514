"""bench.cuda_graph: static buffers refreshed on every call, recaptures when the call changes.

On the CPU the wrapper runs its buffer logic eagerly, so these tests check what a graph replay
relies on (inputs copied in, output copied out, shapes and constants keyed) against the plain
network as the oracle; the last test replays a real graph and runs only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from bench.cuda_graph import GraphedModel
from ddpm import GaussianDiffusion
from ddpm.models import UNet, UNetConfig, get_preset
from ddpm.schedules import linear_betas


def _net(num_classes: int = 0, device: str = "cpu") -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig.from_dict({**get_preset("tiny").to_dict(), "num_classes": num_classes}))
    with torch.no_grad():  # off DDPM's zero initialisation, so that outputs differ between inputs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.to(device).eval()


def test_every_call_sees_its_own_inputs_and_keeps_its_output():
    net = _net()
    graphed = GraphedModel(net)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]
    ts = [torch.tensor([5, 900]), torch.tensor([0, 17]), torch.tensor([999, 3])]
    with torch.no_grad():
        outs = [graphed(x, t) for x, t in zip(xs, ts)]
        for x, t, out in zip(xs, ts, outs):
            # Earlier outputs must not be overwritten by later calls (they are copies).
            torch.testing.assert_close(out, net(x, t), rtol=0, atol=0)
    assert graphed.captures == 1


def test_a_new_shape_or_constant_captures_again():
    net = _net(num_classes=3)
    graphed = GraphedModel(net)
    with torch.no_grad():
        graphed(torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]))
        graphed(torch.ones(2, 3, 8, 8), torch.tensor([3, 4]))
        assert graphed.captures == 1
        graphed(torch.zeros(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
        assert graphed.captures == 2
        y = torch.tensor([0, 2, 1, -1])
        out = graphed(torch.zeros(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), y=y)
        assert graphed.captures == 3
        torch.testing.assert_close(out, net(torch.zeros(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), y=y), rtol=0, atol=0)
        # A tensor argument's new values go through the buffer, without a new capture.
        other = torch.tensor([2, 2, 0, 0])
        out = graphed(torch.zeros(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), y=other)
        assert graphed.captures == 3
        torch.testing.assert_close(out, net(torch.zeros(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), y=other),
                                   rtol=0, atol=0)


def test_turning_autocast_on_captures_again():
    net = _net()
    graphed = GraphedModel(net)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 400])
    with torch.no_grad():
        graphed(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = graphed(x, t)
            expected = net(x, t)
        assert graphed.captures == 2
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        graphed(x, t)
        assert graphed.captures == 3


@pytest.mark.slow
@pytest.mark.parametrize("sampler,steps", [("ddpm", 12), ("ddim", 5)])
def test_sampling_through_the_wrapper_draws_the_same_images(sampler, steps):
    net = _net()
    diffusion = GaussianDiffusion(linear_betas(1000))
    runs = []
    for model in (net, GraphedModel(net)):
        g = torch.Generator().manual_seed(3)
        runs.append(diffusion.sample(model, (2, 3, 8, 8), sampler=sampler, steps=steps, generator=g))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replaying a CUDA graph needs a CUDA device")
def test_a_real_graph_replays_the_network():
    net = _net(device="cuda")
    graphed = GraphedModel(net)
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(4, 3, 8, 8, generator=g, device="cuda")
            t = torch.randint(0, 1000, (4,), generator=g, device="cuda")
            torch.testing.assert_close(graphed(x, t), net(x, t), rtol=1e-4, atol=1e-5)
    assert graphed.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replaying a CUDA graph needs a CUDA device")
def test_a_graph_captured_under_autocast_stays_right_after_the_context_exits():
    # Each sampling run opens its own autocast context; a capture that relied on autocast's cache
    # of cast weights would replay reads of freed copies in the second one.
    net = _net(device="cuda")
    graphed = GraphedModel(net)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda")
    t = torch.tensor([1, 2, 3, 4], device="cuda")
    for _ in range(3):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = graphed(x, t)
            expected = net(x, t)
        torch.cuda.empty_cache()
        torch.zeros(1 << 20, device="cuda")  # reuse freed memory, as other work would
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert graphed.captures == 1
