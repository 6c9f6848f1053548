"""The bad-data matrix for bring-your-own image folders and lists: each broken folder, list or
image stops the job's data loading with one line naming the file (and line); the harmless
oddities data scientists meet (hidden and empty folders, a BOM, a header, 16-bit images) are
handled as they expect, with one warning line where something is ignored."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from robustft.data import readers
from robustft.data.datasets import as_torch_dataset
from robustft.data.registry import ImageFiles, dataset_options, load_split
from robustft.models import Preprocess

PRE = Preprocess(input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
CLASSES = ("ant", "cow")


def save_png(path, *, value=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def write_folders(root, *, train=3, test=2):
    """root/train/<class>/<k>.png and root/test/<class>/<k>.png."""
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(CLASSES):
            for k in range(count):
                save_png(root / split / name / f"{k}.png", value=40 * label + k)
    return root


def options(root, **settings):
    own = {"type": "imagefolder", "root": str(root), "splits": {"train": "train", "test": "test"}}
    own.update(settings)
    return dataset_options({"dataset_settings": {"mine": own}}, "mine")


def load(root, split, **settings):
    return load_split(dataset="mine", split=split, root={}, options=options(root, **settings))


def decode(path):
    """What a job does with a listed image: the split as a torch Dataset, one item read."""
    files = ImageFiles(paths=(str(path),), labels=np.zeros(1, np.int64), class_names=("a",))
    return as_torch_dataset(files, preprocess=PRE, transform="resize")[0]


def write_list(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# --- the matrix: each case builds a broken dataset and returns the step that reads it ----------


def duplicate_line(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\ntest/cow/0.png,cow\ntest/ant/0.png,ant\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def duplicate_spelt_two_ways(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\n\ntest/./ant/../ant/0.png,ant\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def train_image_in_test_list(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\ntrain/cow/1.png,cow\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def train_image_linked_into_ood_folder(root, _):
    (root / "night" / "ant").mkdir(parents=True)
    save_png(root / "night" / "ant" / "a.png")
    os.symlink(root / "train" / "ant" / "0.png", root / "night" / "ant" / "b.png")
    # The train job finds it too: every job of the dataset checks every split it uses.
    return lambda: load(root, "train", splits={"train": "train", "test": "test", "night": "night"})


def image_in_two_ood_lists(root, _):
    for k in range(2):
        save_png(root / "pool" / f"{k}.png", value=k)
    write_list(root / "fog.csv", "pool/0.png,ant\n")
    write_list(root / "rain.csv", "pool/1.png,cow\npool/0.png,ant\n")
    splits = {"train": "train", "test": "test", "fog": "fog.csv", "rain": "rain.csv"}
    return lambda: load(root, "fog", splits=splits)


def latin1_list(root, _):
    (root / "test" / "cow" / "café.png").write_bytes((root / "test/cow/0.png").read_bytes())
    write_list(root / "t.csv", "path,label\ntest/ant/0.png,ant\ntest/cow/café.png,cow\n", "latin-1")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def header_on_a_later_line(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\ntest/cow/0.png,cow\npath,label\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def three_cells(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\ntest/cow/0,1.png,cow\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def unknown_label(root, _):
    write_list(root / "t.csv", "test/ant/0.png,ant\ntest/cow/0.png,bee\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def label_id_out_of_range(root, _):
    write_list(root / "t.csv", "filepath,class\ntest/ant/0.png,0\n\ntest/cow/0.png,7\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def misspelt_first_label(root, _):
    # Not taken for a header: its path is an image file, so the typo is reported.
    write_list(root / "t.csv", "test/ant/0.png,aant\ntest/cow/0.png,cow\n")
    return lambda: load(root, "test", splits={"train": "train", "test": "t.csv"})


def unknown_duplicates_mode(root, _):
    return lambda: load(root, "test", duplicates="warns")


def only_hidden_and_empty_folders(root, _):
    for name in ("train", "test"):
        for sub in (".ipynb_checkpoints", "__MACOSX", "empty"):
            (root / "x" / name / sub).mkdir(parents=True)
        save_png(root / "x" / name / ".ipynb_checkpoints" / "0.png")
    return lambda: load(root / "x", "test")


def split_missing(root, _):
    return lambda: load(root, "night", splits={"train": "train", "test": "test", "night": "n"})


def decompression_bomb(root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    save_png(root / "big.png", size=(20, 20))  # 400 pixels: over twice the limit
    return lambda: decode(root / "big.png")


def above_bomb_warning_limit(root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    save_png(root / "big.png", size=(15, 10))  # 150 pixels: PIL only warns
    return lambda: decode(root / "big.png")


def truncated_image(root, _):
    save_png(root / "cut.png", size=(64, 64))
    data = (root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    return lambda: decode(root / "cut.png")


def text_named_jpg(root, _):
    (root / "notes.jpg").write_text("not an image\n")
    return lambda: decode(root / "notes.jpg")


def listed_image_missing(root, _):
    return lambda: decode(root / "test" / "ant" / "9.png")


def flat_split_folder(root, _):
    (root / "night").mkdir()
    save_png(root / "night" / "0.png")
    return lambda: load(root, "night", splits={"train": "train", "test": "test", "night": "night"})


def split_is_an_image(root, _):
    return lambda: load(root, "test", splits={"train": "train", "test": "test/ant/0.png"})


def train_is_a_spreadsheet(root, _):
    (root / "train.xlsx").write_bytes(b"PK\x03\x04")
    return lambda: load(root, "test", splits={"train": "train.xlsx", "test": "test"})


# name: (build, what the one line must name (besides the file))
CASES = {
    "list: same path twice": (duplicate_line, ["t.csv:3", "test/ant/0.png", "1 duplicate"]),
    "list: same path spelt two ways": (duplicate_spelt_two_ways, ["t.csv:3", "first at"]),
    "train image in the test list": (train_image_in_test_list, ["t.csv:2", "split 'train'"]),
    "train image linked into an OOD folder": (
        train_image_linked_into_ood_folder,
        ["night/ant/b.png", "split 'train'", "1 image(s)"],
    ),
    "image in two OOD lists": (image_in_two_ood_lists, ["rain.csv:2", "split 'fog'"]),
    "list not UTF-8": (latin1_list, ["t.csv:3", "UTF-8"]),
    "header on a later line": (header_on_a_later_line, ["t.csv:3", "header"]),
    "row with three cells": (three_cells, ["t.csv:2", "3 cells"]),
    "unknown label": (unknown_label, ["t.csv:2", "'bee'", "ant, cow"]),
    "label id out of range": (label_id_out_of_range, ["t.csv:4", "'7'", "0..1"]),
    "misspelt label on the first line": (misspelt_first_label, ["t.csv:1", "'aant'"]),
    "unknown duplicates mode": (unknown_duplicates_mode, ["dataset_settings.mine.duplicates"]),
    "only hidden and empty folders": (only_hidden_and_empty_folders, ["no class folders"]),
    "split missing": (split_missing, ["'night'", "dataset_settings.mine.splits.night"]),
    "decompression bomb": (decompression_bomb, ["big.png", "too large"]),
    "above the bomb warning limit": (above_bomb_warning_limit, ["big.png", "too large"]),
    "truncated image": (truncated_image, ["cut.png", "truncated"]),
    "text file named .jpg": (text_named_jpg, ["notes.jpg", "not a readable image"]),
    "listed image missing": (listed_image_missing, ["9.png", "missing"]),
    "split folder of images, no classes": (flat_split_folder, ["night", "the flat layout"]),
    "split is an image file": (split_is_an_image, ["0.png", "neither a folder", "splits.test"]),
    "train is a spreadsheet": (train_is_a_spreadsheet, ["train.xlsx", ".csv/.txt list"]),
}


@pytest.mark.parametrize(("build", "named"), CASES.values(), ids=CASES.keys())
def test_bad_data_fails_with_one_line_naming_the_file(tmp_path, monkeypatch, build, named):
    root = write_folders(tmp_path / "mine")
    step = build(root, monkeypatch)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        step()
    message = str(error.value)
    assert "\n" not in message, message
    assert str(tmp_path) in message or "dataset_settings" in message, message
    for part in named:
        assert part in message, message


# --- what is accepted, as data scientists expect ------------------------------------------------


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_hidden_and_empty_folders_and_hidden_files_are_not_classes_or_images(tmp_path, caplog):
    root = write_folders(tmp_path / "mine")
    for split in ("train", "test"):
        (root / split / "empty").mkdir()
        (root / split / "__MACOSX").mkdir()
        save_png(root / split / ".ipynb_checkpoints" / "0.png")
        (root / split / "ant" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (root / split / "ant" / "._0.png").write_bytes(b"\0\5\26\7")  # AppleDouble
    with caplog.at_level(logging.WARNING):
        train, test = load(root, "train"), load(root, "test")
    assert train.class_names == CLASSES
    assert len(test.paths) == 4 and not any("/." in p for p in test.paths)
    lines = warnings_of(caplog)
    assert len(lines) == 2, lines  # one line per split folder, however often it is read
    assert all("ipynb_checkpoints" in line and "__MACOSX" in line for line in lines)
    assert all("empty" in line for line in lines)
    assert any(str(root / "train") in line for line in lines)
    assert any(str(root / "test") in line for line in lines)
    # The ImageNet-family readers use the same rules.
    assert readers.list_class_folders(root / "train") == list(CLASSES)
    index = {name: i for i, name in enumerate(CLASSES)}
    assert len(readers.read_class_folders(root / "test", class_to_label=index).paths) == 4


def test_images_in_subfolders_of_a_class_count_and_other_files_are_named(tmp_path, caplog):
    """As torchvision's ImageFolder: a class folder's images may sit in subfolders (one per
    patient, per session); files that are not images by extension (a GIF, notes) are skipped
    with one warning line that counts them, never silently."""
    root = write_folders(tmp_path / "mine")
    save_png(root / "train" / "ant" / "patient 7" / "scan.PNG")
    save_png(root / "train" / "cow" / "a" / "b" / "deep.png")
    save_png(root / "train" / "cow" / ".cache" / "hidden.png")
    Image.new("P", (8, 8)).save(root / "train" / "ant" / "clip.gif")
    (root / "train" / "cow" / "notes.txt").write_text("taken at night")
    os.symlink(root / "train" / "cow", root / "train" / "cow" / "a" / "loop")
    with caplog.at_level(logging.WARNING):
        train, val = load(root, "train"), load(root, "val")  # val is carved from train
    listed = [os.path.relpath(p, root / "train") for p in train.paths + val.paths]
    assert "ant/patient 7/scan.PNG" in listed and "cow/a/b/deep.png" in listed
    assert not any("hidden" in p or p.endswith((".gif", ".txt")) for p in listed)
    assert len(listed) == len(set(listed))  # the link back to `cow` lists nothing twice
    lines = warnings_of(caplog)
    assert len(lines) == 1, lines
    assert "skipping 2 files" in lines[0] and ".gif ×1" in lines[0] and ".txt ×1" in lines[0]
    assert str(root / "train") in lines[0]
    # A class folder holding images only in subfolders is a class, not an empty folder.
    save_png(root / "test" / "emu" / "day1" / "0.png")
    assert "emu" in readers.list_class_folders(root / "test")


@pytest.mark.parametrize("header", ["filepath,class", "path,label", "Image,Target", None])
def test_lists_with_a_bom_a_header_and_blank_lines(tmp_path, header):
    root = write_folders(tmp_path / "mine")
    head = f"{header}\r\n" if header else ""
    rows = "train/ant/0.png,ant\r\n\r\ntrain/cow/0.png,cow\r\ntrain/ant/1.png,ant\r\n"
    write_list(root / "train.csv", "\ufeff" + head + rows)
    write_list(root / "test.csv", "\ufeff" + head + "test/cow/1.png,1\n\n")
    splits = {"train": "train.csv", "test": "test.csv"}
    train = load(root, "train", splits=splits, val_fraction=0.5)
    val = load(root, "val", splits=splits, val_fraction=0.5)
    assert train.class_names == CLASSES  # the header's label is not a class
    assert len(train.paths) + len(val.paths) == 3
    assert load(root, "test", splits=splits).labels.tolist() == [1]


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        # DomainNet's, Office-Home's and VisDA's lists: `path label` (ids), a space in a path.
        ("list.txt", ["test/ant/0.png 0", "test/ant/my ant 1.png 0", "test/cow/0.png\t1"]),
        ("list.txt", ["test/ant/0.png ant", "test/ant/my ant 1.png ant", "test/cow/0.png cow"]),
        ("list.csv", ["path;label", "test/ant/0.png;ant", "test/ant/my ant 1.png;ant", "x;cow"]),
        ("list.csv", ["test/ant/0.png\tant", "test/ant/my ant 1.png\tant", "x\tcow"]),
    ],
)
def test_lists_separated_by_spaces_semicolons_or_tabs(tmp_path, name, rows):
    root = write_folders(tmp_path / "mine")
    save_png(root / "test" / "ant" / "my ant 1.png")
    rows = [row.replace("x", "test/cow/0.png", 1) if row.startswith("x") else row for row in rows]
    write_list(root / name, "\n".join(rows) + "\n")
    test = load(root, "test", splits={"train": "train", "test": name})
    listed = [os.path.relpath(p, root) for p in test.paths]
    assert listed == ["test/ant/0.png", "test/ant/my ant 1.png", "test/cow/0.png"]
    assert test.labels.tolist() == [0, 0, 1]


def test_duplicates_warn_keeps_them_with_one_line_each(tmp_path, caplog):
    root = write_folders(tmp_path / "mine")
    write_list(root / "t.csv", "test/ant/0.png,ant\ntrain/cow/1.png,cow\ntest/ant/0.png,ant\n")
    with caplog.at_level(logging.WARNING):
        test = load(root, "test", splits={"train": "train", "test": "t.csv"}, duplicates="warn")
    assert len(test.paths) == 3
    lines = warnings_of(caplog)
    assert len(lines) == 2, lines
    assert any(f"{root / 't.csv'}:3" in line and "1 duplicate" in line for line in lines)
    assert any(f"{root / 't.csv'}:2" in line and "split 'train'" in line for line in lines)


def save_high_depth(path, values, mode):
    image = Image.fromarray(values)
    if mode == "I;16B":
        image = Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes())
    assert image.mode == mode
    image.save(path)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix", "dtype", "top"),
    [
        ("I;16", ".png", np.uint16, 4095),  # 12-bit data in a 16-bit PNG
        ("I;16B", ".tif", np.uint16, 4095),
        ("I", ".tif", np.int32, 100_000),
        ("F", ".tif", np.float32, 0.5),  # a 32-bit float TIFF in [0, 0.5]
    ],
)
def test_high_bit_depth_images_are_rescaled_by_their_range(tmp_path, mode, suffix, dtype, top):
    values = (np.arange(16 * 16).reshape(16, 16) / (16 * 16 - 1) * top).astype(dtype)
    path = save_high_depth(tmp_path / f"deep{suffix}", values, mode)
    image, _ = decode(path)  # uint8 (3, 16, 16), at its own size: not resampled
    assert image.min() <= 5 and image.max() >= 250
    assert (image == 255).float().mean() < 0.1  # not clipped to white
    flat = save_high_depth(tmp_path / f"flat{suffix}", np.full((8, 8), top, dtype=dtype), mode)
    assert int(decode(flat)[0].max()) == 0  # a constant image has no range: zeros
