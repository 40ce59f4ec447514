"""Text-to-image end to end on tiny settings: training on captioned folders (GLIDE's own text
transformer, and a frozen CLIP), exact resume, previews labelled with their prompts, sampling with
prompts from the command line, the caption dropout's statistics, and bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.checkpoints import latest_training_checkpoint
from ddpm.cli import main
from ddpm.conditioning import Captions, TextPrompts
from ddpm.config import get_config
from ddpm.data import Batch
from ddpm.generate import generate
from ddpm.loading import load_model
from ddpm.models.text_transformer import TextTransformer, TextTransformerConfig
from ddpm.tokenizer import WordTokenizer
from ddpm.train import train

QUIET = {"progress": False, "log": lambda message: None}
CAPTIONS = ["a bar at the top", "a bar high", "a bar low", "a bar at the bottom"]


def write_bars(folder: Path, n: int = 32) -> Path:
    """``n`` 8x8 RGB images of a bar at one of four heights, captioned by where it is."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        c = i % 4
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[2 * c:2 * c + 2] = 255
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": CAPTIONS[c]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> Path:
    return write_bars(tmp_path_factory.mktemp("text") / "bars")


def tiny_text(bars: Path, **overrides: str):
    return get_config("tiny-text", {"data.source": str(bars), "train.steps": "6", "train.sample_every": "0",
                                    "train.ckpt_every": "3", **overrides})


@pytest.fixture(scope="module")
def run(bars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "t2i"
    train(tiny_text(bars), out, **QUIET)
    return out


@pytest.mark.slow
def test_a_text_run_keeps_its_vocabulary_and_labels_its_previews(run, bars):
    ckpt = latest_training_checkpoint(run / "checkpoints")[1]
    assert ckpt.meta["tokenizer"] == WordTokenizer.from_captions(CAPTIONS).tokens
    assert set(ckpt.group("model")) == {k for k in ckpt.group("ema")}
    assert any(k.startswith("text_encoder.") for k in ckpt.group("model"))
    with Image.open(next((run / "samples").glob("*.png"))) as grid:
        # One labelled row per prompt: the labels widen it beyond a row of 8x8 tiles.
        assert grid.height >= 4 * 8 and grid.width > 8 * 6
    loaded = load_model(run)
    assert loaded.conditioning is not None and loaded.conditioning.encoder.trainable


@pytest.mark.slow
def test_a_resumed_text_run_repeats_the_uninterrupted_one(bars, tmp_path):
    config = tiny_text(bars, **{"train.steps": "6"})
    train(config, tmp_path / "whole", **QUIET)
    train(config.replace({"train.steps": "3"}), tmp_path / "parts", **QUIET)
    train(config, tmp_path / "parts", resume=True, explicit={"train.steps"}, **QUIET)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "parts")]
    assert losses[0] == losses[1]
    a, b = (latest_training_checkpoint(tmp_path / name / "checkpoints")[1] for name in ("whole", "parts"))
    assert all(torch.equal(a.group("ema")[k], b.group("ema")[k]) for k in a.group("ema"))


