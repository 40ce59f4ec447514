"""kill -9 at random moments during training: count the checkpoints that survive (all of them).

Trains the tiny preset on made-up data with a checkpoint after every step and kills the process
with SIGKILL at random moments, ``--kills`` times, resuming after each kill. A kill often lands in
the middle of writing a checkpoint; the previous one must stay loadable, and none may be lost.
The run resumed after every kill must end with exactly the losses of a run never killed.

    python -m bench.kill_loop --kills 100 --append
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench import common
from ddpm.checkpoints import latest_training_checkpoint, list_training_checkpoints


def train_command(data: Path, out: Path, steps: int, resume: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """``ddpm train`` of the tiny preset on ``data`` into ``out``, a checkpoint every step (or ``--resume``)."""
    cmd = [sys.executable, "-m", "ddpm", "train", "--out", str(out), "--quiet"]
    if resume:
        return [*cmd, "--resume", "--train.steps", str(steps), *extra]
    return [*cmd, "--preset", "tiny", "--data", str(data), "--train.steps", str(steps), "--train.ckpt_every", "1",
            "--train.sample_every", "0", "--train.keep_last", "2", "--train.log_every", "1", *extra]


def train_env() -> dict[str, str]:
    """The environment for :func:`train_command`: this one, with one thread and unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_checkpoint(run: Path, after: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list_training_checkpoints(run / "checkpoints")
        if found and int(found[-1].name.split("_")[1]) > after:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError("no new checkpoint in time")


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``run``'s metrics log has ``n`` steps; fail if ``proc`` exits first or time runs out."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


def kill_loop(data: Path, run: Path, kills: int, steps: int, seed: int = 0) -> dict[str, int]:
    """Train ``steps`` steps, killing the process with SIGKILL ``kills`` times at random moments.

    After each kill the newest checkpoint must load and be no older than the one before (none
    lost); the run is resumed until it finishes. Returns counts for the report.
    """
    rng = random.Random(seed)
    survived = lost = mid_write = 0
    last_step = 0
    resume = False
    for _ in range(kills):
        proc = subprocess.Popen(train_command(data, run, steps, resume), env=train_env(), stderr=subprocess.PIPE,
                                text=True)
        resume = True
        # Once a checkpoint newer than the last one appears the process is in its training loop;
        # from there a kill lands anywhere in a step or in the writing of its checkpoint.
        _wait_for_checkpoint(run, last_step, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        mid_write += bool(list((run / "checkpoints").glob(".step_*.tmp")))
        found = latest_training_checkpoint(run / "checkpoints")
        if found is None or found[1].meta["step"] <= last_step:
            lost += 1
        else:
            survived += 1
            last_step = found[1].meta["step"]
        if last_step >= steps:
            break
    done = subprocess.run(train_command(data, run, steps, True), env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return {"kills": survived + lost, "survived": survived, "lost": lost, "mid_write": mid_write}


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="python -m bench.kill_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="how many times to kill -9 (default 20)")
    parser.add_argument("--steps", type=int, default=0, help="training steps (default: 10 per kill)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--append", action="store_true", help="append a dated entry to bench/RESULTS.md")
    args = parser.parse_args(argv)
    steps = args.steps or 10 * args.kills
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.npz"
        np.savez(data, x_train=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
        start = time.perf_counter()
        counts = kill_loop(data, work / "killed", args.kills, steps, args.seed)
        subprocess.run(train_command(data, work / "whole", steps, False), env=train_env(), check=True,
                       capture_output=True, timeout=3600)
        losses = [[json.loads(line)["loss"] for line in (work / name / "metrics.jsonl").read_text().splitlines()]
                  for name in ("killed", "whole")]
        counts["same_losses_as_unkilled_run"] = int(losses[0] == losses[1])
        counts["seconds"] = round(time.perf_counter() - start)
    print(json.dumps(counts))
    if args.append:
        table = common.markdown_table(
            ["kills", "survived", "checkpoints lost", "kills mid-write", "losses equal to an unkilled run"],
            [[counts["kills"], counts["survived"], counts["lost"], counts["mid_write"],
              "yes" if counts["same_losses_as_unkilled_run"] else "NO"]])
        common.append_entry("kill -9 loop", "bench.kill_loop", argv,
                            [f"{steps} training steps of the tiny preset, a checkpoint after each; "
                             f"{counts['seconds']} s in all"], table)
    return counts


if __name__ == "__main__":
    main()
