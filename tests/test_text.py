"""Text encoders behind one interface: frozen CLIP against transformers and diffusers'
StableDiffusionPipeline, frozen T5 against transformers, GLIDE's text transformer and its word
tokenizer, and the loader's faults.

Everything is offline: tiny random transformers models built from a config, a CLIP vocabulary and
merges written here (one token per word), a T5 tokenizer.json built with the tokenizers library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ddpm.errors import DataWarning, UserError
from ddpm.models.text_transformer import PRESETS, TextTransformer, TextTransformerConfig
from ddpm.models.unet import UNet, UNetConfig
from ddpm.text import CLIPTextEncoder, T5TextEncoder, load_text_encoder
from ddpm.tokenizer import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, WordTokenizer, split_words

ROOT = Path(__file__).resolve().parent.parent
# A DataWarning nobody asked for fails the test; pytest.warns still catches the expected ones.
pytestmark = pytest.mark.filterwarnings("error::ddpm.errors.DataWarning")

WORDS = "a photo of cat dog four on the left and two right seven three 7 3".split()
CLIP_CONTEXT = 16
T5_CONTEXT = 12
WIDTH = 32
CAPTIONS = ["a four on the left and a two on the right", "7 and 3", "Seven and three.", "a two on the left"]


@pytest.fixture(scope="module")
def transformers():
    # Offline before transformers (and huggingface_hub) read the environment: nothing downloads.
    os.environ["HF_HUB_OFFLINE"] = "1"
    return pytest.importorskip("transformers", reason="CLIP and T5 come from transformers (ddpm[text])")


def clip_vocabulary(words):
    """A CLIP BPE vocabulary and merges in which every word of ``words`` is one token: the
    characters (with and without CLIP's end-of-word mark) and each word's merges, left to right."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if f"{merged} {symbol}" not in merges:
                merges.append(f"{merged} {symbol}")
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    return vocab, merges


def save_tiny_clip(transformers, directory, seed=0, **tokenizer_options):
    """Write a tiny random CLIPTextModel (width 32) and its CLIPTokenizer (context 16, one token per
    word of WORDS) into ``directory``; returns it."""
    vocab, merges = clip_vocabulary(WORDS)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                           model_max_length=CLIP_CONTEXT, **tokenizer_options)
    assert [len(tokenizer(w).input_ids) for w in WORDS] == [3] * len(WORDS)  # <|startoftext|> word <|endoftext|>
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=CLIP_CONTEXT, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1)
    transformers.CLIPTextModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_dir(transformers, tmp_path_factory):
    """A tiny random CLIPTextModel and its CLIPTokenizer (context 16) in one directory."""
    return save_tiny_clip(transformers, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def t5_dir(transformers, tmp_path_factory):
    """A tiny random T5EncoderModel and a T5 tokenizer (a Unigram tokenizer.json, context 12)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    directory = tmp_path_factory.mktemp("t5")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -20.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -30.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    hf_tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                model_max_length=T5_CONTEXT, extra_ids=0)
    hf_tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    # Dropout on, as in T5's config: the frozen encoder must switch it off.
    config = transformers.T5Config(vocab_size=len(hf_tokenizer), d_model=WIDTH, d_kv=8, d_ff=48, num_layers=2,
                                   num_heads=4, dropout_rate=0.1, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sd_pipeline_dir(clip_dir, tmp_path_factory):
    """A tiny StableDiffusionPipeline saved by diffusers, around the tiny CLIP."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers' pipeline is the reference (ddpm[interop])")
    import transformers

    directory = tmp_path_factory.mktemp("sd")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, norm_num_groups=8, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        text_encoder=transformers.CLIPTextModel.from_pretrained(clip_dir),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_dir),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def clip_ids(*words):
    """The ids CLIP gives a prompt of ``words``, padded to the context with <|endoftext|> (SD 1.x)."""
    vocab, _ = clip_vocabulary(WORDS)
    ids = [0, *(vocab[w + "</w>"] for w in words), 1]
    return ids + [1] * (CLIP_CONTEXT - len(ids))


# --- CLIP, as Stable Diffusion uses it ---------------------------------------------------------


