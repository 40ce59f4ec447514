"""Training checkpoints: atomic directories, pruning, fallback past broken ones, optimizer state round trip."""

import pytest
import torch

from ddpm.checkpoints import (
    latest_training_checkpoint,
    list_training_checkpoints,
    load_training_checkpoint,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    rank_rng_state,
    rng_states_to_flat,
    save_training_checkpoint,
)
from ddpm.errors import UserError


def groups(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "empty": {}}


def test_round_trip_and_pruning(tmp_path):
    for step in (5, 10, 15, 20):
        save_training_checkpoint(tmp_path, step, groups(step), {"step": step, "note": "x"}, keep_last=2)
    assert [p.name for p in list_training_checkpoints(tmp_path)] == ["step_00000015", "step_00000020"]
    ckpt = load_training_checkpoint(tmp_path / "step_00000020")
    assert ckpt.meta["step"] == 20 and ckpt.meta["note"] == "x"
    assert torch.equal(ckpt.group("model")["w"], torch.full((3,), 20.0))
    assert ckpt.group("empty") == {}


def test_latest_skips_a_broken_checkpoint_and_leftovers_are_cleaned(tmp_path):
    for step in (1, 2):
        save_training_checkpoint(tmp_path, step, groups(step), {"step": step})
    weights = tmp_path / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # truncated
    messages = []
    path, ckpt = latest_training_checkpoint(tmp_path, warn=messages.append)
    assert path.name == "step_00000001" and ckpt.meta["step"] == 1
    assert len(messages) == 1 and "step_00000002" in messages[0]
    # A directory left by a writer killed mid-way is not a checkpoint, and the next save removes it.
    (tmp_path / ".step_00000003.abc.tmp").mkdir()
    assert [p.name for p in list_training_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    save_training_checkpoint(tmp_path, 3, groups(3), {"step": 3})
    assert not list(tmp_path.glob(".*.tmp"))


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_training_checkpoint(tmp_path, 7, groups(1), {"step": 7})
    save_training_checkpoint(tmp_path, 7, groups(2), {"step": 7})
    assert torch.equal(load_training_checkpoint(tmp_path / "step_00000007").group("model")["w"], torch.full((3,), 2.0))
    assert len(list(tmp_path.iterdir())) == 1


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint directory"):
        load_training_checkpoint(tmp_path / "nothing")
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "meta.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a ddpm training checkpoint"):
        load_training_checkpoint(tmp_path / "step_00000001")
    assert latest_training_checkpoint(tmp_path) is None


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_state_to_flat(opt.state_dict())
    save_training_checkpoint(tmp_path, 3, {"optimizer": tensors, "model": model.state_dict()}, {"step": 3,
                                                                                               "optimizer": meta})
    ckpt = load_training_checkpoint(tmp_path / "step_00000003")
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(ckpt.group("model"))
    opt2 = torch.optim.Adam(clone.parameters(), lr=0.5)
    opt2.load_state_dict(optimizer_state_from_flat(ckpt.group("optimizer"), ckpt.meta["optimizer"]))
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.99)
    batch = torch.randn(5, 4)
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        m(batch).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, clone.weight) and torch.equal(model.bias, clone.bias)


def test_rng_states_per_rank():
    states = [{"torch": torch.tensor([1, 2], dtype=torch.uint8)}, {"torch": torch.tensor([3], dtype=torch.uint8)}]
    flat = rng_states_to_flat(states)
    assert torch.equal(rank_rng_state(flat, 1)["torch"], states[1]["torch"])
    assert rank_rng_state(flat, 5) == {}
