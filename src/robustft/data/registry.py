"""The registry of settings: which splits a dataset has and how to read one.

Split names: `train`, `val`, `test` are in-distribution (ID); every other split is an
out-of-distribution (OOD) test set, named after its domain or source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ID_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]


def split_column(split: str) -> str:
    """History/metrics column of a split: id_val, id_test, ood_<name>."""
    return f"id_{split}" if split in ID_SPLITS else f"ood_{split}"


def dataset_files(dataset: str, *, root: str | Path) -> dict[str, Path]:
    """The files a dataset's reader needs, relative to its resource folder."""
    root = Path(root)
    if dataset == "toyshift":
        return {"task": root / "task.h5", "pretrain": root / "pretrain.h5"}
    raise ValueError(f"unknown dataset {dataset!r}; known: toyshift")


def load_split(*, dataset: str, split: str, root: str | Path) -> ImageArrays:
    """Images and labels of one split, labels already in the ID label space."""
    if dataset == "toyshift":
        from robustft.data import toyshift

        task = dataset_files(dataset, root=root)["task"]
        arrays = toyshift.read_split(task, split)
        return ImageArrays(
            images=arrays.images,
            labels=arrays.labels,
            class_names=tuple(toyshift.class_names(task)),
        )
    raise ValueError(f"unknown dataset {dataset!r}; known: toyshift")
