"""Expected sizes of every data source, `allow_subset`, and the official ImageNet label spaces.

A copy is counted from directory listings and file sizes; one that differs from the published
size is refused in one line (source, split, both counts, likely cause), unless the config's
`allow_subset` names the source. Labels come from fixed official lists, never from the folders
a copy holds.
"""

from __future__ import annotations

import json
import logging
import pkgutil
import shutil

import fake_data
import pandas as pd
import pytest

from robustft.data.download import DownloadError, fetch_source
from robustft.data.registry import (
    SETTINGS,
    dataset_options,
    imagenet_wnids,
    load_split,
    source_splits,
    split_column,
)
from robustft.data.sources import SOURCES, SizeMismatch, check_sizes, describe_copy
from robustft.report import aggregate_dataset

WRITERS = {
    "cifar10": fake_data.write_cifar10,
    "stl10": fake_data.write_stl10,
    "cifar101": fake_data.write_cifar101,
    "domainnet": fake_data.write_domainnet,
    "breeds": fake_data.write_breeds,
    "fmow": fake_data.write_fmow,
    "imagenet": fake_data.write_imagenet,
    "objectnet": fake_data.write_objectnet,
    "imagenet_v2": lambda root: fake_data.write_imagenet_ood(
        root,
        folder="imagenetv2-matched-frequency-format-val",
        classes=tuple(str(i) for i in range(6)),
    ),
    "imagenet_r": lambda root: fake_data.write_imagenet_ood(
        root, folder="imagenet-r", classes=fake_data.R_WNIDS
    ),
    "imagenet_a": lambda root: fake_data.write_imagenet_ood(
        root, folder="imagenet-a", classes=fake_data.A_WNIDS
    ),
    "imagenet_sketch": lambda root: fake_data.write_imagenet_ood(
        root, folder="sketch", classes=fake_data.IMAGENET_WNIDS
    ),
}


def timm_list(name: str) -> list[str]:
    """A fixed list as timm ships it (read through timm's package data, independently)."""
    data = pkgutil.get_data("timm", f"data/_info/{name}")
    return data.decode().split()


def test_every_registered_source_has_a_fake_copy_and_expected_sizes():
    assert set(WRITERS) == set(SOURCES)
    for name, source in SOURCES.items():
        assert source.short and source.sizes, name
    # The published figures (REFERENCES.md, "Data facts").
    published = {
        ("imagenet", "train"): (1_281_167, 1000),
        ("imagenet", "val"): (50_000, 1000),
        ("imagenet_v2", "test"): (10_000, 1000),
        ("imagenet_r", "test"): (30_000, 200),
        ("imagenet_a", "test"): (7500, 200),
        ("imagenet_sketch", "test"): (50_889, 1000),
        ("objectnet", "test"): (50_000, 313),
        ("cifar10", "train"): (50_000, None),
        ("cifar10", "test"): (10_000, None),
        ("cifar101", "test"): (2000, None),
        ("stl10", "test"): (8000, None),
        ("domainnet", "real_test"): (6943, 40),
        ("domainnet", "sketch_train"): (5537, 40),
    }
    for (source, split), (images, classes) in published.items():
        size = next(s for s in SOURCES[source].sizes if s.split == split)
        assert (size.images, size.classes) == (images, classes), (source, split)
    # Every split a built-in setting reads is one the checks count.
    for dataset, setting in SETTINGS.items():
        for split in ("train", "val", "test", *setting.ood_sources):
            for source, part in source_splits(dataset, split):
                assert part in {s.split for s in SOURCES[source].sizes}, (dataset, split)


@pytest.mark.parametrize("source", sorted(WRITERS))
def test_a_small_copy_is_refused_in_one_line_unless_allowed(source, tmp_path, caplog):
    root = WRITERS[source](tmp_path / source)
    with pytest.raises(SizeMismatch) as refused:
        describe_copy(source=source, root=root)
    message = str(refused.value)
    assert "\n" not in message and SOURCES[source].short in message
    assert f"allow_subset: [{source}]" in message

    caplog.set_level(logging.WARNING)
    described = describe_copy(source=source, root=root, allow_subset=True)
    assert described["complete"] is False
    first = next(
        (split, counts) for split, counts in described["sizes"].items() if not counts["complete"]
    )
    split, counts = first
    assert message.startswith(f"{SOURCES[source].short} {split}: ")
    # Both counts of the first incomplete split, as the JSON of rule check_dataset records.
    if (
        counts["expected_classes"] is not None
        and counts["found_classes"] != counts["expected_classes"]
    ):
        assert f"{counts['found_classes']} of {counts['expected_classes']} classes" in message
    else:
        assert f"{counts['found_images']:,} of {counts['expected_images']:,} images" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(message) for w in warnings)
    json.dumps(described)  # what check_dataset writes


