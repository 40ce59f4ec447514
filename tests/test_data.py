"""Tests of ddpm.data: every source, every conversion, and the batch stream a training run draws.

Expected pixels come from what a test wrote (or from a closed form such as ITU-R 601-2 luma), never
from the loader's own helpers. No test downloads anything: torchvision is replaced by a fake.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.data
from ddpm.data import DATASET_NAMES, DataWarning, ImageData, load_images
from ddpm.errors import UserError

# A DataWarning nobody asked for fails the test; pytest.warns still catches the expected ones.
pytestmark = pytest.mark.filterwarnings("error::ddpm.data.DataWarning")

# The project's real data sets sit beside the clone, in ../shared/data (skipped when absent).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def save(path: Path, pixels: np.ndarray, fmt: str | None = None) -> Path:
    """Write ``pixels`` (PIL's layout: [H, W] or [H, W, C]) as an image file, making folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def nchw(pixels: np.ndarray) -> torch.Tensor:
    """[N, H, W, C] numpy -> [N, C, H, W] torch, the layout ImageData holds."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def random_uint8(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def luma(r: int, g: int, b: int) -> int:
    """ITU-R 601-2, the grey that PIL's 'L' conversion is documented to give."""
    return round(0.299 * r + 0.587 * g + 0.114 * b)


# ---------------------------------------------------------------------------------------------
# Folders


def write_captioned(folder: Path, rows: list[dict], pixels: np.ndarray) -> Path:
    """Images ``pixels[i]`` as ``{i}.png`` and a metadata.jsonl of ``rows`` (JSON lines)."""
    import json

    for i, p in enumerate(pixels):
        save(folder / f"{i}.png", p)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_a_captioned_folder_keeps_the_metadata_order_and_captions(tmp_path):
    pixels = random_uint8((3, 8, 8, 1))[..., 0]
    rows = [{"file_name": "2.png", "text": "two"}, {"file_name": "0.png", "text": "zero", "left": 0},
            {"file_name": "1.png"}]  # no caption: the empty (unconditional) one
    data = load_images(write_captioned(tmp_path, rows, pixels), 8)
    assert data.captions == ["two", "zero", ""] and data.num_classes == 0
    assert torch.equal(data.images[:, 0], torch.from_numpy(pixels[[2, 0, 1]]))
    assert "captioned" in data.describe()
    other = load_images(write_captioned(tmp_path / "other", [{"file_name": "0.png", "alt": "x"}], pixels[:1]), 8,
                        caption_column="alt")
    assert other.captions == ["x"]


def test_an_unreadable_image_takes_its_caption_with_it(tmp_path):
    folder = write_captioned(tmp_path, [{"file_name": f"{i}.png", "text": f"c{i}"} for i in range(3)],
                             random_uint8((3, 8, 8, 3)))
    (folder / "1.png").write_bytes(b"not a png")
    with pytest.warns(DataWarning, match="skipped 1 unreadable"):
        data = load_images(folder, 8)
    assert data.captions == ["c0", "c2"] and len(data) == 2


@pytest.mark.parametrize("lines,message", [
    (['{"file_name": "9.png", "text": "a"}'], r"metadata.jsonl:1: '9.png' is not a file in"),
    (['{"file_name": "../0.png", "text": "a"}'], r"metadata.jsonl:1: '../0.png' is not a file in"),
    (['{"file_name": "0.png", "text": "a"}', "{oops"], r"metadata.jsonl:2: not a JSON line"),
    (['["0.png"]'], r"metadata.jsonl:1: expected a JSON object with a \"file_name\""),
    (['{"file_name": "0.png", "caption": "a"}'], r"no 'text' caption column \(its fields: caption, file_name\)"),
    (['{"file_name": "0.png", "text": ""}'], r"the caption column 'text' is empty on every line"),
    (['{"file_name": "0.png", "text": 7}'], r"metadata.jsonl:1: the caption 'text' is int, not text"),
    ([""], r"metadata.jsonl: lists no images"),
])
def test_bad_caption_files_are_named(tmp_path, lines, message):
    folder = tmp_path / "data"
    save(folder / "0.png", random_uint8((8, 8)))
    save(tmp_path / "0.png", random_uint8((8, 8)))  # outside the folder: never listed
    (folder / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_images(folder, 8)


def test_rectangular_sizes_cover_then_crop_the_centre(tmp_path):
    # 40x40 to 20 rows by 40 columns: the scale that covers is 1, so the centre rows 10..29 are kept.
    pixels = random_uint8((1, 40, 40, 3))
    save(tmp_path / "square" / "a.png", pixels[0])
    data = load_images(tmp_path / "square", (20, 40))
    assert data.size == (20, 40) and data.image_size == (20, 40)
    assert torch.equal(data.images, nchw(pixels[:, 10:30]))
    # Images of the asked size are kept bit for bit, from a folder and from an array.
    wide = random_uint8((2, 28, 56, 1))
    for i, p in enumerate(wide):
        save(tmp_path / "wide" / f"{i}.png", p[..., 0])
    assert torch.equal(load_images(tmp_path / "wide", (28, 56)).images, nchw(wide))
    np.savez(tmp_path / "wide.npz", x_train=wide[..., 0])
    assert torch.equal(load_images(tmp_path / "wide.npz", (28, 56)).images, nchw(wide))
    assert "28x56x1" in load_images(tmp_path / "wide.npz", (28, 56)).describe()


def test_flat_folder_keeps_pixels_in_path_order_unlabeled(tmp_path):
    pixels = random_uint8((3, 8, 8, 3))
    for i, p in enumerate(pixels):
        save(tmp_path / f"img{i}.png", p)
    (tmp_path / "README.txt").write_text("not an image")

    data = load_images(str(tmp_path), 8)

    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert torch.equal(data.images, nchw(pixels))
    assert data.labels.tolist() == [-1, -1, -1] and data.labels.dtype == torch.int64
    assert (data.num_classes, data.class_names, data.channels, data.image_size) == (0, [], 3, 8)
    assert (len(data), data.skipped) == (3, 0)
    assert data.describe() == f"folder {tmp_path}: 3 images, unlabeled, 8x8x3"


def test_class_subfolders_label_images_at_any_depth_round_robin(tmp_path):
    for rel, value in [("cat/a.png", 10), ("cat/deep/er/b.png", 20), ("dog/c.png", 30),
                       ("dog/d.bmp", 40), ("dog/e.JPG", 50)]:
        save(tmp_path / rel, np.full((4, 4), value, np.uint8))
    # Hidden files and folders (macOS leaves ._ files that are not images) are left out.
    (tmp_path / "dog" / "._c.png").write_bytes(b"\0resource fork")
    save(tmp_path / ".thumbs" / "x.png", np.zeros((4, 4), np.uint8))

    data = load_images(str(tmp_path), 4)

    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    # One of each class in turn, so that a --limit keeps the classes balanced.
    assert data.labels.tolist() == [0, 1, 0, 1, 1]
    assert data.images[:, 0, 0, 0].tolist()[:4] == [10, 30, 20, 40]
    assert abs(int(data.images[4, 0, 0, 0]) - 50) <= 1  # JPEG is lossy
    assert data.skipped == 0
    assert load_images(str(tmp_path), 4, limit=2).labels.tolist() == [0, 1]


@pytest.mark.parametrize("layout", [["a/x.png", "b/y.png", "top.png"],
                                    ["only/x.png", "only/y.png"]])
def test_folder_is_unlabeled_unless_every_image_is_in_one_of_two_or_more_subfolders(
        tmp_path, layout):
    for rel in layout:
        save(tmp_path / rel, np.zeros((4, 4), np.uint8))
    data = load_images(str(tmp_path), 4)
    assert data.num_classes == 0 and data.labels.tolist() == [-1] * len(layout)


def mixed_mode_folder(folder: Path) -> None:
    """One 2x2 image per mode, each written from known values."""
    save(folder / "l.png", np.full((2, 2), 100, np.uint8))
    save(folder / "rgb.png", np.tile(np.array([200, 50, 10], np.uint8), (2, 2, 1)))
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[:, 0] = (10, 20, 30, 255)  # opaque
    rgba[:, 1] = (0, 0, 0, 0)  # transparent black: must come out white, not black
    save(folder / "rgba.png", rgba)
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.putpixel((1, 1), 1)
    palette.save(folder / "p.gif")
    save(folder / "wide.png", np.full((2, 2), 77 * 257, np.uint16))  # 16-bit grey (I;16)


def test_mixed_modes_convert_to_rgb_exactly(tmp_path):
    mixed_mode_folder(tmp_path)
    assert Image.open(tmp_path / "wide.png").mode == "I;16"

    data = load_images(str(tmp_path), 2)  # files sorted: l, p, rgb, rgba, wide

    assert data.channels == 3  # native count: colour wins in a mixed folder
    px = data.images.permute(0, 2, 3, 1)  # [N, H, W, C]
    assert px[0].unique().tolist() == [100]
    assert px[1, :, 0].tolist() == [[10, 20, 30]] * 2
    assert px[1, :, 1].tolist() == [[200, 100, 50]] * 2
    assert px[2].reshape(-1, 3).tolist() == [[200, 50, 10]] * 4
    assert px[3, :, 0].tolist() == [[10, 20, 30]] * 2 and px[3, :, 1].tolist() == [[255] * 3] * 2
    assert px[4].unique().tolist() == [77]  # 77 * 257 / 257, not clipped to 255


def test_mixed_modes_convert_to_grey_by_luma(tmp_path):
    mixed_mode_folder(tmp_path)
    data = load_images(str(tmp_path), 2, channels=1)
    assert data.channels == 1
    px = data.images[:, 0]
    assert px[:, 0, 0].tolist() == [100, luma(10, 20, 30), luma(200, 50, 10), luma(10, 20, 30), 77]
    assert px[3, 0, 1] == 255  # transparent -> white
    # A folder of grey images alone stays grey when channels are not asked for.
    for name in ["p.gif", "rgb.png", "rgba.png"]:
        (tmp_path / name).unlink()
    assert load_images(str(tmp_path), 2).channels == 1


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    for i in range(3):
        save(tmp_path / f"good{i}.png", random_uint8((8, 8, 3), seed=i))
    (tmp_path / "corrupt.png").write_bytes(b"this is not a PNG at all")
    for name, fmt in [("cut.jpg", "JPEG"), ("cut.png", "PNG")]:
        encoded = io.BytesIO()
        Image.fromarray(random_uint8((64, 64, 3))).save(encoded, format=fmt)
        (tmp_path / name).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])

    with pytest.warns(DataWarning, match=r"skipped 3 unreadable image\(s\)") as caught:
        data = load_images(str(tmp_path), 8)

    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert (len(data), data.skipped) == (3, 3)
    assert data.describe().endswith("(3 skipped)")


