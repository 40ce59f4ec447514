"""The benchmarks' statistics: the paired ratio's interval covers the true median as often as it says."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.common import paired_ratio


def test_interval_indices_for_ten_rounds_match_the_binomial_table():
    # n = 10: P(Bin <= 1) = 11/1024 <= 0.025 < P(Bin <= 2) = 56/1024, so the 2nd smallest and the 2nd
    # largest ratio bound the median with coverage 1 - 22/1024.
    ratio = paired_ratio([float(i) for i in range(1, 11)], [1.0] * 10)
    assert (ratio.low, ratio.median, ratio.high) == (2.0, 5.5, 9.0)
    assert ratio.coverage == pytest.approx(1 - 22 / 1024, abs=1e-15)
    assert ratio.rounds == 10


def test_too_few_rounds_give_the_full_range_and_say_the_lower_coverage():
    ratio = paired_ratio([3.0, 1.0, 5.0, 2.0, 4.0], [1.0] * 5)
    assert (ratio.low, ratio.high) == (1.0, 5.0)
    assert ratio.coverage == pytest.approx(1 - 2 / 32, abs=1e-15)


def test_ratios_are_taken_round_by_round_not_from_the_medians():
    # A slow spell in round 2 hits both sides; per-round ratios are all 0.5 and so is their median,
    # while the ratio of medians would not be.
    ratio = paired_ratio([1.0, 10.0, 1.0], [2.0, 20.0, 2.0])
    assert ratio.median == ratio.low == ratio.high == 0.5
    assert not ratio.excludes(0.5) and ratio.excludes(1.0)


@pytest.mark.parametrize("rounds", [6, 9, 12, 20])
def test_coverage_by_simulation(rounds):
    # Log-normal timings whose per-round ratio has median exactly 1.1 (the log-ratio is a symmetric
    # normal around log 1.1). The interval must contain 1.1 in the stated fraction of trials: the
    # coverage is exact for continuous data, so the hit count is Binomial(trials, coverage), and
    # 4 standard deviations bound a false failure at about 6e-5.
    rng = np.random.default_rng(rounds)
    trials = 4000
    hits = 0
    coverage = None
    for _ in range(trials):
        base = rng.lognormal(0.0, 0.3, rounds)  # a shared slow/fast spell per round
        theirs = base * rng.lognormal(0.0, 0.05, rounds)
        ours = 1.1 * base * rng.lognormal(0.0, 0.05, rounds)
        ratio = paired_ratio(ours.tolist(), theirs.tolist())
        coverage = ratio.coverage
        hits += not ratio.excludes(1.1)
    assert coverage >= 0.95 or rounds < 6
    sd = math.sqrt(trials * coverage * (1 - coverage))
    assert abs(hits - trials * coverage) <= 4 * sd


def test_mismatched_runs_are_refused():
    with pytest.raises(ValueError, match="equally many"):
        paired_ratio([1.0, 2.0], [1.0])


def test_the_mnist_path_comes_from_the_option_or_the_environment(tmp_path, monkeypatch):
    from bench.common import MNIST_ENV, mnist_path

    monkeypatch.delenv(MNIST_ENV, raising=False)
    with pytest.raises(SystemExit, match="--data"):
        mnist_path(None)
    with pytest.raises(SystemExit, match="no such file"):
        mnist_path(str(tmp_path / "missing.npz"))
    data = tmp_path / "m.npz"
    data.write_bytes(b"")
    monkeypatch.setenv(MNIST_ENV, str(data))
    assert mnist_path(None) == data and mnist_path(str(data)) == data