def test_a_missing_listed_image_is_named_as_an_incomplete_copy(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    root = fake_data.write_fmow(tmp_path / "fmow")
    (root / "images" / "rgb_img_1.png").unlink()  # a WILDS train image of the metadata
    sizes = check_sizes(source="fmow", root=root, allow_subset=True)
    assert sizes["train"]["expected_images"] == 4 and sizes["train"]["found_images"] == 3
    root = fake_data.write_domainnet(tmp_path / "domainnet")
    (root / "real" / "cat" / "real_test_000.jpg").unlink()
    sizes = check_sizes(source="domainnet", root=root, allow_subset=True)
    assert sizes["real_test"]["found_images"] == 5 and sizes["real_test"]["expected_images"] == 6943
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("FMoW train: ") and "1 listed images missing" in w for w in warnings)
    assert any(
        w.startswith("DomainNet real_test: ") and "1 listed images missing" in w for w in warnings
    )


def test_imagenet_with_7_class_folders_is_refused_naming_imagenet_and_7(tmp_path):
    root = fake_data.write_imagenet(tmp_path / "imagenet", classes=7)

    def load(config, split="train"):
        options = dataset_options(config, "imagenet")
        return load_split(dataset="imagenet", split=split, root={"imagenet": root}, options=options)

    for split in ("train", "val", "test"):
        with pytest.raises(SizeMismatch) as refused:
            load({}, split)
        message = str(refused.value)
        assert message.startswith("ImageNet train: 7 of 1000 classes") and "\n" not in message
        assert "allow_subset: [imagenet]" in message
    with pytest.raises(SizeMismatch, match="ImageNet train: 7 of 1000 classes, 35 of 1,281,167"):
        describe_copy(source="imagenet", root=root)

    data = load({"allow_subset": ["imagenet"]}, "test")
    assert data.class_names == tuple(timm_list("imagenet_synsets.txt"))  # all 1000
    assert sorted(set(data.labels.tolist())) == list(range(7))
    # BREEDS reads the same ImageNet: refused too.
    breeds = fake_data.write_breeds(tmp_path / "breeds")
    with pytest.raises(SizeMismatch, match="ImageNet train: 7 of 1000"):
        load_split(
            dataset="living17",
            split="train",
            root={"imagenet": root, "breeds": breeds},
            options=dataset_options({}, "living17"),
        )


def test_labels_come_from_the_official_lists_not_the_folders(tmp_path):
    official = timm_list("imagenet_synsets.txt")
    assert imagenet_wnids() == official
    # A copy that lacks ImageNet's first classes: labels stay where ImageNet puts them.
    root = tmp_path / "imagenet"
    for wnid in (official[5], official[999]):
        for split in ("train", "val"):
            fake_data.save_image(root / split / wnid / "0.JPEG", value=1)
    paths = {
        "imagenet": root,
        "imagenet_r": WRITERS["imagenet_r"](tmp_path / "r"),
        "imagenet_a": WRITERS["imagenet_a"](tmp_path / "a"),
    }
    options = dataset_options(
        {"allow_subset": ["imagenet", "imagenet_r", "imagenet_a"]}, "imagenet"
    )

    def load(split):
        return load_split(dataset="imagenet", split=split, root=paths, options=options)

    assert load("test").labels.tolist() == [5, 999]
    r, a = load("r"), load("a")
    r_indices = [int(i) for i in timm_list("imagenet_r_indices.txt")]
    a_indices = [int(i) for i in timm_list("imagenet_a_indices.txt")]
    assert list(r.class_subset) == sorted(r_indices) and len(r.class_subset) == 200
    assert list(a.class_subset) == sorted(a_indices) and len(a.class_subset) == 200
    assert [official[i] for i in r.class_subset] == timm_list("imagenet_r_synsets.txt")
    assert set(r.labels.tolist()) == {official.index(w) for w in fake_data.R_WNIDS} == {1, 2, 4}
    assert set(a.labels.tolist()) == {official.index(w) for w in fake_data.A_WNIDS}
    # R/A copies with 3 and 2 of their 200 class folders: refused unless allowed.
    with pytest.raises(SizeMismatch, match=r"ImageNet-R test: 3 of 200 classes"):
        load_split(
            dataset="imagenet", split="r", root=paths, options=dataset_options({}, "imagenet")
        )


def test_a_folder_outside_the_official_classes_is_an_error_naming_it(tmp_path):
    root = WRITERS["imagenet_r"](tmp_path / "r")
    fake_data.save_image(root / "imagenet-r" / "n01440764" / "0.jpg", value=1)  # not in R
    with pytest.raises(ValueError, match=r"imagenet-r/n01440764 is not one of the 200 official"):
        describe_copy(source="imagenet_r", root=root, allow_subset=True)
    paths = {"imagenet": fake_data.write_imagenet(tmp_path / "imagenet"), "imagenet_r": root}
    options = dataset_options({"allow_subset": ["imagenet", "imagenet_r"]}, "imagenet")
    with pytest.raises(ValueError, match=r"imagenet-r/n01440764 is not one of the 200 official"):
        load_split(dataset="imagenet", split="r", root=paths, options=options)