def test_clip_pads_to_the_context_and_equals_transformers_call(transformers, clip_dir):
    encoder = load_text_encoder(clip_dir)
    assert isinstance(encoder, CLIPTextEncoder)
    assert (encoder.context_length, encoder.hidden_size, encoder.pooled_size) == (CLIP_CONTEXT, WIDTH, WIDTH)
    prompts = ["a photo of a cat", "", "Seven and three"]
    batch = encoder.tokenize(prompts)
    # Padded with <|endoftext|>, as Stable Diffusion 1.x's tokenizer pads; "Seven" lower-cased.
    expected = [clip_ids("a", "photo", "of", "a", "cat"), clip_ids(), clip_ids("seven", "and", "three")]
    assert batch.input_ids.tolist() == expected
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.sum(dim=1).tolist() == [7, 2, 5]  # start, words, end
    out = encoder(batch.input_ids, batch.attention_mask)
    reference = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()(batch.input_ids)
    assert torch.equal(out.hidden_states, reference.last_hidden_state)
    assert torch.equal(out.pooled, reference.pooler_output)
    # Stable Diffusion's U-Net cross-attends to all positions, padding included.
    assert out.attention_mask.all() and out.attention_mask.shape == (3, CLIP_CONTEXT)
    assert not encoder.masks_padding


def test_clip_equals_diffusers_encode_prompt(sd_pipeline_dir):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_pipeline_dir, safety_checker=None)
    prompt = "a photo of a cat on the left"
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
    for path in (sd_pipeline_dir, sd_pipeline_dir / "text_encoder"):  # the pipeline, or its text encoder folder
        encoder = load_text_encoder(path)
        assert torch.equal(encoder.encode([prompt]).hidden_states, positive)
        assert torch.equal(encoder.encode([""]).hidden_states, negative)  # classifier-free guidance's prompt


def test_clip_skip_is_the_output_of_a_clip_without_its_last_layers(transformers, clip_dir):
    # diffusers' clip_skip = 1: the next-to-last layer's output through the final LayerNorm, which is
    # what the same CLIP with one layer fewer computes. (diffusers 0.42 itself cannot run it with
    # transformers 5, whose CLIPTextModel has no text_model attribute.)
    full = transformers.CLIPTextModel.from_pretrained(clip_dir)
    config = full.config.to_dict() | {"num_hidden_layers": 1}
    shorter = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    missing, _ = shorter.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    encoder = load_text_encoder(clip_dir)
    encoder.clip_skip = 1
    batch = encoder.tokenize(["a photo of a dog", ""])
    assert torch.allclose(encoder(batch.input_ids, batch.attention_mask).hidden_states,
                          shorter(batch.input_ids).last_hidden_state, atol=1e-6)


def test_clip_cuts_long_prompts_with_one_warning_naming_the_dropped_words(clip_dir):
    encoder = load_text_encoder(clip_dir)
    long = "seven and three on the left and two on the right and a cat and a dog and a photo of a four".split()
    prompts = ["a cat", " ".join(long), " ".join(long[:15])]
    with pytest.warns(DataWarning) as record:
        batch = encoder.tokenize(prompts)
    assert len(record) == 1
    kept = CLIP_CONTEXT - 2
    assert str(record[0].message) == (
        f'prompt 1 is {len(long) + 2} tokens, longer than the context of {CLIP_CONTEXT}: dropped '
        f'"{" ".join(long[kept:])}"; 1 more cut too (prompt 2)')
    assert batch.input_ids[1].tolist() == clip_ids(*long[:kept])  # the first words, then <|endoftext|>


def test_clip_is_frozen(clip_dir):
    encoder = load_text_encoder(clip_dir)
    assert not encoder.trainable
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not encoder.encode(["a cat"]).hidden_states.requires_grad


# --- T5, as Imagen uses it ---------------------------------------------------------------------


def test_t5_uses_the_mask_and_equals_transformers_call(transformers, t5_dir):
    encoder = load_text_encoder(t5_dir)
    assert isinstance(encoder, T5TextEncoder) and encoder.masks_padding and not encoder.trainable
    assert (encoder.context_length, encoder.hidden_size, encoder.pooled_size) == (T5_CONTEXT, WIDTH, WIDTH)
    prompts = ["a photo of a cat", "", "seven and three"]
    batch = encoder.tokenize(prompts)
    tokenizer = transformers.T5TokenizerFast.from_pretrained(t5_dir)
    word_ids = [tokenizer.convert_tokens_to_ids("\u2581" + w) for w in ("a", "photo", "of", "a", "cat")]
    assert batch.input_ids[0].tolist() == word_ids + [1] + [0] * (T5_CONTEXT - 6)  # </s>, then <pad>
    assert batch.input_ids[1].tolist() == [1] + [0] * (T5_CONTEXT - 1)
    assert batch.attention_mask.sum(dim=1).tolist() == [6, 1, 4]
    out = encoder(batch.input_ids, batch.attention_mask)
    model = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    with torch.no_grad():  # as a pipeline calls it (with autograd on, another kernel differs by 1e-6)
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    assert torch.equal(out.hidden_states, reference)
    assert torch.equal(out.attention_mask, batch.attention_mask)
    for i, n in enumerate([6, 1, 4]):  # the mean of the real tokens' states
        assert torch.allclose(out.pooled[i], reference[i, :n].mean(dim=0), atol=1e-6)


