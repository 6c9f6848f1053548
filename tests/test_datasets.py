"""The readers and the registry on small files in each real dataset's exact on-disk format."""

from __future__ import annotations

import fake_data
import numpy as np
import pytest
import torch

from robustft.data import readers
from robustft.data.datasets import ArrayImageDataset, as_torch_dataset
from robustft.data.registry import (
    ImageArrays,
    ImageFiles,
    carve_val,
    dataset_options,
    load_split,
)
from robustft.data.sources import SOURCES, official_classes
from robustft.evaluate import subset_accuracy
from robustft.models import Preprocess


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return fake_data.write_all(tmp_path_factory.mktemp("data"))


# The small copies hold fewer classes and images than the real datasets: allowed knowingly.
ALLOW_ALL = {"allow_subset": list(SOURCES)}


def load(dataset, split, paths, **settings):
    config = {**ALLOW_ALL, "dataset_settings": {dataset: settings}} if settings else ALLOW_ALL
    return load_split(
        dataset=dataset,
        split=split,
        root=paths,
        options=dataset_options(config, dataset),
    )


PRE32 = Preprocess(input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


# --- CIFAR-10, STL-10, CIFAR-10.1 ---------------------------------------------------------


def test_cifar10_binary_records_keep_images_and_labels_paired(paths):
    train = load("cifar10_stl", "train", paths)
    val = load("cifar10_stl", "val", paths)
    test = load("cifar10_stl", "test", paths)
    assert isinstance(train, ImageArrays)
    per_class = 5 * fake_data.CIFAR_PER_CLASS_PER_BATCH  # 10 per class over 5 batches
    assert len(train.labels) + len(val.labels) == 10 * per_class
    assert len(val.labels) == 10  # 10% of each class's 10 images
    assert np.bincount(val.labels).tolist() == [1] * 10
    assert len(test.labels) == 10 * fake_data.CIFAR_TEST_PER_CLASS
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    for data in (train, val, test):
        # red encodes the label; blue varies along rows: channel-major, row-major records.
        assert (data.images[:, 0, 0, 0] == 20 * data.labels).all()
        assert (data.images[0, :, 0, 2] == np.arange(32) * 4).all()
    assert train.class_names[1] == "automobile"


def test_val_carving_is_fixed_by_the_seed_and_disjoint():
    labels = np.repeat(np.arange(4), 25)
    train_a, val_a = carve_val(labels, fraction=0.2, seed=0)
    train_b, val_b = carve_val(labels, fraction=0.2, seed=0)
    _, val_c = carve_val(labels, fraction=0.2, seed=1)
    assert (val_a == val_b).all() and (train_a == train_b).all()
    assert not (set(val_a) & set(train_a)) and len(val_a) + len(train_a) == 100
    assert np.bincount(labels[val_a]).tolist() == [5, 5, 5, 5]
    assert set(val_a) != set(val_c)


def test_stl_labels_map_into_cifar_and_monkeys_are_dropped(paths):
    stl = load("cifar10_stl", "stl", paths)
    n = fake_data.STL_PER_CLASS
    assert len(stl.labels) == 9 * n  # 10 classes minus monkey
    # red = 20 × STL file label (1..10); map [0,2,1,3,4,5,7,-1,8,9] of file label − 1.
    file_labels = stl.images[:, 0, 0, 0] // 20
    assert 8 not in file_labels  # monkey
    expected = {1: 0, 2: 2, 3: 1, 4: 3, 5: 4, 6: 5, 7: 7, 9: 8, 10: 9}
    assert [expected[int(f)] for f in file_labels] == stl.labels.tolist()
    assert stl.images.shape[1:] == (96, 96, 3)
    assert (stl.images[0, :, 0, 2] == np.arange(96)).all()  # column-major file, rows intact


def test_cifar101_npy_pair(paths):
    data = load("cifar10_cifar101", "cifar101", paths)
    assert len(data.labels) == 20 and (data.images[:, 0, 0, 0] == 20 * data.labels).all()


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "d.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "l.npy", np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match=r"d\.npy"):
        readers.read_npy_pair(tmp_path / "d.npy", tmp_path / "l.npy")


def test_truncated_cifar_batch_is_one_line_naming_the_file(tmp_path):
    fake_data.write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"test_batch\.bin") as error:
        load("cifar10_stl", "test", {"cifar10": str(tmp_path)})
    assert "\n" not in str(error.value)


