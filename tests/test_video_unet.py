"""The space-time U-Net: per frame it is the image U-Net, frames marked as images stay independent, and it
saves, loads and refuses what it cannot do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddpm.errors import UserError
from ddpm.models import NETWORKS, UNet, VideoUNet, build_network, get_preset, get_video_preset
from ddpm.models.video_unet import VideoUNetConfig, relative_position_bucket

TINY = get_video_preset("tiny-video")


def _image_unet(jitter, **changes):
    image = UNet(dataclasses.replace(get_preset("tiny"), in_channels=1, ch=16, norm_groups=8, **changes))
    return jitter(image, seed=1)


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("classes", [0, 4])
def test_each_frame_is_the_image_unet_with_the_same_weights(jitter, frames, classes):
    # The image U-Net's weights mapped onto the video U-Net (its temporal attention the identity): every
    # frame of every clip must come out as the image U-Net computes it on that frame alone, with that
    # clip's t and label. A mix-up of frames and channels, or of clips' time embeddings, fails this.
    image = _image_unet(jitter, num_classes=classes)
    video = VideoUNet.from_image_unet(image, frames=frames)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, frames, 8, 8, generator=g)
    t = torch.tensor([3, 500, 999])
    y = torch.tensor([0, 3, -1]) if classes else None
    with torch.no_grad():
        out = video(x, t, y)
        expected = torch.stack([image(x[:, :, f], t, y) for f in range(frames)], dim=2)
    assert out.shape == (3, 1, frames, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_trained_temporal_layers_do_change_a_clip(jitter):
    # The converse, so the test above could fail: with temporal layers of nonzero weights, frames mix.
    video = jitter(VideoUNet(TINY), seed=2)
    x = torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():
        base = video(x, torch.tensor([10, 20]))
        x2 = x.clone()
        x2[:, :, 1] += 1.0
        changed = video(x2, torch.tensor([10, 20]))
    assert (changed[:, :, 0] - base[:, :, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("mask", ["all images", "images after the video"])
def test_masked_temporal_attention_leaves_image_frames_independent(jitter, mask):
    video = jitter(VideoUNet(TINY), seed=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    images = torch.ones(2, 4, dtype=torch.bool)
    if mask == "images after the video":
        images[:, :2] = False  # frames 0, 1 are a video; 2, 3 independent images
    with torch.no_grad():
        base = video(x, t, images_mask=images)
        for frame in (2, 3):
            x2 = x.clone()
            x2[0, :, frame] += torch.randn(1, 8, 8, generator=g)
            out = video(x2, t, images_mask=images)
            others = [f for f in range(4) if f != frame]
            assert torch.equal(out[1], base[1])  # another clip
            torch.testing.assert_close(out[0, :, others], base[0, :, others], rtol=0, atol=1e-6)
            assert (out[0, :, frame] - base[0, :, frame]).abs().max() > 1e-3
        if mask == "images after the video":
            # A change to a video frame moves the other video frame, and no image frame.
            x2 = x.clone()
            x2[0, :, 0] += 1.0
            out = video(x2, t, images_mask=images)
            assert (out[0, :, 1] - base[0, :, 1]).abs().max() > 1e-3
            torch.testing.assert_close(out[0, :, 2:], base[0, :, 2:], rtol=0, atol=1e-6)


def test_an_image_frame_is_denoised_alike_in_any_clip(jitter):
    # With the mask, an image frame's output depends on nothing but itself: the same frame put among
    # different neighbours (and at another place in the clip) gives the same output.
    video = jitter(VideoUNet(TINY), seed=4)
    x = torch.randn(2, 1, 4, 8, 8)
    x[1, :, 3] = x[0, :, 1]
    with torch.no_grad():
        out = video(x, torch.tensor([50, 50]), images_mask=torch.tensor([True, True]))
    torch.testing.assert_close(out[1, :, 3], out[0, :, 1], rtol=1e-5, atol=1e-6)


def test_relative_position_buckets_follow_t5():
    # T5 (and lucidrains' video-diffusion-pytorch), 32 buckets, max distance 32: keys before the query in
    # 0..15, after it in 16..31; distances below 8 exact, then log-spaced, the last bucket from 32 on.
    rel = torch.tensor([0, -1, -7, -8, -31, -32, -100, 1, 7, 8, 100])
    assert relative_position_bucket(rel, 32, 32).tolist() == [0, 1, 7, 8, 15, 15, 15, 17, 23, 24, 31]


def test_frame_count_is_free(jitter):
    video = jitter(VideoUNet(TINY), seed=5)
    for frames in (1, 4, 9):
        assert video(torch.randn(1, 1, frames, 8, 8), 5).shape == (1, 1, frames, 8, 8)
    with pytest.raises(ValueError, match="T, H, W"):
        video(torch.randn(1, 1, 8, 8), 5)


def test_registered_saved_and_loaded(tmp_path, jitter):
    assert NETWORKS["video_unet"] == (VideoUNetConfig, VideoUNet)
    video = jitter(build_network(TINY), seed=6)
    assert isinstance(video, VideoUNet) and video.sample_shape == (1, 4, 8, 8) and video.num_classes == 0
    video.save_pretrained(tmp_path / "m")
    again = VideoUNet.from_pretrained(tmp_path / "m")
    assert again.config == TINY
    x = torch.randn(1, 1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x, 3), video(x, 3))
    with pytest.raises(UserError, match="no diffusers layout"):
        video.save_diffusers(tmp_path / "d")
    with pytest.raises(UserError, match="frames must be a positive"):
        dataclasses.replace(TINY, frames=0)


def test_joint_mask_shapes(jitter):
    video = VideoUNet(TINY)
    with pytest.raises(ValueError, match="images_mask"):
        video(torch.randn(2, 1, 4, 8, 8), 1, images_mask=torch.zeros(3, dtype=torch.bool))
