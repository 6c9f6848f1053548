"""The split types every reader returns, and the helpers that cut them.

A split is either `ImageArrays` (uint8 images in memory: the toy data, CIFAR, STL) or
`ImageFiles` (paths decoded later, in DataLoader workers). `train`, `val`, `test` are the
in-distribution (ID) splits; every other split is an out-of-distribution (OOD) test set.

A module of its own so that the registry and the imagefolder reader both import it at the top
(each used to need the other). numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

ID_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageArrays:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    # ID class indices this split is scored over (argmax over these only); None = all.
    class_subset: tuple[int, ...] | None = None
    # Group of every ID class: a prediction is right when its group is the label's (ObjectNet:
    # several ImageNet classes make one ObjectNet class); None = the classes themselves.
    class_groups: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ImageFiles:
    paths: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    class_subset: tuple[int, ...] | None = None
    class_groups: tuple[int, ...] | None = None
    border: int = 0  # pixels cropped off every side before the transform (ObjectNet: 2)


Split = ImageArrays | ImageFiles


def split_column(split: str) -> str:
    """History/metrics column of a split: id_val, id_test, ood_<name>."""
    return f"id_{split}" if split in ID_SPLITS else f"ood_{split}"


def carve_val(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a stratified random `fraction` of each class goes to val
    (at least one image of every class with two or more), the same for the same seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = len(members)
        take = min(count - 1, max(1, round(fraction * count))) if count > 1 else 0
        val.append(rng.permutation(members)[:take])
    val_index = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_index] = False
    return np.flatnonzero(train_mask), val_index


def take(split: Split, index: np.ndarray) -> Split:
    if isinstance(split, ImageArrays):
        return replace(split, images=split.images[index], labels=split.labels[index])
    return replace(split, paths=tuple(split.paths[i] for i in index), labels=split.labels[index])


# Run-folder key of a fine-tuning run trained on a larger ID training set than `train`
# (lr0.03-trainpc1150: 1150 images per class): the first that many of each class from `train`
# and then the dataset's pool of extra ID training images (toyshift's `baseline_train`). Its
# val, test and OOD splits are the dataset's own, so the baseline line of ER applies to it.
TRAIN_PER_CLASS_KEY = "trainpc"


def first_per_class(parts: Sequence[ImageArrays], *, per_class: int) -> ImageArrays:
    """The first `per_class` images of every class of `parts` taken in order (the task's own
    training images first, then a pool's), in that order: a smaller size is a subset of a
    larger one. Every class must have that many."""
    if not parts:
        raise ValueError("no splits to take images from")
    names = parts[0].class_names
    if any(part.class_names != names for part in parts):
        raise ValueError("the splits name different classes")
    labels = np.concatenate([part.labels for part in parts])
    counts = np.bincount(labels, minlength=len(names))
    if per_class < 1 or counts.min() < per_class:
        raise ValueError(
            f"{per_class} images per class asked for; the splits hold {int(counts.min())} "
            f"of the rarest class ({names[int(counts.argmin())]!r})"
        )
    # Rank of each image within its class, in order: keep ranks below per_class.
    rank = np.zeros(len(labels), dtype=np.int64)
    for label in range(len(names)):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    keep = np.flatnonzero(rank < per_class)
    images = np.concatenate([part.images for part in parts])
    return replace(parts[0], images=images[keep], labels=labels[keep])
