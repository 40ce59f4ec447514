"""Weight I/O faults and round trips: atomic writes, safetensors only, pickles never run."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat

import pytest
import torch

from ddpm.checkpoints import (
    atomic_write,
    atomic_write_bytes,
    load_json,
    load_metadata,
    load_state_dict,
    save_json,
    save_state_dict,
)
from ddpm.errors import UserError
from ddpm.models import UNet, get_preset


class _CreatesFile:
    """Unpickling this object creates ``path``: a stand-in for a malicious checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_pickle(marker) -> bytes:
    return pickle.dumps({"weight": _CreatesFile(marker)}, protocol=2)


def test_the_malicious_pickle_is_live(tmp_path):
    # The refusals below mean something only if plain unpickling would have run the payload.
    marker = tmp_path / "ran"
    pickle.loads(malicious_pickle(marker))["weight"].close()
    assert marker.exists()


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["x.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # Not mkstemp's 0600.


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]


# --- state dicts --------------------------------------------------------------------------------


def test_state_dict_round_trip_is_exact_with_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 6)
    state = {
        "w": base,
        "w_t": base.t(),  # Non-contiguous view of the same storage.
        "row": base[1],  # Shares storage with "w".
        "half": torch.randn(3, dtype=torch.float16),
        "steps": torch.arange(5),
    }
    path = tmp_path / "w.safetensors"
    save_state_dict(path, state, metadata={"step": "12"})
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert load_metadata(path) == {"step": "12"}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing"),
        pytest.param(b"", id="empty"),
        pytest.param(b"not a checkpoint at all", id="garbage"),
        pytest.param("truncated", id="truncated"),
    ],
)
def test_bad_weight_files_raise_user_errors_naming_the_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    if content == "truncated":
        save_state_dict(path, {"w": torch.randn(100, 100)})
        path.write_bytes(path.read_bytes()[:-1000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="model.safetensors"):
        load_state_dict(path)


def test_a_pickle_named_safetensors_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.safetensors"
    path.write_bytes(malicious_pickle(marker))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_state_dict(path)
    assert not marker.exists()


# --- JSON ---------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "é"}}
    save_json(tmp_path / "c.json", obj)
    assert load_json(tmp_path / "c.json") == obj


@pytest.mark.parametrize("text", ["{", "{'single': 1}", "\udcff"])
def test_bad_json_raises_user_error_naming_the_file(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        load_json(path)


def test_missing_json_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.json: no such file"):
        load_json(tmp_path / "nope.json")


# --- U-Net save_pretrained / from_pretrained ----------------------------------------------------


@pytest.fixture
def saved_unet(tmp_path, jitter):
    config = dataclasses.replace(get_preset("tiny"), num_classes=4, learned_sigma=True)
    torch.manual_seed(0)
    model = jitter(UNet(config)).eval()
    model.save_pretrained(tmp_path / "unet")
    return model, tmp_path / "unet"


def test_save_pretrained_round_trip_is_bit_exact(saved_unet):
    model, directory = saved_unet
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    assert json.loads((directory / "config.json").read_text())["format"] == "ddpm-unet"
    loaded = UNet.from_pretrained(directory).eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 900]), torch.tensor([1, -1])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


def test_wrong_architecture_lists_the_mismatched_keys(saved_unet):
    _, directory = saved_unet
    values = json.loads((directory / "config.json").read_text())
    values["ch"] = 64
    (directory / "config.json").write_text(json.dumps(values))
    message = (r"model.safetensors: weights do not fit.*\d+ shape mismatch "
               r"\(temb.dense0.weight \[128, 32\] != \[256, 64\]")
    with pytest.raises(UserError, match=message):
        UNet.from_pretrained(directory)


def test_missing_and_unexpected_keys_are_counted(saved_unet, tmp_path):
    model, _ = saved_unet
    state = model.state_dict()
    state["extra.weight"] = state.pop("conv_in.weight")
    with pytest.raises(UserError, match=r"1 missing \(conv_in.weight\); 1 unexpected \(extra"):
        model.load_weights(state, source="x")


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "model.safetensors: not a readable safetensors"),
        ("pickle", "model.safetensors: not a readable safetensors"),
        ("no weights", "model.safetensors: no such file"),
        ("unknown key", "unknown U-Net config key"),
        ("diffusers config", "UNet.from_diffusers"),
        ("no dir", "not a directory"),
        ("newer format", "format_version 2"),
    ],
)
def test_damaged_saves_raise_user_errors(saved_unet, damage, message):
    _, directory = saved_unet
    weights, config = directory / "model.safetensors", directory / "config.json"
    values = json.loads(config.read_text())
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "pickle":
        weights.write_bytes(malicious_pickle(directory / "ran"))
    elif damage == "no weights":
        weights.unlink()
    elif damage == "unknown key":
        config.write_text(json.dumps({**values, "channels": 3}))
    elif damage == "diffusers config":
        config.write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif damage == "no dir":
        directory = directory / "missing"
    elif damage == "newer format":
        config.write_text(json.dumps({**values, "format_version": 2}))
    with pytest.raises(UserError, match=message):
        UNet.from_pretrained(directory)
    assert not (directory / "ran").exists()
