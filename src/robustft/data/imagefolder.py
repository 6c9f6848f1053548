"""Bring-your-own data: the `imagefolder` dataset type.

Each split is either a folder of class folders (`<split dir>/<class>/<image>`) or a list file
(`.csv` or `.txt`) of `path,label` lines, paths relative to the dataset's root. Labels are class
names, or integer ids when `classes` is given. Classes: `classes` from the config, else the
sorted class folders (or label names) of `train`. A split without `val` gets one carved from
`train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from robustft.data import readers


def _class_names(root: Path, train: str, classes: list[str] | None) -> tuple[str, ...]:
    if classes:
        return tuple(classes)
    path = root / train
    if path.is_dir():
        return tuple(readers.list_class_folders(path))
    _, labels = readers.read_path_label_csv(path, image_root=root, classes=None)
    return tuple(sorted(set(labels)))


def _read(root: Path, entry: str, names: tuple[str, ...], *, dataset: str, split: str):
    path = root / entry
    index = {name: i for i, name in enumerate(names)}
    if path.is_dir():
        images = readers.read_class_folders(path, class_to_label=index)
        return list(images.paths), images.labels
    if not path.exists():
        raise FileNotFoundError(f"{path}: split {split!r} of dataset {dataset!r} missing")
    paths, raw = readers.read_path_label_csv(path, image_root=root, classes=names)
    labels = []
    for number, label in enumerate(raw, start=1):
        if label in index:
            labels.append(index[label])
        elif label.isdigit() and int(label) < len(names):
            labels.append(int(label))
        else:
            raise ValueError(f"{path}: entry {number}: label {label!r} is not a class of {dataset}")
    return paths, np.asarray(labels, dtype=np.int64)


def load_imagefolder_split(*, split: str, options: Mapping[str, Any], dataset: str):
    from robustft.data.registry import ImageFiles, carve_val, take

    root = Path(options["root"])
    splits: dict[str, str] = dict(options["splits"])
    if split not in splits and split != "val":
        known = sorted({*splits, "val"} if "val" not in splits else splits)
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; splits: {known}")
    names = _class_names(root, splits["train"], options.get("classes"))
    if split in ("train", "val") and "val" not in splits:
        paths, labels = _read(root, splits["train"], names, dataset=dataset, split="train")
        full = ImageFiles(paths=tuple(paths), labels=labels, class_names=names)
        train_index, val_index = carve_val(
            labels, fraction=float(options["val_fraction"]), seed=int(options["split_seed"])
        )
        return take(full, train_index if split == "train" else val_index)
    paths, labels = _read(root, splits[split], names, dataset=dataset, split=split)
    return ImageFiles(paths=tuple(paths), labels=labels, class_names=names)
