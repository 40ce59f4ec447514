"""The benchmark script runs (tiny preset, one repeat); its numbers are not checked."""

from __future__ import annotations

import os

import pytest


def test_unet_speed_runs_on_the_tiny_preset(capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    pytest.importorskip("diffusers", reason="the benchmark compares against diffusers")
    from bench.unet_speed import main

    results = main(["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "0"])
    assert set(results) == {"forward", "train step"}
    assert all(r["ratio"] > 0 for r in results.values())
    assert "702,499 parameters in both" in capsys.readouterr().out