def test_sampling_with_prompts_from_the_command_line(run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bar high\n\na bar low\n")
    out = tmp_path / "s"
    assert main(["sample", str(run), "--out", str(out), "--prompts-file", str(prompts), "--prompt", "a bar",
                 "--negative-prompt", "a bar at the top", "--guidance-scale", "3", "--num-images", "6",
                 "--steps", "3", "--pngs", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "text-conditional" in printed and str(out / "prompts.txt") in printed
    # --prompt first, then the file's lines; images take them in turn.
    assert (out / "prompts.txt").read_text().splitlines() == ["a bar", "a bar high", "a bar low"] * 2
    assert len(list((out / "images").glob("*.png"))) == 6 and (out / "grid.png").is_file()


@pytest.mark.slow
def test_a_seed_gives_the_same_images_in_any_batch_and_guidance_changes_them(run):
    loaded = load_model(run)
    diffusion = loaded.diffusion.build()

    def draw(batch_size, scale):
        return generate(loaded.model, diffusion, 4, prompts=CAPTIONS, guidance_scale=scale, batch_size=batch_size,
                        conditioning=loaded.conditioning, progress=False).images

    whole = draw(4, 3.0)
    assert torch.allclose(whole, draw(1, 3.0), atol=1e-5)
    assert not torch.allclose(whole, draw(4, None), atol=1e-3)


def test_caption_dropout_drops_at_its_rate_to_the_empty_caption():
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    encoder = TextTransformer(TextTransformerConfig.preset("tiny"), tokenizer)
    captions = Captions(CAPTIONS * 500, encoder, dropout=0.3)
    n = len(captions.rows)
    batch = Batch(torch.zeros(n, 1), torch.full((n,), -1), torch.arange(n))
    kwargs = captions(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    empty = tokenizer.tokenize([""], encoder.context_length).input_ids[0]
    dropped = (kwargs["input_ids"] == empty).all(dim=1)
    # Binomial(2000, 0.3): a standard deviation of 20.5, so 4 of them is about 82.
    assert abs(int(dropped.sum()) - 0.3 * n) < 4 * math.sqrt(n * 0.3 * 0.7)
    kept = ~dropped
    expected = tokenizer.tokenize([CAPTIONS[i % 4] for i in range(n)], encoder.context_length).input_ids
    assert torch.equal(kwargs["input_ids"][kept], expected[kept])
    again = captions(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(again["input_ids"], kwargs["input_ids"])


# ---------------------------------------------------------------------------- a frozen CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers", reason="CLIP comes from transformers (ddpm[text])")
    from test_text import clip_vocabulary

    directory = tmp_path_factory.mktemp("clip")
    vocab, merges = clip_vocabulary(["a", "bar", "at", "the", "top", "high", "low", "bottom"])
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                               model_max_length=12).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModel(config).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_a_run_on_a_frozen_clip_caches_its_embeddings_and_samples(bars, clip_dir, tmp_path):
    config = tiny_text(bars, **{"data.text_encoder": str(clip_dir), "train.steps": "3"})
    assert config.text is None
    train(config, tmp_path / "run", **QUIET)
    loaded = load_model(tmp_path / "run")
    assert isinstance(loaded.conditioning, TextPrompts) and not loaded.conditioning.encoder.trainable
    ckpt = latest_training_checkpoint(tmp_path / "run" / "checkpoints")[1]
    assert not any(k.startswith("text_encoder.") for k in ckpt.group("model"))  # the frozen CLIP is not saved
    captions = Captions(CAPTIONS, loaded.conditioning.encoder, dropout=0.0, pooled=True)
    direct = loaded.conditioning.encoder.encode(CAPTIONS)
    batch = Batch(torch.zeros(4, 1), torch.full((4,), -1), torch.arange(4))
    cached = captions(batch, torch.Generator().manual_seed(0), torch.device("cpu"))
    # Embedded once in another batch (the distinct captions and the empty one): float32 sums in another order.
    assert torch.allclose(cached["encoder_hidden_states"], direct.hidden_states, atol=1e-5)
    assert torch.allclose(cached["class_labels"], direct.pooled, atol=1e-5)
    samples = generate(loaded.model, loaded.diffusion.build(), 2, prompts=["a bar low"], guidance_scale=2.0,
                       conditioning=loaded.conditioning, progress=False)
    assert samples.images.shape == (2, 3, 8, 8)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "tiny-text", "--data", "{npz}", "--out", "{tmp}/r"], "has no captions"),
    (["train", "--preset", "tiny", "--data", "{bars}", "--out", "{tmp}/r", "--text.width", "8"],
     "this run has no text section"),
    (["train", "--preset", "tiny-text", "--data", "{bars}", "--out", "{tmp}/r", "--train.class_cond", "true"],
     "drop --train.class_cond"),
    (["train", "--preset", "tiny-text", "--data", "{bars}", "--out", "{tmp}/r", "--model.cross_attention_dim", "16"],
     "set --model.cross_attention_dim 32"),
    (["sample", "{plain}", "--out", "{tmp}/s", "--prompt", "a bar"], "--prompt needs a text-conditional model"),
    (["sample", "{run}", "--out", "{tmp}/s", "--prompts-file", "{tmp}/none.txt"], "no such file"),
    (["sample", "{run}", "--out", "{tmp}/s", "--prompts-file", "{empty}"], "no prompts in it"),
    (["sample", "{run}", "--out", "{tmp}/s", "--label", "2"], "--label needs a class-conditional model"),
])
def test_text_mistakes_cost_one_line_and_write_nothing(argv, message, bars, run, tmp_path, capsys):
    npz = tmp_path / "plain.npz"
    np.savez(npz, x_train=np.zeros((16, 8, 8, 3), np.uint8))
    plain = tmp_path / "plain"
    assert main(["train", "--preset", "tiny", "--data", str(npz), "--out", str(plain), "--quiet",
                 "--train.steps", "1", "--train.sample_every", "0"]) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    capsys.readouterr()
    fields = {"npz": npz, "bars": bars, "run": run, "plain": plain, "tmp": tmp_path, "empty": empty}
    assert main([a.format(**fields) for a in argv] + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ddpm: error:") and message in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()
