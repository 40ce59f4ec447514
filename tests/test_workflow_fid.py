"""FID / KID / IS through torch-fidelity, tested with a stand-in module (the real one downloads weights)."""

from __future__ import annotations

import sys
import types
import urllib.error

import pytest
import torch

from ddpm.errors import UserError
from ddpm.evaluate import evaluate_fid


@pytest.fixture
def fidelity(monkeypatch):
    """A fake ``torch_fidelity`` that records its call and answers like the real one."""
    calls = []

    def calculate_metrics(**kwargs):
        calls.append(kwargs)
        return {"frechet_inception_distance": 12.5, "kernel_inception_distance_mean": 0.01,
                "kernel_inception_distance_std": 0.002, "inception_score_mean": 2.0,
                "inception_score_std": 0.1, "something_else": 1.0}

    module = types.SimpleNamespace(calculate_metrics=calculate_metrics, calls=calls)
    monkeypatch.setitem(sys.modules, "torch_fidelity", module)
    return module


def images(n: int, channels: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8)


def test_metrics_are_named_and_inputs_are_three_channel_uint8(fidelity):
    out = evaluate_fid(images(5, 1), images(7, 1), progress=False)
    assert out == {"fid": 12.5, "kid": 0.01, "kid_std": 0.002, "is": 2.0, "is_std": 0.1}
    call = fidelity.calls[-1]
    first = call["input1"][0]
    assert first.dtype == torch.uint8 and first.shape == (3, 8, 8) and len(call["input2"]) == 7
    assert call["kid_subset_size"] == 5 and call["fid"] and not call["cuda"]


def test_local_inception_weights_are_checked_then_copied(fidelity, tmp_path):
    weights = tmp_path / "pt_inception.pth"
    torch.save({"conv.weight": torch.ones(2, 2)}, weights)
    evaluate_fid(images(2, 3), images(2, 3), inception_weights=str(weights), progress=False)
    passed = fidelity.calls[-1]["feature_extractor_weights_path"]
    assert passed != str(weights)  # torch-fidelity unpickles what it gets: it gets our own copy
    with pytest.raises(UserError, match="no such file"):
        evaluate_fid(images(2, 3), images(2, 3), inception_weights=str(tmp_path / "missing.pth"), progress=False)


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_inception_weights_are_refused(fidelity, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": _Boom()}, evil)
    with pytest.raises(UserError, match="loads safely"):
        evaluate_fid(images(2, 3), images(2, 3), inception_weights=str(evil), progress=False)
    assert "must never run" not in capsys.readouterr().out
    assert not fidelity.calls


def test_an_offline_download_is_one_clear_error(fidelity, monkeypatch):
    def offline(**kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(fidelity, "calculate_metrics", offline)
    with pytest.raises(UserError, match="--inception"):
        evaluate_fid(images(2, 3), images(2, 3), progress=False)


def test_missing_torch_fidelity(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(UserError, match="pip install 'ddpm\\[metrics\\]'"):
        evaluate_fid(images(2, 3), images(2, 3), progress=False)