# --- DomainNet -------------------------------------------------------------------------


def test_domainnet_ids_come_from_the_list_files(paths):
    train = load("domainnet", "train", paths)
    assert isinstance(train, ImageFiles)
    assert train.class_names == ("bird", "apple", "cat")  # not alphabetical
    for split in ("train", "val", "test", "real", "painting", "clipart"):
        data = load("domainnet", split, paths)
        for path, label in zip(data.paths, data.labels, strict=True):
            assert f"/{fake_data.DOMAINNET_CLASSES[int(label)]}/" in path
    assert len(load("domainnet", "val", paths).labels) == 3  # 10% of 4, at least 1 per class
    assert len(load("domainnet", "test", paths).labels) == 3 * 2
    assert all("/clipart/" in p for p in load("domainnet", "clipart", paths).paths)


def test_domainnet_conflicting_ids_are_an_error(tmp_path):
    root = fake_data.write_domainnet(tmp_path / "dn")
    listing = root / "txt" / "real_test_mini.txt"
    listing.write_text(
        listing.read_text().replace(
            "real/apple/real_test_000.jpg 1", "real/apple/real_test_000.jpg 2"
        )
    )
    with pytest.raises(ValueError, match=r"real_test_mini\.txt"):
        load("domainnet", "real", {"domainnet": str(root)})


# --- ImageNet and its shifts, BREEDS ---------------------------------------------------------


def test_imagenet_r_and_a_are_scored_over_their_classes(paths):
    wnids = official_classes("imagenet")
    r = load("imagenet", "r", paths)
    a = load("imagenet", "a", paths)
    # Their official 200 classes, though the small copies hold 3 and 2 of them.
    assert r.class_subset == tuple(sorted(wnids.index(w) for w in official_classes("imagenet_r")))
    assert a.class_subset == tuple(sorted(wnids.index(w) for w in official_classes("imagenet_a")))
    assert len(r.class_subset) == len(a.class_subset) == 200
    assert set(r.labels.tolist()) == {1, 2, 4}
    assert set(a.labels.tolist()) == {wnids.index(w) for w in fake_data.A_WNIDS}
    assert load("imagenet", "sketch", paths).class_subset is None
    v2 = load("imagenet", "v2", paths)
    assert sorted(set(v2.labels.tolist())) == list(range(6))  # folders are class indices
    assert len(load("imagenet", "test", paths).labels) == 6 * 2
    train, val = load("imagenet", "train", paths), load("imagenet", "val", paths)
    assert len(train.labels) + len(val.labels) == 6 * 5 and len(val.labels) == 6


def test_subset_accuracy_takes_argmax_over_the_subset_only():
    logits = np.array([[9.0, 1.0, 0.0, 2.0], [0.0, 0.5, 9.0, 0.1]])
    labels = np.array([3, 1])
    assert subset_accuracy(logits, labels) == 0.0
    assert subset_accuracy(logits, labels, (1, 3)) == 1.0


def test_breeds_source_and_target_subclasses(paths):
    wnids = fake_data.IMAGENET_WNIDS
    train = load("living17", "train", paths)
    target = load("living17", "target", paths)
    test = load("living17", "test", paths)
    assert train.class_names == ("fish", "shark")

    def wnid(path):
        return path.split("/")[-2]

    assert {wnid(p) for p in train.paths} <= {wnids[0], wnids[1], wnids[3]}
    assert {wnid(p) for p in target.paths} == {wnids[2], wnids[4], wnids[5]}
    assert {wnid(p) for p in test.paths} == {wnids[0], wnids[1], wnids[3]}
    assert all("/val/" in p for p in (*target.paths, *test.paths))
    shark = [
        label for p, label in zip(target.paths, target.labels, strict=True) if wnid(p) == wnids[4]
    ]
    assert set(shark) == {1}
    assert len(load("entity30", "target", paths).class_names) == 3


# --- FMoW ---------------------------------------------------------------------------------


