"""The data fingerprint: changes exactly when a dataset's files do, and costs a folder stat
per folder once its listing is cached."""

import os

import numpy as np
from PIL import Image

from robustft.data import fingerprint
from robustft.data.fingerprint import dataset_manifest, tree_fingerprint


def write_tree(root):
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            for k in range(3):
                path = root / split / label / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(path)
    (root / "lists").mkdir()
    (root / "lists" / "extra.csv").write_text("train/cat/0.png,cat\n")
    return root


def age(root, seconds=10):
    """Date every file and folder back, as data that has been on disk a while."""
    past = os.stat(root).st_mtime - seconds
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(folder, name), (past, past))
    os.utime(root, (past, past))


def fp(root, tmp_path):
    return tree_fingerprint(root=root, cache_file=tmp_path / "cache.json").fingerprint


def test_touching_files_changes_nothing_and_adding_removing_renaming_does(tmp_path):
    root = write_tree(tmp_path / "data")
    age(root)
    first = fp(root, tmp_path)
    os.utime(root / "train" / "cat" / "0.png")
    os.utime(root / "lists" / "extra.csv")
    assert fp(root, tmp_path) == first
    extra = root / "train" / "cat" / "9.png"
    Image.new("RGB", (8, 8)).save(extra)
    added = fp(root, tmp_path)
    assert added != first
    extra.rename(root / "train" / "dog" / "9.png")
    assert fp(root, tmp_path) not in (first, added)
    (root / "train" / "dog" / "9.png").unlink()
    assert fp(root, tmp_path) == first


def test_a_list_file_edited_in_place_to_the_same_size_changes_it(tmp_path):
    root = write_tree(tmp_path / "data")
    age(root)
    first = fp(root, tmp_path)
    (root / "lists" / "extra.csv").write_text("train/dog/0.png,cat\n")  # same length
    assert fp(root, tmp_path) != first


def test_hidden_folders_and_files_are_no_part_of_the_data(tmp_path):
    root = write_tree(tmp_path / "data")
    first = fp(root, tmp_path)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(b"junk")
    (root / "test" / ".DS_Store").write_bytes(b"junk")
    assert fp(root, tmp_path) == first


def test_a_cached_listing_is_reused_until_the_folder_changes(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "data")
    age(root)
    fp(root, tmp_path)
    listed = []
    original = fingerprint._list_folder
    monkeypatch.setattr(
        fingerprint, "_list_folder", lambda path, *a: listed.append(path) or original(path, *a)
    )
    fp(root, tmp_path)
    assert listed == []
    Image.new("RGB", (8, 8)).save(root / "test" / "dog" / "7.png")
    fp(root, tmp_path)
    assert listed == [str(root / "test" / "dog")]


def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path):
    root = write_tree(tmp_path / "data")
    age(root)
    first = fp(root, tmp_path)
    (tmp_path / "cache.json").write_text("{not json")
    assert fp(root, tmp_path) == first


def test_the_manifest_counts_images_and_names_missing_data(tmp_path):
    root = write_tree(tmp_path / "data")
    manifest = dataset_manifest(dataset="mine", trees={"root": str(root)}, cache_dir=tmp_path)
    assert manifest["trees"]["root"]["images"] == 12
    assert list(manifest["trees"]["root"]["data_files"]) == ["lists/extra.csv"]
    assert len(manifest["fingerprint"]) == 64
    try:
        dataset_manifest(dataset="mine", trees={"root": str(tmp_path / "gone")})
    except FileNotFoundError as error:
        assert str(error).startswith(f"{tmp_path / 'gone'}: data of dataset 'mine'")
    else:
        raise AssertionError("a missing root must fail")
