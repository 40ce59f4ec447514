"""The benchmark script runs (tiny preset, one repeat); its numbers are not checked."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest


@pytest.mark.slow
def test_unet_speed_runs_on_the_tiny_preset(capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    from bench.unet_speed import main

    results = main(["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0"])
    assert set(results) == {"forward", "train step"}
    assert all(r["ratio"] > 0 for r in results.values())
    assert "702,499 parameters in both" in capsys.readouterr().out


def test_sd_unet_speed_runs_on_the_tiny_preset(capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    from bench.sd_unet_speed import main

    results = main(["--preset", "tiny", "--tokens", "5", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert results["ours"] > 0 and results["diffusers"] > 0 and results["ratio"] > 0
    assert results["max_abs_diff"] < 1e-4
    out = capsys.readouterr().out
    assert f"{results['params']:,} parameters in both; 8x8 latents, batch 1, 5 tokens, 1 threads" in out
    assert "| tiny |" in out


@pytest.mark.slow
def test_train_throughput_runs_on_the_tiny_preset(capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    from bench.train_throughput import main

    results = main(["--preset", "tiny", "--models", "ours,diffusers,diffusers-example", "--batch", "2",
                    "--repeats", "2", "--warmup", "0", "--channels-last"])
    assert set(results) == {"ours", "diffusers", "diffusers-example"}
    assert results["ours"]["params"] == results["diffusers"]["params"] == 702_499
    assert all(r["img_per_s"] > 0 and r["flops"] > 0 and r["memory_mb"] > 0 for r in results.values())
    assert results["diffusers"]["vs_diffusers"] == 1.0 and results["ours"]["vs_diffusers-example"] > 0
    out = capsys.readouterr().out
    assert "| ours | 702,499 |" in out and "throughput vs diffusers-example" in out


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], ["--cuda-graph", "--channels-last"]])
def test_sample_throughput_runs_and_ddim_agrees_with_diffusers(options):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    from bench.sample_throughput import main

    results = main(["--preset", "mnist", "--batch", "1", "--timed-steps", "2", "--repeats", "1", "--warmup", "0",
                    *options])
    assert results["ddpm"]["timed_steps"] == 2 and results["ddpm"]["steps"] == 1000
    assert results["ddim"]["ours_img_per_s"] > 0
    # Same x_T, same weights, same rule: what is left is float32 rounding of the two codes (ours
    # keeps its coefficients in float64), amplified at most by 1/sqrt(alpha-bar) <= 160 per step.
    agreement = results["ddim_max_abs_diff"]
    assert agreement["clipped"] < 1e-4
    assert agreement["unclipped"] < 5e-3


@pytest.mark.slow
def test_quality_runs_on_a_small_fake_mnist(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    import json

    import numpy as np

    from bench.quality import main

    rng = np.random.default_rng(0)
    data = tmp_path / "mnist.npz"
    np.savez(data, x_train=rng.integers(0, 256, (128, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 128),
             x_test=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 32))
    out = main(["--data", str(data), "--minutes", "0.03", "--slices", "2", "--bpd-images", "1", "--samples", "8",
                "--sample-steps", "2", "--classifier-epochs", "1", "--out", str(tmp_path / "q"),
                "--img", str(tmp_path / "img")])
    assert out["train"]["ours"]["steps"] > 0 and out["train"]["diffusers"]["steps"] > 0
    for name in ("ours", "diffusers"):
        assert out["score"][name]["bpd"] > 0 and np.isfinite(out["score"][name]["fd"])
        assert (tmp_path / "img" / f"quality_mnist_{name}.png").is_file()
    assert json.loads((tmp_path / "q" / "score.json").read_text())["ours"]["bpd_images"] == 1


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("DDPM_BENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist.npz"
    np.savez(data, x_train=rng.integers(0, 256, (128, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 128),
             x_test=rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 32))
    return data


@pytest.fixture
def mnist_run(tmp_path, fake_mnist):
    from ddpm.cli import main as ddpm_main

    run = tmp_path / "run"
    assert ddpm_main(["train", "--preset", "mnist", "--data", str(fake_mnist), "--out", str(run), "--quiet",
                      "--train.steps", "2", "--train.sample_every", "0", "--train.sample_count", "2",
                      "--train.sample_steps", "2"]) == 0
    return run


@pytest.mark.slow
def test_solvers_sweep_runs_and_resumes(tmp_path, fake_mnist, mnist_run):
    pytest.importorskip("matplotlib", reason="the sweep draws a plot")
    pytest.importorskip("diffusers", reason="the sweep drives diffusers' schedulers")
    from bench.solvers import main, settings
    from ddpm.generate import SamplerSettings

    argv = [str(mnist_run), "--data", str(fake_mnist), "--samples", "12", "--ddpm-samples", "2", "--nfe", "2",
            "--ddim-nfe", "3", "--methods", "ddim,dpm++2m-sde,unipc-bh1:order=2,diffusers-dpm++2m,diffusers-unipc,"
            "diffusers-ddim", "--etas", "default,0.5", "--final-steps", "denoise,sigma-min",
            "--lower-order-final", "on,off", "--batch", "5", "--out", str(tmp_path / "s"),
            "--plot", str(tmp_path / "s" / "p.png"), "--grid", str(tmp_path / "s" / "grid.png"), "--grid-nfe", "2",
            "--grid-count", "3"]
    variants = {f"{name}:{options}@2" for name in ("ddim", "dpm++2m-sde")
                for options in ("eta=0.5", "final_step=sigma-min", "eta=0.5:final_step=sigma-min")}
    expected = {"ddim@3", "dpm++2m-sde@2", *variants, "unipc-bh1:order=2@2", "unipc-bh1:order=2:final_step=sigma-min@2",
                "unipc-bh1:order=2:final_step=sigma-min:lower_order_final=false@2", "dpm++2m-sde:final_step=sigma-min:"
                "lower_order_final=false@2", "dpm++2m-sde:eta=0.5:final_step=sigma-min:lower_order_final=false@2",
                "diffusers-dpm++2m@2", "diffusers-unipc@2", "diffusers-ddim@2"}
    assert set(main([*argv, "--list"])) == expected  # lower_order_final=false only where it changes the chain
    results = main(argv)
    assert set(results) == expected
    assert all(r["nfe_used"] == r["nfe"] and r["samples"] == 12 for r in results.values())
    assert (tmp_path / "s" / "p.png").is_file() and (tmp_path / "s" / "grid.png").is_file()
    assert main(argv) == results  # a rerun finds every point done
    assert settings("unipc:trailing:order=2:final_step=sigma-min:lower_order_final=false", 7) == SamplerSettings(
        "unipc", 7, spacing="trailing", order=2, final_step="sigma-min", lower_order_final=False)


@pytest.mark.slow
def test_cpu_bf16_and_preset_speed_run_on_tiny(fake_mnist, mnist_run, capsys):
    from bench.cpu_bf16 import main as bf16_main
    from bench.preset_speed import main as speed_main

    bf16_main(["--presets", "tiny:2", "--repeats", "1", "--warmup", "0", "--run", str(mnist_run),
               "--data", str(fake_mnist), "--samples", "4", "--steps", "2"])
    speed_main(["--presets", "tiny:2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "training step" in out and "sampling forward" in out and "float32" in out and "training img/s" in out


def test_psnr_of_a_one_level_error_is_its_closed_form():
    import torch

    from bench.latent import psnr

    x = torch.linspace(-1, 1 - 2 / 255, 3 * 8 * 8).reshape(1, 3, 8, 8)
    # Every pixel one 8-bit level off: MSE on [0, 1] is 1/255², PSNR 20 log10(255) = 48.13 dB.
    assert psnr(x + 2 / 255, x).item() == pytest.approx(20 * math.log10(255), abs=1e-3)
    assert psnr(x, x).item() == pytest.approx(100.0)  # the floor of the MSE, 1e-10


@pytest.mark.slow
def test_latent_bench_trains_both_sides_in_one_budget_and_measures_them(tmp_path, fake_mnist):
    import json

    from bench.latent import main

    out = tmp_path / "l"
    budget = main(["train", "mnist", "--data", str(fake_mnist), "--out", str(out), "--budget", "0.4",
                   "--ae-minutes", "0.02"])
    assert budget["latent"]["summary"]["step"] > 0 and budget["pixel"]["summary"]["step"] > 0
    # The latent run got what the autoencoder's command left of the budget.
    left = 0.4 - budget["autoencoder"]["seconds"] / 60
    assert f"--train.time_limit {left:.3f}" in budget["latent"]["command"]
    results = main(["eval", "mnist", "--data", str(fake_mnist), "--out", str(out), "--samples", "12",
                    "--repeats", "1", "--recon-images", "16", "--speed-images", "4", "--threads", "2"])
    assert results["pixel_nfe"] == results["latent_nfe"] == 20
    assert all(math.isfinite(results[k]) for k in ("psnr_mean", "recon_fd", "pixel_fd", "latent_fd", "latent_img_s"))
    assert results["speedup"]["median"] > 0
    assert json.loads((out / "eval.json").read_text())["recon_images"] == 16
    for name in ("reconstructions_mnist", "samples_mnist_pixel", "samples_mnist_latent"):
        assert (out / f"{name}.png").is_file()


def write_fake_pairs(root: Path, n: int = 72) -> Path:
    """A tiny mnist_pairs tree: random 28x56 images, captions in the data set's phrasing; every pair the
    bench prompts for is in the test split."""
    import json

    import numpy as np
    from PIL import Image

    from bench.text2image import HELD_OUT, SEEN

    rng = np.random.default_rng(0)
    for split, pairs in (("train", [(i % 10, (i * 3) % 10) for i in range(n)]), ("test", [*SEEN, *HELD_OUT])):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i, (left, right) in enumerate(pairs):
            Image.fromarray(rng.integers(0, 256, (28, 56), dtype=np.uint8)).save(folder / f"{i:06d}.png")
            rows.append({"file_name": f"{i:06d}.png", "text": f"{left} and {right}", "left": left, "right": right})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_text2image_bench_trains_the_three_models_and_scores_them(tmp_path, fake_mnist):
    from bench.text2image import main

    pairs, out = write_fake_pairs(tmp_path / "pairs"), tmp_path / "t"
    runs = main(["train", "--pairs", str(pairs), "--out", str(out), "--budget", "0.25", "--ae-minutes", "0.02"])
    assert all(runs[m]["summary"]["step"] > 0 for m in ("pixel", "latent", "classes"))
    assert (out / "classes_data" / "metadata.jsonl").read_text().count('"text": "p') == 72
    report = main(["eval", "--pairs", str(pairs), "--mnist", str(fake_mnist), "--out", str(out), "--samples", "2",
                   "--guidance", "3", "--grid", str(tmp_path / "grid.png"), "--plot", str(tmp_path / "plot.png")])
    assert set(report["models"]) == {"pixel", "latent", "classes"}
    assert report["models"]["classes"]["3"]["held_out_accuracy"] is None  # no way to ask for a held-out pair
    pixel = report["models"]["pixel"]["3"]
    assert 0 <= pixel["seen_accuracy"] <= 1 and pixel["sides"]["both"] <= pixel["sides"]["either order"]
    assert set(report["text_probe"]) == {"pixel", "latent"}  # the classes model's tokens are not language
    assert all(0 <= v <= 1 for v in report["text_probe"]["pixel"].values())
    assert set(report["loss_probe"]) == {"pixel", "latent"}
    assert all(se >= 0 for _, se in report["loss_probe"]["latent"].values())
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "plot.png").is_file()


@pytest.mark.slow
def test_data_stream_runs_on_tiny_data(tmp_path, capsys):
    pytest.importorskip("webdataset", reason="the shard stream needs webdataset")
    import numpy as np

    from bench.data_stream import main

    mnist = tmp_path / "mnist.npz"
    rng = np.random.default_rng(0)
    np.savez(mnist, x_train=rng.integers(0, 256, (80, 28, 28), dtype=np.uint8), y_train=np.arange(80) % 10)
    results = main(["--sizes", "30", "--steps", "3", "--decode-batches", "2", "--decode-batch", "4",
                    "--cifar-batch", "1", "--cifar-repeats", "1", "--data", str(mnist), "--mnist-count", "80",
                    "--rounds", "1", "--workdir", str(tmp_path / "work")])
    assert set(results["rss"]) == {f"30/{s}" for s in ("in memory", "streamed folder", "streamed shards")}
    assert all(r["pss_mib"] > 0 and r["rss_mib"] > 0 for r in results["rss"].values())
    assert all(results["decode"][f"{s}/{w}"] > 0 for s in ("folder", "shards") for w in (0, 1, 2))
    assert results["decode"]["gpu_img_s"] > results["decode"]["cifar10_cpu_img_s"] > 0
    assert results["mnist"]["ratio"] > 0
    assert "| streamed shards |" in capsys.readouterr().out


@pytest.mark.slow
def test_inversion_bench_scores_every_sampler_and_step_count(tmp_path, fake_mnist, mnist_run):
    import json

    from bench.inversion import main

    out = main([str(mnist_run), "--data", str(fake_mnist), "--out", str(tmp_path / "inv"), "--images", "4",
                "--steps", "2,3", "--batch", "3", "--grid"])
    assert [(p["sampler"], p["steps"], p["encode_nfe"], p["decode_nfe"]) for p in out["points"]] == [
        ("ddim", 2, 1, 2), ("ddim", 3, 2, 3), ("dpm++2m", 2, 1, 2), ("dpm++2m", 3, 2, 3)]
    assert all(0 <= p["mse"] < 1 and math.isfinite(p["mse_stderr"]) for p in out["points"])
    assert json.loads((tmp_path / "inv" / "results.json").read_text())["images"] == 4
    assert (tmp_path / "inv" / "reconstructions_inversion.png").is_file()


@pytest.mark.slow
def test_inpainting_bench_compares_repaint_with_replacement_at_equal_nfe(tmp_path, fake_mnist, mnist_run):
    from bench.inpainting import main

    out = main([str(mnist_run), "--data", str(fake_mnist), "--out", str(tmp_path / "inp"), "--images", "4",
                "--methods", "repaint:4:2:2,replacement:dpm++2m:3", "--batch", "3"])
    for kind in ("half", "centre"):
        rows = out["masks"][kind]
        # RePaint on 4 steps, jumps of 2, 2 resamples: 4 + 1 * 1 * 2 NFE; replacement then runs at as many.
        assert {name: r["nfe"] for name, r in rows.items()} == {
            "masked": 0, "RePaint 4 steps, j=2, r=2": 6, "replacement, ddpm at 6 NFE": 6,
            "replacement, dpm++2m at 3 NFE": 3}
        assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["fd"]) for r in rows.values())
        assert (tmp_path / "inp" / f"inpainting_{kind}.png").is_file()


@pytest.mark.slow
def test_cascade_bench_measures_trained_runs(tmp_path, fake_mnist, mnist_run, jitter):
    import shutil

    from bench.cascade import main
    from ddpm.cli import main as ddpm_main
    from ddpm.models import UNet, get_preset

    out = tmp_path / "cascade"
    shutil.copytree(mnist_run, out / "pixel")
    assert ddpm_main(["train", "--preset", "mnist-14", "--data", str(fake_mnist), "--out", str(out / "base"),
                      "--quiet", "--train.steps", "2", "--train.sample_every", "0", "--train.sample_count", "2",
                      "--train.sample_steps", "2"]) == 0
    # The stage as train.py will save it; until it trains one, a jittered fresh stage stands in.
    jitter(UNet(get_preset("mnist-sr")), scale=0.05).save_pretrained(out / "sr")
    results = main(["eval", "--data", str(fake_mnist), "--out", str(out), "--samples", "6", "--nfe", "2",
                    "--sr-nfe", "2", "--levels", "0.1", "--speed-images", "2", "--repeats", "1", "--threads", "2"])
    assert (results["pixel_nfe"], results["base_nfe"], results["sr_nfe"]) == (2, 2, 2)
    assert all(math.isfinite(results[k]) for k in ("pixel_fd", "cascade_fd", "bilinear_fd", "stage_on_real_fd"))
    assert set(results["levels"]) == {"0.1"} and results["speedup"]["median"] > 0
    assert (out / "samples_mnist_cascade.png").is_file() and (out / "eval.json").is_file()


def test_text2image_score_counts_sides_against_hand_counts():
    """Halves whose grey level names a digit: six images with known readings, counted by hand."""
    from types import SimpleNamespace

    import torch

    from bench.text2image import score

    class Reader(torch.nn.Module):  # reads a half's mean grey level v in [-1, 1] as digit round(4.5 (v + 1))
        def forward(self, x):
            return torch.nn.functional.one_hot((4.5 * (x.mean(dim=(1, 2, 3)) + 1)).round().long(), 10).float()

        def features(self, x):
            return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)

    def level(d):
        return d / 4.5 - 1

    read = [(3, 7), (3, 7), (7, 3), (3, 3), (1, 7), (2, 2)]  # asked: 3 left, 7 right
    images = torch.stack([torch.cat([torch.full((1, 28, 28), level(a)), torch.full((1, 28, 28), level(b))], -1)
                          for a, b in read])
    fractions, feats = score(SimpleNamespace(classifier=Reader()), images, 3, 7)
    assert fractions == pytest.approx({"both": 2 / 6, "left": 3 / 6, "right": 3 / 6, "swapped": 1 / 6,
                                       "either order": 3 / 6})
    assert feats.shape == (12, 2)


def test_text2image_swaps_the_two_digit_words_of_every_phrasing():
    from bench.text2image import swap_digits

    assert swap_digits("a four on the left and a two on the right") == "a two on the left and a four on the right"
    assert swap_digits("handwritten 0 next to a 9") == "handwritten 9 next to a 0"
    assert swap_digits("a one to the right of a 7") == "a 7 to the right of a one"  # not "someone", "tone"
    assert swap_digits("the digits three four") == "the digits four three"
    with pytest.raises(ValueError, match="two digit words"):
        swap_digits("seven")