def test_fmow_regions_and_years_as_wilds_splits_them(paths):
    categories = readers.FMOW_CATEGORIES

    def rows(split):
        data = load("fmow", split, paths)
        return [int(p.split("rgb_img_")[1].split(".")[0]) for p in data.paths], data

    train_rows, train = rows("train")
    assert train_rows == [0, 1, 2]
    assert [categories[i] for i in train.labels] == ["airport", "zoo", "dam"]
    assert rows("val")[0] == [6]  # WILDS id_val, Americas
    assert rows("test")[0] == [7]  # WILDS (OOD-years) val, Americas
    assert rows("africa")[0] == [8, 9]
    assert rows("europe")[0] == [10]
    assert len(train.class_names) == 62


# --- missing data -------------------------------------------------------------------------


def test_missing_data_names_the_file_and_the_rule(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load("cifar10_stl", "stl", {"cifar10": str(tmp_path), "stl10": str(tmp_path)})
    message = str(error.value)
    assert "cifar-10-batches-bin/data_batch_1.bin: file missing" in message
    assert "paths.cifar10" in message and "rule download_dataset" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError) as error:
        load("cifar10_stl", "test", {"cifar10": "resources/datasets/cifar10"})
    assert "fetched by rule download_dataset: remove resources/datasets/cifar10" in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"paths\.imagenet"):
        load("imagenet", "test", {"imagenet": str(tmp_path)})


# --- bring your own: imagefolder ------------------------------------------------------------


def test_imagefolder_class_folders_and_csv_lists(tmp_path):
    root = tmp_path / "mine"
    for split, count in (("train", 5), ("test", 2), ("night", 2)):
        for label, name in enumerate(("cow", "ant")):
            for k in range(count):
                fake_data.save_image(root / split / name / f"{k}.png", value=label * 50)
    for k in range(2):
        fake_data.save_image(root / "fog" / f"{k}.png", value=k)
    (root / "fog.csv").write_text("path,label\nfog/0.png,ant\nfog/1.png,cow\n")
    config = {
        "dataset_settings": {
            "mine": {
                "type": "imagefolder",
                "root": str(root),
                "splits": {"train": "train", "test": "test", "night": "night", "fog": "fog.csv"},
            }
        }
    }
    options = dataset_options(config, "mine")
    assert options["ood_splits"] == ["night", "fog"]

    def get(split):
        return load_split(dataset="mine", split=split, root={}, options=options)

    train, val, fog = get("train"), get("val"), get("fog")
    assert train.class_names == ("ant", "cow")  # sorted class folders of train
    assert len(train.labels) == 8 and len(val.labels) == 2
    assert fog.labels.tolist() == [0, 1]
    assert len(get("night").labels) == 4
    with pytest.raises(ValueError, match="mine"):
        dataset_options({}, "mine")


# --- torch datasets -------------------------------------------------------------------------


def test_toy_sized_arrays_pass_through_unchanged():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    arrays = ImageArrays(images=images, labels=np.arange(4), class_names=("a",) * 4)
    dataset = as_torch_dataset(arrays, preprocess=PRE32, transform="resize")
    reference = ArrayImageDataset(images, np.arange(4))
    assert type(dataset) is ArrayImageDataset
    assert torch.equal(dataset[2][0], reference[2][0])


def test_files_and_arrays_become_uint8_tensors_of_the_input_size(paths):
    preprocess = Preprocess(input_size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    stl = load("cifar10_stl", "stl", paths)
    r = load("imagenet", "r", paths)
    for data in (stl, r, load("domainnet", "train", paths)):
        for transform in (
            "resize",
            "resize_center_crop",
            "random_resized_crop",
            "resize_random_crop",
        ):
            dataset = as_torch_dataset(data, preprocess=preprocess, transform=transform)
            image, label = dataset[0]
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 24, 24)
            assert int(label) == int(data.labels[0])
    assert as_torch_dataset(r, preprocess=preprocess).class_subset == r.class_subset