def test_t5_padding_does_not_change_the_real_tokens(t5_dir):
    prompts = ["a photo of a cat", "", "two on the right"]
    short, long = load_text_encoder(t5_dir), load_text_encoder(t5_dir, context_length=3 * T5_CONTEXT)
    a, b = short.encode(prompts), long.encode(prompts)
    assert b.hidden_states.shape == (3, 3 * T5_CONTEXT, WIDTH)
    for i, n in enumerate(a.attention_mask.sum(dim=1).tolist()):
        assert torch.allclose(a.hidden_states[i, :n], b.hidden_states[i, :n], atol=1e-6)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-6)


def test_t5_cuts_long_prompts_and_stays_frozen_in_train_mode(t5_dir):
    encoder = load_text_encoder(t5_dir)
    long = "seven and three on the left and two on the right a cat and a dog"
    with pytest.warns(DataWarning, match=r'^prompt 0 is 17 tokens, longer than the context of 12: dropped "a cat '
                                         r'and a dog"$'):
        batch = encoder.tokenize([long])
    assert batch.input_ids[0, -1] == 1 and batch.attention_mask.all()  # cut before </s>
    encoder.train()  # dropout (0.1 in the config) stays off
    assert torch.equal(encoder.encode(["a cat"]).hidden_states, encoder.encode(["a cat"]).hidden_states)
    assert not any(p.requires_grad for p in encoder.parameters())


# --- the loader ----------------------------------------------------------------------------------


def copy_without(source, destination, *names):
    shutil.copytree(source, destination)
    for name in names:
        (destination / name).unlink()
    return destination


def test_a_tokenizer_missing_its_files_is_one_user_error(clip_dir, t5_dir, tmp_path):
    with pytest.raises(UserError, match=r"a CLIP tokenizer needs vocab.json and merges.txt or tokenizer.json; not "
                                        r"found there"):
        load_text_encoder(copy_without(clip_dir, tmp_path / "clip", "merges.txt", "tokenizer.json"))
    with pytest.raises(UserError, match=r"a T5 tokenizer needs tokenizer.json or spiece.model; not found there"):
        load_text_encoder(copy_without(t5_dir, tmp_path / "t5", "tokenizer.json"))


