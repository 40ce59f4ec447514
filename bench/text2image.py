"""Text-to-image on captioned two-digit MNIST at an equal CPU budget: does the model read the words?

``../shared/data/mnist_pairs.tar.gz`` holds 28x56 images of two MNIST digits with captions that name
them and their order in several phrasings; ten ordered pairs never occur in the train split. Three
models train for the same CPU minutes, one thread each, with the commands a user types:

- ``pixel``: ``ddpm train --preset mnist-pairs`` (GLIDE's recipe: a text transformer trained with
  the conditional U-Net, 10% empty captions);
- ``latent``: ``ddpm train-autoencoder --preset mnist-pairs-f4`` for ``--ae-minutes``, then
  ``ddpm train --preset mnist-pairs-latent --autoencoder`` for the rest of the budget;
- ``classes``: the baseline, a class-conditional model with the 90 seen pairs as its classes: the
  same network and recipe on captions replaced by one atomic token per pair (``p42``), which it
  can only memorise; it has no way to ask for a held-out pair.

Then for 20 prompts (10 seen pairs, 10 held-out pairs; each prompt a test-split caption of its
pair, the phrasings in turn) it draws ``--samples`` images per prompt at each guidance scale with
the default sampler, and scores them with a small MNIST classifier (:mod:`bench.mnist_fd`): the
fraction whose left and right halves it reads as the prompt's digits, and the Fréchet distance of
the halves to the MNIST test digits in its features. ``train`` and ``eval`` are separate stages::

    python -m bench.text2image train --pairs DIR --out OUT --budget 30 --ae-minutes 8
    python -m bench.text2image eval --pairs DIR --mnist mnist.npz --out OUT --append \\
        --plot docs/img/t2i_guidance.png --grid docs/img/t2i_grid.png

``DIR`` is the unpacked ``mnist_pairs`` folder (``train/`` and ``test/`` with ``metadata.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.mnist_fd import FeatureSpace, features, frechet_distance
from ddpm.generate import generate
from ddpm.images import labelled_rows, save_image
from ddpm.loading import LoadedModel, load_model
from ddpm.text import masked_mean

#: The pairs that never occur in the train split (the data set's README).
HELD_OUT = ((0, 7), (1, 4), (2, 9), (3, 3), (4, 8), (5, 1), (6, 2), (7, 5), (8, 6), (9, 0))
#: Ten of the 90 seen pairs, every digit on each side once.
SEEN = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 8))
UNLIMITED = "10000000"
MODELS = ("pixel", "latent", "classes")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.text2image", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("train", "eval"))
    p.add_argument("--pairs", required=True, help="the unpacked mnist_pairs folder (train/ and test/)")
    p.add_argument("--out", required=True, help="where the runs, budget.json and eval.json go")
    p.add_argument("--mnist", default=None, help="eval: MNIST .npz for the classifier ($DDPM_MNIST)")
    p.add_argument("--budget", type=float, default=30.0, help="train: CPU minutes of each model (default 30)")
    p.add_argument("--ae-minutes", type=float, default=8.0, help="train: the autoencoder's share of the latent run")
    p.add_argument("--threads", type=int, default=1, help="train: CPU threads per run (pixel and latent side by side)")
    p.add_argument("--models", default=",".join(MODELS), help=f"which of {', '.join(MODELS)} (default all)")
    p.add_argument("--text-args", default="", help="train: more `ddpm train` options for the pixel and latent "
                   "text models, e.g. \"--text.causal true\"")
    p.add_argument("--samples", type=int, default=100, help="eval: samples per prompt (default 100)")
    p.add_argument("--guidance", default="1,2,4,8", help="eval: guidance scales to sweep")
    p.add_argument("--batch-size", type=int, default=200, help="eval: images per sampling call")
    p.add_argument("--plot", default=None, help="eval: write the accuracy/FD trade-off plot here")
    p.add_argument("--grid", default=None, help="eval: write a labelled grid of samples here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append", action="store_true", help="eval: append an entry to bench/RESULTS.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data


def captions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def pair_token(left: int, right: int) -> str:
    return f"p{left}{right}"


def classes_folder(pairs: Path, out: Path) -> Path:
    """The train split again, each caption replaced by its pair's one token (images hard-linked)."""
    folder = out / "classes_data"
    if (folder / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in captions(pairs / "train"):
        target = folder / row["file_name"]
        if not target.exists():
            try:
                os.link(pairs / "train" / row["file_name"], target)
            except OSError:
                shutil.copyfile(pairs / "train" / row["file_name"], target)
        rows.append({"file_name": row["file_name"], "text": pair_token(row["left"], row["right"])})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def prompts(pairs: Path) -> list[tuple[str, int, int, bool]]:
    """(prompt, left, right, held out) for the 20 pairs: test captions of each pair, phrasings in turn."""
    by_pair: dict[tuple[int, int], list[str]] = {}
    for row in captions(pairs / "test"):
        by_pair.setdefault((row["left"], row["right"]), []).append(row["text"])
    out = []
    for i, pair in enumerate((*SEEN, *HELD_OUT)):
        texts = sorted(set(by_pair[pair]))
        out.append((texts[i % len(texts)], *pair, pair in HELD_OUT))
    return out


# ---------------------------------------------------------------------------- train


def _command(args: argparse.Namespace, *words: str) -> list[str]:
    return [sys.executable, "-m", "ddpm", *words, "--quiet", "--train.threads", str(args.threads), "--train.steps",
            UNLIMITED, "--train.sample_every", "0", "--train.ckpt_every", "1000", "--overwrite"]


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    common.say("$ " + " ".join(cmd[1:]) + f"  > {log}")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _wait(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"a run failed: see {log}")


def train_stage(args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    train, wanted, budget = args.pairs / "train", args.models.split(","), f"{args.budget:g}"
    runs: dict[str, dict] = {}
    started: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}
    if "pixel" in wanted:
        cmd = _command(args, "train", "--preset", "mnist-pairs", "--data", str(train), "--out", str(out / "pixel"),
                       "--train.time_limit", budget, *shlex.split(args.text_args))
        started["pixel"] = (_run(cmd, out / "pixel.log", env), time.perf_counter(), cmd)
    if "latent" in wanted:
        start = time.perf_counter()
        ae = _command(args, "train-autoencoder", "--preset", "mnist-pairs-f4", "--data", str(train),
                      "--out", str(out / "autoencoder"), "--train.time_limit", f"{args.ae_minutes:g}")
        _wait(_run(ae, out / "autoencoder.log", env), out / "autoencoder.log")
        left = args.budget - (time.perf_counter() - start) / 60
        if left <= 0:
            raise SystemExit(f"the autoencoder took all of the {args.budget:g} min budget: lower --ae-minutes")
        cmd = _command(args, "train", "--preset", "mnist-pairs-latent", "--data", str(train), "--autoencoder",
                       str(out / "autoencoder"), "--out", str(out / "latent"), "--train.time_limit", f"{left:.3f}",
                       *shlex.split(args.text_args))
        _wait(_run(cmd, out / "latent.log", env), out / "latent.log")
        runs["latent"] = {"command": " ".join(ae[1:]) + " && " + " ".join(cmd[1:]),
                          "seconds": time.perf_counter() - start}
    for name, (process, start, cmd) in started.items():
        _wait(process, out / f"{name}.log")
        runs[name] = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - start}
    if "classes" in wanted:
        start = time.perf_counter()
        cmd = _command(args, "train", "--preset", "mnist-pairs", "--data", str(classes_folder(args.pairs, out)),
                       "--out", str(out / "classes"), "--train.time_limit", budget)
        _wait(_run(cmd, out / "classes.log", env), out / "classes.log")
        runs["classes"] = {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - start}
    for name, run in runs.items():
        path = out / name / "summary.json"
        run["summary"] = json.loads(path.read_text()) if path.is_file() else {}
    path = out / "budget.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **runs, "budget_min": args.budget, "threads_each": args.threads}, indent=2))
    common.say(", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in runs.items()) + f"; {path}")
    return runs


# ---------------------------------------------------------------------------- eval


#: What ``score`` counts: both digits on the asked sides, each side alone, the two swapped, the pair in either order.
SIDES = ("both", "left", "right", "swapped", "either order")
#: What the text probe reads: the text transformer's states, and the word counts as the order-blind reference.
PROBE_STATES = ("pooled", "mean token", "bag of words")


@torch.no_grad()
def score(space: FeatureSpace, images: torch.Tensor, left: int, right: int) -> tuple[dict[str, float], np.ndarray]:
    """The fractions of ``images`` [N, 1, 28, 56] whose halves the classifier reads as the asked
    digits (:data:`SIDES`: ``both`` is the accuracy), and the halves' features."""
    x = (images.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1  # 8 bits, as a PNG holds them
    halves = torch.cat([x[..., :28], x[..., 28:]])
    pred = torch.cat([space.classifier(halves[i:i + 500]).argmax(1) for i in range(0, len(halves), 500)])
    n = len(images)
    a, b = pred[:n], pred[n:]
    both, swapped = (a == left) & (b == right), (a == right) & (b == left)
    counts = {"both": both, "left": a == left, "right": b == right, "swapped": swapped, "either order": both | swapped}
    return {k: v.float().mean().item() for k, v in counts.items()}, features(space.classifier, halves)


def own_text_encoder(loaded: LoadedModel) -> torch.nn.Module | None:
    """The text transformer a model was trained with, or None (a frozen encoder or no text)."""
    encoder = getattr(loaded.model, "text_encoder", None)
    return encoder if getattr(encoder, "trainable", False) else None


@torch.no_grad()
def text_probe(loaded: LoadedModel, pairs: Path, seed: int = 0) -> dict[str, float] | None:
    """Linear probes of a trained text transformer: how well its pooled state (what the U-Net adds to
    the time embedding) and its mean token state tell the left and the right digit. Fitted on the
    test split's captions of seen pairs, scored on them and on the held-out pairs' captions: a
    representation that composes "left"/"right" with the digits transfers to the held-out pairs
    (chance 0.1). The same probe on the captions' word counts (``bag of words``) is the reference for
    a state that ignores the order of the words: each held-out pair's mirror image is a seen pair,
    so it reads held-out captions no better than chance. None for a model without its own text
    transformer."""
    from sklearn.linear_model import LogisticRegression

    encoder = own_text_encoder(loaded)
    if encoder is None:
        return None
    rows = captions(pairs / "test")
    groups = {"seen": [r for r in rows if (r["left"], r["right"]) not in HELD_OUT][:4000],
              "held_out": [r for r in rows if (r["left"], r["right"]) in HELD_OUT]}
    states = {}
    for name, group in groups.items():
        tokens = encoder.tokenize([r["text"] for r in group])
        embedding = encoder(tokens.input_ids, tokens.attention_mask)
        counts = torch.zeros(len(group), len(encoder.tokenizer)).scatter_add_(
            1, tokens.input_ids, tokens.attention_mask.float())
        states[name] = {"pooled": embedding.pooled.float().numpy(),
                        "mean token": masked_mean(embedding.hidden_states, embedding.attention_mask).float().numpy(),
                        "bag of words": counts.numpy()}
    out = {}
    for kind in PROBE_STATES:
        for side in ("left", "right"):
            fit = LogisticRegression(max_iter=2000, random_state=seed).fit(
                states["seen"][kind], [r[side] for r in groups["seen"]])
            for name, group in groups.items():
                out[f"{kind}, {side}, {name}"] = float(fit.score(states[name][kind], [r[side] for r in group]))
    return out


_DIGIT_WORD = re.compile(r"\b(zero|one|two|three|four|five|six|seven|eight|nine|\d)\b")


def swap_digits(text: str) -> str:
    """``text`` with its two digit words exchanged, the phrasing kept: the caption of the mirrored pair."""
    found = list(_DIGIT_WORD.finditer(text))
    if len(found) != 2:
        raise ValueError(f"expected two digit words in {text!r}")
    a, b = found
    return text[:a.start()] + b.group() + text[a.end():b.start()] + a.group() + text[b.end():]


@torch.no_grad()
def loss_probe(loaded: LoadedModel, pairs: Path, count: int = 256, seed: int = 0) -> dict[str, list[float]] | None:
    """What the words are worth in the training loss: on ``count`` test images of two different digits,
    at fixed noise, the mean increase of the ε-MSE when the caption is replaced by its digit-swapped
    twin (``swap``: the model uses the order of the words) or by the empty caption (``empty``: it uses
    the caption at all), with the standard error, for t in [50, 250), [250, 500) and [500, 750). None
    for a model without its own text transformer."""
    from PIL import Image

    from ddpm.latent import encode_images

    model, encoder = loaded.model, own_text_encoder(loaded)
    if encoder is None:
        return None
    diffusion = loaded.diffusion.build()
    rows = [r for r in captions(pairs / "test") if r["left"] != r["right"]][:count]
    x0 = torch.stack([torch.from_numpy(np.array(Image.open(pairs / "test" / r["file_name"]).convert("L")))[None]
                      for r in rows]).float() / 127.5 - 1
    if loaded.autoencoder is not None:
        x0 = encode_images(loaded.autoencoder, x0)
    texts = {"true": [r["text"] for r in rows], "swap": [swap_digits(r["text"]) for r in rows],
             "empty": [""] * len(rows)}
    tokens = {k: encoder.tokenize(v) for k, v in texts.items()}
    out = {}
    for lo, hi in ((50, 250), (250, 500), (500, 750)):
        g = torch.Generator().manual_seed(seed + lo)
        t = torch.randint(lo, hi, (len(rows),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, eps)
        mse = {k: (model(x_t, t, b.input_ids, b.attention_mask).float() - eps).square().flatten(1).mean(1)
               for k, b in tokens.items()}
        for k in ("swap", "empty"):
            d = mse[k] - mse["true"]
            out[f"{k}, t in [{lo}, {hi})"] = [d.mean().item(), (d.std() / len(d) ** 0.5).item()]
    return out


def evaluate_model(args: argparse.Namespace, space: FeatureSpace, name: str, loaded: LoadedModel, asked: list[tuple],
                   scales: list[float], grid_rows: list) -> dict:
    diffusion = loaded.diffusion.build()
    results = {}
    for w in scales:
        rows, feats = [], []
        start = time.perf_counter()
        for k, (text, left, right, held_out) in enumerate(asked):
            samples = generate(loaded.model, diffusion, args.samples, prompts=[text], seed=args.seed + k,
                               guidance_scale=None if w == 1 else w, conditioning=loaded.conditioning,
                               batch_size=args.batch_size, autoencoder=loaded.autoencoder, progress=False)
            fractions, f = score(space, samples.images, left, right)
            rows.append({"prompt": text, "left": left, "right": right, "held_out": held_out,
                         "accuracy": fractions["both"], "sides": fractions})
            feats.append(f)
            if w == max(scales) and len(grid_rows) < 12 and k % 2 == 0:
                grid_rows.append((samples.images[:8], f"{name}: {text}"))
        seen = [r["accuracy"] for r in rows if not r["held_out"]]
        held = [r["accuracy"] for r in rows if r["held_out"]]
        results[f"{w:g}"] = {
            "seen_accuracy": float(np.mean(seen)), "held_out_accuracy": float(np.mean(held)) if held else None,
            "fd_halves": frechet_distance(np.concatenate(feats), space.test_features),
            "sides": {k: float(np.mean([r["sides"][k] for r in rows])) for k in SIDES},
            "seconds": time.perf_counter() - start, "prompts": rows}
        common.say(f"{name} w={w:g}: seen {results[f'{w:g}']['seen_accuracy']:.3f}, held-out "
                   f"{results[f'{w:g}']['held_out_accuracy']}, FD {results[f'{w:g}']['fd_halves']:.2f}")
    return results


def eval_stage(args: argparse.Namespace, out: Path) -> dict:
    space = FeatureSpace(common.mnist_path(args.mnist), seed=args.seed)
    scales = [float(w) for w in args.guidance.split(",")]
    asked = prompts(args.pairs)
    report: dict = {"classifier_accuracy": space.accuracy, "floor": space.floor(2 * args.samples * len(asked)),
                    "samples_per_prompt": args.samples, "prompts": asked, "models": {}}
    grid_rows: list = []
    for name in args.models.split(","):
        if not (out / name).is_dir():
            continue
        wanted = asked if name != "classes" else [(pair_token(l, r), l, r, h) for _, l, r, h in asked if not h]
        loaded = load_model(out / name)
        report["models"][name] = evaluate_model(args, space, name, loaded, wanted, scales, grid_rows)
        if name != "classes":
            probe = text_probe(loaded, args.pairs, args.seed)
            if probe is not None:
                report.setdefault("text_probe", {})[name] = probe
                common.say(f"{name} text probe: " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
            costs = loss_probe(loaded, args.pairs, seed=args.seed)
            if costs is not None:
                report.setdefault("loss_probe", {})[name] = costs
                common.say(f"{name} loss probe: "
                           + ", ".join(f"{k} {m:+.5f} ± {se:.5f}" for k, (m, se) in costs.items()))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    if args.grid and grid_rows:
        save_image(labelled_rows(grid_rows), Path(args.grid))
    if args.plot:
        plot(report, Path(args.plot))
    if args.append:
        append(args, out, report)
    return report


def plot(report: dict, path: Path) -> Path:
    from ddpm.viz import new_figure, save_figure

    fig = new_figure(figsize=(9, 3.6))
    ax_acc, ax_fd = fig.subplots(1, 2)
    for name, results in report["models"].items():
        ws = [float(w) for w in results]
        ax_acc.plot(ws, [r["seen_accuracy"] for r in results.values()], "o-", label=f"{name}, seen pairs")
        held = [r["held_out_accuracy"] for r in results.values()]
        if held[0] is not None:
            ax_acc.plot(ws, held, "s--", label=f"{name}, held-out pairs")
        ax_fd.plot(ws, [r["fd_halves"] for r in results.values()], "o-", label=name)
    for ax, label in ((ax_acc, "both digits right"), (ax_fd, "FD of the halves (classifier features)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("guidance scale w")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    ax_fd.axhline(report["floor"], color="grey", lw=0.8, ls=":")
    return save_figure(fig, path)


def append(args: argparse.Namespace, out: Path, report: dict) -> None:
    budget_path = out / "budget.json"
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() else {}
    rows = []
    for name, results in report["models"].items():
        for w, r in results.items():
            held = "—" if r["held_out_accuracy"] is None else f"{r['held_out_accuracy']:.3f}"
            steps = budget.get(name, {}).get("summary", {}).get("step", "?")
            rows.append([name, steps, w, f"{r['seen_accuracy']:.3f}", held, f"{r['sides']['either order']:.3f}",
                         f"{r['sides']['swapped']:.3f}", f"{r['fd_halves']:.2f}", f"{r['seconds'] / 60:.1f}"])
    facts = [f"budget: {budget.get('budget_min', '?')} CPU min per model, {budget.get('threads_each', '?')} thread(s) "
             f"each; " + "; ".join(f"{k}: `{v['command']}`" for k, v in budget.items() if isinstance(v, dict)),
             f"{args.samples} samples per prompt, default sampler (dpm++2m-sde, 20 NFE); classifier test accuracy "
             f"{report['classifier_accuracy']:.4f}; FD floor {report['floor']:.2f}"]
    body = common.markdown_table(["model", "steps", "guidance", "seen: both right", "held-out: both right",
                                  "every prompt: pair in either order", "every prompt: swapped", "FD of halves",
                                  "eval min"], rows)
    for name, probe in report.get("text_probe", {}).items():
        body += (f"\n\nLinear probes of {name}'s text transformer (fitted on seen-pair test captions; chance 0.1; "
                 f"'bag of words' is the captions' word counts, the order-blind reference):\n\n"
                 + common.markdown_table(["state", "side", "seen captions", "held-out captions"],
                                         [[kind, side, f"{probe[f'{kind}, {side}, seen']:.3f}",
                                           f"{probe[f'{kind}, {side}, held_out']:.3f}"]
                                          for kind in PROBE_STATES for side in ("left", "right")
                                          if f"{kind}, {side}, seen" in probe]))
    for name, costs in report.get("loss_probe", {}).items():
        body += (f"\n\nWhat the words are worth in {name}'s ε-MSE on 256 test images (caption replaced minus true, "
                 f"± standard error):\n\n" + common.markdown_table(
                     ["caption", *[k.split(", ", 1)[1] for k in costs if k.startswith("swap")]],
                     [[kind, *[f"{m:+.5f} ± {se:.5f}" for k, (m, se) in costs.items() if k.startswith(kind)]]
                      for kind in ("swap", "empty")]))
    common.append_entry("text-to-image on captioned MNIST pairs, equal CPU budget", "bench.text2image",
                        args.argv, facts, body)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.pairs, args.argv = Path(args.pairs), argv
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(args, out) if args.stage == "train" else eval_stage(args, out)


if __name__ == "__main__":
    main()
