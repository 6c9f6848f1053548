"""Tests of the toyshift generator and its HDF5 files, at tiny sizes (a few seconds in all)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from robustft.data import toyshift, toyshift_format
from robustft.data.registry import (
    BUILTIN,
    BUILTIN_SETTINGS,
    GENERATED,
    SETTINGS,
    ImageArrays,
    dataset_options,
    load_split,
)
from robustft.data.toyshift_format import DOMAINS, ImageSplit

TINY: dict[str, Any] = {
    "image_size": 16,
    "pretrain_classes": 3,
    "task_classes": 2,
    "pretrain_images_per_class": {"real": 6, "clipart": 3, "painting": 3, "sketch": 3},
    "train_per_class": 4,
    "val_per_class": 2,
    "test_per_class": 3,
    "ood_per_class": 2,
}
TASK_SPLITS = ["train", "val", "test", "real", "clipart", "painting"]
Splits = tuple[dict[str, ImageSplit], dict[str, ImageSplit]]


def generate(seed: int = 0, **overrides: Any) -> Splits:
    return toyshift.generate_toyshift(seed=seed, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny() -> Splits:
    return generate()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("toyshift")
    pretrain, task = folder / "pretrain.h5", folder / "task.h5"
    toyshift.write_toyshift(pretrain_path=pretrain, task_path=task, seed=0, **TINY)
    return pretrain, task


def copy_of(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes())
    return target


def assert_same(a: dict[str, ImageSplit], b: dict[str, ImageSplit]) -> None:
    assert list(a) == list(b)
    for name in a:
        for field in ("images", "labels", "domains"):
            x, y = getattr(a[name], field), getattr(b[name], field)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), f"{name}.{field} differs"


# --------------------------------------------------------------------------- generation


def test_same_seed_gives_identical_arrays(tiny: Splits) -> None:
    again = generate()
    assert_same(tiny[0], again[0])
    assert_same(tiny[1], again[1])


def test_different_seed_gives_different_images(tiny: Splits) -> None:
    _, task = generate(seed=1)
    assert not np.array_equal(task["train"].images, tiny[1]["train"].images)


def test_split_names_shapes_and_dtypes(tiny: Splits) -> None:
    pretrain, task = tiny
    assert list(pretrain) == ["train", "val"]
    assert list(task) == TASK_SPLITS
    for splits, n_classes in ((pretrain, 3), (task, 2)):
        for split in splits.values():
            assert split.images.dtype == np.uint8
            assert split.images.shape == (len(split), 16, 16, 3)
            assert split.labels.dtype == np.int64 and split.labels.shape == (len(split),)
            assert split.domains.dtype == np.int64 and split.domains.shape == (len(split),)
            assert split.labels.min() >= 0 and split.labels.max() < n_classes
    # Sizes: per class times classes; the pretraining val split is carved out of each domain.
    assert [len(task[s]) for s in TASK_SPLITS] == [8, 4, 6, 4, 4, 4]
    assert len(pretrain["train"]) + len(pretrain["val"]) == 3 * (6 + 3 + 3 + 3)
    assert set(pretrain["val"].domains.tolist()) == set(range(len(DOMAINS)))


def test_every_class_equally_often(tiny: Splits) -> None:
    _, task = tiny
    for split in task.values():
        counts = np.bincount(split.labels, minlength=2)
        assert counts.min() == counts.max()


def test_domains_of_each_split(tiny: Splits) -> None:
    pretrain, task = tiny
    assert set(pretrain["train"].domains.tolist()) == set(range(len(DOMAINS)))
    for name in ("train", "val", "test"):
        assert set(task[name].domains.tolist()) == {DOMAINS.index("sketch")}
    for name in ("real", "clipart", "painting"):
        assert set(task[name].domains.tolist()) == {DOMAINS.index(name)}


def test_sketch_is_grey_and_the_others_are_coloured(tiny: Splits) -> None:
    _, task = tiny
    sketch = task["train"].images.astype(int)
    assert (sketch[..., 0] == sketch[..., 1]).all() and (sketch[..., 1] == sketch[..., 2]).all()
    for name in ("real", "clipart", "painting"):
        rgb = task[name].images.astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 1]).mean() > 5


def test_resizing_one_split_leaves_the_others_alone(tiny: Splits) -> None:
    _, task = generate(ood_per_class=5, test_per_class=1)
    assert_same({"train": tiny[1]["train"]}, {"train": task["train"]})
    assert_same({"val": tiny[1]["val"]}, {"val": task["val"]})


@pytest.mark.parametrize("id_domain", ["sketch", "real"])
def test_baseline_pool_adds_one_split_and_changes_no_other(tiny: Splits, id_domain: str) -> None:
    plain = tiny if id_domain == "sketch" else generate(id_domain=id_domain)
    pretrain, task = generate(id_domain=id_domain, baseline_per_class=5)
    # Every image the other stages read is the same byte for byte: the pool only adds.
    assert_same(plain[0], pretrain)
    assert_same(plain[1], {name: task[name] for name in plain[1]})
    assert list(task) == [*plain[1], toyshift.BASELINE_SPLIT]
    pool = task[toyshift.BASELINE_SPLIT]
    assert len(pool) == 2 * 5
    assert np.bincount(pool.labels).tolist() == [5, 5]
    assert set(pool.domains.tolist()) == {DOMAINS.index(id_domain)}
    # Fresh draws: none of them is an image of ID train, val or test.
    seen = {image.tobytes() for name in ("train", "val", "test") for image in task[name].images}
    assert not seen & {image.tobytes() for image in pool.images}


def test_baseline_pool_is_written_and_read(tmp_path: Path) -> None:
    pretrain, task = tmp_path / "pretrain.h5", tmp_path / "task.h5"
    toyshift.write_toyshift(
        pretrain_path=pretrain, task_path=task, seed=0, baseline_per_class=3, **TINY
    )
    assert toyshift_format.list_splits(task) == [*TASK_SPLITS, toyshift.BASELINE_SPLIT]
    meta = toyshift_format.read_metadata(task)
    assert meta["generator_params"]["baseline_per_class"] == 3
    assert meta["splits"][toyshift.BASELINE_SPLIT] == 6
    loaded = load_split(dataset="toyshift", split=toyshift.BASELINE_SPLIT, root=tmp_path)
    assert isinstance(loaded, ImageArrays) and len(loaded.labels) == 6


def test_other_id_domain() -> None:
    _, task = generate(id_domain="real")
    assert list(task) == ["train", "val", "test", "clipart", "sketch", "painting"]
    assert set(task["train"].domains.tolist()) == {DOMAINS.index("real")}


@pytest.mark.parametrize(
    "bad",
    [
        {"id_domain": "photo"},
        {"pretrain_images_per_class": {"photo": 3}},
        {"train_per_class": -1},
        {"baseline_per_class": -2},
        {"task_classes": 0},
        {"image_size": 4},
    ],
)
def test_invalid_arguments(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(**bad)


# --------------------------------------------------------------------------- files


def test_round_trip(files: tuple[Path, Path], tiny: Splits) -> None:
    pretrain_path, task_path = files
    for path, splits in ((pretrain_path, tiny[0]), (task_path, tiny[1])):
        assert toyshift_format.list_splits(path) == list(splits)
        assert_same(splits, {name: toyshift_format.read_split(path, name) for name in splits})
    meta = toyshift_format.read_metadata(task_path)
    assert meta["format"] == toyshift.FORMAT
    assert meta["seed"] == 0 and meta["image_size"] == 16 and meta["id_domain"] == "sketch"
    assert meta["domains"] == list(DOMAINS)
    assert meta["generator_params"]["ood_per_class"] == 2
    assert meta["splits"]["train"] == 8


def test_class_names_are_disjoint(files: tuple[Path, Path]) -> None:
    pretrain_names = toyshift_format.class_names(files[0])
    task_names = toyshift_format.class_names(files[1])
    assert len(pretrain_names) == 3 and len(task_names) == 2
    assert not set(pretrain_names) & set(task_names)


def test_write_leaves_no_temporary_files(files: tuple[Path, Path]) -> None:
    assert sorted(p.name for p in files[0].parent.iterdir()) == ["pretrain.h5", "task.h5"]


def test_misspelt_keyword_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        toyshift.write_toyshift(
            pretrain_path=tmp_path / "p.h5", task_path=tmp_path / "t.h5", seed=0, ood_per_clas=3
        )
    assert list(tmp_path.iterdir()) == []


def test_flipped_label_bytes_are_detected(files: tuple[Path, Path], tmp_path: Path) -> None:
    path = copy_of(files[1], tmp_path)
    with h5py.File(path, "r") as f:
        offset = f["train/labels"].id.get_offset()  # contiguous, uncompressed
    assert offset is not None
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01  # label 0 changes to another valid class
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*train.*sha256"):
        toyshift_format.read_split(path, "train")
    toyshift_format.read_split(path, "val")  # the other splits still read


def test_edited_image_is_detected(files: tuple[Path, Path], tmp_path: Path) -> None:
    path = copy_of(files[0], tmp_path)
    with h5py.File(path, "r+") as f:
        images = f["val/images"]
        images[0, 0, 0, 0] = (int(images[0, 0, 0, 0]) + 1) % 256
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*val"):
        toyshift_format.read_split(path, "val")


def test_out_of_range_label_is_detected(files: tuple[Path, Path], tmp_path: Path) -> None:
    path = copy_of(files[1], tmp_path)
    with h5py.File(path, "r+") as f:
        f["test/labels"][0] = 7
    with pytest.raises(ValueError, match=r"test.*labels outside"):
        toyshift_format.read_split(path, "test")


def test_missing_dataset_is_named(files: tuple[Path, Path], tmp_path: Path) -> None:
    path = copy_of(files[1], tmp_path)
    with h5py.File(path, "r+") as f:
        del f["real/labels"]
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*real.*labels"):
        toyshift_format.read_split(path, "real")


def test_missing_split_lists_the_available_ones(files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match=r"no split 'ood'; available: train, val, test, real"):
        toyshift_format.read_split(files[1], "ood")


def test_foreign_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        toyshift_format.read_split(path, "train")
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("hello")
    with pytest.raises(ValueError, match=re.escape(str(not_hdf5))):
        toyshift_format.list_splits(not_hdf5)


def test_the_generator_still_offers_the_readers() -> None:
    # Callers that read through `toyshift` (the generator) get the format module's functions.
    for name in ("read_split", "list_splits", "read_metadata", "class_names", "DOMAINS"):
        assert getattr(toyshift, name) is getattr(toyshift_format, name)


def test_toyshift_is_a_generated_registry_entry() -> None:
    toy = GENERATED["toyshift"]
    assert BUILTIN[0] == "toyshift"
    assert toy.generated and not any(setting.generated for setting in SETTINGS.values())
    # Baseline models train on the in-memory settings (the workflow's BASELINE_DATASETS).
    in_memory = [name for name, setting in BUILTIN_SETTINGS.items() if setting.in_memory]
    assert in_memory == ["toyshift", "cifar10_stl", "cifar10_cifar101"]
    assert toy.task_file == "resources/datasets/toyshift/task.h5"
    assert toy.domains == DOMAINS


@pytest.mark.parametrize(
    ("id_domain", "ood"),
    [
        (None, ["real", "clipart", "painting"]),  # the schema's default: sketch
        ("sketch", ["real", "clipart", "painting"]),
        ("real", ["clipart", "sketch", "painting"]),
    ],
)
def test_ood_splits_are_the_other_domains(id_domain: str | None, ood: list[str]) -> None:
    config = {"toyshift": {"id_domain": id_domain}} if id_domain else {}
    assert GENERATED["toyshift"].ood_splits(config) == ood
    options = dataset_options(config, "toyshift")
    assert options["ood_splits"] == ood
    assert (options["train_transform"], options["eval_transform"]) == ("resize", "resize")


def test_the_registry_reads_every_split_of_the_task_file(files: tuple[Path, Path]) -> None:
    task = files[1]
    splits = toyshift_format.list_splits(task)
    assert splits == ["train", "val", "test", *GENERATED["toyshift"].ood_splits({})]
    for split in splits:
        loaded = load_split(dataset="toyshift", split=split, root=task.parent)
        stored = toyshift_format.read_split(task, split)
        assert isinstance(loaded, ImageArrays)
        np.testing.assert_array_equal(loaded.images, stored.images)
        np.testing.assert_array_equal(loaded.labels, stored.labels)
        assert loaded.class_names == tuple(toyshift_format.class_names(task))