def test_pickled_weights_are_refused_not_unpickled(clip_dir, tmp_path):
    class Payload:  # would create a file when unpickled
        def __reduce__(self):
            return (Path.touch, (tmp_path / "unpickled",))

    directory = copy_without(clip_dir, tmp_path / "clip", "model.safetensors")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match=r"only pytorch_model.bin, a pickle, which ddpm does not load"):
        load_text_encoder(directory)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("layout, message", [
    ("nothing", r"no such directory"),
    ("empty", r"unknown layout: neither a ddpm text transformer"),
    ("diffusers unet", r"a diffusers UNet2DModel, not a text encoder ddpm reads"),
    ("bert", r"model_type 'bert', not a text encoder ddpm reads \(CLIP: model_type clip_text_model or clip"),
    ("our unet", r"a ddpm 'ddpm-unet' directory, not a text encoder"),
    ("pipeline without text encoder", r"a diffusers pipeline without a text_encoder/ folder"),
])
def test_unknown_layouts_are_one_user_error(tmp_path, layout, message):
    directory = tmp_path / "model"
    if layout != "nothing":
        directory.mkdir()
    if layout == "diffusers unet":
        (directory / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    elif layout == "bert":
        (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif layout == "our unet":
        UNet(UNetConfig(image_size=8, in_channels=1, ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        norm_groups=8)).save_pretrained(directory)
    elif layout == "pipeline without text encoder":
        (directory / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(UserError, match=message) as caught:
        load_text_encoder(directory)
    assert "\n" not in str(caught.value)


def test_missing_transformers_is_one_user_error(clip_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UserError, match=r"need transformers: pip install 'ddpm\[text\]'$"):
        load_text_encoder(clip_dir)


@pytest.mark.slow
def test_the_package_and_the_text_transformer_work_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import ddpm, ddpm.cli, ddpm.text\n"
            "from ddpm.text import TextTransformer, TextTransformerConfig, WordTokenizer\n"
            "model = TextTransformer(TextTransformerConfig.preset('tiny'), WordTokenizer.from_captions(['7 and 3']))\n"
            "assert model.encode(['7 and 3', '']).pooled.shape == (2, 32)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


# --- the word tokenizer --------------------------------------------------------------------------


def test_the_vocabulary_is_sorted_words_after_the_special_tokens():
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    words = ["." , "3", "7", "a", "and", "four", "left", "on", "right", "seven", "the", "three", "two"]
    assert tokenizer.tokens == [*SPECIAL_TOKENS, *words]
    assert WordTokenizer.from_captions(reversed(CAPTIONS)) == tokenizer
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert split_words("Seven, and 3!") == ["seven", ",", "and", "3", "!"]


def test_the_word_tokenizer_round_trips_and_maps_unknown_words_to_unk(tmp_path):
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    assert tokenizer.decode(tokenizer.encode("A four on the left.")) == "a four on the left ."
    assert tokenizer.encode("a zebra") == [tokenizer.ids["a"], UNK_ID]
    assert tokenizer.decode(tokenizer.encode("a zebra")) == "a <unk>"
    batch = tokenizer.tokenize(["7 and 3", ""], context_length=6)
    ids = [tokenizer.ids[w] for w in ("7", "and", "3")]
    assert batch.input_ids.tolist() == [[START_ID, *ids, END_ID, PAD_ID], [START_ID, END_ID, 0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[True] * 5 + [False], [True] * 2 + [False] * 4]
    tokenizer.save(tmp_path / "tokenizer.json")
    assert WordTokenizer.load(tmp_path / "tokenizer.json") == tokenizer


def test_the_word_tokenizer_cuts_with_one_warning():
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    with pytest.warns(DataWarning) as record:
        batch = tokenizer.tokenize(["a four on the left and a two on the right", "7 and 3"], context_length=6)
    assert [str(w.message) for w in record] == [
        'prompt 0 is 13 tokens, longer than the context of 6: dropped "left and a two on the right"']
    assert tokenizer.decode(batch.input_ids[0].tolist()) == "a four on the"
    assert batch.input_ids[0, -1] == END_ID


@pytest.mark.parametrize("content, message", [
    (None, r"no such file"),
    ("{", r"not valid JSON"),
    (json.dumps({"tokens": ["<pad>"]}), r"not a ddpm word tokenizer \(no format 'ddpm-word-tokenizer'\)"),
    (json.dumps({"format": "ddpm-word-tokenizer", "format_version": 9, "tokens": []}), r"format_version 9"),
    (json.dumps({"format": "ddpm-word-tokenizer", "format_version": 1, "tokens": "a b"}), r"must be a list"),
    (json.dumps({"format": "ddpm-word-tokenizer", "format_version": 1, "tokens": ["a", "b"]}),
     r"must start with <pad>, <start>, <end>, <unk>"),
    (json.dumps({"format": "ddpm-word-tokenizer", "format_version": 1, "tokens": [*SPECIAL_TOKENS, "a", "a"]}),
     r"a token twice"),
])
def test_a_bad_or_missing_tokenizer_json_is_one_user_error(tmp_path, content, message):
    model = TextTransformer(PRESETS["tiny"], WordTokenizer.from_captions(CAPTIONS))
    model.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.unlink()
    if content is not None:
        path.write_text(content)
    for load in (lambda: WordTokenizer.load(path), lambda: TextTransformer.from_pretrained(tmp_path),
                 lambda: load_text_encoder(tmp_path)):
        with pytest.raises(UserError, match=message) as caught:
            load()
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


# --- GLIDE's text transformer --------------------------------------------------------------------


@pytest.fixture
def model(jitter):
    # Jittered: biases and LayerNorms away from 0 and 1, so that every parameter matters.
    return jitter(TextTransformer(PRESETS["tiny"], WordTokenizer.from_captions(CAPTIONS))).eval()


def test_save_and_load_give_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((tmp_path / "config.json").read_text())["format"] == "ddpm-text-transformer"
    prompts = ["a four on the left and a two on the right", "", "seven and three"]
    expected = model.encode(prompts)
    for loaded in (TextTransformer.from_pretrained(tmp_path), load_text_encoder(tmp_path)):
        assert isinstance(loaded, TextTransformer) and loaded.tokenizer == model.tokenizer
        got = loaded.eval().encode(prompts)
        assert torch.equal(got.hidden_states, expected.hidden_states) and torch.equal(got.pooled, expected.pooled)


def test_padding_changes_neither_the_real_tokens_nor_the_pooled_vector(model):
    prompts = ["a four on the left and a two on the right", "", "7 and 3"]
    batch = model.tokenize(prompts)
    out = model(batch.input_ids, batch.attention_mask)
    assert out.hidden_states.shape == (3, 16, 32) and out.pooled.shape == (3, 32)
    assert torch.equal(out.attention_mask, batch.attention_mask) and model.masks_padding
    for i, n in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        alone = model(batch.input_ids[i : i + 1, :n], batch.attention_mask[i : i + 1, :n])  # no padding at all
        assert torch.allclose(alone.hidden_states[0], out.hidden_states[i, :n], atol=1e-5)
        assert torch.allclose(alone.pooled[0], out.pooled[i], atol=1e-5)
        assert torch.equal(out.pooled[i], out.hidden_states[i, n - 1])  # pooled at <end>
        assert not out.hidden_states[i, n:].any()  # the padding carries nothing


def test_a_causal_transformers_states_depend_only_on_the_tokens_before_them(jitter):
    # CLIP's mask: position i attends to positions <= i, so every prefix of a prompt, run alone, gives
    # the prompt's first states; with GLIDE's full attention a later word changes the earlier states.
    tokenizer = WordTokenizer.from_captions(CAPTIONS)
    prompt = "a four on the left and a two on the right"
    for causal in (True, False):
        torch.manual_seed(0)
        model = jitter(TextTransformer(dataclasses.replace(PRESETS["tiny"], causal=causal), tokenizer)).eval()
        batch = model.tokenize([prompt])
        n = int(batch.attention_mask.sum())
        full = model(batch.input_ids[:, :n], batch.attention_mask[:, :n]).hidden_states[0]
        for k in (1, 3, n - 1):
            prefix = model(batch.input_ids[:, :k], batch.attention_mask[:, :k]).hidden_states[0]
            assert torch.allclose(prefix, full[:k], atol=1e-5) == causal, (causal, k)
    with pytest.raises(UserError, match=r"TextTransformerConfig.causal must be true or false"):
        TextTransformerConfig(causal=1)


def test_gradients_reach_every_parameter(model):
    assert model.trainable
    model.train()
    out = model.encode(["a four on the left and a two on the right", "7 and 3", ""])
    (out.hidden_states.square().mean() + out.pooled.sin().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.token_embedding.weight.grad[PAD_ID].any()  # padding takes no part


def test_weights_for_another_vocabulary_are_one_user_error(model, tmp_path):
    model.save_pretrained(tmp_path)
    WordTokenizer.from_captions([*CAPTIONS, "a zebra"]).save(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match=r"weights for a vocabulary of 17 tokens, but the tokenizer has 18"):
        TextTransformer.from_pretrained(tmp_path)


def test_a_text_transformers_context_is_its_configs(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert load_text_encoder(tmp_path, context_length=16).context_length == 16
    with pytest.raises(UserError, match=r"context is its config's \(16\), not 8"):
        load_text_encoder(tmp_path, context_length=8)


def test_presets_and_the_paper_size():
    for config in PRESETS.values():
        assert config.width % config.heads == 0
    # GLIDE, section 2.3: "24 residual blocks of width 2048, resulting in roughly 1.2 billion parameters".
    with torch.device("meta"):
        glide = TextTransformer(TextTransformerConfig.preset("glide"), WordTokenizer(SPECIAL_TOKENS))
    assert sum(p.numel() for p in glide.transformer.parameters()) == 1_208_598_528
    with pytest.raises(UserError, match=r"heads 3 does not divide width 32"):
        TextTransformerConfig(width=32, heads=3)
    with pytest.raises(UserError, match=r"unknown text transformer preset 'huge'; choose one of glide"):
        TextTransformerConfig.preset("huge")
    with pytest.raises(UserError, match=r"unknown text transformer config key\(s\) depth"):
        TextTransformerConfig.from_dict({"depth": 3})
