"""Where a network runs: the bfloat16 rule of ``auto``, with the CPU's capability and the
measurement faked (the machine's own answer is whatever its oneDNN and timing say)."""

from __future__ import annotations

import pytest
import torch

from ddpm import runtime
from ddpm.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture
def auto(monkeypatch):
    """``auto(capable, speedup)``: the rule's answer on a CPU with that capability and measurement."""
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "auto")
    measured = []

    def answer(capable: bool, speedup: float) -> bool:
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: capable)
        monkeypatch.setattr(runtime, "measured_cpu_bf16_speedup", lambda: measured.append(speedup) or speedup)
        return runtime.resolve_bf16(None, CPU)

    answer.measured = measured
    return answer


def test_auto_turns_bf16_on_only_where_onednn_has_it_and_it_measures_faster(auto):
    assert auto(True, 1.79) is True  # an AMX Xeon (the measurement)
    assert auto(True, runtime.BF16_MIN_SPEEDUP) is True
    assert auto(True, 1.05) is False  # native bf16 but no faster: float32
    assert auto.measured == [1.79, runtime.BF16_MIN_SPEEDUP, 1.05]
    assert auto(False, 9.0) is False and len(auto.measured) == 3  # no native bf16: not even measured


def test_the_environment_decides_instead_and_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "on")
    assert runtime.resolve_bf16(None, CPU) is True
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "off")
    assert runtime.resolve_bf16(None, CPU) is False and runtime.resolve_bf16(True, CPU) is True
    assert runtime.resolve_bf16(None, torch.device("cuda")) is True
    assert runtime.resolve_bf16(True, torch.device("mps")) is False
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "maybe")
    with pytest.raises(UserError, match="DDPM_CPU_BF16 must be auto, on or off"):
        runtime.resolve_bf16(None, CPU)


def test_the_measurement_is_taken_once_per_machine_and_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: calls.append(1) or 1.5)
    runtime.measured_cpu_bf16_speedup.cache_clear()
    assert runtime.measured_cpu_bf16_speedup() == 1.5 and len(calls) == 1
    runtime.measured_cpu_bf16_speedup.cache_clear()  # a new process: read back, not measured again
    assert runtime.measured_cpu_bf16_speedup() == 1.5 and len(calls) == 1
    (tmp_path / "cpu_bf16.json").write_text('{"key": "another machine", "speedup": 9.0}')
    runtime.measured_cpu_bf16_speedup.cache_clear()
    assert runtime.measured_cpu_bf16_speedup() == 1.5 and len(calls) == 2
    runtime.measured_cpu_bf16_speedup.cache_clear()


def test_the_measurement_is_a_positive_ratio():
    assert runtime.cpu_bf16_speedup(rounds=1) > 0