def test_probe_scores_a_split_over_its_class_subset(tmp_path):
    from robustft.features import write_features
    from robustft.probe import run_probe

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 5
    centres[2] = centres[0] + 1.0  # class 2 lies next to class 0
    files = {}
    shifted = np.repeat(centres[2][None], 10, axis=0)  # class-2-looking images labelled 0
    for split, features, labels, attrs in (
        ("train", None, np.repeat(np.arange(4), 20), {}),
        ("val", None, np.repeat(np.arange(4), 5), {}),
        ("plain", shifted, np.zeros(10, dtype=np.int64), {}),
        ("r", shifted, np.zeros(10, dtype=np.int64), {"class_subset": [0, 1]}),
        # ObjectNet-like: classes 0 and 2 form one group, so predicting 2 for a 0 is right.
        (
            "grouped",
            shifted,
            np.zeros(10, dtype=np.int64),
            {"class_subset": [0, 2, 3], "class_groups": [0, 1, 0, 3]},
        ),
    ):
        if features is None:
            features = centres[labels] + rng.normal(size=(len(labels), 8)) * 0.1
        files[split] = tmp_path / f"{split}.h5"
        write_features(
            files[split],
            features=features.astype(np.float32),
            labels=labels,
            attrs={"num_classes": 4, **attrs},
        )
    metrics = run_probe(feature_files=files, out_dir=tmp_path / "probe", c_grid=[1.0], max_iter=500)
    assert metrics["id_val"] == 1.0
    assert metrics["ood_plain"] == 0.0  # argmax over all 4 classes picks class 2
    assert metrics["ood_r"] == 1.0  # argmax over classes {0, 1} only
    assert metrics["ood_grouped"] == 1.0


def test_finetuning_runs_on_image_files_with_class_subsets(paths, tmp_path):
    """run_finetune on file-backed splits: train transform, eval transforms, R/A subsets."""
    import pandas as pd

    from robustft.models import build_backbone, save_backbone
    from robustft.stages import run_finetune

    torch.manual_seed(0)
    save_backbone(
        backbone=build_backbone(architecture="toyresnet", kwargs={"width": 4}),
        out_dir=tmp_path / "backbone",
        architecture="toyresnet",
        kwargs={"width": 4},
        preprocess=PRE32,
    )
    metrics = run_finetune(
        method="ft",
        dataset="imagenet",
        data_root=paths,
        data_options=dataset_options(ALLOW_ALL, "imagenet"),
        model_dir=tmp_path / "backbone",
        out_dir=tmp_path / "run",
        ood_splits=["r", "a"],
        lr=0.01,
        seed=0,
        epochs=1,
        batch_size=4,
        momentum=0.9,
        weight_decay=0.0,
        bn="frozen",
        augment=False,
        progress=False,
    )
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {"id_val", "id_test", "ood_r", "ood_a"} <= set(history.columns)
    assert 0.0 <= metrics["ood_a"] <= 1.0 and len(history) == 2


def test_objectnet_maps_its_classes_onto_imagenet_groups(tmp_path):
    imagenet = fake_data.write_imagenet_1000(tmp_path / "imagenet")
    for folder in (imagenet / "train").iterdir():
        (folder / "0.jpg").touch()  # a folder without image files is not a class
    roots = {
        "imagenet": str(imagenet),
        "objectnet": str(fake_data.write_objectnet(tmp_path / "objectnet")),
    }
    assert "objectnet" not in dataset_options({}, "imagenet")["ood_splits"]
    config = {"paths": roots}
    assert dataset_options(config, "imagenet")["ood_splits"][-1] == "objectnet"
    data = load_split(
        dataset="imagenet",
        split="objectnet",
        root=roots,
        options=dataset_options(config, "imagenet"),
    )
    clock, banana = 409, 954
    assert data.labels.tolist() == [clock, clock, banana, banana]  # chair: not in ImageNet
    assert data.class_subset == (409, 530, 954)
    groups = data.class_groups
    assert groups[409] == groups[530] != groups[954] and len(set(groups)) == 1000 - 1
    logits = np.zeros((4, 1000))
    logits[:, 0] = 100.0  # outside the subset: ignored
    logits[[0, 1], [530, 954]] = 5.0  # a digital clock for an alarm clock: right; banana: wrong
    logits[[2, 3], [954, 409]] = 5.0
    assert subset_accuracy(logits, data.labels, data.class_subset, groups) == 0.5
    dataset = as_torch_dataset(data, preprocess=PRE32)
    assert dataset.border == 2 and tuple(dataset[0][0].shape) == (3, 32, 32)