def test_a_folder_of_only_bad_files_is_a_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of its 2 images could be read \(e\.g\. .*a\.png"):
        load_images(str(tmp_path), 8)


def test_a_folder_without_images_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no image files in it \(0 other"):
        load_images(str(tmp_path), 8)
    (tmp_path / "cifar.tar.gz").write_bytes(b"archive")
    with pytest.raises(UserError, match=r"no image files in it \(1 other file"):
        load_images(str(tmp_path), 8)


def test_small_images_are_upscaled_with_one_warning(tmp_path):
    save(tmp_path / "a_small.png", np.full((4, 4, 3), (77, 10, 200), np.uint8))
    save(tmp_path / "b_big.png", random_uint8((8, 8, 3)))
    with pytest.warns(DataWarning, match=r"upscaled 1 image\(s\) smaller than 8x8"):
        data = load_images(str(tmp_path), 8)
    # Bicubic keeps a flat image flat.
    assert data.images[0].reshape(3, -1).unique(dim=1).tolist() == [[77], [10], [200]]


def test_non_square_images_keep_their_centre(tmp_path):
    columns = np.tile(np.arange(30, dtype=np.uint8) * 8, (10, 1))  # 10 high, 30 wide
    save(tmp_path / "wide.png", columns)
    save(tmp_path / "tall.png", columns.T.copy())
    data = load_images(str(tmp_path), 10)
    centre = (np.arange(10, 20) * 8).tolist()
    assert data.images[1, 0, 0].tolist() == centre  # wide: columns 10..19 survive
    assert data.images[0, 0, :, 0].tolist() == centre  # tall: rows 10..19 survive


def test_large_non_square_images_are_shrunk_then_centre_cropped(tmp_path):
    bands = np.zeros((20, 60, 3), np.uint8)
    bands[:, :15, 0] = 255  # red
    bands[:, 15:45, 1] = 255  # green: the middle half, all that a 10x10 crop of 30x10 keeps
    bands[:, 45:, 2] = 255  # blue
    save(tmp_path / "bands.png", bands)
    data = load_images(str(tmp_path), 10)
    assert data.images[0].reshape(3, -1).unique(dim=1).tolist() == [[0], [255], [0]]


def test_folder_with_train_and_test_subfolders_is_split_by_them(tmp_path):
    for split, n in [("train", 3), ("test", 1)]:
        for cls in ["a", "b"]:
            for i in range(n):
                save(tmp_path / split / cls / f"{i}.png", np.zeros((4, 4), np.uint8))
    train = load_images(str(tmp_path), 4)
    test = load_images(str(tmp_path), 4, split="test")
    assert (len(train), len(test)) == (6, 2)
    assert train.class_names == test.class_names == ["a", "b"]
    with pytest.raises(UserError, match=r"a plain folder has no test split"):
        load_images(str(tmp_path / "train"), 4, split="test")


# ---------------------------------------------------------------------------------------------
# .npz files


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("layout", ["NHW", "NHWC-1", "NCHW-1", "NHWC-3", "NCHW-3"])
def test_npz_layouts_give_exact_pixels(tmp_path, layout):
    channels = 1 if layout == "NHW" else int(layout[-1])
    want = random_uint8((5, channels, 6, 6))  # NCHW
    arrays = {"NHW": want[:, 0], "NHWC": want.transpose(0, 2, 3, 1), "NCHW": want}
    x = arrays[layout.split("-")[0]]
    y = np.array([0, 1, 2, 1, 0], np.uint8)

    data = load_images(write_npz(tmp_path / "d.npz", x_train=x, y_train=y), 6)

    assert torch.equal(data.images, torch.from_numpy(want))
    assert data.labels.tolist() == y.tolist() and data.class_names == ["0", "1", "2"]


def test_npz_channel_axis_is_found_when_both_ends_could_be_channels(tmp_path):
    want = random_uint8((2, 3, 12, 4))  # NCHW 12x4 is closer to square than NHWC 3x12
    data = load_images(write_npz(tmp_path / "d.npz", x_train=want), 4)
    assert data.channels == 3
    assert torch.equal(data.images, load_images(write_npz(
        tmp_path / "e.npz", x_train=want.transpose(0, 2, 3, 1)), 4).images)


def test_npz_rgba_is_composited_on_white(tmp_path):
    x = np.zeros((1, 2, 2, 4), np.uint8)
    x[0, 0] = (10, 20, 30, 255)
    data = load_images(write_npz(tmp_path / "d.npz", x_train=x), 2)
    assert data.images[0, :, 0].T.tolist() == [[10, 20, 30]] * 2
    assert data.images[0, :, 1].unique().tolist() == [255]


@pytest.mark.parametrize("convert", [
    # Off the integers by 0.4 (of 255), so rounding is tested, not truncation.
    lambda u: ((u - np.float32(0.4)).clip(0) / 255).astype(np.float32),  # [0, 1]
    lambda u: (u - 0.4).clip(0),  # [0, 255]
    lambda u: u.astype(np.int64),
])
def test_npz_accepts_floats_and_wide_integers_that_hold_8_bit_values(tmp_path, convert):
    want = random_uint8((3, 4, 4))
    want[0, 0, 0] = 255  # so the [0, 255] float case has values above 1
    data = load_images(write_npz(tmp_path / "d.npz", x_train=convert(want)), 4)
    assert torch.equal(data.images[:, 0], torch.from_numpy(want))


@pytest.mark.parametrize("x, message", [
    (np.linspace(-1, 1, 32).reshape(2, 4, 4), r"x_train \(float64\) has values in \[-1\.0, 1\.0\]"),
    (np.full((2, 4, 4), 1000, np.uint16), r"x_train \(uint16\) has values in \[1000, 1000\]"),
    (np.array(["a", "b"]), r"x_train has shape \(2,\)"),
    (np.zeros((2, 4, 4), np.complex64), r"x_train has dtype complex64"),
    (np.zeros((4, 4), np.uint8), r"x_train has shape \(4, 4\): expected \[N, H, W\]"),
    (np.zeros((2, 5, 6, 7), np.uint8), r"x_train has shape \(2, 5, 6, 7\): no axis of size 1, 3"),
    (np.zeros((0, 4, 4), np.uint8), r"x_train holds no images"),
])
def test_npz_with_bad_images_is_a_user_error_naming_the_key(tmp_path, x, message):
    with pytest.raises(UserError, match=message):
        load_images(write_npz(tmp_path / "d.npz", x_train=x), 4)


@pytest.mark.parametrize("y, message", [
    (np.zeros(4, np.int64), r"y_train has 4 labels but there are 5 images"),
    (np.zeros(5, np.float32), r"y_train has shape \(5,\) and dtype float32"),
    (np.full(5, -1), r"y_train has negative labels"),
])
def test_npz_with_bad_labels_is_a_user_error_naming_the_key(tmp_path, y, message):
    with pytest.raises(UserError, match=message):
        load_images(write_npz(tmp_path / "d.npz", x_train=np.zeros((5, 4, 4), np.uint8),
                              y_train=y), 4)


def test_npz_without_the_split_or_unreadable_is_a_user_error(tmp_path):
    path = write_npz(tmp_path / "d.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UserError, match=r"no x_train array \(found: images\)"):
        load_images(path, 4)
    path = write_npz(tmp_path / "e.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(UserError, match=r"no x_test array"):
        load_images(path, 4, split="test")
    (tmp_path / "f.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"cannot read it as \.npz"):
        load_images(str(tmp_path / "f.npz"), 4)
    pickled = np.array([{"a": 1}, None], dtype=object)
    with pytest.raises(UserError, match=r"g\.npz: .*allow_pickle"):
        load_images(write_npz(tmp_path / "g.npz", x_train=pickled), 4)


def test_npz_test_split_shares_the_classes_of_the_train_split(tmp_path):
    x = random_uint8((6, 4, 4))
    path = write_npz(tmp_path / "d.npz", x_train=x[:4], y_train=np.array([[0], [9], [3], [3]]),
                     x_test=x[4:], y_test=np.array([1, 2]))
    train = load_images(path, 4)
    test = load_images(path, 4, split="test")
    assert torch.equal(test.images[:, 0], torch.from_numpy(x[4:]))
    assert (train.labels.tolist(), test.labels.tolist()) == ([0, 9, 3, 3], [1, 2])
    assert train.num_classes == test.num_classes == 10
    assert test.describe() == f"npz {path}, test split: 2 images, 10 classes, 4x4x1"
    assert len(load_images(path, 4, limit=3)) == 3


def test_npz_and_folder_resize_the_same_way(tmp_path):
    x = random_uint8((2, 12, 9, 3))
    for i, p in enumerate(x):
        save(tmp_path / "folder" / f"{i}.png", p)
    from_npz = load_images(write_npz(tmp_path / "d.npz", x_train=x), 6, channels=1)
    from_folder = load_images(str(tmp_path / "folder"), 6, channels=1)
    assert torch.equal(from_npz.images, from_folder.images)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits


@pytest.mark.slow
def test_digits_scale_exactly_and_split_1500_297():
    datasets = pytest.importorskip("sklearn.datasets")
    raw = datasets.load_digits()
    train = load_images("digits", 8)
    test = load_images("digits", 8, split="test")

    grey = np.concatenate([train.images[:, 0].numpy(), test.images[:, 0].numpy()])
    # round(v * 255 / 16) in integers, halves up: 0 -> 0, 8 -> 128, 16 -> 255.
    assert np.array_equal(grey, (raw.images.astype(int) * 255 + 8) // 16)
    assert (len(train), len(test)) == (1500, 297)
    assert train.labels.tolist() + test.labels.tolist() == raw.target.tolist()
    assert train.class_names == [str(k) for k in range(10)]
    assert train.describe() == "digits (scikit-learn), train split: 1,500 images, 10 classes, 8x8x1"


def test_digits_without_scikit_learn_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UserError, match=r"pip install scikit-learn"):
        load_images("digits", 8)


# ---------------------------------------------------------------------------------------------
# torchvision names (a fake torchvision: nothing is downloaded)


class FakeDataset:
    """Stands in for a torchvision data set class: absent until "downloaded", offline if told."""

    mirrors = ["https://ossci-datasets.s3.amazonaws.com/mnist/"]
    offline = False
    calls: list[tuple[str, dict]] = []

    def __init__(self, root: str, download: bool = False, **kwargs: object) -> None:
        type(self).calls.append((root, {"download": download, **kwargs}))
        marker = Path(root, "downloaded")
        if download:
            if self.offline:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            marker.touch()
        elif not marker.exists():
            raise RuntimeError("Dataset not found. You can use download=True to download it")
        self.make(kwargs)

    def make(self, kwargs: dict) -> None:
        raise NotImplementedError


class FakeMNIST(FakeDataset):
    def make(self, kwargs: dict) -> None:
        n = 6 if kwargs["train"] else 2
        self.data = torch.from_numpy(random_uint8((n, 28, 28)))
        self.targets = torch.arange(n) % 10
        self.classes = [f"{k} - digit" for k in range(10)]


class FakeCIFAR10(FakeDataset):
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def make(self, kwargs: dict) -> None:
        self.data = random_uint8((4, 32, 32, 3))
        self.targets = [3, 1, 4, 1]
        self.classes = [f"class{k}" for k in range(10)]


class FakeCelebA(FakeDataset):
    """Files on disk: no .data, items are (PIL image, target)."""

    def make(self, kwargs: dict) -> None:
        assert kwargs["target_type"] == []

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[Image.Image, None]:
        return Image.new("RGB", (40, 50), (i, 2 * i, 3 * i)), None


@pytest.fixture
def torchvision(monkeypatch, tmp_path):
    """A fake torchvision module in sys.modules, and $DDPM_DATA_DIR under tmp_path."""
    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(MNIST=FakeMNIST, CIFAR10=FakeCIFAR10,
                                            CelebA=FakeCelebA)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(FakeDataset, "calls", [])
    return module


def test_torchvision_mnist_downloads_once_into_the_cache(torchvision, tmp_path):
    data = load_images("mnist", 28)
    again = load_images("MNIST", 28)

    where = str(tmp_path / "cache" / "mnist")
    assert FakeDataset.calls == [
        (where, {"download": False, "train": True}),
        (where, {"download": True, "train": True}),
        (where, {"download": False, "train": True}),  # cached: no network the second time
    ]
    want = random_uint8((6, 28, 28))
    assert torch.equal(data.images[:, 0], torch.from_numpy(want))
    assert torch.equal(again.images, data.images)
    assert data.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.class_names[3] == "3 - digit" and data.num_classes == 10
    assert data.describe() == "mnist (torchvision), train split: 6 images, 10 classes, 28x28x1"


def test_torchvision_root_argument_and_test_split(torchvision, tmp_path):
    data = load_images("mnist", 14, split="test", root=str(tmp_path / "mine"))
    assert FakeDataset.calls[-1] == (str(tmp_path / "mine" / "mnist"),
                                     {"download": True, "train": False})
    assert data.images.shape == (2, 1, 14, 14)


def test_torchvision_cifar10_from_numpy_data(torchvision):
    data = load_images("CIFAR-10", 32)
    assert torch.equal(data.images, nchw(random_uint8((4, 32, 32, 3))))
    assert data.labels.tolist() == [3, 1, 4, 1] and data.class_names[4] == "class4"


def test_torchvision_celeba_from_files_is_unlabeled(torchvision):
    data = load_images("celeba", 16)
    assert FakeDataset.calls[0][1] == {"download": False, "split": "train", "target_type": []}
    assert data.images.shape == (3, 3, 16, 16) and data.num_classes == 0
    assert data.images[2].reshape(3, -1).unique(dim=1).tolist() == [[2], [4], [6]]


def test_torchvision_offline_download_is_a_one_line_user_error(torchvision, monkeypatch):
    monkeypatch.setattr(FakeDataset, "offline", True)
    with pytest.raises(UserError) as caught:
        load_images("mnist", 28)
    message = str(caught.value)
    assert "\n" not in message
    assert "downloading it into" in message and "failed" in message
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in message
    assert "Temporary failure in name resolution" in message
    assert "pass a local folder of images or an .npz" in message


def test_missing_torchvision_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(UserError, match=r"pip install torchvision"):
        load_images("cifar10", 32)


# ---------------------------------------------------------------------------------------------
# What a source may be


def test_unknown_source_is_a_user_error_listing_what_is_accepted(tmp_path):
    with pytest.raises(UserError, match=r"no such file or folder.*" + ", ".join(DATASET_NAMES)):
        load_images(tmp_path / "nope", 8)
    with pytest.raises(UserError, match=r"--data is empty"):
        load_images("", 8)  # not the current folder
    (tmp_path / "pics.tar.gz").write_bytes(b"x")
    with pytest.raises(UserError, match=r"not a folder or an \.npz file"):
        load_images(str(tmp_path / "pics.tar.gz"), 8)


def test_a_folder_named_like_a_data_set_is_reached_by_its_path(torchvision, tmp_path,
                                                               monkeypatch):
    save(tmp_path / "mnist" / "a.png", np.zeros((4, 4), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert load_images("./mnist", 4).source == "folder mnist"
    assert load_images("mnist", 4).source.startswith("mnist (torchvision)")


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 0}, r"--image-size"),
    ({"channels": 2}, r"--channels"),
    ({"split": "val"}, r"split must be one of train, test"),
    ({"limit": 0}, r"--limit"),
])
def test_bad_options_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        load_images("digits", **{"image_size": 8, **kwargs})


def test_too_much_memory_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm.data, "MAX_BYTES", 1000)
    path = write_npz(tmp_path / "d.npz", x_train=np.zeros((20, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"20 images at 8x8x1 .* lower --image-size or a --limit"):
        load_images(path, 8)
    assert len(load_images(path, 8, limit=10)) == 10


# ---------------------------------------------------------------------------------------------
# Batches


def indexed(n: int, size: int = 4, channels: int = 1) -> ImageData:
    """Random images whose label is their index, so batches can be traced back."""
    images = torch.from_numpy(random_uint8((n, channels, size, size), seed=n))
    return ImageData(images, torch.arange(n), [str(i) for i in range(n)], "test")


def take(stream, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(k)]


def test_to_float_maps_0_to_minus_1_and_255_to_1_exactly():
    images = torch.tensor([0, 255, 51, 128], dtype=torch.uint8).view(1, 1, 2, 2)
    data = ImageData(images, torch.tensor([-1]))
    x = data.to_float(0)
    assert x.dtype == torch.float32 and x.shape == (1, 1, 2, 2)
    assert x.flatten()[:2].tolist() == [-1.0, 1.0]
    assert np.allclose(x.flatten()[2:].numpy(), [51 / 127.5 - 1, 0.5 / 127.5], rtol=0, atol=1e-6)


def test_batches_are_deterministic_epochs_that_permute_the_data():
    data = indexed(20)
    first = take(data.batches(5, seed=7), 8)  # 4 steps an epoch: two epochs
    again = take(data.batches(5, seed=7), 8)
    other = take(data.batches(5, seed=8), 8)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    epochs = [torch.cat([y for _, y, _ in first[e * 4:(e + 1) * 4]]) for e in range(2)]
    assert all(sorted(e.tolist()) == list(range(20)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    x, y, idx = first[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, data.to_float(y)) and torch.equal(idx, y)  # indexed(): label i is image i


@pytest.mark.parametrize("start", [0, 3, 4, 9])
def test_resumed_batches_equal_the_tail_of_an_uninterrupted_run(start):
    data = indexed(22)  # 4 steps an epoch (2 images dropped), so resuming crosses epochs
    whole = take(data.batches(5, seed=3, flip=True), 13)
    resumed = take(data.batches(5, seed=3, flip=True, start_step=start), 13 - start)
    for (x, y, _), (rx, ry, _) in zip(whole[start:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("n", [30, 32])
def test_ranks_get_disjoint_equal_shards_that_cover_the_epoch(n):
    data = indexed(n)
    world, batch = 3, 5  # 10 images a rank, 2 steps an epoch
    shards = [torch.cat([y for _, y, _ in take(data.batches(batch, seed=1, rank=r, world_size=world),
                                           2)]) for r in range(world)]
    seen = torch.cat(shards).tolist()
    assert [len(s) for s in shards] == [10, 10, 10]
    assert len(set(seen)) == 30  # disjoint, and all of the epoch when n = 30
    # The shards split the same epoch a single process would see.
    single = torch.cat([y for _, y, _ in take(data.batches(batch, seed=1), n // batch)])
    assert set(seen) <= set(single.tolist())
    assert data.steps_per_epoch(batch, world) == 2


def test_flips_are_deterministic_mirror_images_about_half_the_time():
    data = indexed(400, channels=3)
    (plain, y, _), = take(data.batches(400, seed=5), 1)
    (flipped, fy, _), = take(data.batches(400, seed=5, flip=True), 1)
    (again, _, _), = take(data.batches(400, seed=5, flip=True), 1)
    assert torch.equal(y, fy) and torch.equal(flipped, again)
    is_flipped = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert ((flipped == plain).flatten(1).all(1) | is_flipped).all()
    assert 160 < int(is_flipped.sum()) < 240  # Binomial(400, 1/2): mean 200, sd 10


def test_batches_larger_than_the_data_are_a_user_error():
    data = indexed(10)
    with pytest.raises(UserError, match=r"--batch-size 4 x 3 process\(es\)"):
        next(data.batches(4, seed=0, world_size=3))
    with pytest.raises(ValueError, match=r"rank 2"):
        next(data.batches(2, seed=0, rank=2, world_size=2))


# ---------------------------------------------------------------------------------------------
# Real data, where this machine has it


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist_pairs.tar.gz").exists() or shutil.which("tar") is None,
                    reason="no shared captioned MNIST pairs (or no tar) here")
def test_real_captioned_mnist_pairs(tmp_path):
    import json

    subprocess.run(["tar", "xzf", str(SHARED / "mnist_pairs.tar.gz"), "-C", str(tmp_path),
                    "mnist_pairs/test/metadata.jsonl", *[f"mnist_pairs/test/{i:06d}.png" for i in range(50)]],
                   check=True)
    folder = tmp_path / "mnist_pairs" / "test"
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("\n".join(lines[:50]))
    data = load_images(folder, (28, 56), channels=1)
    assert len(data) == 50 and data.size == (28, 56) and data.captions == [json.loads(x)["text"] for x in lines[:50]]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "mnist.npz").exists(), reason="no shared MNIST here")
def test_real_mnist_npz():
    data = load_images(str(SHARED / "mnist.npz"), 28)
    assert data.images.shape == (60000, 1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.labels).min() > 5000


@pytest.mark.skipif(not (SHARED / "cifar10_jpeg.tar.gz").exists() or not shutil.which("tar"),
                    reason="no shared CIFAR-10 (or no tar) here")
@pytest.mark.slow
def test_real_cifar10_jpeg_tree(tmp_path):
    # GNU tar, because Python's tarfile takes seconds to walk the 60,000 members.
    subprocess.run(["tar", "xzf", str(SHARED / "cifar10_jpeg.tar.gz"), "-C", str(tmp_path),
                    "--wildcards", "*/000[0-2].jpg"], check=True)
    train = load_images(str(tmp_path), 32)
    test = load_images(str(tmp_path), 16, split="test")
    assert train.images.shape == (30, 3, 32, 32) and len(test) == 30
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]
    assert train.labels[:10].tolist() == list(range(10))


def test_native_size_when_no_image_size_is_given(tmp_path):
    """image_size=None keeps the source's own size: arrays' side, a folder's first image's shorter side."""
    x = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    np.savez(tmp_path / "a.npz", x_train=x)
    data = load_images(tmp_path / "a.npz", None)
    assert data.image_size == 6 and torch.equal(data.images[:, 0], torch.from_numpy(x))
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (10, 7), (1, 2, 3)).save(folder / "a.png")
    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / "b.png")
    assert load_images(folder, None).image_size == 7