def test_imagenet_val_in_the_flat_layout_of_the_official_tar_is_named_as_such(tmp_path):
    """ILSVRC2012_img_val.tar unpacks into one folder of 50,000 images: said as that, not as
    "0 of 1000 classes: an incomplete copy". A hidden folder beside the classes is no class."""
    root = fake_data.write_imagenet(tmp_path / "imagenet", classes=3)
    for image in sorted((root / "val").glob("*/*.JPEG")):
        image.rename(root / "val" / image.name)
        if not any(image.parent.iterdir()):
            image.parent.rmdir()
    fake_data.save_image(root / "train" / ".ipynb_checkpoints" / "x.JPEG", value=1)
    with pytest.raises(SizeMismatch) as refused:
        describe_copy(source="imagenet", root=root, allow_subset=True)
    message = str(refused.value)
    assert "\n" not in message and str(root / "val") in message
    assert "6 images but no class folders: the flat layout" in message
    options = dataset_options({"allow_subset": ["imagenet"]}, "imagenet")
    with pytest.raises(ValueError, match="6 images but no class folders: the flat layout"):
        load_split(dataset="imagenet", split="test", root={"imagenet": root}, options=options)


def test_a_download_holding_fewer_images_is_refused_after_download(tmp_path):
    from test_download import Server, imagenet_r_tar

    server = Server()
    try:
        server.files["r.tar"] = imagenet_r_tar(tmp_path)
        out, cache = tmp_path / "datasets" / "imagenet_r", tmp_path / "cache"
        urls = {"imagenet-r.tar": server.url("r.tar")}
        with pytest.raises(DownloadError) as refused:
            fetch_source(source="imagenet_r", out_dir=out, cache_dir=cache, urls=urls)
        message = str(refused.value)
        assert "ImageNet-R test: 3 of 200 classes, 6 of 30,000 images" in message
        assert str(out) in message and ".partial" not in message and "\n" not in message
        assert not out.exists() and not list(out.parent.glob("*partial*"))
        assert not (cache / "checksums.json").exists()  # a short copy never becomes the reference

        manifest = fetch_source(
            source="imagenet_r", out_dir=out, cache_dir=cache, urls=urls, allow_subset=True
        )
        assert manifest["complete"] is False
        recorded = json.loads((out / "MANIFEST.json").read_text())
        assert recorded["sizes"]["test"] == {
            "expected_images": 30_000,
            "found_images": 6,
            "expected_classes": 200,
            "found_classes": 3,
            "complete": False,
        }
    finally:
        server.close()


def test_tables_mark_the_splits_read_from_a_subset_copy(tmp_path):
    r = WRITERS["imagenet_r"](tmp_path / "r")
    check = tmp_path / "imagenet_r.json"
    check.write_text(json.dumps(describe_copy(source="imagenet_r", root=r, allow_subset=True)))
    sketch = tmp_path / "sketch"
    shutil.copytree(WRITERS["imagenet_sketch"](tmp_path / "s"), sketch)
    (sketch / "MANIFEST.json").write_text(json.dumps({"source": "imagenet_sketch"}))  # old
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({"id_val": 0.5, "id_test": 0.5, "ood_r": 0.25, "ood_sketch": 0.1})
    )
    check_splits = {
        split_column(split): source_splits("imagenet", split)
        for split in ("train", "val", "test", "r", "sketch")
    }
    table = aggregate_dataset(
        dataset="imagenet",
        sources={"zeroshot/vit": str(metrics)},
        ood_splits=["r", "sketch"],
        csv_path=tmp_path / "t.csv",
        md_path=tmp_path / "t.md",
        data_checks={"imagenet_r": str(check), "imagenet_sketch": str(sketch)},
        check_splits=check_splits,
    )
    note = "ood_r: subset copy of imagenet_r test (6 of 30,000 images; allow_subset)"
    assert table["subset"].tolist() == [note]
    assert pd.read_csv(tmp_path / "t.csv")["subset"].tolist() == [note]
    markdown = (tmp_path / "t.md").read_text()
    assert markdown.rstrip().endswith(f"- imagenet, {note}")
    # Complete copies: the table keeps its shape.
    plain = aggregate_dataset(
        dataset="imagenet",
        sources={"zeroshot/vit": str(metrics)},
        ood_splits=["r", "sketch"],
        csv_path=tmp_path / "p.csv",
        md_path=tmp_path / "p.md",
        data_checks={"imagenet_sketch": str(sketch)},
        check_splits=check_splits,
    )
    assert "subset" not in plain and "subset" not in (tmp_path / "p.md").read_text()
